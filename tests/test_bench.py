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


def test_loss_error_compares_each_precision_with_fp32(capsys):
    rows = bench.main(["--loss-error", "--net", "ncsnpp-tiny", "--batch", "2", "--grids", "18,40",
                       "--precisions", "fp32,bf16", "--device", "cpu"])
    assert [(r["N"], r["mode"]) for r in rows] == [(18, "ct"), (18, "cd"), (40, "ct"), (40, "cd")]
    for r in rows:  # bf16 moves them a little, not to nonsense (the README reports the sizes)
        assert r["loss"] > 0 and 0 < r["loss_rel"] < 0.05 and 0 < r["grad_rel"] < 0.5 and r["grad_cos"] > 0.9
    assert "grad rel" in capsys.readouterr().out
