"""python -m full.train end to end on the tiny presets (CPU): the three modes, bit-exact resume, one-line
errors, NaN stop, mixed-precision boundary condition."""
import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import cm
import full.train
from full import checkpoints
from full.model import make_model
from full.networks import NCSNppConfig
from full.presets import resolve

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}



def cli(*args, check=True):
    p = subprocess.run([sys.executable, "-m", "full.train", *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env=ENV)
    if check and p.returncode:
        raise AssertionError(p.stderr[-2000:])
    return p


def one_line_error(stderr: str) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-1500:]
    return lines[0]


@pytest.fixture(scope="session")
def teacher(tmp_path_factory):
    """A tiny EDM teacher trained through the CLI (also the edm end-to-end test)."""
    out = tmp_path_factory.mktemp("edm")
    cli("--preset", "tiny-edm", f"run.out={str(out)!r}", "opt.steps=10", "run.ckpt_every=5")
    return out


def test_edm_run_writes_checkpoints_grid_and_log(teacher):
    assert [p.name for p in checkpoints.list_checkpoints(teacher)] == ["ckpt-0000005.pt", "ckpt-0000010.pt"]
    assert (teacher / "export.pt").is_file() and (teacher / "grid-heun-0000010.png").is_file()
    state = checkpoints.load(teacher / "ckpt-0000010.pt")
    assert state["step"] == 10 and state["target"] is None and set(state["ema"]) == {0.99, 0.999}
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in state["model"])


@pytest.mark.parametrize("preset", ["tiny-cd", "tiny-ct"])
def test_cd_ct_runs(preset, teacher, tmp_path):
    p = cli("--preset", preset, f"run.out={str(tmp_path)!r}", "opt.steps=6", "run.log_every=1",
            f"run.teacher={str(teacher / 'export.pt')!r}")
    assert "done: step 6" in p.stdout
    assert (tmp_path / "ckpt-0000006.pt").is_file()
    assert {"grid-1step-0000006.png", "grid-2step-0000006.png"} <= {q.name for q in tmp_path.iterdir()}
    log = [eval(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert all(k in log[0] for k in ("loss", "N", "mu", "lr", "img/s", "sec"))
    if preset == "tiny-ct":  # N(k) = ⌈√(k/6 (21² - 2²) + 2²) - 1⌉ + 1, e.g. N(1) = ⌈√76.83 - 1⌉ + 1 = 9
        assert [r["N"] for r in log] == [2, 9, 13, 15, 18, 20]
        assert log[0]["mu"] == pytest.approx(0.81)  # the official μ(0) = μ0^(s0/(s0-1)) = 0.9²
    else:  # CD with μ = 0: θ⁻ is θ itself under stop-grad, so no copy is kept or saved
        state = checkpoints.load(tmp_path / "ckpt-0000006.pt")
        assert state["config"]["cm"]["mu"] == 0.0
        assert state["target"] is None


@pytest.mark.parametrize("preset", ["tiny-cd", "tiny-ct"])
def test_student_starts_from_teacher(preset, teacher, tmp_path):
    """CD starts from its teacher; CT does when given one (OCM's CT launch scripts), and never calls it."""
    cfg = resolve(preset, [f"run.out={str(tmp_path)!r}", f"run.teacher={str(teacher / 'export.pt')!r}"])
    t = full.train.load_teacher(cfg, torch.device("cpu"))
    tr = full.train.Trainer(cfg, torch.device("cpu"), t)
    for a, b in zip(tr.model.net.state_dict().values(), t.net.state_dict().values()):
        assert torch.equal(a, b)
    assert tr.model.sigma_min == cfg.cm.sigma_min and t.sigma_min == 0.0  # f_θ vs EDM's D
    assert (tr.teacher is None) == (preset == "tiny-ct")


def official_ema_and_scales(k, K, s0, s1, mu0):
    """openai/consistency_models' create_ema_and_scales_fn ('adaptive', 'progressive'), written again:
    scales = max(⌈√(k/K ((s1+1)² - s0²) + s0²) - 1⌉, 1); μ = exp(s0 ln μ0 / scales); N = scales + 1."""
    scales = max(math.ceil(math.sqrt(k / K * ((s1 + 1) ** 2 - s0 ** 2) + s0 ** 2) - 1), 1)
    return scales + 1, math.exp(-(-math.log(mu0) * s0) / scales)


@pytest.mark.parametrize("preset", ["cifar10-ct", "imagenet64-ct", "lsun256-ct"])
def test_ct_presets_use_the_official_curriculum(preset):
    cfg = resolve(preset)
    K, c = cfg.opt.steps, cfg.cm
    for k in (0, 1, 12_345, K // 8, K // 2, K - 1, K):
        N, mu = cm.schedule(cfg.cm, k, K)[:2]
        N_ref, mu_ref = official_ema_and_scales(k, K, c.s0, c.s1, c.mu0)
        assert N == N_ref and mu == pytest.approx(mu_ref, rel=1e-12)


def test_presets_follow_the_official_runs():
    """Literals from openai/consistency_models scripts/launch.sh and consistency_models_cifar10 configs."""
    get = lambda name: resolve(name)
    for name in ("cifar10-edm", "cifar10-cd-lpips", "cifar10-cd-l2", "cifar10-cd-l1", "cifar10-ct"):
        assert get(name).opt.precision == "fp32"  # JAX, fp32
    for name in ("imagenet64-edm", "imagenet64-edm-ocm", "imagenet64-cd-lpips", "imagenet64-cd-l2",
                 "imagenet64-ct", "lsun256-edm", "lsun256-cd-lpips", "lsun256-cd-l2", "lsun256-ct"):
        cfg = get(name)
        assert cfg.opt.precision == "fp16"  # --use_fp16 True
        assert cfg.ema.for_eval() == 0.9999432189950708  # the rate the paper evaluates, 0.999943
    assert get("cifar10-ct").ema.for_eval() == 0.9999 and get("cifar10-cd-lpips").ema.for_eval() == 0.9999
    assert get("cifar10-edm").opt.steps == 400_000
    assert get("cifar10-cd-l1").opt.lr == 2e-4 and get("cifar10-cd-l1").cm.metric == "l1"
    l2 = get("lsun256-cd-l2")
    assert (l2.run.ts, l2.run.grid_steps, l2.cm.metric, l2.cm.N, l2.cm.mu) == \
        ((0, 18, 39), 40, "l2", 40, 0.95)
    for name, batch in (("imagenet64-edm-ocm", 4096), ("lsun256-edm", 256)):
        o = get(name)
        got = (o.opt.optimizer, o.opt.lr, o.opt.warmup, o.opt.batch, o.net.dropout)
        assert got == ("radam", 1e-4, 0, batch, 0.1)
        assert o.ema.rates == (0.999, 0.9999, 0.9999432189950708)
    # LPIPS: the `lpips` package for CIFAR-10 (JAX runs), piq's average-pooling variant for the ADM runs
    assert get("cifar10-cd-lpips").cm.metric == get("cifar10-ct").cm.metric == "lpips"
    for name in ("imagenet64-cd-lpips", "imagenet64-ct", "lsun256-cd-lpips", "lsun256-ct"):
        assert get(name).cm.metric == "lpips_piq"
    assert get("lsun256-edm").net.num_classes == 0 and not get("lsun256-edm").net.use_scale_shift_norm


class Crash(Exception):
    pass


def _losses(run):
    return {r["step"]: r["loss"] for r in map(eval, (run / "log.jsonl").read_text().splitlines())}


def test_resume_is_bit_exact(tmp_path):
    """Crash right after the step-4 checkpoint, resume, and match an uninterrupted run bit for bit
    (dropout on, so the shared-mask RNG replay and the restored RNG states are exercised)."""
    over = ["opt.steps=8", "run.ckpt_every=4", "run.log_every=1", "net.dropout=0.2", "opt.batch=16",
            "opt.microbatch=8"]
    a, b = tmp_path / "a", tmp_path / "b"
    ra = full.train.train(resolve("tiny-ct", over + [f"run.out={str(a)!r}"]))

    def crash(step, path):
        if step == 4:
            raise Crash

    cfg_b = resolve("tiny-ct", over + [f"run.out={str(b)!r}"])
    with pytest.raises(Crash):
        full.train.train(cfg_b, on_checkpoint=crash)
    assert checkpoints.latest(b).name == "ckpt-0000004.pt"
    rb = full.train.train(cfg_b)  # run.resume='auto' picks up ckpt-0000004.pt
    la, lb = _losses(a), _losses(b)
    assert [la[k] for k in range(5, 9)] == [lb[k] for k in range(5, 9)]
    for name in ("model", "target"):
        sa, sb = getattr(ra["trainer"], name).state_dict(), getattr(rb["trainer"], name).state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    for rate in ra["trainer"].emas:
        sa, sb = ra["trainer"].emas[rate].state_dict(), rb["trainer"].emas[rate].state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def _main_error(capsys, *args) -> str:
    with pytest.raises(SystemExit) as e:
        full.train.main(list(args))
    assert e.value.code != 0
    return one_line_error(capsys.readouterr().err)


def test_cli_errors_are_one_line(tmp_path, capsys):
    p = cli("--preset", "no-such-preset", check=False)
    assert p.returncode != 0 and "tiny-ct" in one_line_error(p.stderr)
    assert "valid fields" in _main_error(capsys, "--preset", "tiny-ct", "opt.bogus=1")
    assert "section one of" in _main_error(capsys, "--preset", "tiny-ct", "--nosection=1")
    assert "wrong type" in _main_error(capsys, "--preset", "tiny-ct", "--opt.lr='fast'")
    assert "unknown cm.metric" in _main_error(capsys, "--preset", "tiny-ct", "cm.metric=l3")
    assert "does not divide" in _main_error(capsys, "--preset", "tiny-ct", "opt.microbatch=5",
                                            f"run.out={str(tmp_path)!r}")
    assert "run.teacher" in _main_error(capsys, "--preset", "tiny-cd", f"run.out={str(tmp_path)!r}")


def test_bad_checkpoints_are_one_line_errors(tmp_path, capsys):
    good = tmp_path / "adm"
    full.train.train(resolve("tiny-ct-adm", [f"run.out={str(good)!r}", "opt.steps=2"]))
    data = (good / "ckpt-0000002.pt").read_bytes()
    cases = {"corrupt": b"not a checkpoint at all" * 10, "truncated": data[: len(data) // 2],
             "another network": data}
    for name, blob in cases.items():
        run = tmp_path / name.replace(" ", "_")
        run.mkdir()
        (run / "ckpt-0000002.pt").write_bytes(blob)  # tiny-ct (NCSN++) resuming from these
        msg = _main_error(capsys, "--preset", "tiny-ct", f"run.out={str(run)!r}", "opt.steps=3")
        assert ("trained with other arch" if name == "another network" else "corrupt or truncated") in msg, (
            msg
        )
    assert "no checkpoint" in _main_error(capsys, "--preset", "tiny-cd", f"run.out={str(tmp_path)!r}",
                                          f"run.teacher={str(tmp_path / 'missing.pt')!r}")
    assert "no ckpt" in _main_error(capsys, "--preset", "tiny-ct", f"run.out={str(tmp_path / 'x')!r}",
                                    "--resume")


def test_nan_loss_stops_without_saving(tmp_path, capsys, monkeypatch):
    calls = {"n": 0}

    def poisoned(*args, **kwargs):  # the loss of cm.py for two steps, then NaN
        calls["n"] += 1  # the first call measures the FLOPs of a step (Trainer.measure_flops)
        return cm.recipe_loss(*args, **kwargs) * (float("nan") if calls["n"] > 3 else 1.0)

    monkeypatch.setattr(full.train, "recipe_loss", poisoned)
    msg = _main_error(capsys, "--preset", "tiny-ct", f"run.out={str(tmp_path)!r}", "run.ckpt_every=1")
    assert "loss is nan at step 3" in msg and "ckpt-0000002.pt" in msg, msg
    assert [p.name for p in checkpoints.list_checkpoints(tmp_path)] == ["ckpt-0000001.pt", "ckpt-0000002.pt"]
    assert checkpoints.load(tmp_path / "ckpt-0000002.pt")["step"] == 2


def test_bf16_autocast_keeps_boundary_condition():
    """f(x, ε) == x exactly under bf16 autocast, NCSN++ with the paper's structure at tiny width."""
    cfg = resolve("tiny-ct")
    cfg = dataclasses.replace(cfg, net=NCSNppConfig.cifar10(), cm=cfg.cm)
    cfg = dataclasses.replace(cfg, net=dataclasses.replace(cfg.net, model_channels=8))
    f = make_model(cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in f.parameters():
            p.add_(0.05 * torch.randn_like(p))  # make F non-zero (its output conv starts at zero)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(f(x, cfg.cm.sigma_min), x)
        y = f(x, 1.0)
    with torch.no_grad():
        y32 = f(x, 1.0)
    assert y.dtype == torch.float32 and not torch.equal(y, y32)  # autocast did run F in bf16


def test_fp16_on_cpu_is_a_clear_error(tmp_path, capsys):
    assert "fp16" in _main_error(capsys, "--preset", "tiny-ct", "opt.precision='fp16'", "run.device='cpu'",
                                 f"run.out={str(tmp_path)!r}")


def test_print_config(capsys):
    full.train.main(["--preset", "cifar10-cd-lpips", "--print-config", "opt.lr=1e-4"])
    out = capsys.readouterr().out
    assert '"lr": 0.0001' in out and '"N": 18' in out and '"arch": "ncsnpp"' in out


def test_teacher_of_other_data_is_refused(teacher, tmp_path, capsys):
    state = torch.load(teacher / "ckpt-0000010.pt", weights_only=True)
    state["config"]["data"]["resolution"] = 16  # as if the teacher had been trained on 16x16 images
    cm.save_checkpoint(tmp_path / "teacher16.pt", state)  # with a checksum of the edited contents
    msg = _main_error(capsys, "--preset", "tiny-cd", f"run.out={str(tmp_path / 'cd')!r}",
                      f"run.teacher={str(tmp_path / 'teacher16.pt')!r}")
    assert "run.teacher was trained with data.resolution=16" in msg, msg


def test_old_name_ts_grid_still_reads():
    """run.grid_steps was run.ts_grid: an override or a stored config with the old name still works."""
    from full.config import config_from_dict
    assert resolve("tiny-ct", ["run.ts_grid=40"]).run.grid_steps == 40
    stored = dataclasses.asdict(resolve("tiny-ct"))
    stored["run"]["ts_grid"] = 30
    del stored["run"]["grid_steps"]
    assert config_from_dict(stored).run.grid_steps == 30


FID_RUN = ["--preset", "tiny-ct", "opt.steps=2", "run.ckpt_every=2", "run.fid_every=2", "run.fid_samples=20"]


def test_fid_every_logs_a_fid_through_full_evaluate(tmp_path, monkeypatch):
    """A stand-in feature extractor (pixel means of 4x4 patches): the FID of the run's samples is logged,
    finite and positive, and the training set's statistics are cached in the run folder."""
    from full import evaluate
    pool = lambda x: torch.nn.functional.avg_pool2d(x.float(), 4).flatten(1)  # noqa: E731  (B, 3*2*2)
    monkeypatch.setattr(evaluate, "make_extractor", lambda device=None: lambda x: (pool(x), pool(x)))
    full.train.main([*FID_RUN, f"run.out={str(tmp_path)!r}"])
    fids = [
        r["fid"] for r in map(json.loads, (tmp_path / "log.jsonl").read_text().splitlines()) if "fid" in r
    ]
    assert len(fids) == 1 and np.isfinite(fids[0]) and fids[0] > 0
    assert (tmp_path / "fid_ref.npz").is_file()


def test_fid_offline_is_one_line_and_training_goes_on(tmp_path, capsys):
    """No Inception weights and no network (this machine): one note, no FID, the run finishes."""
    from full import evaluate
    if evaluate.inception_weights_cache_path().is_file():
        pytest.skip("the Inception weights are cached here: the offline path cannot be shown")
    full.train.main([*FID_RUN, f"run.out={str(tmp_path)!r}"])
    err = capsys.readouterr().err
    assert err.count("FID is off") == 1 and "Traceback" not in err, err
    assert (tmp_path / "export.pt").is_file()


# --- full/: the cifar10-ict / cifar10-ect presets and the tiny runs through full.train -------------

def test_cifar10_presets_carry_the_papers_values():
    from full.presets import resolve
    ict, ect = resolve("cifar10-ict"), resolve("cifar10-ect")
    assert (ict.cm.mode, ict.cm.s0, ict.cm.s1, ict.cm.mu) == ("ict", 10, 1280, 0.0)
    assert ict.cm.metric == "pseudo_huber"
    assert (ict.cm.P_mean, ict.cm.P_std, ict.net.dropout, ict.net.fourier_scale) == (-1.1, 2.0, 0.3, 0.02)
    assert (ict.opt.lr, ict.opt.batch, ict.run.sigmas) == (1e-4, 1024, (80.0, 0.821))
    assert (ect.cm.mode, ect.cm.metric, ect.cm.q, ect.cm.stage_steps, ect.net.dropout) == \
        ("ect", "l2_norm", 2.0, 25_000, 0.2)
    assert (ect.opt.lr, ect.opt.batch, ect.opt.steps, ect.run.sigmas) == (1e-4, 128, 200_000, (80.0, 0.821))
    assert ict.data.random_flip and not ect.data.random_flip  # run_ecm.sh: --augment 0, --xflip off


@pytest.mark.slow
def test_full_train_ict_and_ect(tmp_path):
    import full.train
    from full import checkpoints
    from full.presets import resolve
    full.train.train(resolve("tiny-edm", [f"run.out={str(tmp_path / 'edm')!r}", "opt.steps=4"]), "cpu")
    teacher = tmp_path / "edm" / "export.pt"
    for mode in ("ict", "ect"):
        out = tmp_path / mode
        ect = [f"run.teacher={str(teacher)!r}", "cm.stage_steps=2"] if mode == "ect" else []  # ict: none
        cfg = resolve(f"tiny-{mode}", [f"run.out={str(out)!r}", "opt.steps=4", "run.ckpt_every=4", *ect])
        full.train.train(cfg, "cpu")
        state = checkpoints.load(out / "ckpt-0000004.pt")
        assert state["target"] is None  # μ = 0: θ⁻ is θ under stop-grad, no copy kept
        assert (out / "grid-2step-0000004.png").is_file()
    assert [cm.schedule(cfg.cm, k, 4).stage for k in (0, 1, 2, 5)] == [1, 1, 2, 3]  # ECT's stage a
