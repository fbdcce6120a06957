"""TensorBoard events (--tensorboard, run.tensorboard=True) and the compute accounting of cm.py and
full.train: images seen, device hours across resumes, the measured FLOPs of one step."""
import contextlib
import io
import json
import os
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from test_reliability import TOY, run_main  # noqa: E402

import cm  # noqa: E402
import full.evaluate  # noqa: E402
import full.plot_log  # noqa: E402
from full import checkpoints  # noqa: E402

HIDDEN, BATCH = 16, 32  # TOY's --channels and --batch-size


def events(run: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def steps_of(acc: EventAccumulator, tag: str) -> list[int]:
    return [e.step for e in acc.Scalars(tag)]


def log_lines(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]


def stored_accounting(path: Path) -> dict:
    return torch.load(path, weights_only=True)["accounting"]


def cm_run(out: Path, *extra: str) -> str:
    code, err = run_main("cm.py", [*TOY, "--mode", "ct", "--log-every", "1", "--no-report", "--tensorboard",
                                   "--out", str(out), *extra])
    assert code == 0, err
    return err


# ----------------------------------------------------------------------------------------------
# cm.py


def test_cm_events_log_fields_and_resume(tmp_path):
    run = tmp_path / "r"
    cm_run(run, "--steps", "4")
    acc = events(run)
    tags = acc.Tags()
    for tag in ("loss", "N", "mu", "lr", "img/s", "images", "device_hours"):
        assert steps_of(acc, tag) == [1, 2, 3, 4], tag
    assert "stage" not in tags["scalars"]  # ct has no stages
    assert {"grid/1step", "grid/2step"} <= set(tags["images"])
    img = acc.Images("grid/1step")[-1]
    assert img.step == 4 and img.width > 0 and img.encoded_image_string[:4] == b"\x89PNG"
    lines = log_lines(run)
    assert [r["step"] for r in lines] == [1, 2, 3, 4]
    assert all(r["images"] == r["step"] * BATCH for r in lines)
    hours = [r["device_hours"] for r in lines]
    assert hours[0] > 0 and all(b > a for a, b in zip(hours, hours[1:]))
    loss = {e.step: e.value for e in acc.Scalars("loss")}
    assert loss == pytest.approx({r["step"]: r["loss"] for r in lines})
    stored = stored_accounting(run / "ckpt.pt")["device_hours"]
    assert stored >= hours[-1]

    cm_run(run, "--steps", "6", "--resume", "--allow-config-change")
    lines = log_lines(run)
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 5, 6]
    assert all(r["images"] == r["step"] * BATCH for r in lines)
    after = [r["device_hours"] for r in lines[4:]]
    assert after[0] > stored and after[1] > after[0]  # continues from the checkpoint, not from 0
    assert stored_accounting(run / "ckpt.pt")["device_hours"] > after[-1] - 1e-12
    assert steps_of(events(run), "loss") == [1, 2, 3, 4, 5, 6]  # appended, no step twice


def test_cm_flops_per_step_closed_form(tmp_path):
    """cm.MLP on 2-D points, width h: Linear layers emb (h->h, h->h), inp (2->h), 4 blocks of two h->h,
    out (h->2). A Linear layer of m multiply-adds per sample costs 2·m·B FLOPs forward, 2·m·B for the
    weight gradient and 2·m·B for the input gradient, which autograd skips for inp and the first emb
    layer (their inputs need no gradient). CT evaluates the network twice (θ, then θ⁻ without gradient),
    backward once."""
    h, d = HIDDEN, 2
    macs = 2 * h * h + d * h + 8 * h * h + h * d
    leaf = d * h + h * h
    fwd = 2 * macs * BATCH
    expected = 2 * fwd + 2 * macs * BATCH + 2 * (macs - leaf) * BATCH
    run = tmp_path / "r"
    cm_run(run, "--steps", "2")
    acc = stored_accounting(run / "ckpt.pt")
    assert acc["flops_per_step"] == expected


def test_step_flops_keeps_rng_and_grads():
    lin = torch.nn.Linear(5, 7)
    lin.weight.grad = torch.ones_like(lin.weight)
    torch.manual_seed(3)
    before = torch.get_rng_state()
    flops = cm.step_flops(lambda: lin(torch.randn(4, 5, requires_grad=True)).sum(), lin, torch.device("cpu"))
    assert flops == 3 * 2 * 5 * 7 * 4  # forward, weight gradient, input gradient
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(lin.weight.grad, torch.ones_like(lin.weight)) and lin.bias.grad is None


def block_tensorboard(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails: ImportError


def test_cm_missing_tensorboard_is_one_line(tmp_path, monkeypatch):
    block_tensorboard(monkeypatch)
    run = tmp_path / "r"
    code, err = run_main("cm.py", [*TOY, "--mode", "ct", "--steps", "2", "--tensorboard", "--out", str(run)])
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: --tensorboard needs the tensorboard package: pip install tensorboard")
    assert not (run / "log.jsonl").exists() and not (run / "ckpt.pt").exists()  # before step 0


def test_cm_without_flag_writes_no_events(tmp_path):
    run = tmp_path / "r"
    code, err = run_main("cm.py", [*TOY, "--mode", "ct", "--steps", "2", "--no-report", "--log-every", "1",
                                   "--out", str(run)])
    assert code == 0, err
    assert not (run / "tb").exists()
    assert [r["images"] for r in log_lines(run)] == [BATCH, 2 * BATCH]


# ----------------------------------------------------------------------------------------------
# full.train


def full_run(out: Path, *extra: str) -> None:
    code, err = run_main("full.train", ["--preset", "tiny-ct", "run.device='cpu'", "run.log_every=1",
                                        "run.tensorboard=True", f"run.out={str(out)!r}", *extra])
    assert code == 0, err


def test_full_events_accounting_fid_and_resume(tmp_path, monkeypatch):
    fids = iter([30.0, 20.0, 15.0, 12.0])
    monkeypatch.setattr(full.evaluate, "fid_during_training", lambda *a, **k: next(fids))
    run = tmp_path / "r"
    full_run(run, "opt.steps=2", "run.fid_every=1")
    cfg = json.loads((run / "config.json").read_text())
    batch = cfg["opt"]["batch"]
    acc = events(run)
    for tag in ("loss", "N", "mu", "lr", "img/s", "images", "device_hours", "fid"):
        assert steps_of(acc, tag) == [1, 2], tag
    assert [e.value for e in acc.Scalars("fid")] == [30.0, 20.0]
    assert {"grid/1step", "grid/2step"} <= set(acc.Tags()["images"])
    lines = log_lines(run)
    train, fid = [r for r in lines if "loss" in r], [r for r in lines if "fid" in r]
    assert all(r["images"] == r["step"] * batch for r in train) and [r["step"] for r in train] == [1, 2]
    hours = [r["device_hours"] for r in lines]
    assert hours[0] > 0 and all(b > a for a, b in zip(hours, hours[1:]))
    assert [r["step"] for r in fid] == [1, 2]
    summary = cfg["accounting"]
    assert summary["images"] == 2 * batch and summary["device_hours"] >= hours[-1]
    assert summary["flops_per_step"] > 0 and summary["flops"] == 2 * summary["flops_per_step"]
    assert checkpoints.load(run / "export.pt")["accounting"] == summary
    stored = checkpoints.load(checkpoints.latest(run))["accounting"]["device_hours"]

    png = full.plot_log.plot_fid(run)
    assert png.name == "fid_vs_device_hours.png" and png.read_bytes()[:4] == b"\x89PNG"

    full_run(run, "opt.steps=4", "run.fid_every=1", "--allow-config-change")
    lines = log_lines(run)
    train = [r for r in lines if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert all(r["images"] == r["step"] * batch for r in train)
    after = [r["device_hours"] for r in lines if r["step"] > 2]
    assert after[0] > stored and all(b > a for a, b in zip(after, after[1:]))
    assert steps_of(events(run), "loss") == [1, 2, 3, 4]
    final = json.loads((run / "config.json").read_text())["accounting"]
    assert final["images"] == 4 * batch and final["device_hours"] > stored
    assert final["flops_per_step"] == summary["flops_per_step"]  # the same step, measured again


def test_full_resume_from_an_earlier_checkpoint_drops_the_later_events(tmp_path):
    """A run resumed from step 2 after logging steps 3 and 4 (a lost checkpoint): the events of 3 and 4
    are replaced, not repeated."""
    run = tmp_path / "r"
    full_run(run, "opt.steps=4", "run.ckpt_every=2")
    checkpoints.ckpt_path(run, 4).unlink()
    assert steps_of(events(run), "loss") == [1, 2, 3, 4]
    full_run(run, "opt.steps=4", "run.ckpt_every=2", "run.resume=True")
    assert steps_of(events(run), "loss") == [1, 2, 3, 4]


def test_full_flops_do_not_depend_on_microbatches(tmp_path):
    """flops_per_step is of the whole step: one microbatch measured, times the accumulation rounds."""
    per = {}
    for micro in (0, 8):
        full_run(tmp_path / f"m{micro}", "opt.steps=1", f"opt.microbatch={micro}")
        per[micro] = json.loads((tmp_path / f"m{micro}" / "config.json").read_text())["accounting"]
    assert per[8]["flops_per_step"] == pytest.approx(per[0]["flops_per_step"], rel=0.01)


def test_full_missing_tensorboard_is_one_line(tmp_path, monkeypatch):
    block_tensorboard(monkeypatch)
    run = tmp_path / "r"
    code, err = run_main("full.train", ["--preset", "tiny-ct", "opt.steps=2", "run.device='cpu'",
                                        "run.tensorboard=True", f"run.out={str(run)!r}"])
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert "run.tensorboard=True needs the tensorboard package: pip install tensorboard" in err
    assert not checkpoints.list_checkpoints(run) and not (run / "log.jsonl").exists()


def test_plot_log_without_fid_lines_is_one_line(tmp_path):
    (tmp_path / "log.jsonl").write_text(json.dumps({"step": 1, "loss": 0.5, "device_hours": 0.1}) + "\n")
    with pytest.raises(cm.CMError, match="no FID lines"):
        full.plot_log.plot_fid(tmp_path)


def _plot_log(run) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            full.plot_log.main([str(run)])
        except SystemExit as e:
            return e.code, err.getvalue()
    return 0, err.getvalue()


@pytest.mark.parametrize("line, needle", [
    (b"[" * 100_000, "log.jsonl:2 is not a JSON line"),  # deeper than json.loads recurses
    (b"\xff\xfe{}", "log.jsonl:2 is not a JSON line"),
    (b'{"step": 2, "fid": "7.5", "device_hours": 0.2}', "log.jsonl:2: fid and device_hours are not"),
    (b'{"step": 2, "fid": NaN, "device_hours": 0.2}', "log.jsonl:2: fid and device_hours are not"),
    (b'{"step": 2, "fid": 7.5, "device_hours": [0.2]}', "log.jsonl:2: fid and device_hours are not"),
    (b'{"step": 2, "fid": 1' + b"0" * 400 + b', "device_hours": 0.2}', "log.jsonl:2: fid and device_hours")],
    ids=["deep", "not-utf-8", "fid-string", "fid-nan", "hours-list", "fid-400-digits"])
def test_plot_log_of_a_hostile_log_is_one_line(tmp_path, line, needle):
    good = json.dumps({"step": 1, "fid": 9.0, "device_hours": 0.1}).encode()
    (tmp_path / "log.jsonl").write_bytes(good + b"\n" + line + b"\n")
    code, err = _plot_log(tmp_path)
    assert code == 1 and len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert needle in err, err
    assert not (tmp_path / "fid_vs_device_hours.png").exists()


def test_plot_log_of_a_fifo_is_one_line(tmp_path):
    os.mkfifo(tmp_path / "log.jsonl")
    code, err = _plot_log(tmp_path)
    assert code == 1 and "is not a regular file" in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("bad", [{"device_hours": -1.0, "flops_per_step": 1}, {"device_hours": "1"},
                                 {"device_hours": 1.0, "flops_per_step": 2.5}, [1.0],
                                 {"device_hours": 1.0, "flops": -3}])
def test_bad_accounting_entry_is_one_line(tmp_path, bad):
    run = tmp_path / "r"
    code, err = run_main("cm.py", [*TOY, "--mode", "ct", "--steps", "1", "--no-report", "--out", str(run)])
    assert code == 0, err
    state = torch.load(run / "ckpt.pt", weights_only=True)
    state.pop(cm.CHECKSUM)
    cm.save_checkpoint(run / "ckpt.pt", state | {"accounting": bad})
    with pytest.raises(cm.CMError, match="accounting"):
        cm.load_checkpoint(run / "ckpt.pt")
    code, err = run_main("cm.py", [*TOY, "--mode", "ct", "--steps", "2", "--no-report", "--resume",
                                   "--allow-config-change", "--out", str(run)])
    assert code == 1 and len(err.strip().splitlines()) == 1 and "accounting" in err, err
