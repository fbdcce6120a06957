"""Run folders: nothing of an earlier run is deleted or reused before every check of the new one has passed.

Each class of input here once lost or silently reused work: a mistyped teacher with --overwrite deleted the
earlier checkpoints before failing; a folder holding only a log was overwritten (full.train) or truncated
(cm.py --resume); --overwrite alone resumed; cm.py reused an auto-trained teacher of another width.
"""
import hashlib
import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_reliability import TOY, assert_one_line, run_main

import cm

FULL = ["--preset", "tiny-ct", "opt.steps=2", "run.ckpt_every=2", "run.sample_every=0", "run.device=cpu"]
CM = [*TOY, "--steps", "2", "--log-every", "1", "--sample-every", "2", "--no-report"]


def _digests(folder: Path) -> dict[str, str]:
    """Every file of a run folder but its (empty) .lock, by content."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("full") / "run"
    code, err = run_main("full.train", [*FULL, f"run.out={str(out)!r}"])
    assert code == 0, err
    return out


@pytest.mark.parametrize("bad", ["run.teacher='nope.pt'", "data.root='/no/such/folder'", "opt.lr=-1",
                                 "run.tensorboard=True"])
def test_overwrite_deletes_nothing_when_the_new_run_fails_its_checks(full_run, tmp_path, monkeypatch, bad):
    """--overwrite with a setting that fails (a teacher file that is not there, data that is not there, a
    bad value, run.tensorboard=True without the package): one line, and every file of the earlier run is as
    it was."""
    import shutil
    import sys
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails: not installed
    out = tmp_path / "run"
    shutil.copytree(full_run, out)
    before = _digests(out)
    preset = "tiny-cd" if "teacher" in bad else "tiny-ct"
    argv = ["--preset", preset, "opt.steps=2", "run.device=cpu", f"run.out={str(out)!r}", "--overwrite",
            "run.resume=False", bad]
    if "root" in bad:
        argv += ["data.name='folder'"]
    code, err = run_main("full.train", argv)
    assert_one_line(code, err)
    assert _digests(out) == before


@pytest.mark.parametrize("kind", ["folder", "fifo"])
def test_full_train_refuses_a_log_that_is_not_a_regular_file(full_run, tmp_path, kind):
    """log.jsonl replaced by a folder (append fails) or a FIFO (opening it blocks for ever): a resume is one
    line naming it, before anything is written (config.json and the checkpoint as they were)."""
    import os
    import shutil
    import signal
    out = tmp_path / "run"
    shutil.copytree(full_run, out)
    (out / "log.jsonl").unlink()
    (out / "log.jsonl").mkdir() if kind == "folder" else os.mkfifo(out / "log.jsonl")
    before = _digests(out)

    def hang(*_):
        raise TimeoutError("full.train blocked on the FIFO")
    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(60)
    try:
        code, err = run_main("full.train", [*FULL, "opt.steps=3", f"run.out={str(out)!r}",
                                            "--allow-config-change"])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert_one_line(code, err, "log.jsonl", "not a regular file")
    assert _digests(out) == before


def test_overwrite_alone_starts_afresh_and_contradicts_resume(full_run, tmp_path):
    import shutil
    out = tmp_path / "run"
    shutil.copytree(full_run, out)
    old = torch.load(out / "ckpt-0000002.pt", weights_only=True)
    code, err = run_main("full.train", [*FULL, f"run.out={str(out)!r}", "--overwrite", "run.seed=7"])
    assert code == 0, err
    assert "resumed" not in err
    new = torch.load(out / "ckpt-0000002.pt", weights_only=True)
    assert new["config"]["run"]["seed"] == 7  # a resume would have refused the changed seed
    assert not all(torch.equal(a, b) for a, b in zip(old["model"].values(), new["model"].values()))
    code, err = run_main("full.train", [*FULL, f"run.out={str(out)!r}", "--overwrite", "--resume"])
    assert_one_line(code, err, "--overwrite")


@pytest.mark.parametrize("kept", ["log.jsonl", "export.pt"])
def test_full_train_refuses_a_folder_with_a_log_or_export_but_no_checkpoint(full_run, tmp_path, kept):
    out = tmp_path / "run"
    out.mkdir()
    (out / kept).write_bytes((full_run / kept).read_bytes())
    before = _digests(out)
    code, err = run_main("full.train", [*FULL, f"run.out={str(out)!r}"])
    assert_one_line(code, err, kept, "--overwrite", "no ckpt")
    assert "resume it" not in err  # there is nothing to resume
    assert _digests(out) == before
    code, err = run_main("full.train", [*FULL, f"run.out={str(out)!r}", "--overwrite"])
    assert code == 0, err


def test_cm_resume_of_a_folder_with_a_log_but_no_checkpoint_keeps_the_log(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "log.jsonl").write_text('{"step": 1, "loss": 0.5}\n')
    code, err = run_main("cm.py", [*CM, "--mode", "ct", "--out", str(out), "--resume"])
    assert_one_line(code, err, "log.jsonl", "--overwrite")
    assert (out / "log.jsonl").read_text() == '{"step": 1, "loss": 0.5}\n'
    code, err = run_main("cm.py", [*CM, "--mode", "ct", "--out", str(out), "--resume", "--overwrite"])
    assert_one_line(code, err, "--resume", "--overwrite")


@pytest.mark.parametrize("kept", ["export.pt", "ckpt-0000002.pt"])
@pytest.mark.parametrize("resume", [[], ["--resume"]])
def test_cm_refuses_a_folder_of_a_full_train_run(full_run, tmp_path, kept, resume):
    """cm.py does not write its config.json, log and grids over a full.train run's folder."""
    out = tmp_path / "run"
    out.mkdir()
    for name in (kept, "config.json"):
        (out / name).write_bytes((full_run / name).read_bytes())
    before = _digests(out)
    code, err = run_main("cm.py", [*CM, "--mode", "ct", "--out", str(out), *resume])
    assert_one_line(code, err, kept, "--overwrite")
    assert _digests(out) == before


def test_cm_reuses_its_teacher_only_with_the_same_settings(tmp_path):
    """cd without --teacher trains one into <out>/teacher; another --channels is refused (not silently
    served by the old teacher's width); with --overwrite the teacher is trained again at the new width."""
    out = tmp_path / "run"
    cd = [*CM, "--mode", "cd", "--teacher-steps", "2", "--out", str(out)]
    width = lambda: torch.load(out / "teacher" / "ckpt.pt", weights_only=True)["config"]["channels"]
    code, err = run_main("cm.py", cd)
    assert code == 0 and width() == 16, err
    before = _digests(out)
    code, err = run_main("cm.py", [*cd, "--channels", "32"])
    assert_one_line(code, err, "channels 16 -> 32", "--overwrite")
    assert _digests(out) == before
    code, err = run_main("cm.py", [*cd, "--channels", "32", "--overwrite"])
    assert code == 0 and width() == 32, err
    assert torch.load(out / "ckpt.pt", weights_only=True)["config"]["channels"] == 32


def _records(n_steps: list[int]) -> list[bytes]:
    return [json.dumps({"step": k, "loss": 0.5}).encode() + b"\n" for k in n_steps]


@settings(max_examples=200, deadline=None)
@given(steps=st.lists(st.integers(0, 40), max_size=30).map(sorted), at=st.integers(0, 40),
       other=st.lists(st.sampled_from([b"not json\n", b"[1, 2]\n", b'{"step": "7"}\n', b"\n",
                                       b"\xff\xfe\n", b"[" * 100_000 + b"\n"]), max_size=3),
       torn=st.sampled_from([b"", b'{"step": 3, "lo']))
def test_trim_log_keeps_exactly_the_records_up_to_the_checkpoint(tmp_path_factory, steps, at, other, torn):
    """The log after trim_log(step) is the prefix of its lines before the first record of a later step (or
    before a torn last line): lines that are not records stay where they were, and the count removed is
    the number of lines after that prefix."""
    lines = _records(steps)
    for i, junk in enumerate(other):  # spread through the log
        lines.insert(min(len(lines), 3 * i), junk)
    lines += [torn] if torn else []
    path = tmp_path_factory.mktemp("log") / "log.jsonl"
    path.write_bytes(b"".join(lines))

    def later(line):  # the expected cut, from the lines as written
        if not line.endswith(b"\n"):
            return True
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError):  # not JSON, not UTF-8, nested deeper than json recurses
            return False
        return isinstance(rec, dict) and type(rec.get("step")) is int and rec["step"] > at
    keep = next((i for i, line in enumerate(lines) if later(line)), len(lines))
    assert cm.trim_log(path, at) == len(lines) - keep
    assert path.read_bytes() == b"".join(lines[:keep])
    assert cm.trim_log(path, at) == 0  # a second trim changes nothing


@pytest.mark.parametrize("trainer", ["cm.py", "full.train"])
def test_a_resume_logs_each_step_once(full_run, tmp_path, trainer):
    """Records written after the last checkpoint (a kill, or a checkpoint write that failed) and a torn last
    line: the resume used to append its own records of those steps after them (steps 3, 4 twice) and glue
    its first line to the torn one (a line that is not JSON). Now the log holds steps 1..6 once each."""
    import shutil
    out = tmp_path / "run"
    if trainer == "cm.py":
        argv = [*TOY, "--steps", "2", "--log-every", "1", "--ckpt-every", "2", "--sample-every", "100",
                "--no-report", "--out", str(out)]
        code, err = run_main("cm.py", argv)
        assert code == 0, err
        more = [a if a != "2" or argv[i - 1] != "--steps" else "6" for i, a in enumerate(argv)]
    else:
        shutil.copytree(full_run, out)
        argv = [*FULL, f"run.out={str(out)!r}", "run.log_every=1"]
        more = [a if a != "opt.steps=2" else "opt.steps=6" for a in argv]
    log = out / "log.jsonl"
    kept = [json.loads(line)["step"] for line in log.read_text().splitlines() if '"loss"' in line]
    assert kept[-1] == 2
    with open(log, "ab") as fh:
        fh.write(b"".join(_records([3, 4])) + b'{"step": 5, "lo')
    code, err = run_main(trainer, [*more, "--resume", "--allow-config-change"])
    assert code == 0, err
    recs = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in recs if "loss" in r] == [*kept, 3, 4, 5, 6]


@pytest.mark.parametrize("kind", ["export.pt", "safetensors"])
def test_an_export_named_as_a_checkpoint_is_not_resumed(full_run, tmp_path, kind):
    """An export (EMA weights only) copied to ckpt-N.pt is the newest checkpoint of the folder: the resume
    read its data section (a KeyError traceback). It is refused in one line, and nothing is written."""
    import shutil
    out = tmp_path / "run"
    shutil.copytree(full_run, out)
    fake = out / "ckpt-0000009.pt"
    if kind == "export.pt":
        shutil.copy(out / "export.pt", fake)
    else:
        pytest.importorskip("safetensors")
        from full import diffusers_io
        diffusers_io.write_safetensors(torch.load(out / "export.pt", weights_only=True), fake)
    before = _digests(out)
    code, err = run_main("full.train", [*FULL, f"run.out={str(out)!r}", "opt.steps=12", "--resume",
                                        "--allow-config-change"])
    assert_one_line(code, err, str(fake), "is an export")
    assert _digests(out) == before
