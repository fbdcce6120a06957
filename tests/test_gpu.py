"""CUDA checks: mixed precision keeps the boundary condition, and short runs train without NaN.
Marked `gpu`: skipped on machines without CUDA (conftest.py)."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cm
from full.networks import NCSNppConfig, build_network

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_boundary_condition_under_cuda_autocast(dtype):
    torch.manual_seed(0)
    f = cm.ConsistencyFunction(build_network(NCSNppConfig.tiny(16)), 0.5, 0.002).cuda()
    x = torch.randn(4, 3, 16, 16, device="cuda")
    with torch.autocast("cuda", dtype):
        y = f(x, 0.002)
        assert torch.isfinite(f(x, 80.0)).all()
    assert y.dtype == torch.float32 and torch.equal(y, x)


def test_cm_train_on_cuda(tmp_path):
    rows = cm.train(cm.Config(mode="ct", dataset="toy", steps=30, channels=64, batch_size=256, device="cuda",
                              precision="bf16", out=str(tmp_path), log_every=10))
    assert all(torch.isfinite(torch.tensor(v)) for v in rows.values())


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_full_train_on_cuda(tmp_path, precision):
    r = subprocess.run([sys.executable, "-m", "full.train", "--preset", "tiny-ct", f"run.out='{tmp_path}'",
                        "run.device='cuda'", f"opt.precision='{precision}'", "opt.steps=10"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert list(tmp_path.glob("ckpt-*.pt"))
