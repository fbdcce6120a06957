"""CUDA checks: mixed precision keeps the boundary condition, and short runs train without NaN.

Marked `gpu`: skipped on machines without CUDA (conftest.py). `python -m full.bench --gpu-check` runs
this file on a GPU; its `--dry-run` runs it on the CPU (CM_GPU_CHECK_DEVICE=cpu), fp16 left out there."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cm
from full.networks import NCSNppConfig, build_network

ROOT = Path(__file__).resolve().parents[1]
DEVICE = os.environ.get("CM_GPU_CHECK_DEVICE", "cuda")
pytestmark = pytest.mark.gpu
CUDA = DEVICE == "cuda"
PRECISIONS = ["bf16", "fp16"] if CUDA else ["bf16"]  # fp16 autocast is for CUDA


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("net", ["tiny", "cifar10"] if CUDA else ["tiny"])  # CPU: the dry run, in seconds
def test_boundary_condition_under_autocast(dtype, net):
    """f(x, ε) == x bit for bit under autocast (the skip path stays fp32), and f(x, T) is finite."""
    torch.manual_seed(0)
    cfg = NCSNppConfig.tiny(16) if net == "tiny" else NCSNppConfig.cifar10()
    f = cm.ConsistencyFunction(build_network(cfg), 0.5, 0.002).to(DEVICE)
    with torch.no_grad():
        for p in f.parameters():  # F's output layer starts at zero: make F non-zero
            p.add_(0.02 * torch.randn_like(p))
    res = cfg.img_resolution
    x = torch.randn(4, 3, res, res, device=DEVICE)
    with torch.no_grad(), torch.autocast(DEVICE, dtype):
        y = f(x, 0.002)
        y_T = f(x, 80.0)
    assert y.dtype == torch.float32 and torch.equal(y, x)
    assert y_T.dtype == torch.float32 and torch.isfinite(y_T).all() and not torch.equal(y_T, 80.0 * x)


def test_cm_train(tmp_path):
    rows = cm.train(cm.Config(mode="ct", dataset="toy", steps=30 if CUDA else 5, channels=64,
                              batch_size=256 if CUDA else 32, device=DEVICE, precision="bf16",
                              out=str(tmp_path), log_every=10))
    assert all(torch.isfinite(torch.tensor(v)) for v in rows.values())
    assert (tmp_path / "ckpt.pt").is_file()  # written only after the finite-loss check


@pytest.mark.parametrize("precision", PRECISIONS)
def test_full_train(tmp_path, precision):
    r = subprocess.run([sys.executable, "-m", "full.train", "--preset", "tiny-ct", f"run.out='{tmp_path}'",
                        f"run.device='{DEVICE}'", f"opt.precision='{precision}'",
                        f"opt.steps={10 if CUDA else 3}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]  # a NaN loss would exit 2 ("loss is nan at step ...")
    assert list(tmp_path.glob("ckpt-*.pt"))
