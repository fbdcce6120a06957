"""Hostile inputs against every entry point (cm.py, full.train, full.sample, full.evaluate, full.bench).

Each bad input must give a non-zero exit with exactly one line on stderr and no traceback, change no file
of an earlier run, never run code hidden in a pickle, and leave no process behind (README: Reliability).
Most rows call `main(argv)` in-process (a subprocess adds only the interpreter start); the rows that are
about the process itself (exit status, stderr, kill -9, locks, file-size limits) run as subprocesses.
"""
import contextlib
import hashlib
import io
import math
import os
import pickle
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import cm
import full.bench
import full.evaluate
import full.sample
import full.train
from full import checkpoints
from full.model import make_model
from full.presets import ConfigError, resolve

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
TOY = ["--dataset", "toy", "--channels", "16", "--batch-size", "32", "--device", "cpu"]
MAINS = {"cm.py": cm.main, "full.train": full.train.main, "full.sample": full.sample.main,
         "full.evaluate": full.evaluate.main, "full.bench": full.bench.main}


# ----------------------------------------------------------------------------------------------
# Helpers


class Payload:
    """Unpickling this runs open(marker, 'w'): the side effect that must never happen."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def run_main(name: str, argv: list[str]) -> tuple[int, str]:
    """main(argv) in-process: (exit status, stderr). An uncaught exception (a traceback) fails the test."""
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            MAINS[name](argv)
            code = 0
        except SystemExit as e:
            code = e.code
    return code, err.getvalue()


def assert_one_line(code, err: str, *needles: str) -> None:
    assert code not in (0, None), err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for n in needles:
        assert n in err, err


def run_cli(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=kw.pop("cwd", ROOT), capture_output=True, text=True,
                          timeout=300, env=ENV, **kw)


def snapshot(*folders: Path) -> dict:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest()
            for d in folders for p in sorted(d.rglob("*")) if p.is_file()}


def export(path: Path, preset: str) -> Path:
    cfg = resolve(preset)
    torch.manual_seed(0)
    return checkpoints.export(path, {cfg.ema.rates[0]: make_model(cfg)}, cfg, step=0)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An earlier run of each trainer (whose files no bad input may change) and sampling inputs."""
    d = tmp_path_factory.mktemp("runs")
    cm.train(cm.Config(mode="ct", steps=4, ckpt_every=2, out=str(d / "cm-ct"), dataset="toy", channels=16,
                       batch_size=32, device="cpu"))
    full.train.train(resolve("tiny-ct", [f"run.out={str(d / 'full-ct')!r}", "opt.steps=2"]))
    export(d / "edm-export.pt", "tiny-edm")
    export(d / "ct-export.pt", "tiny-ct")
    return d


@pytest.fixture(scope="module")
def evil(tmp_path_factory):
    """Crafted pickles in every container a path flag may read, all aimed at one marker file."""
    d = tmp_path_factory.mktemp("evil")
    marker = d / "PWNED"
    payload = Payload(marker)
    torch.save(payload, d / "evil.pt")
    (d / "evil.pkl").write_bytes(pickle.dumps(payload))
    np.savez(d / "evil.npz", arr_0=np.array([payload], dtype=object), mu=np.array([payload], dtype=object),
             sigma=np.array([payload], dtype=object))
    np.save(d / "evil.npy", np.array([payload], dtype=object), allow_pickle=True)
    batches = d / "cifar" / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
        (batches / name).write_bytes(pickle.dumps(payload))
    (d / "imagenet").mkdir()
    np.savez(d / "imagenet" / "train_data_batch_1.npz", data=np.array([payload], dtype=object),
             labels=np.array([payload], dtype=object))
    run = d / "run"
    run.mkdir()
    torch.save(payload, run / "ckpt.pt")  # cm.py --resume reads <out>/ckpt.pt
    torch.save(payload, run / "ckpt-0000001.pt")  # full.train resumes <run.out>/ckpt-*.pt
    return d


def test_the_payload_is_live(evil, tmp_path):
    """The crafted files do run code when unpickled naively, so the tests below can fail."""
    marker = tmp_path / "PWNED"
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.exists()
    torch.load(evil / "evil.pt", weights_only=False)
    assert (evil / "PWNED").exists()
    (evil / "PWNED").unlink()


# ----------------------------------------------------------------------------------------------
# 1. No pickle ever runs: every path-taking flag of every entry point (full.bench takes no path)


def security_cases(e: Path, runs: Path) -> list[tuple[str, list[str], str]]:
    good_ref = runs / "ref.npz"
    samples = runs / "samples.npz"
    return [
        ("cm.py", ["--checkpoint", str(e / "evil.pt")], "weights-only"),
        ("cm.py", ["--checkpoint", str(e / "evil.pkl")], "weights-only"),
        ("cm.py", [*TOY, "--mode", "cd", "--teacher", str(e / "evil.pt"), "--out", str(runs / "x1")],
         "weights-only"),
        ("cm.py", [*TOY, "--mode", "ct", "--resume", "--out", str(e / "run")], "weights-only"),
        ("cm.py", ["--dataset", "cifar10", "--mode", "ct", "--metric", "l2", "--data-dir", str(e / "cifar"),
                   "--out", str(runs / "x2")], "CIFAR-10"),
        ("full.train", ["--preset", "tiny-cd", f"run.teacher={str(e / 'evil.pt')!r}",
                        f"run.out={str(runs / 'x3')!r}"], "weights-only"),
        ("full.train", ["--preset", "tiny-cd", f"run.teacher={str(e / 'evil.pkl')!r}",
                        f"run.out={str(runs / 'x4')!r}"], "evil.pkl"),
        ("full.train", ["--preset", "tiny-ct", f"run.out={str(e / 'run')!r}"], "weights-only"),
        ("full.train", ["--preset", "tiny-ct", "data.name='cifar10'", f"data.root={str(e / 'cifar')!r}",
                        f"run.out={str(runs / 'x5')!r}"], "CIFAR-10"),
        ("full.train", ["--preset", "tiny-ct", "data.name='imagenet64'", f"data.root={str(e / 'imagenet')!r}",
                        f"run.out={str(runs / 'x6')!r}"], "train_data_batch_1.npz"),
        ("full.sample", ["--checkpoint", str(e / "evil.pt")], "weights-only"),
        ("full.sample", ["--checkpoint", str(e / "evil.pkl")], "evil.pkl"),
        ("full.sample", ["--checkpoint", str(runs / "ct-export.pt"), "--edit", "denoise", "--sigmas", "0.5",
                         "--reference", str(e / "evil.npz"), "--out", str(runs / "x7")], "evil.npz"),
        ("full.sample", ["--checkpoint", str(runs / "ct-export.pt"), "--edit", "denoise", "--sigmas", "0.5",
                         "--reference", str(e / "evil.pt"), "--out", str(runs / "x7")], "evil.pt"),
        ("full.sample", ["--checkpoint", str(runs / "ct-export.pt"), "--edit", "inpaint",
                         "--reference", str(samples), "--mask", str(e / "evil.pt"), "--out", str(runs / "x7")],
         "evil.pt"),
        ("full.evaluate", [str(e / "evil.npz"), "--ref", str(good_ref)], "evil.npz"),
        ("full.evaluate", [str(e / "evil.npy"), "--ref", str(good_ref)], "evil.npy"),
        ("full.evaluate", [str(samples), "--ref", str(e / "evil.npz")], "evil.npz"),
        ("full.evaluate", ["--make-ref", str(e / "evil.npz"), "--out", str(runs / "r.npz")], "evil.npz"),
        ("full.evaluate", [str(samples), "--ref", str(good_ref), "--inception-weights", str(e / "evil.pt")],
         "weights-only"),
        ("full.evaluate", ["--make-ref", "cifar10", "--data-dir", str(e / "cifar"), "--out",
                           str(runs / "r.npz")], "CIFAR-10"),
    ]


def test_no_path_flag_unpickles_code(evil, runs):
    rng = np.random.default_rng(0)
    np.savez(runs / "samples.npz", arr_0=rng.integers(0, 256, (4, 8, 8, 1), dtype=np.uint8))
    full.evaluate.save_stats(runs / "ref.npz", np.zeros(4), np.eye(4), 4)
    before = snapshot(runs / "cm-ct", runs / "full-ct")
    for name, argv, needle in security_cases(evil, runs):
        code, err = run_main(name, argv)
        assert_one_line(code, err, needle)
        assert not (evil / "PWNED").exists(), (name, argv)
    assert snapshot(runs / "cm-ct", runs / "full-ct") == before


def test_payload_in_a_subprocess_never_runs(evil):
    """The same through the real command line: exit 1, one line, no traceback, no marker."""
    for args in (["cm.py", "--checkpoint", str(evil / "evil.pt")],
                 ["-m", "full.sample", "--checkpoint", str(evil / "evil.pt")]):
        p = run_cli(*args)
        assert_one_line(p.returncode, p.stderr, "weights-only")
        assert p.returncode == 1 and not (evil / "PWNED").exists()
