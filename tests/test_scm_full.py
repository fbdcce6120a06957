"""sCT and sCD through full/: presets, the trainer, resume, DDP, export and sampling (tiny networks, CPU)."""
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
from full.presets import resolve

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


class Crash(Exception):
    pass


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("edm")
    full.train.train(resolve("tiny-edm", [f"run.out={str(out)!r}", "opt.steps=6", "run.ckpt_every=6"]))
    return out / "export.pt"


def _log(run: Path) -> list[dict]:
    return [eval(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_scd_student_starts_as_its_teacher(teacher, tmp_path):
    """sCD's TrigFlow student with EDM's c_noise and F_trig = -F_EDM, started from the teacher's weights, is
    the teacher's denoiser at every σ before its first step: f(x_σ, σ) = D(x_σ, σ)."""
    cfg = resolve("tiny-scd", [f"run.out={str(tmp_path)!r}", f"run.teacher={str(teacher)!r}"])
    D = full.train.load_teacher(cfg, torch.device("cpu"))
    tr = full.train.Trainer(cfg, torch.device("cpu"), D)
    assert isinstance(tr.model, cm.TrigFlow) and tr.teacher is D
    gen = torch.Generator().manual_seed(0)
    for sigma in (0.01, 0.3, 2.0, 40.0):
        x = torch.randn(4, 1, 8, 8, generator=gen) * math.hypot(0.5, sigma)
        with torch.no_grad():
            torch.testing.assert_close(tr.model.eval()(x, sigma), D(x, sigma), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("preset", ["tiny-sct", "tiny-scd"])
def test_runs_log_the_tangent_warmup_and_sample_from_the_export(preset, teacher, tmp_path):
    """r(k) = min(1, k / 5) in the log (tiny presets: tangent_warmup 5); the export samples in one and two
    steps through full.sample (TrigFlow's boundary is σ = 0)."""
    run = tmp_path / "run"
    over = [f"run.out={str(run)!r}", "opt.steps=7", "run.log_every=1", f"run.teacher={str(teacher)!r}"]
    full.train.train(resolve(preset, over if preset == "tiny-scd" else over[:3]))
    log = _log(run)
    assert [r["r"] for r in log] == [min(1.0, k / 5) for k in range(7)]
    assert all(math.isfinite(r["loss"]) for r in log)
    f, _ = checkpoints.model_from_state(checkpoints.load(run / "export.pt"))
    assert isinstance(f, cm.TrigFlow) and f.sigma_min == 0.0
    p = subprocess.run([sys.executable, "-m", "full.sample", "--checkpoint", str(run / "export.pt"),
                        "--num-samples", "4", "--sampler", "multistep", "--ts", "0,8,17", "--out",
                        str(tmp_path / "s")], cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV)
    assert p.returncode == 0, p.stderr[-1500:]
    x = np.load(tmp_path / "s" / "samples.npz")["arr_0"]
    assert x.shape == (4, 8, 8, 1) and x.dtype == np.uint8


@pytest.mark.parametrize("jvp", ["exact", "fd"])
def test_sct_resume_is_bit_exact(jvp, tmp_path):
    """Crash after the step-3 checkpoint, resume: steps 4-6 equal an uninterrupted run bit for bit (dropout
    on: the JVP pass and the online pass replay one mask; the adaptive weight is in the state)."""
    over = ["opt.steps=6", "run.ckpt_every=3", "run.log_every=1", "net.dropout=0.2", f"cm.jvp={jvp!r}"]
    a, b = tmp_path / "a", tmp_path / "b"
    ra = full.train.train(resolve("tiny-sct", over + [f"run.out={str(a)!r}"]))

    def crash(step, path):
        if step == 3:
            raise Crash

    cfg_b = resolve("tiny-sct", over + [f"run.out={str(b)!r}"])
    with pytest.raises(Crash):
        full.train.train(cfg_b, on_checkpoint=crash)
    rb = full.train.train(cfg_b)
    la, lb = ({r["step"]: r["loss"] for r in _log(x)} for x in (a, b))
    assert [la[k] for k in (4, 5, 6)] == [lb[k] for k in (4, 5, 6)]
    sa, sb = ra["trainer"].model.state_dict(), rb["trainer"].model.state_dict()
    assert any(k.startswith("weight.") for k in sa) and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_sct_under_torchrun(tmp_path):
    """Two gloo processes: DDP carries TrigFlow's training view (trig=True) and the adaptive weight's
    gradient; the losses are finite and the checkpoint records both processes."""
    over = ["opt.steps=2", "run.log_every=1", "opt.batch=16", "run.ckpt_every=2", "cm.tangent_warmup=0"]
    two = tmp_path / "two"
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "full.train", "--preset", "tiny-sct", *over, f"run.out={str(two)!r}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV)
    assert p.returncode == 0, p.stderr[-2000:]
    assert [r["step"] for r in _log(two)] == [1, 2] and all(math.isfinite(r["loss"]) for r in _log(two))
    s2 = checkpoints.load(two / "ckpt-0000002.pt")
    assert s2["step"] == 2 and s2["data"]["world"] == 2


def test_scm_presets_carry_the_stated_settings():
    """The sCM presets' settings as their comment states them (the comment cites its sources)."""
    for name, steps in (("cifar10-sct", 350_000), ("cifar10-scd", 500_000)):
        c = resolve(name)
        assert (c.cm.mode, c.cm.P_mean, c.cm.P_std, c.cm.tangent_warmup, c.cm.tangent_c) == \
            (name[-3:], -1.0, 1.4, 10_000, 0.1)
        assert (c.opt.optimizer, c.opt.lr, tuple(c.opt.betas), c.opt.batch, c.opt.steps, c.opt.grad_clip) == \
            ("radam", 1e-4, (0.9, 0.99), 512, steps, 10.0)
        assert c.net.embedding == "positional" and c.run.sigmas[1] == pytest.approx(0.5 * math.tan(1.1))
        assert c.cm.noise_cond == ("trig" if name.endswith("sct") else "edm")
    c = resolve("imagenet64-scd")
    assert (c.opt.optimizer, c.opt.lr, c.opt.eps, c.opt.batch, c.cm.P_std, c.cm.noise_cond) == \
        ("adam", 7e-5, 1e-11, 1024, 1.6, "adm")
