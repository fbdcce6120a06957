"""scripts/gpu_check.py: the prepared GPU check's pipeline, run on the CPU (--dry-run)."""
import importlib.util
import json
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_check)


def test_gpu_check_dry_run(tmp_path, capsys):
    """The GPU check's whole pipeline, on the CPU with tiny sizes: tests/test_gpu.py, the bench per
    precision, cm.py and full.train; one report file that says all went well and keeps every train
    table, each part's whole output in its log; a rerun in the same --out passes too (~40 s in all)."""
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path)]) == 0
    report = (tmp_path / "report.md").read_text()
    assert "result: all ok" in report and "FAILED" not in report
    trains = [f"\ntrain: one optimiser step per recipe (ncsnpp-tiny, batch 4, {q}," for q in ("fp32", "bf16")]
    for part in ("tests/test_gpu.py: ok", "passed", "bench fp32,bf16 + options: ok", "\nsample", "\noptions:",
                 "cm.py --mode ct: ok", "full.train --preset tiny-ct: ok", "tiny-ct: last log line", *trains):
        assert part in report, part
    for name in gpu_check.GPU_CHECK_PARTS:
        assert (tmp_path / f"{name}.log").stat().st_size > 0, name
    assert [r["precision"] for r in json.loads((tmp_path / "bench.json").read_text())] == ["fp32", "bf16"]
    # a rerun of the parts that keep state in --out (the training runs) starts them afresh
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path), "--parts", "cm-ct,tiny-ct"]) == 0
    report = (tmp_path / "report.md").read_text()
    assert "result: all ok" in report and "cm.py --mode ct: ok" in report and "tiny-ct: ok" in report, report


def test_gpu_check_stops_a_part_at_its_time_limit(tmp_path, capsys):
    """A part past its limit is stopped (here cm.py after 1 s, as a planned stop of a training run) and
    reported; the check goes on and writes its report and the part's log."""
    t0 = time.perf_counter()
    assert gpu_check.gpu_check(tmp_path, dry_run=True, budget=1.0, parts=["cm-ct"]) == 0
    assert time.perf_counter() - t0 < 20
    report = (tmp_path / "report.md").read_text()
    assert "cm.py --mode ct: ok" in report and "stopped after 1 s, as planned" in report, report
    assert "stopped after 1 s" in (tmp_path / "cm-ct.log").read_text()
    assert not (tmp_path / "runs" / "cm-ct" / "ckpt.pt").exists()  # killed, not waited for (it needs ~5 s)


def test_gpu_check_rejects_an_unknown_part(capsys):
    with pytest.raises(SystemExit) as e:
        gpu_check.main(["--dry-run", "--parts", "bench,speed"])
    err = capsys.readouterr().err
    assert e.value.code == 1 and "unknown --parts 'speed'" in err and err.count("\n") == 1, err
