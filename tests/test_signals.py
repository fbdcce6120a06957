"""Ctrl-C and SIGTERM: one line, no temporary file left, the last checkpoint intact and resumable.

A SIGTERM (torchrun stopping its workers, a cluster's scheduler) used to kill a run wherever it was, and
Ctrl-C printed a 34-line traceback; either left atomic_write's `.tmp` file behind when it came during a
checkpoint write, and a killed paper-scale run leaves gigabytes of them. Temporaries of processes that
are gone are removed when the next run takes the folder.
"""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_reliability import ENV, ROOT

import cm


def test_an_interrupted_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "ckpt.pt"
    path.write_bytes(b"the last good checkpoint")

    def interrupted(fh):
        fh.write(b"half of a new one")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cm.atomic_write(path, interrupted)
    assert path.read_bytes() == b"the last good checkpoint"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


def test_a_run_folder_removes_the_temporaries_of_dead_processes_only(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()  # its pid is free now (reuse within this test is vanishingly unlikely)
    stale = tmp_path / f".ckpt.pt.{dead.pid}.tmp"
    live = tmp_path / f".samples.npz.{os.getpid()}.tmp"  # a process still writing next to the run
    other = tmp_path / ".notes.tmp"  # not atomic_write's name
    for p in (stale, live, other):
        p.write_bytes(b"x")
    with cm.RunFolder(tmp_path):
        pass
    assert not stale.exists() and live.exists() and other.exists()


@pytest.mark.slow
def test_sigterm_stops_cm_py_in_one_line_and_the_run_resumes(tmp_path):
    out = tmp_path / "run"
    argv = [str(ROOT / "cm.py"), "--mode", "ct", "--dataset", "toy", "--channels", "16", "--batch-size", "32",
            "--device", "cpu", "--steps", "100000", "--ckpt-every", "5", "--log-every", "5", "--no-report",
            "--out", str(out)]
    p = subprocess.Popen([sys.executable, *argv], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    deadline = time.time() + 120
    while not (out / "ckpt.pt").exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.2)
    time.sleep(0.5)  # well inside the loop, often inside a checkpoint write
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 1, err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: stopped by SIGTERM") and "Traceback" not in err, err
    assert not list(out.glob(".*.tmp"))
    step = torch.load(out / "ckpt.pt", weights_only=True)["step"]
    assert step >= 5 and step % 5 == 0
    r = subprocess.run([sys.executable, *argv[:-2], "--steps", str(step + 5), "--out", str(out), "--resume",
                        "--allow-config-change"],
                       env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == step + 5


@pytest.mark.slow
def test_ctrl_c_stops_full_train_in_one_line(tmp_path):
    out = tmp_path / "run"
    argv = ["-m", "full.train", "--preset", "tiny-ct", "opt.steps=100000", "run.ckpt_every=2",
            "run.sample_every=0", "run.device=cpu", f"run.out={str(out)!r}"]
    p = subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(out.glob("ckpt-*.pt")) and time.time() < deadline and p.poll() is None:
        time.sleep(0.2)
    time.sleep(0.5)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=240)  # a loaded 2-core CI machine is slow to unwind
    assert p.returncode == 1, err
    assert err.strip().splitlines()[-1].startswith("error: stopped by Ctrl-C") and "Traceback" not in err
    assert not list(Path(out).glob(".*.tmp"))


def test_a_failed_log_write_is_one_line_and_leaves_whole_records(tmp_path):
    """A full disk in the middle of a log line: CMError naming the file, and the half line is cut off, so
    every line of log.jsonl still parses."""
    import errno
    import json

    class HalfThenFull:  # writes half of what it is given, then fails as a full disk does
        def __init__(self, fh):
            self.fh, self.name = fh, fh.name

        def seek(self, *a):
            return self.fh.seek(*a)

        def write(self, b):
            self.fh.write(b[:len(b) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")

    path = tmp_path / "log.jsonl"
    with open(path, "ab", buffering=0) as fh:
        cm.log_line(fh, {"step": 1, "loss": 0.5})
        with pytest.raises(cm.CMError, match="No space left"):
            cm.log_line(HalfThenFull(fh), {"step": 2, "loss": 0.25})
    assert [json.loads(line) for line in path.read_text().splitlines()] == [{"step": 1, "loss": 0.5}]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_a_full_tool_starts_is_one_line(sig):
    """A SIGTERM or Ctrl-C in the seconds `python -m full.<tool>` spends importing torch (before main and
    its interrupts_as_errors run) was an empty stderr and exit -15, or a KeyboardInterrupt traceback. The
    process here is in the state `python -m` leaves it in (argv[0] '-m' while the package is imported)
    and signals itself right after, during the remaining imports."""
    code = (f"import sys, os, signal; sys.argv = ['-m']; import full; sys.argv = ['full/train.py']; "
            f"os.kill(os.getpid(), {int(sig)}); import full.train; print('imported')")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=120)
    name = "SIGTERM" if sig == signal.SIGTERM else "Ctrl-C"
    line = f"error: stopped by {name} while starting; nothing was written"
    assert p.returncode == 1 and p.stderr.strip() == line and "imported" not in p.stdout, p.stderr


@pytest.mark.parametrize("started_as", ["cm.py", "python -m full"])
def test_a_second_signal_while_stopping_changes_nothing(started_as):
    """A double Ctrl-C, or a scheduler's SIGTERM right after it, arriving after the first interrupt was
    turned into the one line (as interrupts_as_errors hands it to exit_on): still that one line and
    status 1, not a KeyboardInterrupt traceback or the start-up handler's line."""
    pre = "sys.argv = ['-m']; import full; " if started_as != "cm.py" else ""
    code = (f"import os, signal, sys, time; {pre}import cm\n"
            "try:\n"
            "    with cm.interrupts_as_errors():\n"
            "        os.kill(os.getpid(), signal.SIGINT)\n"
            "        time.sleep(5)\n"
            "except cm.CMError as e:\n"
            "    os.kill(os.getpid(), signal.SIGINT)\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    cm.exit_on(e)\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 1 and p.stderr.count("\n") == 1, p.stderr
    assert p.stderr.startswith("error: stopped by Ctrl-C; every file written so far is complete"), p.stderr
