"""End-to-end runs of cm.py's trainer and CLI on small settings, and its errors on bad input."""
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import cm

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(dataset="toy", channels=32, batch_size=64, log_every=5, ckpt_every=10, device="cpu")


def run_cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / "cm.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("edm")
    rows = cm.train(cm.config(mode="edm", steps=30, out=str(out), **TINY))
    assert "EDM Heun, 18 levels (35 NFE)" in rows and "data vs data (floor)" in rows
    return out / "ckpt.pt"


@pytest.mark.slow
def test_edm_then_cd_then_ct_end_to_end(teacher, tmp_path):
    assert (teacher.parent / "grid-heun-0000030.png").is_file()
    state = torch.load(teacher, weights_only=True)
    assert state["step"] == 30 and state["config"]["cm"]["mode"] == "edm"
    rows = cm.train(cm.config(mode="cd", teacher=str(teacher), steps=20, out=str(tmp_path / "cd"), **TINY))
    assert {"1-step", "2-step", "teacher Heun, 18 levels (35 NFE)"} <= set(rows)
    cd = torch.load(tmp_path / "cd" / "ckpt.pt", weights_only=True)
    assert cd["config"]["cm"]["mu"] == 0.0  # [CM Tab. 3] CIFAR-10 CD: μ = 0, so θ⁻ is θ under stop-grad
    assert cd["target"] is None  # and no copy of it is kept
    assert not all(torch.equal(cd["ema"][k], v) for k, v in cd["model"].items())
    rows = cm.train(cm.config(mode="ct", steps=20, out=str(tmp_path / "ct"), **TINY))
    assert all(np.isfinite(v) for v in rows.values())
    # --sample on the final checkpoint draws the very grids the run drew at its last step
    r = run_cli("--sample", str(tmp_path / "ct" / "ckpt.pt"), "--out", str(tmp_path / "again"))
    assert r.returncode == 0, r.stderr
    for how in ("1-step", "2-step"):
        name = cm.grid_name(how, 20)
        assert same_image(tmp_path / "ct" / name, tmp_path / "again" / name)
    lines = (tmp_path / "ct" / "log.jsonl").read_text().splitlines()
    assert len(lines) >= 4 and all("loss" in ln for ln in lines)


@pytest.mark.parametrize("mode", ["ict", "ect"])
def test_improved_recipes_resume_and_refuse_changed_settings(mode, teacher, tmp_path):
    """--resume continues an iCT or ECT run; a resume with another setting of its recipe is refused,
    naming it."""
    cfg = dict(mode=mode, steps=4, out=str(tmp_path), teacher=str(teacher) if mode == "ect" else "", **TINY)
    cm.train(cm.config(**cfg))
    cm.train(cm.config(**{**cfg, "steps": 6}, resume=True, allow_config_change=True))
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 6
    with pytest.raises(cm.CMError, match=r"P_std 2\.0 -> 3\.0"):
        cm.train(cm.config(**{**cfg, "steps": 6}, resume=True, P_std=3.0))


def test_distillation_resume_takes_the_teachers_width_and_refuses_another_teacher(teacher, tmp_path):
    """CD's network is as wide as its teacher (32 here, not toy's default 256): a plain --resume without
    --channels continues; a resume with another --teacher file (other targets) is refused, naming it."""
    cfg = dict(
        {k: v for k, v in TINY.items() if k != "channels"},
        mode="cd",
        steps=2,
        out=str(tmp_path / "cd"),
        teacher=str(teacher),
    )
    cm.train(cm.config(**cfg))
    cm.train(cm.config(**{**cfg, "steps": 3}, resume=True, allow_config_change=True))
    assert torch.load(tmp_path / "cd" / "ckpt.pt", weights_only=True)["step"] == 3
    cm.train(cm.config(**{**cfg, "steps": 3}, resume=True))  # nothing changed: nothing refused
    other = tmp_path / "other.pt"
    other.write_bytes(teacher.read_bytes())
    with pytest.raises(cm.CMError, match="teacher"):
        cm.train(cm.config(**{**cfg, "steps": 3, "teacher": str(other)}, resume=True))


@pytest.mark.slow
def test_resume_continues_bit_for_bit(tmp_path, monkeypatch):
    cfg = dict(mode="ct", steps=20, **TINY)
    cm.train(cm.config(out=str(tmp_path / "a"), **cfg))
    uninterrupted = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)

    class Killed(Exception):
        pass

    real_save = cm.save_checkpoint

    def save_then_die(path, state):  # the process dies right after its first checkpoint (step 10)
        real_save(path, state)
        raise Killed

    monkeypatch.setattr(cm, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        cm.train(cm.config(out=str(tmp_path / "b"), **cfg))
    monkeypatch.setattr(cm, "save_checkpoint", real_save)
    assert torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)["step"] == 10
    cm.train(cm.config(out=str(tmp_path / "b"), resume=True, **cfg))
    resumed = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)
    assert resumed["step"] == 20
    for key in ("model", "target", "ema"):
        for name, v in uninterrupted[key].items():
            assert torch.equal(v, resumed[key][name]), (key, name)


@pytest.mark.slow
def test_cd_without_teacher_trains_one_first(tmp_path):
    rows = cm.train(cm.config(mode="cd", steps=10, teacher_steps=20, out=str(tmp_path), **TINY))
    teacher = torch.load(tmp_path / "teacher" / "ckpt.pt", weights_only=True)
    assert teacher["config"]["cm"]["mode"] == "edm" and teacher["step"] == 20
    student = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert student["config"]["teacher"].endswith("teacher/ckpt.pt")
    assert "teacher Heun, 18 levels (35 NFE)" in rows


def same_image(a: Path, b: Path) -> bool:
    from PIL import Image
    with Image.open(a) as x, Image.open(b) as y:
        return np.array_equal(np.asarray(x), np.asarray(y))


def test_sample_cli_draws_the_training_grid(teacher, tmp_path):
    """The grid of --sample equals the one the run drew at the same step from the same (EMA) weights."""
    r = run_cli("--sample", str(teacher), "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    name = cm.grid_name("heun", 30)
    assert same_image(teacher.parent / name, tmp_path / name)


def test_import_has_no_side_effects(tmp_path):
    r = subprocess.run([sys.executable, "-c", "import cm, os; print(sorted(os.listdir('.')))"],
                       cwd=tmp_path, capture_output=True, text=True, env={"PYTHONPATH": str(ROOT)})
    assert r.returncode == 0 and r.stdout.strip() == "[]" and r.stderr == ""


@pytest.mark.parametrize("args, message", [
    (["--mode", "cd", "--teacher", "no/such/teacher.pt", "--dataset", "toy"], "no checkpoint at"),
    (["--N", "1", "--dataset", "toy"], "N >= 2"),
    (["--dataset", "mnist"], "no such dataset or folder"),
    (["--metric", "cosine", "--dataset", "toy"], "unknown metric"),
    (["--sample", "no/such.pt"], "no checkpoint at"),
    (["--dataset", "toy", "--log-every", "0"], "must be >= 1"),
    (["--dataset", "toy", "--batch-size", "-3"], "must be >= 1"),
    (["--dataset", "toy", "--ts", "0,30"], "ts must be strictly increasing"),
])
def test_bad_input_gives_one_line_error(args, message, tmp_path):
    r = run_cli(*args, "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert r.returncode != 0
    assert r.stderr.strip().count("\n") == 0 and message in r.stderr, r.stderr


def test_corrupt_and_foreign_checkpoints(teacher, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(teacher.read_bytes()[:1000])  # truncated
    r = run_cli("--sample", str(bad), cwd=tmp_path)
    assert r.returncode != 0 and "cannot read checkpoint" in r.stderr and r.stderr.count("\n") == 1
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    r = run_cli("--sample", str(foreign), cwd=tmp_path)
    assert r.returncode != 0 and "not a cm.py checkpoint" in r.stderr
    # a ct run cannot serve as a teacher
    state = torch.load(teacher, weights_only=True)
    state["config"]["cm"]["mode"] = "ct"
    cm.save_checkpoint(tmp_path / "ct.pt", state)  # with a checksum of the edited contents
    r = run_cli("--mode", "cd", "--dataset", "toy", "--teacher", str(tmp_path / "ct.pt"), "--out",
                str(tmp_path / "run"), cwd=tmp_path)
    assert r.returncode != 0 and "must be an edm checkpoint" in r.stderr


def test_nan_run_keeps_the_good_checkpoint(tmp_path):
    """A run that resumes a good checkpoint and blows up (lr 1e39 makes the weights inf after one step)
    stops with one line at its next checkpoint and leaves the good checkpoint byte for byte as it was."""
    cm.train(cm.config(mode="ct", steps=10, out=str(tmp_path), **TINY))
    good = (tmp_path / "ckpt.pt").read_bytes()
    r = run_cli(
        "--mode",
        "ct",
        "--dataset",
        "toy",
        "--channels",
        "32",
        "--batch-size",
        "64",
        "--log-every",
        "5",
        "--device",
        "cpu",
        "--out",
        str(tmp_path),
        "--resume",
        "--allow-config-change",
        "--steps",
        "30",
        "--lr",
        "1e39",
        "--ckpt-every",
        "1",
        cwd=tmp_path,
    )
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert "non-finite weights at step 11" in r.stderr
    assert f"the last good checkpoint is {tmp_path / 'ckpt.pt'}" in r.stderr
    assert (tmp_path / "ckpt.pt").read_bytes() == good


def write_cifar10(root: Path, n: int = 10) -> np.ndarray:
    """A tiny CIFAR-10 in torchvision's on-disk format: pickled dicts of (N, 3072) uint8 rows."""
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    batches = []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        batches.append(data)
        with open(d / name, "wb") as fh:
            pickle.dump({"data": data, "labels": list(rng.integers(0, 10, n))}, fh)
    with open(d / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, fh)
    return np.concatenate(batches[:5])


def test_cifar10_loader_reads_the_real_format(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar
    raw = write_cifar10(tmp_path)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)  # the md5s of the real files
    x = cm.uint8_to_unit(cm.load_cifar10(tmp_path, download=False).data).permute(0, 3, 1, 2)
    assert x.shape == (50, 3, 32, 32)
    expected = torch.from_numpy(raw.reshape(50, 3, 32, 32)).float() / 127.5 - 1  # rows are R, G, B planes
    assert torch.equal(x, expected)


def test_cifar10_missing_fails_fast_with_one_line(tmp_path):
    r = run_cli("--dataset", "cifar10", "--data-dir", str(tmp_path / "nothing"), "--metric", "l2",
                "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert r.returncode != 0 and "cifar-10-python.tar.gz" in r.stderr and r.stderr.count("\n") == 1


def test_resume_refuses_a_run_with_other_settings(tmp_path):
    cm.train(cm.config(mode="ct", steps=10, out=str(tmp_path), **TINY))
    with pytest.raises(cm.CMError, match="trained with other steps"):
        cm.train(cm.config(mode="ct", steps=20, out=str(tmp_path), resume=True, **TINY))


# ==== iCT and ECT runs ====

@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ict", "ect"])
def test_ict_ect_train_end_to_end_with_shared_dropout(mode, tmp_path):
    tiny = dict(dataset="toy", channels=32, batch_size=32, log_every=5, ckpt_every=10, device="cpu",
                dropout=0.1, steps=8, **(dict(teacher_steps=6, stage_steps=3) if mode == "ect" else {}))
    rows = cm.train(cm.config(mode=mode, out=str(tmp_path), **tiny))
    assert all(np.isfinite(v) for v in rows.values())
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert state["target"] is None  # μ = 0: θ⁻ is θ under stop-grad, no copy is kept
    assert all((tmp_path / cm.grid_name(how, 8)).is_file() for how in ("1-step", "2-step"))


@pytest.mark.slow
def test_ict_ablations_run_and_ect_starts_at_the_teacher(tmp_path):
    tiny = dict(dataset="toy", channels=32, batch_size=32, ckpt_every=10, device="cpu")
    rows = cm.train(
        cm.config(mode="ict", steps=3, ablate="weight,lognormal,doubling", out=str(tmp_path / "a"), **tiny)
    )
    assert all(np.isfinite(v) for v in rows.values())
    cm.train(cm.config(mode="edm", steps=3, out=str(tmp_path / "edm"), **tiny))
    teacher = tmp_path / "edm" / "ckpt.pt"
    cm.train(
        cm.config(mode="ect", steps=1, teacher=str(teacher), lr=1e-30, out=str(tmp_path / "ect"), **tiny)
    )
    t, e = torch.load(teacher, weights_only=True), torch.load(tmp_path / "ect" / "ckpt.pt", weights_only=True)
    # ECT tunes EDM's denoiser itself: θ starts at the teacher's EMA weights (a 1e-30 step leaves them there)
    assert all(torch.allclose(e["model"][k], v, atol=1e-20) for k, v in t["ema"].items())


@pytest.mark.parametrize("bad", [dict(ablate="ema"), dict(stage_steps=-1), dict(q=1.0), dict(mid_t=-1.0)])
def test_bad_recipe_flags_are_one_line_errors(bad):
    with pytest.raises(cm.CMError):
        cm.config(mode="ict", dataset="toy", **bad)
