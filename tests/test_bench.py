"""full.bench runs end to end on the CPU and reports finite, positive throughputs (no timing asserts)."""
import pytest

from full import bench


def test_bench_reports_each_precision(capsys):
    rows = bench.main(["--net", "ncsnpp-tiny", "--batch-size", "2", "--steps", "1", "--warmup", "0",
                       "--precisions", "fp32,bf16", "--device", "cpu"])
    assert [r["precision"] for r in rows] == ["fp32", "bf16"]
    assert all(r["train_ips"] > 0 and r["sample_ips"] > 0 and r["loss_finite"] for r in rows)
    assert "train img/s" in capsys.readouterr().out


def test_bench_rejects_unknown_precision(capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--precisions", "fp8", "--device", "cpu"])
    assert e.value.code == 1 and "unknown precision" in capsys.readouterr().err
