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
    huge = tmp_path / f".ckpt.pt.{10 ** 30}.tmp"  # a "pid" past C's int: os.kill raises OverflowError
    minus = tmp_path / ".ckpt.pt.-1.tmp"  # os.kill(-1, 0) would ask about every process
    for p in (stale, live, other, huge, minus):
        p.write_bytes(b"x")
    with cm.RunFolder(tmp_path):
        pass
    assert not stale.exists() and live.exists() and other.exists() and huge.exists() and minus.exists()


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


def _as_from_a_terminal() -> None:
    """The child starts with SIGHUP and SIGINT at their defaults, as from a terminal, even where this
    test runs under nohup or as a background job (which start it ignored)."""
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _cm_until_first_checkpoint(out: Path, ignore_hup: bool = False) -> subprocess.Popen:
    argv = [str(ROOT / "cm.py"), "--mode", "ct", "--dataset", "toy", "--channels", "16", "--batch-size", "32",
            "--device", "cpu", "--steps", "100000", "--ckpt-every", "5", "--log-every", "5", "--no-report",
            "--out", str(out)]
    hup = signal.SIG_IGN if ignore_hup else signal.SIG_DFL  # as nohup leaves it, or a terminal (the test
    p = subprocess.Popen([sys.executable, *argv], env=ENV, stdout=subprocess.DEVNULL,  # may run under nohup)
                         stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGHUP, hup))
    deadline = time.time() + 120
    while not (out / "ckpt.pt").exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.2)
    time.sleep(0.3)
    return p


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="POSIX")
def test_sighup_stops_a_run_in_one_line_and_nohup_keeps_it_running(tmp_path):
    """SIGHUP (a closed terminal, a dropped ssh session) killed a run without a word (status -1) and
    left its .tmp; it now stops like SIGTERM. Under nohup (SIGHUP ignored) the run goes on."""
    p = _cm_until_first_checkpoint(tmp_path / "a")
    p.send_signal(signal.SIGHUP)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 1 and err.strip().splitlines()[-1].startswith("error: stopped by SIGHUP"), err
    assert not list((tmp_path / "a").glob(".*.tmp")) and "Traceback" not in err
    p = _cm_until_first_checkpoint(tmp_path / "b", ignore_hup=True)
    p.send_signal(signal.SIGHUP)
    time.sleep(1.5)
    assert p.poll() is None  # still training
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 1 and err.strip().splitlines()[-1].startswith("error: stopped by SIGTERM"), err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, getattr(signal, "SIGHUP", signal.SIGTERM)])
def test_a_signal_while_a_full_tool_starts_is_one_line(sig):
    """A SIGTERM or Ctrl-C in the seconds `python -m full.<tool>` spends importing torch (before main and
    its interrupts_as_errors run) was an empty stderr and exit -15, or a KeyboardInterrupt traceback. The
    process here is in the state `python -m` leaves it in (argv[0] '-m' while the package is imported)
    and signals itself right after, during the remaining imports."""
    code = (f"import sys, os, signal; sys.argv = ['-m']; import full; sys.argv = ['full/train.py']; "
            f"os.kill(os.getpid(), {int(sig)}); import full.train; print('imported')")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=120, preexec_fn=_as_from_a_terminal)
    name = "Ctrl-C" if sig == signal.SIGINT else signal.Signals(sig).name
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


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_inside_exec_of_a_string_still_exits_with_status_1(tmp_path, sig):
    """`python -m`'s exit checks a flag that CPython sets whenever a plain KeyboardInterrupt leaves an
    exec() or eval() of a string (dataclasses, namedtuple and torch make functions that way), even one
    caught further up: the process then killed itself with SIGINT (status -2) after printing its one
    line. interrupts_as_errors raises a subclass, which the flag ignores."""
    (tmp_path / "stopped_in_exec.py").write_text(
        "import os, signal, time, cm\n"
        "try:\n"
        "    with cm.interrupts_as_errors(note=''):\n"
        f"        exec('os.kill(os.getpid(), {int(sig)})\\ntime.sleep(5)')\n"
        "except cm.CMError as e:\n"
        "    cm.exit_on(e)\n")
    p = subprocess.run([sys.executable, "-m", "stopped_in_exec"], cwd=tmp_path, env=ENV, capture_output=True,
                       text=True, timeout=120)
    name = "SIGTERM" if sig == signal.SIGTERM else "Ctrl-C"
    line = f"error: stopped by {name}; every file written so far is complete\n"
    assert p.returncode == 1 and p.stderr == line, (p.returncode, p.stderr)


WRITES_THEN_SIGNALS = """
import os, signal, sys, torch, cm
class SignalsMidWrite:
    '''A file whose third write sends this process the signal: the handler runs inside torch.save's
    C++ zip writer, between two of its calls back into Python.'''
    def __init__(self, fh):
        self.fh, self.writes = fh, 0
    def write(self, b):
        self.writes += 1
        if self.writes == 3:
            os.kill(os.getpid(), {sig})
        return self.fh.write(b)
    def __getattr__(self, name):
        return getattr(self.fh, name)
    def __enter__(self):
        return self
    def __exit__(self, *a):
        return self.fh.__exit__(*a)
cm.open = lambda *a, **k: SignalsMidWrite(open(*a, **k))
try:
    with cm.interrupts_as_errors(note=''):
        cm.save_checkpoint(sys.argv[1], {{"w": torch.arange(300_000.0), "step": 7}})
        print("not stopped")
except cm.CMError as e:
    cm.exit_on(e)
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_mid_checkpoint_write_finishes_the_file_then_stops(tmp_path, sig):
    """A signal that came while torch.save wrote through the Python file left its C++ zip writer holding a
    closed file: the process printed its one line, then aborted (status -6, `terminate called after
    throwing an instance of pybind11::error_already_set`) when the writer was collected. atomic_write
    holds signals until the file is whole and in place, then stops."""
    path = tmp_path / "ckpt.pt"
    (tmp_path / "w.py").write_text(WRITES_THEN_SIGNALS.format(sig=int(sig)))
    p = subprocess.run([sys.executable, str(tmp_path / "w.py"), str(path)], cwd=tmp_path, env=ENV,
                       capture_output=True, text=True, timeout=120)
    name = "SIGTERM" if sig == signal.SIGTERM else "Ctrl-C"
    line = f"error: stopped by {name}; every file written so far is complete\n"
    assert p.returncode == 1 and p.stderr == line, (p.returncode, p.stderr)
    assert "not stopped" not in p.stdout
    state = cm.read_weights_only(path)
    assert torch.equal(state["w"], torch.arange(300_000.0)) and state["step"] == 7
    assert sorted(q.name for q in tmp_path.iterdir()) == ["ckpt.pt", "w.py"]


SIGNAL_AT_IMPORT_TORCH = """
import os, runpy, sys
class SignalAtTorch:
    '''Sends the signal the moment `import torch` starts (the second a script spends there), then lets
    the import go on.'''
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            sys.meta_path.remove(self)
            os.kill(os.getpid(), {sig})
        return None
sys.meta_path.insert(0, SignalAtTorch())
sys.argv = [{script!r}, "--help"]
runpy.run_path({script!r}, run_name="__main__")
print("imported")
"""


@pytest.mark.parametrize("script", ["cm.py", "scripts/compare.py"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_a_script_imports_torch_is_one_line(script, sig):
    """`python cm.py` and `python scripts/compare.py` spend a second in `import torch` before main and its
    interrupts_as_errors: a SIGTERM there was exit -15 with nothing said, a Ctrl-C a KeyboardInterrupt
    traceback through torch's import machinery."""
    code = SIGNAL_AT_IMPORT_TORCH.format(sig=int(sig), script=str(ROOT / script))
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=120)
    name = "SIGTERM" if sig == signal.SIGTERM else "Ctrl-C"
    assert (p.returncode, p.stderr) == (1, f"error: stopped by {name} while starting; nothing was written\n")
    assert "imported" not in p.stdout and "usage" not in p.stdout


@pytest.mark.parametrize("started_as", ["cm.py", "python -m full"])
def test_after_the_command_the_start_up_line_is_not_restored(started_as):
    """interrupts_as_errors puts back the handlers it found, but not a start-up one: its "nothing was
    written" would be said by a signal after the command had written its files. (cm.py arms its own only
    as __main__; here a handler of the same name stands in for it.)"""
    pre = ("sys.argv = ['-m']; import full" if started_as != "cm.py" else
           "def _stopped_while_starting(n, f): pass\n"
           "signal.signal(signal.SIGTERM, _stopped_while_starting)\n"
           "signal.signal(signal.SIGINT, _stopped_while_starting)")
    code = (f"import signal, sys\n{pre}\nimport cm\n"
            "with cm.interrupts_as_errors():\n"
            "    pass\n"
            "print(signal.getsignal(signal.SIGTERM) is signal.SIG_DFL,\n"
            "      signal.getsignal(signal.SIGINT) is signal.default_int_handler)\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=120)
    assert p.stdout.split() == ["True", "True"], p.stderr
