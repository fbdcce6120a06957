"""CUDA checks: mixed precision keeps the boundary condition, and short runs train without NaN.

Marked `gpu`: skipped on machines without CUDA (conftest.py). `python scripts/gpu_check.py` runs
this file on a GPU; its `--dry-run` runs it on the CPU (CM_GPU_CHECK_DEVICE=cpu), fp16 left out there."""
import contextlib
import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import cm
import full.train
from full.networks import NCSNppConfig, build_network
from full.presets import resolve

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
    rows = cm.train(cm.config(mode="ct", dataset="toy", steps=30 if CUDA else 5, channels=64,
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


@pytest.mark.parametrize("precision", ["fp32", *PRECISIONS])
def test_shared_dropout_gives_the_target_the_online_masks(precision):
    """Dropout 0.3: the online pass (with grad) and the target pass (no grad) through cm.SharedDropout
    draw the same masks on this device, so their outputs are equal bit for bit; a third pass outside it
    draws other masks (so the comparison can see a difference)."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(NCSNppConfig.tiny(16), dropout=0.3)
    f = cm.ConsistencyFunction(build_network(cfg), 0.5, 0.002).to(DEVICE).train()
    with torch.no_grad():
        for p in f.parameters():  # F's output layer starts at zero: make F non-zero
            p.add_(0.02 * torch.randn_like(p))
    drops = [m for m in f.modules() if isinstance(m, torch.nn.Dropout)]
    masks = []  # per dropout call: where it zeroed a non-zero input
    for m in drops:
        m.register_forward_hook(lambda m, inp, out: masks.append(((out == 0) & (inp[0] != 0)).cpu()))
    x, sigma = torch.randn(4, 3, 16, 16, device=DEVICE), torch.full((4,), 2.0, device=DEVICE)
    amp = (contextlib.nullcontext if precision == "fp32" else
           lambda: torch.autocast(DEVICE, {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]))
    n = len(drops)
    assert n > 0
    # the default attention kernels (they may differ with grad on and off: only the masks are compared),
    # then the math kernel, under which the two passes compute alike: outputs equal bit for bit
    for kernels in ([], [SDPBackend.MATH]):
        masks.clear()
        share = cm.SharedDropout(torch.device(DEVICE))
        with sdpa_kernel(kernels) if kernels else contextlib.nullcontext():
            with amp():
                online = share.wrap(f)(x, sigma)
            with torch.no_grad(), amp():
                target = share.wrap(f)(x, sigma)
                other = f(x, sigma)
        assert len(masks) == 3 * n and all(m.any() for m in masks)
        same = all(torch.equal(a, b) for a, b in zip(masks[:n], masks[n:2 * n]))
        assert same, "the target drew other masks"
        assert not all(torch.equal(a, b) for a, b in zip(masks[:n], masks[2 * n:]))
        assert online.requires_grad and not target.requires_grad and torch.isfinite(online).all()
    diff = (online.detach() - target).abs().max().item()
    assert torch.equal(online.detach(), target), f"same masks, yet the outputs differ by {diff:.2e}"
    assert not torch.equal(other, target)


@pytest.mark.parametrize("precision", ["fp32", *PRECISIONS])
def test_full_train_ict_with_dropout(tmp_path, precision):
    """A few full.train steps of tiny-ict with dropout 0.3 (shared masks, target = stopgrad θ): finite
    losses in every log line, a checkpoint at the end (a non-finite loss raises CMError instead)."""
    cfg = resolve("tiny-ict", [f"run.out='{tmp_path}'", f"run.device='{DEVICE}'", "net.dropout=0.3",
                               f"opt.precision='{precision}'", f"opt.steps={20 if CUDA else 3}",
                               "run.log_every=1"])
    r = full.train.train(cfg)
    assert r["trainer"].shared_dropout and r["step"] == cfg.opt.steps
    losses = [json.loads(v)["loss"] for v in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert len(losses) == cfg.opt.steps and all(math.isfinite(v) for v in losses)
    assert r["checkpoint"].is_file()
