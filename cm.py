"""Consistency Models in one file: the method top to bottom, and a trainer that runs on a laptop.

    python cm.py                                  # CD on 8x8 digits (EDM teacher, then CD), CPU, minutes
    python cm.py --mode ct                        # CT: no teacher at all; --mode ict, ect: [iCT], [ECT]
    python cm.py --dataset toy --mode edm         # a 2-D ring (--dataset cifar10: the real thing, on a GPU)
    python cm.py --checkpoint runs/digits-cd/ckpt.pt  # sample grids from a checkpoint

This file stands alone: it needs torch, and optionally tqdm (progress bars), scikit-learn (the digits),
torchvision (CIFAR-10, PNG grids), matplotlib (the toy scatter plot) and lpips (the LPIPS metric), each
imported only where it is used. Copy it anywhere; full/ builds the paper-scale runs on top of it.

References
    [CM]  Song, Dhariwal, Chen, Sutskever. Consistency Models. ICML 2023, arXiv:2303.01469v2.
    [EDM] Karras, Aittala, Aila, Laine. Elucidating the Design Space of Diffusion-Based Generative
          Models. NeurIPS 2022, arXiv:2206.00364.
    [iCT] Song, Dhariwal. Improved Techniques for Training Consistency Models. arXiv:2310.14189.
    [ECT] Geng, Pokle, Luo, Lin, Kolter. Consistency Models Made Easy. arXiv:2406.14548 (code:
          github.com/locuslab/ect, whose defaults and run_ecm.sh give ECT's constants here).

Notation (code name = paper symbol)
    sigma       t (noise level; the PF ODE of [EDM] has x_t = x + t z, so t is also the std)
    sigma_min   epsilon = 0.002      sigma_max  T = 80      sigma_data  0.5      rho  7
    sigmas      t_1 = eps < t_2 < ... < t_N = T, the ascending grid of [CM Sec. 4], indices n = 1..N
                (in code 0-based: sigmas[n-1] is t_n)
    F           the raw network F_theta        f   the consistency function f_theta [CM Eq. 7]
    D           a denoiser D(x, t) ~ E[x_0 | x_t] ([EDM]; the CD teacher, written s_phi in [CM])
    target      theta^- (EMA of the online net at rate mu, used inside the loss)
    ema         the evaluation EMA (a separate average used for sampling), never the target
    k, K        training step and total steps; s0, s1, mu0 the curriculum constants [CM App. C]

Sections: the method 1 noise levels · 2 parameterization · 3 ODE steps · 4 losses · 5 iCT and ECT ·
6 recipes (one dispatch: a mode's schedule and loss; CMConfig, the math settings) · 7 samplers · 8 target
and EMA; then what runs it: 9 networks · 10 data · 11 files, devices, grids, distances · 12 the
trainer's settings · 13 the trainer · 14 command line. Importing this module has no side effects.
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import copy
import dataclasses
import errno
import hashlib
import inspect
import json
import math
import os
import re
import shutil
import signal
import stat
import sys
import tempfile
import threading
import time
import typing
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

if __name__ == "__main__":  # python cm.py: a Ctrl-C, SIGTERM or SIGHUP in the second `import torch` takes is
    def _stopped_while_starting(signum, frame):  # one line too; main()'s interrupts_as_errors takes over
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        sys.exit(f"error: stopped by {name} while starting; nothing was written")
    for _s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if _s is not None and (_s != getattr(signal, "SIGHUP", None) or signal.getsignal(_s) is not
                               signal.SIG_IGN):  # nohup's SIGHUP stays ignored
            signal.signal(_s, _stopped_while_starting)

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


class CMError(RuntimeError):
    """The one user-facing error of cm.py and full/ (bad input, a run that cannot go on): every main()
    prints its message as one line and exits with status 1. A programming error keeps its traceback."""


# ----------------------------------------------------------------------------------------------
# 1. Noise levels: the grid, the curricula N(k), μ(k), and sampling levels

def karras_sigmas(N: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> Tensor:
    """Ascending grid t_i = (ε^(1/ρ) + (i-1)/(N-1)·(T^(1/ρ) - ε^(1/ρ)))^ρ, i = 1..N.  [CM Sec. 4, EDM Eq. 5]
    In float64: for iCT's N up to ~1300, neighbouring levels differ in the 4th digit."""
    if N < 2:
        raise ValueError(f"the grid needs N >= 2 points, got N={N}")
    if rho <= 0:
        raise ValueError(f"rho must be > 0, got {rho}")
    i = torch.arange(N, dtype=torch.float64) / (N - 1)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (lo + i * (hi - lo)) ** rho
    sigmas[0], sigmas[-1] = sigma_min, sigma_max  # exact ends, free of pow round-off
    return sigmas


def ct_num_steps(k: int, K: int, s0: int, s1: int) -> int:
    """N(k) = ⌈√(k/K·((s1+1)² - s0²) + s0²) - 1⌉ + 1, from N(0) = s0 to N(K) = s1 + 1.  [CM App. C]"""
    k = min(max(k, 0), K)
    return math.ceil(math.sqrt(k / K * ((s1 + 1) ** 2 - s0 ** 2) + s0 ** 2) - 1) + 1


def ct_target_rate(k: int, K: int, s0: int, s1: int, mu0: float, rule: str = "code") -> float:
    """μ(k) = exp(s0·ln μ0 / (N(k) - 1)) ('code'), or exp(s0·ln μ0 / N(k)) ('paper').  [CM App. C]
    'code' is what both official codebases compute, so every CT number of the paper used it (μ(0) =
    μ0^(s0/(s0-1)) = 0.81 for μ0 = 0.9, s0 = 2); 'paper' is the paper's text, μ(0) = μ0. Both rise to 1."""
    if rule not in MU_RULES:
        raise ValueError(f"unknown mu rule {rule!r}; choose {' or '.join(MU_RULES)}")
    return math.exp(s0 * math.log(mu0) / (ct_num_steps(k, K, s0, s1) - MU_RULES[rule]))


MU_RULES = {"code": 1, "paper": 0}  # what ct_target_rate subtracts from N(k)


def ts_to_sigmas(ts: Sequence[int], N: int, sigma_min: float = 0.002, sigma_max: float = 80.0,
                 rho: float = 7.0) -> list[float]:
    """Official `ts` indices -> descending noise levels for sample_multistep: index 0 of the N-point grid
    is T, index N-1 is ε (e.g. ts = 0,11,17 of 18 for two-step CIFAR-10 CD). N-1 only marks the end (a step
    at ε adds √(ε² - ε²) = 0 noise and f(x, ε) = x), so it is dropped. (Should ts not end at N-1, the
    official sampler returns its last sample re-noised to that level; here every index denoises.)"""
    if list(ts) != sorted(set(ts)) or not ts or ts[0] < 0 or ts[-1] > N - 1:
        raise ValueError(f"ts must be strictly increasing indices in [0, {N - 1}], got {list(ts)}")
    desc = karras_sigmas(N, sigma_min, sigma_max, rho).flip(0)
    return [desc[i].item() for i in ts if i != N - 1]


def check_levels(levels: Sequence[float], sigma_min: float, sigma_max: float = math.inf) -> list[float]:
    """Multistep levels τ_1 > τ_2 > ...: finite, strictly decreasing, within [ε, T] (a level at ε only
    re-noises by √(ε² - ε²) = 0); anything else is a ValueError. The one check of sampling and editing."""
    levels = [float(t) for t in levels]
    if not levels or not all(map(math.isfinite, levels)) or any(a <= b for a, b in zip(levels, levels[1:])) \
            or levels[-1] < sigma_min or levels[0] > sigma_max:
        raise ValueError(f"levels must be finite, strictly decreasing and within [sigma_min, sigma_max] = "
                         f"[{sigma_min}, {sigma_max}], got {levels}")
    return levels


# ----------------------------------------------------------------------------------------------
# 2. Parameterization: f(x, t) = c_skip(t) x + c_out(t) F(c_in(t) x, c_noise(t))  [CM Eq. 7]

def append_dims(v: Tensor, ndim: int) -> Tensor:
    """(B,) -> (B, 1, ..., 1) with ndim dimensions, to broadcast per-sample scalars over x."""
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def wide(x: Tensor) -> Tensor:
    """x in float32, or float64 if it is: the precision the parameterisation's skip paths run in."""
    return x if x.dtype == torch.float64 else x.float()


def boundary_scalings(sigma: Tensor, sigma_data: float = 0.5, sigma_min: float = 0.002):
    """c_skip = σd² / ((t-ε)² + σd²),  c_out = σd (t-ε) / √(σd² + t²),  c_in = 1 / √(t² + σd²).  [CM App. C]
    At t = ε, c_skip = 1 and c_out = 0 exactly: f(x, ε) = x for any network (the boundary condition).
    With ε = 0 these are the scalings of EDM's denoiser [EDM Tab. 1]."""
    c_skip = sigma_data ** 2 / ((sigma - sigma_min) ** 2 + sigma_data ** 2)
    c_out = sigma_data * (sigma - sigma_min) / (sigma_data ** 2 + sigma ** 2).sqrt()
    c_in = 1 / (sigma ** 2 + sigma_data ** 2).sqrt()
    return c_skip, c_out, c_in


# c_noise(t): EDM and NCSN++ use ln(t)/4 [EDM Tab. 1]; the released ADM checkpoints were trained
# with 1000·ln(t + 1e-44)/4 (a DDPM-style timestep range; 1e-44 keeps t = 0 finite).
NOISE_CONDITIONING = {
    "edm": lambda sigma: sigma.log() / 4,
    "adm": lambda sigma: 1000 * 0.25 * (sigma + 1e-44).log(),
}


class ConsistencyFunction(nn.Module):
    """f_θ(x, t) = c_skip(t) x + c_out(t) F_θ(c_in(t) x, c_noise(t)).  [CM Eq. 7]
    With sigma_min = 0 it is EDM's preconditioned denoiser D(x, t) [EDM Tab. 1]. Only F runs under autocast
    (its output is cast to fp32 before the skip), so f(x, ε) = x holds exactly in mixed precision too."""

    def __init__(self, net: nn.Module, sigma_data: float = 0.5, sigma_min: float = 0.002,
                 noise_cond: str = "edm"):
        super().__init__()
        self.net, self.sigma_data, self.sigma_min = net, sigma_data, sigma_min
        self.c_noise = NOISE_CONDITIONING[noise_cond]

    def forward(self, x: Tensor, sigma: Tensor | float, class_labels: Tensor | None = None) -> Tensor:
        x = wide(x)  # the skip path never runs in low precision
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(x.shape[0])  # (B,)
        c_skip, c_out, c_in = (append_dims(c, x.ndim)
                               for c in boundary_scalings(sigma, self.sigma_data, self.sigma_min))
        F_x = self.net(c_in * x, self.c_noise(sigma), class_labels)
        return c_skip * x + c_out * F_x.to(x.dtype)


# ----------------------------------------------------------------------------------------------
# 3. ODE steps for the probability-flow ODE dx/dt = (x - D(x, t)) / t  [EDM Eq. 3 with σ(t) = t]

def to_d(x: Tensor, sigma: Tensor, denoised: Tensor) -> Tensor:
    """dx/dt = (x - D(x, t)) / t."""
    return (x - denoised) / append_dims(sigma, x.ndim)


def euler_step(denoiser: Callable, x: Tensor, sigma: Tensor, sigma_next: Tensor) -> Tensor:
    """x + (t' - t) d(x, t): one Euler step of the PF ODE (the last step to t = 0 of EDM's sampler)."""
    return x + append_dims(sigma_next - sigma, x.ndim) * to_d(x, sigma, denoiser(x, sigma))


def heun_step(denoiser: Callable, x: Tensor, sigma: Tensor, sigma_next: Tensor) -> Tensor:
    """One Heun step from t to t' > 0: Euler, then the average of the two slopes.  [EDM Alg. 1, CM Eq. 6]"""
    d = to_d(x, sigma, denoiser(x, sigma))
    x_euler = x + append_dims(sigma_next - sigma, x.ndim) * d
    d_next = to_d(x_euler, sigma_next, denoiser(x_euler, sigma_next))
    return x + append_dims(sigma_next - sigma, x.ndim) * (d + d_next) / 2


# ----------------------------------------------------------------------------------------------
# 4. Losses. Each returns a scalar; randomness (indices n, noise z) can be passed in.

def l2(x: Tensor, y: Tensor) -> Tensor:
    """Squared L2 distance, averaged over all but the batch dimension: (B, ...) -> (B,)."""
    return (x - y).pow(2).flatten(1).mean(1)


def l1(x: Tensor, y: Tensor) -> Tensor:
    return (x - y).abs().flatten(1).mean(1)


def pseudo_huber(x: Tensor, y: Tensor, c: float | None = None) -> Tensor:
    """√(‖x - y‖² + c²) - c, by default c = 0.00054·√dim (0.03 for CIFAR-10).  [iCT Sec. 3.3]
    ≈ ‖x - y‖²/(2c) for ‖x - y‖ ≪ c and ≈ ‖x - y‖ - c for ‖x - y‖ ≫ c; c = 0 is the L2 norm."""
    c = 0.00054 * math.sqrt(x[0].numel()) if c is None else c
    return ((x - y).pow(2).flatten(1).sum(1) + c ** 2).sqrt() - c


def l2_norm(x: Tensor, y: Tensor) -> Tensor:
    """‖x - y‖₂, pseudo-Huber with c = 0: ECT's CIFAR-10 metric (its code's default c = 0).  [ECT Sec. 3]"""
    return pseudo_huber(x, y, 0.0)


VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"  # torchvision's IMAGENET1K_V1


def read_hub_weights(url: str, what: str) -> dict:
    """The tensors of a weight file in torch.hub's cache (downloaded once), read before any library sees
    them: the sha256 prefix in the file's name is checked and the file is loaded with weights_only=True, so
    a file planted or corrupted in the cache can neither run code nor pass as the real weights."""
    import socket

    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
    prefix = path.stem.rsplit("-", 1)[-1]
    if not path.exists():
        old = socket.getdefaulttimeout()
        socket.setdefaulttimeout(60.0)  # torch.hub's urlopen has none: a dropped packet would hang
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(url, str(path), hash_prefix=prefix, progress=sys.stderr.isatty())
        except Exception as e:  # offline (URLError), a proxy page (hash mismatch), a full disk
            raise CMError(f"{what} weights not available ({type(e).__name__}: {str(e)[:80]}): download {url} "
                          f"to {path} by hand") from None
        finally:
            socket.setdefaulttimeout(old)
    if not path.is_file():
        raise CMError(f"{what} weights {path}: not a regular file")
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            sha.update(chunk)
    if not sha.hexdigest().startswith(prefix):
        raise CMError(f"{what} weights {path}: sha256 {sha.hexdigest()[:12]}... is not the {prefix}... its "
                      "name states (a corrupt or replaced file): delete it to download it again")
    return read_tensors(path, what)


def read_tensors(path: str | os.PathLike, what: str) -> dict:
    """A state dict of tensors from a weight file, read with weights_only=True: no file can run code."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickled code, a text file, a truncated zip
        raise CMError(f"{what} weights {path}: not a weights-only PyTorch file ({type(e).__name__})"
                      ) from None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise CMError(f"{what} weights {path}: not a state dict of tensors")
    return state


class LPIPS(nn.Module):
    """LPIPS(VGG) with inputs upsampled bilinearly to 224x224, images in [-1, 1].  [CM Sec. 5, App. C]
    The `lpips` package's network (max pooling), as the official CIFAR-10 (JAX) runs used it;
    `avg_pool=True` is piq's LPIPS(replace_pooling=True) of the official ImageNet-64 / LSUN-256 runs: the
    same features and calibration with average pooling, resized to 224 only below 256 pixels (piq's
    standardisation of (x + 1)/2 equals lpips' scaling layer on x in [-1, 1]). pretrained_backbone=False:
    a random VGG (offline tests); the calibration ships inside `lpips`, the VGG16 weights download once."""

    def __init__(self, pretrained_backbone: bool = True, avg_pool: bool = False):
        super().__init__()
        try:
            import lpips
        except ImportError:
            raise CMError("LPIPS needs the lpips package: pip install lpips (or use --metric l2)") from None
        with warnings.catch_warnings():  # lpips still uses torchvision's deprecated `pretrained=`
            warnings.simplefilter("ignore", UserWarning)
            self.net = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False)  # torchvision downloads nothing
        if pretrained_backbone:  # the VGG16 features, read here (torchvision would unpickle the cache freely)
            state = read_hub_weights(VGG16_URL, "LPIPS VGG16")
            for block in self.net.net.children():  # slice1..slice5 hold torchvision's features[i] as child i
                try:
                    block.load_state_dict({k: state[f"features.{k}"] for k in block.state_dict()})
                except (KeyError, RuntimeError) as e:
                    raise CMError(f"LPIPS VGG16 weights do not fit torchvision's VGG16 ({str(e)[:80]})"
                                  ) from None
        self.avg_pool = avg_pool
        for block in self.net.net.children() if avg_pool else ():
            for name, layer in block.named_children():
                if isinstance(layer, nn.MaxPool2d):
                    setattr(block, name, nn.AvgPool2d(2, 2))
        self.net.eval().requires_grad_(False)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        if x.shape[1] == 1:  # grey images: repeat to RGB
            x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)
        if not self.avg_pool or x.shape[-1] < 256:
            x, y = (F.interpolate(v.float(), size=224, mode="bilinear", align_corners=False) for v in (x, y))
        return self.net(x.float(), y.float()).flatten(1).mean(1)


class PiqLPIPS(LPIPS):
    """piq's LPIPS(replace_pooling=True): LPIPS with average pooling (the ADM presets' metric)."""

    def __init__(self, pretrained_backbone: bool = True):
        super().__init__(pretrained_backbone, avg_pool=True)


METRICS = {"l2": l2, "l1": l1, "pseudo_huber": pseudo_huber, "l2_norm": l2_norm, "lpips": LPIPS,
           "lpips_piq": PiqLPIPS}  # the LPIPS entries are modules: make_metric builds them


def _draw(x: Tensor, N: int, n: Tensor | None, z: Tensor | None, index_probs: Tensor | None = None):
    """n ~ U{1, ..., N-1} or index_probs (0-based: t_n = sigmas[n], t_{n+1} = sigmas[n+1]); z ~ N(0, I)."""
    if n is None:
        n = (torch.randint(0, N - 1, (x.shape[0],)) if index_probs is None else
             torch.multinomial(index_probs.float().cpu(), x.shape[0], replacement=True)).to(x.device)
    return n, torch.randn_like(x) if z is None else z


def consistency_loss(f: Callable, f_target: Callable, x: Tensor, t: Tensor, r: Tensor, z: Tensor,
                     metric: Callable = l2, weight: Callable | None = None) -> Tensor:
    """E[λ(r, t) d(f_θ(x + t z, t), f_θ⁻(x + r z, r))], r < t, the same z in both; f(·, 0) := x.
    x stands in for the denoiser: an Euler step of the PF ODE from x + t z with D = x lands on x + r z
    [CM Thm. 2]. Every consistency-training recipe here is this loss with its own draw of (t, r), weighting
    λ (≡ 1 unless given) and metric d. At r = 0 the target is x itself (the boundary condition,
    [ECT Sec. 3])."""
    online = f(x + append_dims(t, x.ndim) * z, t)
    with torch.no_grad():
        live = append_dims(r > 0, x.ndim)
        target = torch.where(live, f_target(x + append_dims(r, x.ndim) * z, torch.where(r > 0, r, t)), x)
    lam = 1.0 if weight is None else weight(r, t)
    return (lam * metric(online, target)).mean()


def ct_loss(f: Callable, f_target: Callable, x: Tensor, sigmas: Tensor, metric: Callable = l2,
            n: Tensor | None = None, z: Tensor | None = None, weight: Callable | None = None,
            index_probs: Tensor | None = None) -> Tensor:
    """E[λ(t_n, t_{n+1}) d(f_θ(x + t_{n+1} z, t_{n+1}), f_θ⁻(x + t_n z, t_n))].  [CM Alg. 3]
    n ~ U{1..N-1} as in [CM], or from `index_probs` (iCT's lognormal_index_probs)."""
    n, z = _draw(x, len(sigmas), n, z, index_probs)
    sigmas = sigmas.to(x.device, x.dtype)
    return consistency_loss(f, f_target, x, sigmas[n + 1], sigmas[n], z, metric, weight)


def cd_loss(f: Callable, f_target: Callable, teacher: Callable, x: Tensor, sigmas: Tensor,
            metric: Callable = l2, n: Tensor | None = None, z: Tensor | None = None) -> Tensor:
    """E[d(f_θ(x_{t_{n+1}}, t_{n+1}), f_θ⁻(x̂_{t_n}, t_n))], x̂_{t_n} one teacher Heun step.  [CM Alg. 2]"""
    n, z = _draw(x, len(sigmas), n, z)
    sigmas = sigmas.to(x.device, x.dtype)
    t, t_next = sigmas[n], sigmas[n + 1]
    x_next = x + append_dims(t_next, x.ndim) * z
    with torch.no_grad():
        target = f_target(heun_step(teacher, x_next, t_next, t), t)
    return metric(f(x_next, t_next), target).mean()


EDM_P_MEAN, EDM_P_STD = -1.2, 1.2  # ln t ~ N(P_mean, P_std²) of EDM's training  [EDM Tab. 1]


def edm_loss(D: Callable, x: Tensor, sigma: Tensor | None = None, z: Tensor | None = None,
             sigma_data: float = 0.5, P_mean: float = EDM_P_MEAN, P_std: float = EDM_P_STD) -> Tensor:
    """E[λ(t) ‖D(x + t z, t) - x‖²], ln t ~ N(P_mean, P_std²), λ = (t² + σd²)/(t σd)².  [EDM Sec. 5]"""
    if sigma is None:
        sigma = (P_mean + P_std * torch.randn(x.shape[0], device=x.device)).exp()
    z = torch.randn_like(x) if z is None else z
    lam = (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2
    return (lam * l2(D(x + append_dims(sigma, x.ndim) * z, sigma), x)).mean()


# ----------------------------------------------------------------------------------------------
# 5. Improved recipes: iCT (from data, no teacher) and ECT (tuning a diffusion model). Each piece is
#     one function; both recipes are consistency_loss with their own (t, r), λ and d, and μ = 0.

def ict_num_steps(k: int, K: int, s0: int = 10, s1: int = 1280) -> int:
    """N(k) = min(s0·2^⌊k/K'⌋, s1) + 1, K' = ⌊K / (log₂⌊s1/s0⌋ + 1)⌋: N doubles every K' steps.
    [iCT Sec. 3.4] With s0 10, s1 1280: N = 11, 21, ..., 1281, eight stages of K' steps."""
    K_ = max(math.floor(K / (math.log2(s1 // s0) + 1)), 1)  # the log is not floored: s1/s0 need not be 2^m
    return min(s0 * 2 ** min(max(k, 0) // K_, 62), s1) + 1


def lognormal_index_probs(sigmas: Tensor, P_mean: float = -1.1, P_std: float = 2.0) -> Tensor:
    """p(n) ∝ erf((ln t_{n+1} - P_mean)/(√2 P_std)) - erf((ln t_n - P_mean)/(√2 P_std)), n = 1..N-1:
    the lognormal mass between neighbouring levels (P_mean -1.1, P_std 2.0).  [iCT Sec. 3.5]"""
    u = (sigmas.double().log() - P_mean) / P_std  # standardised level edges
    lo, hi = u[:-1], u[1:]
    # Φ(hi) - Φ(lo) in log space, taken on the side of P_mean where the interval lies (Φ(b) - Φ(a) =
    # Φ(-a) - Φ(-b)), so levels far out in either tail keep their relative mass instead of rounding to 0
    a, b = torch.where(hi <= 0, lo, -hi), torch.where(hi <= 0, hi, -lo)  # b ≤ 0 unless the interval straddles
    log_Phi_a, log_Phi_b = torch.special.log_ndtr(a), torch.special.log_ndtr(b)
    log_p = log_Phi_b + torch.log1p(-torch.exp(log_Phi_a - log_Phi_b))
    return torch.softmax(log_p, 0)


def gap_weight(r: Tensor, t: Tensor) -> Tensor:
    """λ = 1 / (t - r): iCT's 1/(t_{n+1} - t_n) [iCT Sec. 3.1] and ECT's 1/(t - r) [ECT Sec. 3]."""
    return 1 / (t - r)


def ect_r(t: Tensor, stage: int, q: float = 2.0, k: float = 8.0, b: float = 1.0) -> Tensor:
    """r(t) = max(t·(1 - q^(-a)·n(t)), 0), n(t) = 1 + k·sigmoid(-b t), a the stage.  [ECT Sec. 3]
    r < t, and the gap t - r = t·min(1, q^(-a) n(t)) shrinks by q per stage. At a = 0, n ≥ 1 gives
    r = 0: the diffusion objective. The official code (training/loss.py: q 2, k 8, b 1) starts
    tuning at its stage 0, which is our a = 1 (it raises q to the stage + 1)."""
    return (t * (1 - q ** -stage * (1 + k * torch.sigmoid(-b * t)))).clamp(min=0)


def ect_loss(f: Callable, f_target: Callable, x: Tensor, stage: int, metric: Callable = l2_norm,
             t: Tensor | None = None, z: Tensor | None = None, P_mean: float = -1.1, P_std: float = 2.0,
             q: float = 2.0) -> Tensor:
    """ln t ~ N(P_mean, P_std²) in continuous time, r = r(t), λ = 1/(t - r).  [ECT Sec. 3]
    f is EDM's denoiser D (ε = 0) initialised from the teacher; f_target is f under stop-gradient."""
    if t is None:
        t = (P_mean + P_std * torch.randn(x.shape[0])).exp().to(x.device, x.dtype)
    z = torch.randn_like(x) if z is None else z
    return consistency_loss(f, f_target, x, t, ect_r(t, stage, q), z, metric, gap_weight)


class SharedDropout:
    """Wrap the online pass, then the target pass: the second replays the RNG state (CPU and CUDA) the
    first saw, so both draw the same dropout masks.  [iCT Sec. 3.1; ECT training/loss.py]"""

    def __init__(self, device: torch.device):
        self.devices, self.state = ([device] if device.type == "cuda" else []), None

    def wrap(self, fn: Callable) -> Callable:
        def call(*args, **kwargs):
            if self.state is None:
                self.state = (torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in self.devices])
                return fn(*args, **kwargs)
            with torch.random.fork_rng(devices=self.devices):
                torch.set_rng_state(self.state[0])
                for d, s in zip(self.devices, self.state[1]):
                    torch.cuda.set_rng_state(s, d)
                return fn(*args, **kwargs)
        return call


# ----------------------------------------------------------------------------------------------
# 5b. Continuous-time consistency models (sCM): TrigFlow, the JVP objective of sCT and sCD.  [sCM]
#     x_t = cos(t) x_0 + sin(t) z, z ~ N(0, σd² I), t ∈ [0, π/2]: EDM's x_σ = x_0 + σ z' at σ = σd tan t,
#     rescaled by cos t (x_t = x_σ σd / √(σ² + σd²)). Training takes the limit of consistency_loss as the
#     gap t - r → 0: the target moves by the network's total time derivative, one JVP per step.

def trig_time(sigma: Tensor, sigma_data: float = 0.5) -> Tensor:
    """t = arctan(σ / σd): the TrigFlow time of EDM's noise level σ (and σ = σd tan t).  [sCM Sec. 2]"""
    return torch.atan(sigma / sigma_data)


def trig_time_proposal(n: int, P_mean: float = -1.0, P_std: float = 1.4, sigma_data: float = 0.5,
                       generator: torch.Generator | None = None) -> Tensor:
    """t = arctan(e^τ / σd), τ ~ N(P_mean, P_std²): EDM's lognormal σ = e^τ in TrigFlow time.  [sCM Sec. 4.2]
    (P_mean -1.0, P_std 1.4 on CIFAR-10, 1.6 for ImageNet-64 distillation, as the sCM runs; on the CPU.)"""
    return torch.atan((P_mean + P_std * torch.randn(n, generator=generator, dtype=torch.float64)).exp()
                      / sigma_data).float()


class AdaptiveWeight(nn.Module):
    """w_φ(t): a learned log-weight per time, a linear map of t's sinusoidal embedding, zero at the start.
    The loss e^w L - w is smallest at w = -ln L: it divides each time's loss by its own running size, so
    no hand-tuned weighting of t is needed (a prior λ(t) inside L is absorbed: e^w λ L = 1).
    [sCM Sec. 4.2]"""

    def __init__(self, dim: int = 128):
        super().__init__()
        self.dim, self.linear = dim, nn.Linear(dim, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, t: Tensor) -> Tensor:
        return self.linear(timestep_embedding(t.to(self.linear.weight.dtype), self.dim)).squeeze(1)  # (B,)


# c_noise(t) of a TrigFlow network: 'trig' feeds t itself [sCM Sec. 4.1]; 'edm'/'adm' feed EDM's
# c_noise(σd tan t), with F_trig = -F_EDM: then f below is exactly EDM's denoiser D(x_σ, σ) of the same
# network, so an EDM teacher (or an sCD student started from it) is a TrigFlow model without any change.
TRIG_SIGN = {"trig": 1.0, "edm": -1.0, "adm": -1.0}


class TrigFlow(nn.Module):
    """f_θ(x_t, t) = cos(t) x_t - sin(t) σd F_θ(x_t / σd, c_noise(t)): f(x, 0) = x for any network.
    [sCM Sec. 2, Eq. 4] forward(x_σ, σ) takes EDM's noise level (x_t = cos(t) x_σ), so every sampler of
    section 7 runs it as it runs a ConsistencyFunction; forward(x_t, t, trig=True) is the training view:
    (F_θ(x_t, t), w_φ(t)) in TrigFlow time, one call (one DDP forward) for both."""

    def __init__(self, net: nn.Module, sigma_data: float = 0.5, noise_cond: str = "trig"):
        super().__init__()
        self.net, self.sigma_data, self.noise_cond = net, sigma_data, noise_cond
        self.sign = TRIG_SIGN[noise_cond]
        self.weight = AdaptiveWeight()
        self.sigma_min = 0.0  # the boundary is t = 0 (σ = 0): multistep sampling re-noises with ε = 0

    def c_noise(self, t: Tensor) -> Tensor:
        if self.noise_cond == "trig":
            return t
        return NOISE_CONDITIONING[self.noise_cond](self.sigma_data * t.tan())

    def F(self, x_t: Tensor, t: Tensor, class_labels: Tensor | None = None) -> Tensor:
        """The raw network in TrigFlow time: F_θ(x_t / σd, c_noise(t))."""
        out = self.net(x_t / self.sigma_data, self.c_noise(t), class_labels)
        return self.sign * out.to(x_t.dtype)

    def forward(self, x: Tensor, sigma: Tensor | float, class_labels: Tensor | None = None,
                trig: bool = False):
        if trig:
            return self.F(x, sigma, class_labels), self.weight(sigma)
        x = wide(x)
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(x.shape[0])  # (B,)
        t = append_dims(trig_time(sigma, self.sigma_data), x.ndim)
        x_t = t.cos() * x
        return t.cos() * x_t - t.sin() * self.sigma_data * self.F(x_t, t.flatten(), class_labels)


def trig_velocity(D: Callable, x_t: Tensor, t: Tensor, sigma_data: float = 0.5) -> Tensor:
    """dx_t/dt = (cos(t) x_t - D(x_t / cos t, σd tan t)) / sin(t): the PF-ODE velocity of an EDM denoiser D
    in TrigFlow time (x̂_0 = D, ẑ = (x_t - cos t x̂_0) / sin t, v = cos t ẑ - sin t x̂_0).  [sCM Sec. 2]"""
    ta = append_dims(t, x_t.ndim)
    return (ta.cos() * x_t - D(x_t / ta.cos(), sigma_data * t.tan())) / ta.sin()


FD_STEP = 1e-4  # --jvp fd: the central difference's step in t (and along dx_t/dt); in float32 it balances
#                the O(h²) truncation against round-off (~1e-7/h): within 0.2% of the exact JVP on cm.py's
#                networks, NCSN++ and ADM (tests/test_scm.py)


def trig_jvp(F: Callable, x_t: Tensor, t: Tensor, dxdt: Tensor, how: str = "exact") -> tuple[Tensor, Tensor]:
    """(F(x_t, t), dF/dt) with dF/dt = ∂F/∂x · dx_t/dt + ∂F/∂t, the total derivative along the trajectory.
    'exact': one forward-mode pass (torch.func.jvp), about three forward passes of work; 'fd': central
    differences (three forward passes, error O(h²)), for networks or kernels without forward-mode AD.
    No gradient flows through either (θ⁻ = stopgrad θ)."""
    # in float32 also under --precision bf16: autocast's casts inside a forward-mode pass fail on the CPU
    # (a dual input meets a bf16 weight), and the tangent is the part of the loss that needs the precision
    with torch.no_grad(), torch.autocast(x_t.device.type, enabled=False):
        if how == "exact":  # attention on its math kernel: CUDA's fused kernels have no forward-mode AD
            math_kernel = torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH)
            with math_kernel, warnings.catch_warnings():
                # torch's own forward-mode decompositions still call torch.jit.script on first use
                warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", FutureWarning)
                return torch.func.jvp(F, (x_t, t), (dxdt, torch.ones_like(t)))
        h = FD_STEP
        ahead, back = F(x_t + h * dxdt, t + h), F(x_t - h * dxdt, t - h)
        return F(x_t, t), (ahead - back) / (2 * h)


def scm_tangent(F_minus: Tensor, dF_dt: Tensor, x_t: Tensor, dxdt: Tensor, t: Tensor, sigma_data: float = 0.5,
                r: float = 1.0, c: float = 0.1) -> Tensor:
    """g = -cos²(t) (σd F⁻ - dx_t/dt) - r cos(t) sin(t) (x_t + σd dF⁻/dt), then g / (‖g‖ + c) per sample.
    g is cos(t) times the time derivative of f_θ⁻ along the trajectory (up to the sign and 1/σd), the
    continuous-time limit of consistency_loss's f(x_t) - f(x_r). r warms up 0 → 1 (tangent warm-up) and
    the normalisation bounds the step the noisy JVP term can take (c = 0.1).  [sCM Sec. 4.2]"""
    ta = append_dims(t, x_t.ndim)
    g = -ta.cos() ** 2 * (sigma_data * F_minus - dxdt) - r * ta.cos() * ta.sin() * (x_t + sigma_data * dF_dt)
    norm = g.flatten(1).norm(dim=1)
    return g / append_dims(norm + c, g.ndim)


def scm_loss(F_theta: Tensor, F_minus: Tensor, g: Tensor, w: Tensor) -> Tensor:
    """e^{w(t)} / D · ‖F_θ - F_θ⁻ - g‖² - w(t), averaged over the batch; F_θ⁻ and g carry no gradient.
    Its value is e^w ‖g‖²/D - w (F_θ = F_θ⁻ as numbers); its θ-gradient is -2 e^w/D g·∇F_θ.  [sCM Eq. 8]"""
    mse = (F_theta - (F_minus + g).detach()).flatten(1).pow(2).mean(dim=1)  # (B,), the /D of the paper
    return (w.exp() * mse - w).mean()


def scm_step(f: Callable, f_target: Callable, x0: Tensor, t: Tensor, z: Tensor, sigma_data: float = 0.5,
             r: float = 1.0, c: float = 0.1, jvp: str = "exact", teacher: Callable | None = None) -> Tensor:
    """The sCT / sCD loss at times t (B,) with noise z ~ N(0, σd² I): x_t = cos(t) x_0 + sin(t) z; the
    tangent dx_t/dt is cos(t) z - sin(t) x_0 (sCT: from the data and noise) or the teacher's PF-ODE
    velocity (sCD: trig_velocity of the EDM denoiser `teacher`); f, f_target: TrigFlow models (θ, θ⁻)."""
    ta = append_dims(t, x0.ndim)
    x_t = ta.cos() * x0 + ta.sin() * z
    if teacher is not None:
        with torch.no_grad():
            dxdt = wide(trig_velocity(teacher, x_t, t, sigma_data))
    else:
        dxdt = ta.cos() * z - ta.sin() * x0
    F_minus, dF_dt = trig_jvp(lambda x, s: wide(f_target(x, s, trig=True)[0]), x_t, t, dxdt, jvp)
    g = scm_tangent(F_minus, dF_dt, x_t, dxdt, t, sigma_data, r, c)
    F_theta, w = f(x_t, t, trig=True)
    return scm_loss(wide(F_theta), F_minus, g, wide(w))


# ----------------------------------------------------------------------------------------------
# 6. Recipes. CMConfig holds the math settings (cm.py's runs and full/'s `cm` section alike); RECIPES
#    turns a mode into its schedule (N, μ, stage at step k) and its loss: the one dispatch of both
#    trainers. A new recipe is one entry here (plus, for full/, a preset).

SIGMA_MAX_LIMIT = 1e4  # far above any paper's T = 80; beyond it float32 images lose their signal
MAX_LEVELS = 2 ** 16  # grid sizes: iCT's s1 is 1280
MAX_SEED = 2 ** 62  # seeds made from a seed (+ a sample's index, + a rank's and a step's offset) fit int64


@dataclass
class CMConfig:
    """The math of a run [CM Sec. 4-5, App. C; iCT; ECT]. Defaults: [CM Tab. 3]'s CIFAR-10 values."""

    mode: str = "cd"                  # cd | ct | ict | ect | sct | scd | edm (the teacher's score matching)
    sigma_min: float = 0.002          # ε
    sigma_max: float = 80.0           # T
    sigma_data: float = 0.5           # σ_data of the scalings
    rho: float = 7.0                  # Karras grid exponent
    noise_cond: str = "edm"           # c_noise: edm = ln(t)/4 (NCSN++) | adm = 1000 ln(t + 1e-44)/4 (ADM)
    #                                   | trig = TrigFlow's t itself (sct only; section 5b)
    N: int = 18                       # cd: grid points (one Heun teacher step between neighbours)
    mu: float = 0.0                   # cd, ict, ect: constant target EMA rate μ (0 for CIFAR-10)
    s0: int = 2                       # ct, ict: N(0) = s0 (ict: 10)
    s1: int = 150                     # ct: N(K) = s1 + 1; ict: the doubling stops at s1 (1280)
    mu0: float = 0.9                  # ct: μ(0) = μ0
    mu_rule: str = "code"             # ct: μ(k) divides by N(k)-1 'code' (official runs) | N(k) 'paper'
    metric: str = "l2"                # l2 | l1 | pseudo_huber | l2_norm | lpips | lpips_piq
    lpips_pretrained: bool = True     # False: a random VGG for LPIPS (offline tests only, never real runs)
    P_mean: float = -1.1              # ict, ect: ln t ~ N(P_mean, P_std²) (edm: EDM's -1.2, 1.2 always)
    P_std: float = 2.0
    q: float = 2.0                    # ect: the gap t - r shrinks by q per stage (ect_r)
    stage_steps: int = 25_000         # ect: steps per stage (locuslab/ect: 25k of 200k on CIFAR-10)
    ablate: str = ""                  # ict: pieces switched back to CT's, any of weight,lognormal,doubling
    tangent_warmup: int = 10_000      # sct, scd: r rises linearly 0 → 1 over these steps (0: r = 1) [sCM]
    tangent_c: float = 0.1            # sct, scd: the tangent normalisation g / (‖g‖ + c)
    jvp: str = "exact"                # sct, scd: dF/dt by forward-mode AD | fd (central differences)

    def check(self, prefix: str = "") -> CMConfig:
        """Every range and choice, before step 0: the first bad one is a one-line CMError naming it."""
        choices = dict(mode=RECIPES, metric=METRICS, mu_rule=MU_RULES, noise_cond=TRIG_SIGN,
                       jvp=("exact", "fd"))
        for name, ok in choices.items():
            if getattr(self, name) not in ok:
                raise CMError(f"unknown {prefix}{name} {getattr(self, name)!r}; "
                              f"choose one of {', '.join(ok)}")
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.type in ("float", "int") and (isinstance(v, bool) or not isinstance(v, (int, float))
                                              or not math.isfinite(v)):
                raise CMError(f"{prefix}{f.name} must be a finite number, got {v!r}")
            if f.type == "str" and not isinstance(v, str):
                raise CMError(f"{prefix}{f.name} must be a string, got {str(v)[:40]!r}")
        if not 0 < self.sigma_min < self.sigma_max <= SIGMA_MAX_LIMIT:
            raise CMError(f"need 0 < {prefix}sigma_min < {prefix}sigma_max <= {SIGMA_MAX_LIMIT:g} "
                          f"(got {self.sigma_min}, {self.sigma_max})")
        if not 1e-4 <= self.sigma_data <= SIGMA_MAX_LIMIT or not 0.1 <= self.rho <= 1000:  # σd² stays finite
            raise CMError(f"need 1e-4 <= {prefix}sigma_data <= {SIGMA_MAX_LIMIT:g} and "
                          f"0.1 <= {prefix}rho <= 1000 "
                          f"(got {self.sigma_data}, {self.rho})")
        if self.N < 2 or self.s0 < 2 or self.s1 < self.s0:
            raise CMError(f"need {prefix}N >= 2 and 2 <= {prefix}s0 <= {prefix}s1 "
                          f"(got N={self.N}, s0={self.s0}, s1={self.s1})")
        if not (0 <= self.mu < 1 and 0 < self.mu0 < 1):
            raise CMError(f"need 0 <= {prefix}mu < 1 and 0 < {prefix}mu0 < 1 "
                          f"(got mu={self.mu}, mu0={self.mu0})")
        if max(self.N, self.s1) > MAX_LEVELS:
            raise CMError(f"need {prefix}N and {prefix}s1 <= {MAX_LEVELS} (got N={self.N}, s1={self.s1})")
        try:
            grid = karras_sigmas(max(self.N, self.s1), self.sigma_min, self.sigma_max, self.rho)
            ok = bool(torch.isfinite(grid).all() and (grid.diff() > 0).all())
        except (OverflowError, ZeroDivisionError):
            ok = False
        if not ok:
            raise CMError(f"{prefix}rho={self.rho} gives no finite, increasing grid of levels in "
                          f"[{self.sigma_min}, {self.sigma_max}]")
        if abs(self.P_mean) > 20 or self.P_std > 10:  # beyond, e^(P_mean + P_std z) leaves float32's range
            raise CMError(f"need |{prefix}P_mean| <= 20 and {prefix}P_std <= 10 "
                          f"(got {self.P_mean}, {self.P_std})")
        if self.stage_steps < 1 or self.q <= 1 or self.P_std < 1e-3:  # below, (ln t - P_mean)/P_std overflows
            raise CMError(f"need {prefix}stage_steps >= 1, {prefix}q > 1 and {prefix}P_std >= 0.001 "
                          f"(got {self.stage_steps}, {self.q}, {self.P_std})")
        if self.noise_cond == "trig" and self.mode != "sct":
            raise CMError(f"{prefix}noise_cond trig (TrigFlow's c_noise(t) = t) is for mode sct only; "
                          "scd and the other modes take edm or adm, the conditioning of their EDM networks")
        if self.tangent_warmup < 0 or self.tangent_c <= 0:
            raise CMError(f"need {prefix}tangent_warmup >= 0 and {prefix}tangent_c > 0 "
                          f"(got {self.tangent_warmup}, {self.tangent_c})")
        if set(filter(None, self.ablate.split(","))) - {"weight", "lognormal", "doubling"}:
            raise CMError(f"unknown {prefix}ablate {self.ablate!r}; choose from weight, lognormal, doubling")
        return self

    def run_fields(self) -> tuple[str, ...]:
        """The fields this mode computes with: a resume may not change them (the others it ignores)."""
        common = ("mode", "sigma_min", "sigma_max", "sigma_data", "rho", "noise_cond")
        return common + RECIPES[self.mode].fields


class Schedule(NamedTuple):
    """What a recipe uses at step k: N grid points (0: none), the target rate μ, ECT's stage a (0: none),
    sCM's tangent warm-up factor r."""
    N: int
    mu: float
    stage: int = 0
    r: float = 1.0


def _ct_schedule(c: CMConfig, k: int, K: int) -> Schedule:
    """N(k), μ(k) of [CM App. C]."""
    return Schedule(ct_num_steps(k, K, c.s0, c.s1), ct_target_rate(k, K, c.s0, c.s1, c.mu0, c.mu_rule))


def _ict_schedule(c: CMConfig, k: int, K: int) -> Schedule:
    """N doubles every K' steps, μ = 0 [iCT Sec. 3.2, 3.4] (ablate 'doubling': CT's N(k))."""
    return Schedule((ct_num_steps if "doubling" in c.ablate else ict_num_steps)(k, K, c.s0, c.s1), c.mu)


def _ect_schedule(c: CMConfig, k: int, K: int) -> Schedule:
    """The stage a = 1 + ⌊k / stage_steps⌋ [ECT Sec. 3] (no grid: t is continuous)."""
    return Schedule(0, c.mu, 1 + k // c.stage_steps)


def _scm_schedule(c: CMConfig, k: int, K: int) -> Schedule:
    """r = min(1, k / tangent_warmup), μ = 0 (θ⁻ = stopgrad θ) [sCM Sec. 4.2]; no grid: t is continuous."""
    return Schedule(0, 0.0, 0, min(1.0, k / c.tangent_warmup) if c.tangent_warmup else 1.0)


def _grid(c: CMConfig, s: Schedule) -> Tensor:
    return karras_sigmas(s.N, c.sigma_min, c.sigma_max, c.rho)  # t_1 < ... < t_N at this k


def _ct(c, s, f, f_target, D, x, z, metric, n=None, t=None):
    return ct_loss(f, f_target, x, _grid(c, s), metric, n=n, z=z)


def _cd(c, s, f, f_target, D, x, z, metric, n=None, t=None):
    return cd_loss(f, f_target, D, x, _grid(c, s), metric, n=n, z=z)


def _ict(c, s, f, f_target, D, x, z, metric, n=None, t=None):
    sigmas = _grid(c, s)
    probs = None if "lognormal" in c.ablate else lognormal_index_probs(sigmas, c.P_mean, c.P_std)
    weight = None if "weight" in c.ablate else gap_weight
    return ct_loss(f, f_target, x, sigmas, metric, n=n, z=z, weight=weight, index_probs=probs)


def _ect(c, s, f, f_target, D, x, z, metric, n=None, t=None):
    return ect_loss(f, f_target, x, s.stage, metric, t=t, z=z, P_mean=c.P_mean, P_std=c.P_std, q=c.q)


def _trig_t(c: CMConfig, x: Tensor, t: Tensor | None) -> Tensor:
    """sCM's proposal, kept to the sampled range [arctan(ε/σd), arctan(T/σd)] (a choice: the sCM paper
    does not bound t; here training covers what sampling uses and EDM's c_noise stays finite)."""
    t = trig_time_proposal(x.shape[0], c.P_mean, c.P_std, c.sigma_data) if t is None else t
    lo, hi = math.atan(c.sigma_min / c.sigma_data), math.atan(c.sigma_max / c.sigma_data)
    return t.clamp(lo, hi).to(x.device)


def _sct(c, s, f, f_target, D, x, z, metric, n=None, t=None):
    z = torch.randn_like(x) if z is None else z
    return scm_step(f, f_target, x, _trig_t(c, x, t), c.sigma_data * z, c.sigma_data, s.r, c.tangent_c, c.jvp)


def _scd(c, s, f, f_target, D, x, z, metric, n=None, t=None):
    z = torch.randn_like(x) if z is None else z
    return scm_step(f, f_target, x, _trig_t(c, x, t), c.sigma_data * z, c.sigma_data, s.r, c.tangent_c, c.jvp,
                    teacher=D)


def _edm(c, s, f, f_target, D, x, z, metric, n=None, t=None):
    return edm_loss(f, x, sigma=t, z=z, sigma_data=c.sigma_data)


@dataclass(frozen=True)
class Recipe:
    schedule: Callable[[CMConfig, int, int], Schedule]  # (c, k, K) -> Schedule
    loss: Callable                    # (c, schedule, f, f_target, D, x, z, metric, n=, t=) -> scalar
    fields: tuple[str, ...]           # the CMConfig fields it reads
    teacher: str = ""                 # 'loss': D_φ inside the loss (cd) | 'init': starts from D_φ (ect)
    denoiser: bool = False            # trains EDM's D (ε = 0 scalings) rather than f_θ
    trigflow: bool = False            # f_θ is a TrigFlow model (section 5b) and t is TrigFlow time


_SCM_FIELDS = ("P_mean", "P_std", "tangent_warmup", "tangent_c", "jvp")
RECIPES = {
    "cd": Recipe(lambda c, k, K: Schedule(c.N, c.mu), _cd, ("N", "mu", "metric"), teacher="loss"),  # [CM]
    "ct": Recipe(_ct_schedule, _ct, ("s0", "s1", "mu0", "mu_rule", "metric")),                     # [CM]
    "ict": Recipe(_ict_schedule, _ict, ("s0", "s1", "mu", "metric", "P_mean", "P_std", "ablate")),  # [iCT]
    "ect": Recipe(_ect_schedule, _ect, ("mu", "metric", "P_mean", "P_std", "q", "stage_steps"),     # [ECT]
                  teacher="init", denoiser=True),
    "sct": Recipe(_scm_schedule, _sct, _SCM_FIELDS, trigflow=True),                                # [sCM]
    "scd": Recipe(_scm_schedule, _scd, _SCM_FIELDS, teacher="loss", trigflow=True),                # [sCM]
    "edm": Recipe(lambda c, k, K: Schedule(0, 0.0), _edm, (), denoiser=True),                       # [EDM]
}


def schedule(c: CMConfig, k: int, K: int) -> Schedule:
    """The recipe's (N, μ, stage) at step k of K."""
    return RECIPES[c.mode].schedule(c, k, K)


def recipe_loss(c: CMConfig, s: Schedule, f: Callable, f_target: Callable | None, D: Callable | None,
                x: Tensor, z: Tensor | None, metric: Callable, n: Tensor | None = None,
                t: Tensor | None = None) -> Tensor:
    """The mode's loss at schedule s; n (grid indices) or t (ect: t, edm: σ, sct/scd: TrigFlow t) may be
    given, else drawn."""
    return RECIPES[c.mode].loss(c, s, f, f_target, D, x, z, metric, n=n, t=t)


def parameterize(c: CMConfig, net: nn.Module) -> nn.Module:
    """The mode's model around the raw network: TrigFlow (sct, scd), EDM's D (ε = 0: edm, ect) or f_θ."""
    recipe = RECIPES[c.mode]
    if recipe.trigflow:
        return TrigFlow(net, c.sigma_data, c.noise_cond)
    return ConsistencyFunction(net, c.sigma_data, 0.0 if recipe.denoiser else c.sigma_min, c.noise_cond)


def keeps_target_copy(c: CMConfig) -> bool:
    """θ⁻ needs its own copy only when μ can be > 0 (ct, or a constant μ > 0). With μ = 0 throughout
    (iCT, ECT, CIFAR-10 CD) θ⁻ = stopgrad(θ): the online net under no_grad is the target."""
    return c.mode == "ct" or ("mu" in RECIPES[c.mode].fields and c.mu > 0)


def make_metric(c: CMConfig, device: torch.device | str = "cpu") -> Callable:
    """d(x, y) of METRICS; LPIPS is a module (VGG), built once."""
    m = METRICS[c.metric]
    return m(pretrained_backbone=c.lpips_pretrained).to(device) if c.metric.startswith("lpips") else m


# ----------------------------------------------------------------------------------------------
# 7. Samplers

@torch.no_grad()
def sample_onestep(f: Callable, z: Tensor, sigma_max: float = 80.0) -> Tensor:
    """x = f(T z, T): one network evaluation.  [CM Alg. 1 with one step]"""
    return f(sigma_max * z, sigma_max)


@torch.no_grad()
def sample_multistep(f: Callable, z: Tensor, sigmas: Sequence[float], sigma_min: float = 0.002,
                     noises: Sequence[Tensor] | None = None, generator: torch.Generator | None = None,
                     clip_denoised: bool = True) -> Tensor:
    """x ← f(τ_1 z, τ_1); then for τ_2 > τ_3 > ...: x ← f(x + √(τ² - ε²) z', τ).  [CM Alg. 1]
    `sigmas` descend, τ_1 = T in the paper (ts_to_sigmas: the official index form). clip_denoised clamps
    every f(·) to [-1, 1] before it is re-noised, as both official samplers do; without it, one level
    is exactly sample_onestep."""
    denoise = (lambda x, t: f(x, t).clamp(-1, 1)) if clip_denoised else f
    x = denoise(sigmas[0] * z, sigmas[0])
    for i, tau in enumerate(sigmas[1:]):
        zi = noises[i] if noises is not None else torch.randn(x.shape, generator=generator).to(x.device)
        x = denoise(x + math.sqrt(tau ** 2 - sigma_min ** 2) * zi, tau)
    return x


@torch.no_grad()
def sample_heun(D: Callable, z: Tensor, N: int = 18, sigma_min: float = 0.002, sigma_max: float = 80.0,
                rho: float = 7.0) -> Tensor:
    """Deterministic EDM sampler: Heun steps down the grid, a final Euler step to 0.  [EDM Alg. 1]"""
    sigmas = karras_sigmas(N, sigma_min, sigma_max, rho).flip(0).tolist() + [0.0]
    x = sigmas[0] * z
    for t, t_next in zip(sigmas[:-1], sigmas[1:]):
        t, t_next = (torch.full((x.shape[0],), s, device=x.device) for s in (t, t_next))
        x = (heun_step if t_next[0] > 0 else euler_step)(D, x, t, t_next)
    return x




def per_sample_noise(indices: Sequence[int], shape: Sequence[int], levels: int, seed: int,
                     num_classes: int = 0) -> tuple[Tensor, list[Tensor], Tensor | None]:
    """z (B, *shape), the re-noising z' of each later level, and labels, all from seed + i for sample i
    (on the CPU): a sample does not depend on the batch size, the device or the number of processes."""
    zs, extra, labels = [], [], []
    for i in indices:
        g = torch.Generator().manual_seed(seed + int(i))
        if num_classes:
            labels.append(torch.randint(num_classes, (1,), generator=g))
        zs.append(torch.randn(*shape, generator=g))
        extra.append([torch.randn(*shape, generator=g) for _ in range(levels - 1)])
    noises = [torch.stack([e[j] for e in extra]) for j in range(levels - 1)]
    return torch.stack(zs), noises, (torch.cat(labels) if num_classes else None)


@torch.no_grad()
def generate(f: nn.Module, c: CMConfig, shape: Sequence[int], indices: Sequence[int],
             levels: Sequence[float] | None, seed: int = 0, heun_steps: int = 18, num_classes: int = 0,
             class_labels: Sequence[int] | None = None, batch: int = 256,
             clip_denoised: bool = True) -> tuple[Tensor, Tensor | None]:
    """Samples `indices` (on the CPU) and their labels (None if unconditional), per-sample seeds.
    levels: descending τ's of sample_multistep ([T]: one step); None: EDM's Heun sampler with heun_steps
    levels (f is a denoiser D). class_labels: label i is class_labels[i % len]. clip_denoised clamps every
    denoised image to [-1, 1], as the official samplers do."""
    indices, dev = list(indices), next(f.parameters()).device
    xs, ys = [], []
    for s in range(0, len(indices), batch):
        idx = indices[s:s + batch]
        z, noises, y = per_sample_noise(idx, shape, 1 if levels is None else len(levels), seed, num_classes)
        if num_classes and class_labels:
            y = torch.tensor([class_labels[i % len(class_labels)] for i in idx])
        fy = (lambda x, t: f(x, t, y.to(dev))) if y is not None else f
        z = z.to(dev)
        if levels is None:
            x = sample_heun(fy, z, heun_steps, c.sigma_min, c.sigma_max, c.rho)
        elif len(levels) == 1 and levels[0] == c.sigma_max:
            x = sample_onestep(fy, z, c.sigma_max)
            x = x.clamp(-1, 1) if clip_denoised else x
        else:
            eps = 0.0 if RECIPES[c.mode].trigflow else c.sigma_min  # TrigFlow's boundary is σ = 0
            x = sample_multistep(fy, z, levels, eps, noises=[n.to(dev) for n in noises],
                                 clip_denoised=clip_denoised)
        xs.append(x.float().cpu())
        ys.append(y)
    return torch.cat(xs), (torch.cat(ys) if num_classes else None)


def ternary_search(criterion: Callable[[int], float], lo: int, hi: int) -> tuple[int, dict[int, float]]:
    """argmin of a unimodal criterion on the integers lo..hi, and {index: value} of the ones evaluated (in
    order, each once). Two inner points a third in from each end; the larger one's outer third goes (the
    minimum cannot lie there), until at most 3 candidates are left, which are compared directly: about
    2 log_{3/2}(hi - lo) evaluations. How the official scripts pick the middle index of two-step ts."""
    if lo > hi:
        raise ValueError(f"empty search range [{lo}, {hi}]")
    tried: dict[int, float] = {}

    def value(i: int) -> float:
        if i not in tried:
            v = float(criterion(i))
            if math.isnan(v):
                raise ValueError(f"the criterion at {i} is NaN")
            tried[i] = v
        return tried[i]

    while hi - lo >= 3:
        third = (hi - lo) // 3
        m1, m2 = lo + third, hi - third
        if value(m1) < value(m2):
            hi = m2
        else:
            lo = m1
    best = min(range(lo, hi + 1), key=value)
    return best, tried


def two_step_candidates(N: int, c: CMConfig, log_sigma: bool = False) -> list[float]:
    """The N levels the two-step search indexes, descending from T to ε (the ends are never searched):
    the Karras grid of the official ts convention (ts = 0, i, N-1), or N levels evenly spaced in log σ."""
    if N < 3:
        raise ValueError(f"the search needs a grid of >= 3 levels (ts = 0, i, N-1 with 0 < i < N-1), got {N}")
    if log_sigma:
        hi, lo = math.log(c.sigma_max), math.log(c.sigma_min)
        return [math.exp(hi + j / (N - 1) * (lo - hi)) for j in range(N)]
    return karras_sigmas(N, c.sigma_min, c.sigma_max, c.rho).flip(0).tolist()


def search_two_step(score: Callable[[list[float]], float], N: int, c: CMConfig, log_sigma: bool = False,
                    name: str = "criterion") -> dict:
    """Ternary search of the two-step middle level: score(levels) of the samples of [T, σ_i], lower is
    better, for i in 1..N-2 of two_step_candidates. Returns the rows tried, the evaluation order, the best
    row, its levels and (on the Karras grid) its ts. The caller keeps the noise fixed across candidates."""
    sigmas = two_step_candidates(N, c, log_sigma)
    best, tried = ternary_search(lambda i: score([c.sigma_max, sigmas[i]]), 1, N - 2)
    key = "sigma_index" if log_sigma else "ts_index"
    rows = [{key: i, "sigma": sigmas[i], name: v} for i, v in sorted(tried.items())]
    result = {"criterion": name, "space": "log-sigma" if log_sigma else "karras-grid", "grid_steps": N,
              "tried": rows, "evaluated_in_order": list(tried),
              "best": {key: best, "sigma": sigmas[best], name: tried[best]},
              "levels": [c.sigma_max, sigmas[best]]}
    if not log_sigma:
        result["ts"] = [0, best, N - 1]
    return result


def search_table(result: dict) -> str:
    """search_two_step's result as the printed table (one row per level tried) and the chosen flags."""
    name, N, best = result["criterion"], result["grid_steps"], result["best"]
    key = "ts_index" if "ts" in result else "sigma_index"
    lines = [f"{'ts' if 'ts' in result else 'i':>4}  {'sigma':>10}  {name}"]
    for r in result["tried"]:
        mark = "  <- chosen" if r[key] == best[key] else ""
        lines.append(f"{r[key]:>4}  {r['sigma']:>10.6g}  {r[name]:.6g}{mark}")
    how = f"--ts 0,{best[key]},{N - 1} --grid-steps {N}" if "ts" in result else \
        f"--sigmas {result['levels'][0]:g},{best['sigma']:.6g}"
    return "\n".join(lines + [f"chosen: {how} ({name} {best[name]:.6g}, {len(result['tried'])} evaluations)"])


# ----------------------------------------------------------------------------------------------
# 8. Target network and evaluation EMA: both are θ_avg ← μ θ_avg + (1 - μ) θ

def ema_warmup_rate(rate: float, k: int) -> float:
    """The evaluation EMA's rate at step k, min(rate, (1 + k) / (10 + k)): a warm-up that forgets the
    random initialisation fast (as the EMA of many codebases)."""
    return min(rate, (1 + k) / (10 + k))


@torch.no_grad()
def ema_update(avg: nn.Module, model: nn.Module, mu: float) -> None:
    """θ⁻ ← stopgrad(μ θ⁻ + (1 - μ) θ) [CM Alg. 2/3]; also the evaluation EMA. Buffers are copied."""
    for p_avg, p in zip(avg.parameters(), model.parameters()):
        p_avg.lerp_(p.detach(), 1 - mu)
    for b_avg, b in zip(avg.buffers(), model.buffers()):
        b_avg.copy_(b)


# ----------------------------------------------------------------------------------------------
# 9. Networks F(x, c_noise, class_labels) -> same shape as x. Small on purpose; full/ has NCSN++/ADM.

def timestep_embedding(c_noise: Tensor, dim: int, scale: float = 100.0,
                       max_period: float = 10_000.0) -> Tensor:
    """Sinusoidal embedding of the scalar c_noise, (B,) -> (B, dim), frequencies scale down to
    scale / max_period. c_noise = ln(t)/4 only spans about [-1.6, 1.1], so the 2023 modes scale it by 100.
    sct and scd (TrainConfig.time_scale) take scale 1: their tangent holds dF/dt, frequencies of 100 make
    it large and the training unstable, the failure sCM traces to large Fourier scales [sCM Sec. 4.1];
    sCM's own DDPM++ teacher embeds c_noise at frequencies up to 1 too. sCD's student and teacher share the
    network, so its EDM teacher is trained at scale 1 (on the digits, sCD at scale 100 swung between one-step
    distances of 28 and 208; at scale 1 it stays near 21: docs/results.md)."""
    half = torch.arange(dim // 2, device=c_noise.device, dtype=c_noise.dtype) / (dim // 2)
    args = scale * c_noise[:, None] * torch.exp(-math.log(max_period) * half)[None]  # (B, dim/2)
    return torch.cat([args.cos(), args.sin()], dim=1)


class Embedding(nn.Module):
    """c_noise (and an optional class label) -> a vector that conditions every block."""

    def __init__(self, dim: int, num_classes: int = 0, scale: float = 100.0):
        super().__init__()
        self.scale = scale  # of c_noise in timestep_embedding: 100 for ln(t)/4, 1 for TrigFlow's t
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.label = nn.Embedding(num_classes, dim) if num_classes else None

    def forward(self, c_noise: Tensor, class_labels: Tensor | None) -> Tensor:
        emb = self.mlp(timestep_embedding(c_noise, self.mlp[0].in_features, self.scale))
        if (self.label is None) != (class_labels is None):
            raise ValueError("pass class_labels exactly when the network has num_classes > 0")
        return emb if self.label is None else emb + self.label(class_labels)


class MLP(nn.Module):
    """Residual MLP for 2-D data; the embedding is added at the input of every block."""

    def __init__(self, dim: int = 2, hidden: int = 256, depth: int = 4, num_classes: int = 0,
                 dropout: float = 0.0, time_scale: float = 100.0):
        super().__init__()
        self.emb, self.inp = Embedding(hidden, num_classes, time_scale), nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                                  nn.Dropout(dropout), nn.Linear(hidden, hidden))
                                    for _ in range(depth))
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor, c_noise: Tensor, class_labels: Tensor | None = None) -> Tensor:
        emb, h = self.emb(c_noise, class_labels), self.inp(x)  # (B, hidden) each
        for block in self.blocks:
            h = h + block(h + emb)
        return self.out(h)


class Block(nn.Module):
    """Residual block (GroupNorm, SiLU, 3x3 conv, + embedding, again), then optional self-attention."""

    def __init__(self, cin: int, cout: int, emb_dim: int, attention: bool, dropout: float):
        super().__init__()
        norm = lambda c: nn.GroupNorm(min(32, c // 4), c)
        self.res = nn.Sequential(norm(cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1))
        self.out = nn.Sequential(norm(cout), nn.SiLU(), nn.Dropout(dropout),
                                 nn.Conv2d(cout, cout, 3, padding=1))
        self.emb = nn.Linear(emb_dim, cout)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        self.attn = nn.ModuleList([norm(cout), nn.Conv2d(cout, 3 * cout, 1), nn.Conv2d(cout, cout, 1)]
                                  ) if attention else None

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = (self.skip(x) + self.out(self.res(x) + self.emb(emb)[:, :, None, None])) / math.sqrt(2)
        if self.attn is None:
            return h
        B, C, H, W = h.shape
        norm, qkv, proj = self.attn
        heads = max(C // 32, 1)  # 32 channels per head
        q, k, v = qkv(norm(h)).reshape(B, 3, heads, C // heads, H * W).transpose(-1, -2).unbind(1)
        a = F.scaled_dot_product_attention(q, k, v)  # (B, heads, HW, C/heads)
        return (h + proj(a.transpose(-1, -2).reshape(B, C, H, W))) / math.sqrt(2)


class Resample(nn.Module):
    """Halve (strided 3x3 conv) or double (nearest, then 3x3 conv) the resolution."""

    def __init__(self, c: int, up: bool):
        super().__init__()
        self.up, self.conv = up, nn.Conv2d(c, c, 3, stride=1 if up else 2, padding=1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest") if self.up else x)


class UNet(nn.Module):
    """A small DDPM-style UNet with skip connections and attention at the two lowest resolutions."""

    def __init__(self, in_ch: int = 1, ch: int = 32, mult: Sequence[int] = (1, 2, 2), blocks: int = 2,
                 resolution: int = 8, num_classes: int = 0, dropout: float = 0.0, time_scale: float = 100.0):
        super().__init__()
        self.emb, self.inp = Embedding(4 * ch, num_classes, time_scale), nn.Conv2d(in_ch, ch, 3, padding=1)
        attn = {resolution >> (len(mult) - 1), resolution >> max(len(mult) - 2, 0)}
        self.enc, self.dec, skips, c, res = nn.ModuleList(), nn.ModuleList(), [ch], ch, resolution
        for level, m in enumerate(mult):
            if level:
                self.enc.append(Resample(c, up=False))
                skips.append(c)
                res //= 2
            for _ in range(blocks):
                self.enc.append(Block(c, ch * m, 4 * ch, res in attn, dropout))
                c = ch * m
                skips.append(c)
        self.mid = Block(c, c, 4 * ch, True, dropout)
        for level, m in reversed(list(enumerate(mult))):
            for _ in range(blocks + 1):
                self.dec.append(Block(c + skips.pop(), ch * m, 4 * ch, res in attn, dropout))
                c = ch * m
            if level:
                self.dec.append(Resample(c, up=True))
                res *= 2
        self.out = nn.Sequential(nn.GroupNorm(min(32, c // 4), c), nn.SiLU(),
                                 nn.Conv2d(c, in_ch, 3, padding=1))

    def forward(self, x: Tensor, c_noise: Tensor, class_labels: Tensor | None = None) -> Tensor:
        emb, h = self.emb(c_noise, class_labels), self.inp(x)  # (B, 4ch), (B, ch, H, W)
        skips = [h]
        for layer in self.enc:
            h = layer(h, emb)
            skips.append(h)
        h = self.mid(h, emb)
        for layer in self.dec:
            h = layer(torch.cat([h, skips.pop()], 1) if isinstance(layer, Block) else h, emb)
        return self.out(h)


# ----------------------------------------------------------------------------------------------
# 10. Data: everything as one in-memory tensor in [-1, 1] (toy data is drawn fresh each batch)

def toy_ring(n: int, generator: torch.Generator | None = None) -> Tensor:
    """8 Gaussians (std 0.05) on a circle of radius 0.7: per-coordinate std ≈ 0.5 = σd. (n, 2)"""
    k = torch.randint(0, 8, (n,), generator=generator).float()
    centers = 0.7 * torch.stack([torch.cos(k * math.pi / 4), torch.sin(k * math.pi / 4)], 1)
    return centers + 0.05 * torch.randn(n, 2, generator=generator)


def load_digits(labels: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """scikit-learn's 1,797 handwritten 8x8 digits (values 0..16) -> (1797, 1, 8, 8) in [-1, 1]."""
    try:
        from sklearn.datasets import load_digits as sk_digits
    except ImportError:
        raise CMError("the digits need scikit-learn (pip install scikit-learn), "
                      "or use --dataset toy") from None
    d = sk_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 8 - 1
    return (x, torch.as_tensor(d.target)) if labels else x


def uint8_to_unit(x) -> Tensor:
    """uint8 pixels v (array or tensor, any shape) -> float32 v / 127.5 - 1 in [-1, 1] (0 -> -1, 255 -> 1)."""
    t = x if isinstance(x, Tensor) else torch.tensor(x)  # a copy: never a view of read-only memory
    return t.to(torch.uint8).to(torch.float32) / 127.5 - 1.0


CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"


def load_cifar10(root: str | os.PathLike, train: bool = True, download: bool = False):
    """torchvision's CIFAR-10 (`.data` uint8 (N, 32, 32, 3), `.targets`); a failure is a one-line CMError.
    Without `download` the check is local (an offline machine never waits on the network)."""
    where = Path(root) / "cifar-10-batches-py"
    missing = (f"CIFAR-10 not found or corrupted: put the extracted files in {where}/ (from {CIFAR10_URL}), "
               "or let it download (needs internet)")
    if not download and not where.is_dir():
        raise CMError(missing)
    try:
        from torchvision.datasets import CIFAR10
        return CIFAR10(str(root), train=train, download=download and not where.is_dir())
    except (ImportError, RuntimeError, OSError) as e:  # "not found or corrupted", or a failed download
        raise CMError(f"{missing} [{type(e).__name__}: {e}]".replace("\n", " ")) from None


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def load_image_folder(root: str | os.PathLike, resolution: int, max_pixels: int = 2**28) -> Tensor:
    """Every PNG/JPEG/WebP under `root` (nested folders; a linked folder once, so link loops end) ->
    (N, 3, r, r) in [-1, 1]: center-cropped to a square, resized to r x r (bicubic), made RGB (grey and
    palette converted, alpha dropped, 16-bit scaled 65535 -> 255). Regular files only (a FIFO would block),
    sizes checked from the header before decoding; any bad file is one CMError naming it."""
    import numpy as np
    from PIL import Image
    paths, seen = [], set()
    for d, subdirs, files in os.walk(root, followlinks=True):
        if os.path.realpath(d) in seen:
            subdirs[:] = []
            continue
        seen.add(os.path.realpath(d))
        paths += [Path(d) / f for f in files if f.lower().endswith(IMAGE_SUFFIXES)]
    if not paths:
        raise CMError(f"no {'/'.join(IMAGE_SUFFIXES)} images under {root}")
    out = []
    for p in sorted(paths):
        try:
            if not p.is_file():
                raise CMError(f"image {p} is not a regular file")
            with Image.open(p) as img:
                w, h = img.size
                if not 0 < w * h <= max_pixels:
                    raise CMError(f"image {p} is {w}x{h} pixels: outside 1..{max_pixels}")
                if img.mode.startswith("I;16") or img.mode == "I":
                    v = (np.asarray(img, np.int64) * 255 + 32767) // 65535  # rounded, not clipped to white
                    img = Image.fromarray(v.clip(0, 255).astype(np.uint8))
                s, left, top = min(w, h), (w - min(w, h)) // 2, (h - min(w, h)) // 2
                img = img.convert("RGB").crop((left, top, left + s, top + s))
                out.append(np.asarray(img.resize((resolution, resolution), Image.BICUBIC, reducing_gap=2.0)))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise CMError(f"cannot read image {p} ({type(e).__name__}: {str(e)[:100]})") from None
    return uint8_to_unit(np.stack(out)).permute(0, 3, 1, 2)


def load_data(cfg: TrainConfig) -> Tensor | None:
    """The training set as a tensor, or None for the toy data (infinite, drawn per batch)."""
    if cfg.dataset == "toy":
        return None
    if cfg.dataset == "digits":
        return load_digits()
    if cfg.dataset != "cifar10":  # a folder of images
        return load_image_folder(cfg.dataset, cfg.resolution)
    return uint8_to_unit(load_cifar10(cfg.data_dir, download=True).data).permute(0, 3, 1, 2)


def make_net(cfg: TrainConfig, shape: Sequence[int]) -> nn.Module:
    time_scale = cfg.time_scale  # see timestep_embedding
    if len(shape) == 1:
        return MLP(shape[0], cfg.channels, dropout=cfg.dropout, time_scale=time_scale)
    small = shape[-1] <= 8  # 8x8 digits: one block per level keeps a CPU step near 0.1 s
    return UNet(shape[0], cfg.channels, (1, 2, 2) if small else (1, 2, 2, 2), blocks=1 if small else 2,
                resolution=shape[-1], dropout=cfg.dropout, time_scale=time_scale)


# ----------------------------------------------------------------------------------------------
# 11. Files, devices, grids and distances: what the trainer needs that is not the method

FORMAT = 1  # the checkpoint container of cm.py and full/: {"format": 1, "kind": "cm" | "full", "config": ...}
KINDS = {"cm": ("a cm.py checkpoint", "python cm.py --checkpoint PATH"),
         "full": ("a full/ checkpoint", "python -m full.sample --checkpoint PATH")}


def exit_on(e: CMError):
    """What every main() does with a CMError: `error: <message>` as one line on stderr, exit status 1."""
    print("error: " + " ".join(str(e).split()), file=sys.stderr, flush=True)
    raise SystemExit(1) from None


class Stopped(KeyboardInterrupt):
    """Ctrl-C or SIGTERM as interrupts_as_errors raises it. A subclass on purpose: `python -m` ends a
    process by re-sending itself SIGINT (status -2) whenever a KeyboardInterrupt itself (this exact type)
    once left an exec() or eval() of a string (dataclasses, namedtuple and torch make functions that
    way), even one caught and turned into the one line further up."""


_held: list[str] | None = None  # inside signals_held(): the signals that came, not yet raised


def _stop(signum, frame):
    name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
    if _held is not None:
        _held.append(name)
    else:
        raise Stopped(name)


@contextlib.contextmanager
def signals_held():
    """Ctrl-C and SIGTERM wait until the block is done, then stop the command as usual. For writes that a
    signal must not cut: torch.save into a Python file calls back into it from its C++ zip writer, and a
    signal raised in such a call is turned into a bogus write error, or leaves the writer holding the
    closed file, which aborts the process when it is collected. Nested blocks hold until the outer ends."""
    global _held
    if _held is not None or threading.current_thread() is not threading.main_thread():
        yield
        return
    _held = []
    try:
        yield
    finally:
        held, _held = _held, None
    if held:
        raise Stopped(held[0])


PATH_ERRNOS = (errno.ENAMETOOLONG, errno.ELOOP)  # raised only by a path the user gave, wherever it is used
WRITE_ERRNOS = (errno.EPIPE, errno.ENOSPC, errno.EFBIG, errno.EIO, getattr(errno, "EDQUOT", errno.ENOSPC))


def _flush_stdout_at_exit() -> None:
    """atexit: what a command printed after its interrupts_as_errors block (a score, a 'wrote' line) is
    flushed here, where a refusal can still be one line and status 1, not Python's 'Exception ignored'."""
    try:
        if sys.stdout is not None:
            sys.stdout.flush()
    except OSError as e:
        _drop_stdout()
        print(f"error: cannot write to the standard output ({e.strerror})", file=sys.stderr, flush=True)
        os._exit(1)


def _drop_stdout() -> None:
    """Standard output refused a write (a pipe whose reader is gone, `| head`; a full device): point its
    file descriptor at os.devnull, so that Python's own flush at exit adds no second message to the one
    line. Every file the project writes has its own errors (atomic_write, log_line): a write error
    without a file name that gets this far is one of standard output."""
    if sys.stdout is None or sys.stdout is not sys.__stdout__:  # a caller's redirect (a test's capture)
        return
    try:
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, sys.stdout.fileno())
        os.close(fd)
    except (OSError, ValueError, AttributeError):  # not a file (a test's capture): nothing to flush at exit
        pass


@contextlib.contextmanager
def interrupts_as_errors(note: str = "a run keeps its last checkpoint: --resume continues it"):
    """Ctrl-C, SIGTERM (torchrun's, a scheduler's) and SIGHUP (a closed terminal; left alone where it is
    ignored, as under nohup) stop a command as a one-line CMError after the clean-ups
    run: a file that atomic_write is writing is finished and put in place first (signals_held).
    A path the file system cannot resolve (a name too long, a loop of links) is one line too, wherever the
    command first touches it, and so is a machine with no usable temporary folder (torch asks tempfile for
    one when it first compiles or caches: a file-size limit of 0, a full disk), found at the start.
    Once stopping, a second Ctrl-C or SIGTERM (a double press, a scheduler's repeat) is ignored: the
    command is already on its way out with its one line."""
    main = threading.current_thread() is threading.main_thread()  # signal handlers live there only
    stopping = False
    old = signal.signal(signal.SIGTERM, _stop) if main else None
    old_int = signal.signal(signal.SIGINT, _stop) if main else None
    hup = getattr(signal, "SIGHUP", None)  # a closed terminal, a dropped ssh session; not under nohup
    old_hup = signal.signal(hup, _stop) if main and hup and signal.getsignal(hup) is not signal.SIG_IGN \
        else None
    try:
        try:
            tempfile.gettempdir()  # cached: torch's later calls get the same answer
        except FileNotFoundError as e:
            raise CMError(f"no usable temporary folder ({e.strerror or e}; set TMPDIR to a writable one)") \
                from None
        if main:  # once per process, however many commands run in it
            atexit.unregister(_flush_stdout_at_exit)
            atexit.register(_flush_stdout_at_exit)
        if main and hasattr(sys.stdout, "reconfigure"):  # a path of bytes that are not UTF-8, or not
            sys.stdout.reconfigure(errors="backslashreplace")  # ASCII under PYTHONIOENCODING=ascii, is
        yield                                                 # printed escaped, not an error after the work
        if main and sys.stdout is not None:
            sys.stdout.flush()  # what is still buffered fails here, not in Python's flush at exit
    except KeyboardInterrupt as e:
        if main:
            stopping = True
            for sig in (signal.SIGINT, signal.SIGTERM, hup if old_hup is not None else None):
                if sig is not None:
                    signal.signal(sig, signal.SIG_IGN)
        raise CMError(f"stopped by {e.args[0] if e.args else 'Ctrl-C'}; every file written so far is "
                      f"complete{f' ({note})' if note else ''}") from None
    except OSError as e:
        if e.errno in WRITE_ERRNOS and e.filename is None:
            _drop_stdout()
            raise CMError(f"cannot write to the standard output ({e.strerror}): stopped; every file written "
                          "so far is complete") from None
        if e.errno not in PATH_ERRNOS:
            raise
        name = str(e.filename or "")
        shown = name if len(name) <= 80 else name[:80] + "..."
        raise CMError(f"cannot use the path {shown}: {e.strerror}") from None
    finally:  # the handlers from before, but not a start-up one (`python cm.py`, `python -m full.<tool>`):
        if old is not None and not stopping:  # its "nothing was written" is no longer true
            starting = lambda h: getattr(h, "__name__", "") == "_stopped_while_starting"  # noqa: E731
            signal.signal(signal.SIGTERM, signal.SIG_DFL if starting(old) else old)
            signal.signal(signal.SIGINT, signal.default_int_handler if starting(old_int) else old_int)
            if old_hup is not None:
                signal.signal(hup, signal.SIG_DFL if starting(old_hup) else old_hup)


def log_line(fh, rec: dict) -> None:
    """One record of log.jsonl as one unbuffered write of one line: a failed write (a full disk) is a one-line
    CMError, and a part-written line is cut off so that every line of the log stays a whole record."""
    end = fh.seek(0, os.SEEK_END)
    try:
        fh.write((json.dumps(rec) + "\n").encode())
    except OSError as e:
        try:
            os.truncate(fh.name, end)
        except OSError:
            pass
        raise CMError(f"cannot write {fh.name}: {e.strerror or e}") from None


LOG_LINE_BYTES = 2 ** 20  # a log.jsonl record is a few hundred bytes; a longer line is not one of ours


def json_value(text: str | bytes):
    """json.loads of text read from a file, where every text it cannot take is a ValueError: also one
    nested deeper than its parser recurses (a line of 10^5 '[' is a RecursionError in json.loads)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def trim_log(path: str | os.PathLike, step: int) -> int:
    """A resume from the checkpoint of `step`: log.jsonl is cut back to before its first record of a later
    step, or before a last line that a kill cut short. Those records came after the last checkpoint (the
    run was then killed, or its next checkpoint write failed); the resume trains and logs those steps
    again, so the log keeps every step once. Lines that are not records are kept, and a line over
    LOG_LINE_BYTES ends the scan there. Returns the number of lines removed."""
    try:
        fh = open(path, "rb+")
    except FileNotFoundError:
        return 0
    except OSError as e:  # read-only: the resume could not append to it either
        raise CMError(f"cannot continue {path}: {e.strerror or e}") from None
    with fh:
        at = 0
        while line := fh.readline(LOG_LINE_BYTES + 1):
            if len(line) > LOG_LINE_BYTES:
                return 0
            if not line.endswith(b"\n"):
                break  # the torn last line of a kill
            try:
                rec = json_value(line)
            except ValueError:
                rec = None
            if isinstance(rec, dict) and type(rec.get("step")) is int and rec["step"] > step:
                break
            at += len(line)
        else:
            return 0
        fh.seek(at)
        removed, last = 0, b""
        for chunk in iter(lambda: fh.read(2 ** 20), b""):
            removed, last = removed + chunk.count(b"\n"), chunk
        fh.truncate(at)
        os.fsync(fh.fileno())
    return removed + (not last.endswith(b"\n"))  # a torn last line counts too


def remove_stale_temporaries(folder: Path, name: str = "*") -> None:
    """atomic_write's temporary files (and the temporary folders of folder writes), .NAME.PID.tmp, left by
    killed processes (kill -9): the pid in the name is gone. name: only those of the file `name`."""
    for tmp in Path(folder).glob(f".{name}.*.tmp"):
        try:
            pid = int(tmp.name.rsplit(".", 2)[-2])
            os.kill(pid, 0)  # raises if no such process
        except ProcessLookupError:
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
        except (ValueError, OverflowError, OSError):  # not ours (a pid past C's int), a live process of
            pass                                          # another user


def atomic_write(path: str | os.PathLike, write: Callable) -> Path:
    """write(fh) into a temporary file, fsync, rename over `path` (and fsync the folder): a crash never
    leaves a half-written file, a failed write (disk full) leaves nothing behind but a one-line CMError.
    A Ctrl-C or SIGTERM that comes meanwhile waits until the file is in place (signals_held); any other
    exception on the way (a KeyboardInterrupt raised by code) removes the temporary file."""
    path = Path(path)
    if path.is_symlink():  # the link stays and its target gets the new file (a dangling one: made)
        try:
            path = path.resolve()
        except (OSError, RuntimeError):  # a loop of links: open() below names it
            pass
    try:
        kind = stat.S_IFMT(os.stat(path).st_mode)
    except (OSError, ValueError):
        kind = None  # not there yet (or a path the writes below refuse in their own words)
    if kind not in (None, stat.S_IFREG, stat.S_IFDIR):  # a rename would put a file in a device's place
        raise CMError(f"cannot write {path}: it is a device, FIFO or socket, not a regular file; give a "
                      "file name")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with signals_held():
        try:
            with open(tmp, "wb") as fh:
                write(fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
            if hasattr(os, "O_DIRECTORY"):  # POSIX: the rename itself reaches the disk with its folder
                fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        except BaseException as e:  # also KeyboardInterrupt: no temporary file outlives the write
            try:
                tmp.unlink(missing_ok=True)
            except OSError:  # a file system that turned read-only: the next run's start removes it
                pass
            if not isinstance(e, (OSError, RuntimeError)):  # torch.save: a failed write is a RuntimeError
                raise
            cause = e  # torch.save's RuntimeError ("unexpected pos ...") carries the OSError it met
            while cause is not None and not isinstance(cause, OSError):
                cause = cause.__cause__ or cause.__context__
            why = cause.strerror if cause is not None and cause.strerror else str(e).splitlines()[0][:120]
            raise CMError(f"cannot write {path}: {why}") from None
    return path


CHECKSUM = "sha256"  # the top-level entry holding scan_tree's digest of everything else in the file
TREE_DEPTH, TREE_NODES = 32, 4_000_000  # a checkpoint's nesting is 5 (opt > state > 0 > exp_avg); entries


def _tensor_fits(v: Tensor) -> bool:
    """A dense tensor whose view lies inside its storage and reads no byte twice, so copying it costs no
    more memory than the file holds."""
    if v.layout != torch.strided or v.is_quantized:
        return False
    if not v.numel():
        return True
    end = v.storage_offset() + sum((n - 1) * st for n, st in zip(v.shape, v.stride())) + 1
    nbytes = v.untyped_storage().nbytes()
    return min(v.stride(), default=1) >= 0 and end * v.element_size() <= nbytes and \
        v.numel() * v.element_size() <= nbytes


def scan_tree(state, digest: bool = True) -> str:
    """Check a checkpoint's contents as data, in one walk without recursion: only dicts, lists, tuples,
    None, bools, numbers, strings, bytes and dense real tensors (their views inside their storage), at
    most TREE_DEPTH deep and TREE_NODES entries (a cyclic or self-sharing pickle stops there); no NaN or
    infinite float tensor anywhere, and no non-finite float number outside the top-level "config" (whose
    fields the configs' own checks read). Returns the sha256 (hex) over every key, value and type in
    order (a tensor: dtype, shape, bytes), the top-level CHECKSUM entry left out; '' without `digest`."""
    h = hashlib.sha256() if digest else None
    stack, nodes = [(state, "", 0, False)], 0
    while stack:
        v, at, depth, in_config = stack.pop()
        nodes += 1
        if depth > TREE_DEPTH or nodes > TREE_NODES:
            raise CMError(f"the checkpoint is nested deeper than {TREE_DEPTH} levels or holds more than "
                          f"{TREE_NODES} entries (at {at[:80] or 'the top'}): a cyclic or tampered file")
        where = at or "the top level"
        if isinstance(v, dict):
            items = [(k, x) for k, x in v.items() if not (depth == 0 and k == CHECKSUM)]
            if h:
                h.update(b"d%d;" % len(items))
            for k, x in reversed(items):
                if k is not None and not isinstance(k, (bool, int, float, str)):
                    raise CMError(f"{where} has a key of type {type(k).__name__}, not a name or number")
                config = in_config or (depth == 0 and k == "config")
                stack.append((x, f"{at}.{k}" if at else str(k), depth + 1, config))
                stack.append((k, f"{at}[key]", depth + 1, True))  # keys: checked where they are read
        elif isinstance(v, (list, tuple)):
            if h:
                h.update(b"%s%d;" % (b"l" if isinstance(v, list) else b"t", len(v)))
            stack += [(x, f"{at}[{i}]", depth + 1, in_config) for i, x in reversed(list(enumerate(v)))]
        elif isinstance(v, Tensor):
            if not _tensor_fits(v) or v.is_complex():
                raise CMError(f"{where} is a {v.dtype} {v.layout} tensor whose view does not fit its storage "
                              "or that is not real: a tampered tensor record")
            if v.is_floating_point() and not torch.isfinite(v).all():
                raise CMError(f"{where} holds NaN or infinite values")
            if h:
                b = v.detach().cpu().reshape(-1).contiguous()
                h.update(f"T{str(v.dtype)[6:]}{list(v.shape)};".encode())
                h.update(b.view(torch.uint8).numpy().tobytes() if b.numel() else b"")
        elif v is None or isinstance(v, (bool, int, float, str, bytes)):
            if isinstance(v, float) and not in_config and not math.isfinite(v):
                raise CMError(f"{where} is {v}, not a finite number")
            if h:
                h.update(f"{type(v).__name__[0]}{v!r};".encode())
        else:
            raise CMError(f"{where} is a {type(v).__name__[:40]}, not a tensor, number, string or container")
    return h.hexdigest() if h else ""


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """torch.save through atomic_write (tensors and Python primitives only, so weights_only reads it),
    with the sha256 of its contents under CHECKSUM (read_weights_only verifies it)."""
    try:
        state = {**state, CHECKSUM: scan_tree(state)}
    except CMError as e:
        raise CMError(f"refusing to write {path}: {e}") from None
    atomic_write(path, lambda fh: torch.save(state, fh))


def read_weights_only(path: str | os.PathLike):
    """torch.load(weights_only=True): a pickle that would run code is refused unread; a missing, corrupt
    or truncated file is a one-line CMError. The contents are then checked as data (scan_tree: only
    containers, numbers and finite real tensors, bounded), and a CHECKSUM entry (every file
    save_checkpoint writes; older files have none) must match them: a flipped bit is one line."""
    path = Path(path)
    try:
        if not path.is_file():
            raise CMError(f"no checkpoint at {path}")
    except OSError as e:  # a name too long for the file system, a loop of links
        raise CMError(f"cannot read checkpoint {str(path)[:80]}...: {e.strerror or e}") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, garbage bytes, pickled code
        raise CMError(f"cannot read checkpoint {path}: corrupt or truncated, or not a weights-only "
                      f"PyTorch file ({type(e).__name__})") from None
    signed = isinstance(state, dict) and CHECKSUM in state
    try:
        digest = scan_tree(state, digest=signed)
    except CMError as e:
        raise CMError(f"{path}: {e}") from None
    if signed and not (isinstance(state[CHECKSUM], str) and state[CHECKSUM] == digest):
        raise CMError(f"{path}: its contents do not match the checksum written with it (a changed or "
                      "corrupted file)")
    return state


def checkpoint_kind(state) -> str | None:
    """'cm' or 'full' for a checkpoint dict of this project, None for anything else."""
    if not isinstance(state, dict) or state.get("format") != FORMAT or \
            not isinstance(state.get("config"), dict):
        return None
    kind = state.get("kind") or ("full" if "arch" in state["config"] else "cm")
    return kind if isinstance(kind, str) and kind in KINDS else None


def load_checkpoint(path: str | os.PathLike, kind: str = "cm") -> dict:
    """A checkpoint of `kind`, read weights-only and checked as data (a cm.py one: check_cm_state); a
    foreign file or one of the other kind: one line."""
    state = read_weights_only(path)
    found = checkpoint_kind(state)
    if found != kind:
        what, how = KINDS[found] if found else ("", "")
        raise CMError(f"{path} is not {KINDS[kind][0]} (format {FORMAT})" +
                      (f"; it is {what}: use {how.replace('PATH', str(path))}" if found else ""))
    if kind == "cm":
        try:
            check_cm_state(state)
        except CMError as e:
            raise CMError(f"{path}: {e}") from None
    return state


def check_state_dict(sd, what: str, optional: bool = False) -> None:
    """A state dict: names -> floating-point tensors (None where `optional`); the networks here hold no
    integer or boolean buffers, so such a weight is a tampered file, not one to cast."""
    if sd is None and optional:
        return
    if not isinstance(sd, dict) or \
            not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in sd.items()):
        raise CMError(f"its {what} is a {type(sd).__name__}, not a state dict of named tensors")
    for k, v in sd.items():
        if not v.is_floating_point():
            raise CMError(f"its {what} weight {k[:80]} is {str(v.dtype)[6:]}, not floating point")


def check_rng(v, what: str, like: Tensor | None = None) -> None:
    """A generator state: a 1-D uint8 tensor (of the size of `like`, the CPU generator's state)."""
    ok = isinstance(v, Tensor) and v.dtype == torch.uint8 and v.ndim == 1 and 0 < v.numel() <= 1 << 20
    if not ok or (like is not None and v.shape != like.shape):
        raise CMError(f"its {what} is not a random generator state (a 1-D uint8 tensor"
                      f"{f' of {like.numel()} bytes' if like is not None else ''})")


def check_opt_state(opt) -> None:
    """An optimiser state_dict: {"state": {index: {name: tensor or number}}, "param_groups": [{"params":
    [index, ...], setting: value}]}, its lr and eps numbers >= 0 and betas two numbers in [0, 1)."""
    ok = isinstance(opt, dict) and isinstance(opt.get("state"), dict) and \
        isinstance(opt.get("param_groups"), list)
    ok = ok and all(isinstance(k, int) and isinstance(v, dict) and all(
        isinstance(x, (Tensor, int, float)) for x in v.values()) for k, v in opt["state"].items())
    ok = ok and all(isinstance(g, dict) and isinstance(g.get("params"), list) and
                    all(isinstance(i, int) and not isinstance(i, bool) for i in g["params"])
                    for g in opt["param_groups"])
    if not ok:
        raise CMError("its optimiser state is not a dict of per-parameter states and a list of param groups")
    for g in opt["param_groups"]:
        for k, v in g.items():
            num = isinstance(v, (int, float)) and not isinstance(v, bool)
            betas = isinstance(v, tuple) and len(v) == 2 and all(isinstance(b, float) and 0 <= b < 1
                                                                 for b in v)
            if k in ("lr", "eps") and not (num and v >= 0) or k == "betas" and not betas:
                raise CMError(f"its optimiser setting {k}={str(v)[:40]} is out of range")


def check_int(v, what: str, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise CMError(f"its {what} is {str(v)[:40]!r}, not an integer in [{lo}, {hi}]")
    return v


def check_cm_state(state: dict) -> None:
    """Every entry of a cm.py checkpoint as data, before anything is built from it: the state dicts,
    the config's field types and ranges (config_of, check), the step within the run, the RNG states and
    the shape of the data (scan_tree has checked every tensor finite)."""
    for name in ("model", "ema"):
        check_state_dict(state.get(name), name)
    if "target" not in state:
        raise CMError("it has no target entry (θ⁻'s state dict, or None)")
    check_state_dict(state["target"], "target", optional=True)
    check_opt_state(state.get("opt"))
    cfg = config_of(state)
    held = sum(v.numel() for v in state["ema"].values())
    if cfg.channels ** 2 > 100 * held + 10 ** 6:  # each layer of MLP and UNet has >= channels² weights / 9
        raise CMError(f"its config's {cfg.channels} channels do not fit its {held:,} EMA weights")
    try:
        check(dataclasses.replace(cfg, out=""))  # the run folder may have moved since
    except CMError as e:
        raise CMError(f"its config: {e}") from None
    check_int(state.get("step"), "step", 0, cfg.steps)
    check_rng(state.get("rng"), "rng", torch.get_rng_state())
    if "rng_cuda" in state:
        check_rng(state["rng_cuda"], "rng_cuda")
    shape = state.get("shape")
    if not isinstance(shape, list) or len(shape) not in (1, 3):
        raise CMError(f"its data shape {str(shape)[:40]} is not [dim] or [channels, height, width]")
    for i, n in enumerate(shape):
        check_int(n, f"shape[{i}]", 1, 4096 if i else (2 if len(shape) == 1 else 64))
    check_accounting(state.get("accounting"))


def check_accounting(acc) -> None:
    """A checkpoint's compute record (absent in older files): {"device_hours": a finite number >= 0,
    "flops_per_step": an int >= 0 or None}, an export's also "images" and "flops" (ints >= 0 or None)."""
    if acc is None:
        return
    if not isinstance(acc, dict):
        raise CMError(f"its accounting entry is a {type(acc).__name__}, not a dict")
    h = acc.get("device_hours")
    if isinstance(h, bool) or not isinstance(h, (int, float)) or not 0 <= h < 1e12:
        raise CMError(f"its accounting device_hours {str(h)[:40]} is not a number in [0, 1e12)")
    for k in ("flops_per_step", "images", "flops"):
        if acc.get(k) is not None:
            check_int(acc[k], f"accounting {k}", 0, 1 << 100)


def out_folder(path: str | os.PathLike, make: bool = False) -> Path:
    """--out as a folder (a file there is a one-line CMError), created with `make`."""
    out = Path(path)
    if "\0" in str(out):  # os calls raise ValueError on it, not OSError
        raise CMError(f"the output folder {str(out)!r} holds a NUL character")
    try:
        if out.exists() and not out.is_dir():
            raise CMError(f"the output folder {out} is a file, not a folder")
    except OSError as e:  # a name too long for the file system, a loop of links
        raise CMError(f"cannot use {str(out)[:80]} as the run folder: {e.strerror or e}") from None
    if make:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CMError(f"cannot use {out} as the run folder: {e.strerror or e}") from None
    return out


class RunFolder:
    """The run folder, held with an OS lock (fcntl; released on exit, kill -9 included) for the life of
    the run: a second run in the same folder is refused with one line instead of sharing its files."""

    def __init__(self, out: str | os.PathLike):
        self.out = out_folder(out, make=True)
        try:  # non-blocking: a FIFO named .lock would otherwise wait for a reader for ever
            fd = os.open(self.out / ".lock", os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NONBLOCK, 0o644)
            self.fh = os.fdopen(fd, "a")
        except OSError as e:  # ENXIO: a FIFO with no reader
            raise CMError(f"cannot use {self.out} as the run folder ({self.out / '.lock'}: "
                          f"{e.strerror or e}; it must be a regular file)") from None
        if not stat.S_ISREG(os.fstat(self.fh.fileno()).st_mode):
            self.fh.close()
            raise CMError(f"cannot use {self.out} as the run folder: {self.out / '.lock'} "
                          "is not a regular file")
        try:
            import fcntl  # POSIX; elsewhere runs are not locked
            fcntl.flock(self.fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:
            pass
        except OSError:
            self.fh.close()
            raise CMError(f"another process is running in {self.out} (it holds {self.out / '.lock'}); "
                          "wait for it or use another --out") from None
        remove_stale_temporaries(self.out)

    def release(self) -> None:
        self.fh.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def changed_fields(saved: dict, now: dict, fields: Sequence[str]) -> list[str]:
    """The fields whose saved and current values differ, as 'name saved -> now'."""
    return [f"{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in fields if saved.get(k) != now.get(k)]


def pick_device(name: str = "") -> torch.device:
    """--device: '' -> cuda if available, else cpu; an unknown name or an absent device -> CMError."""
    try:
        dev = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except (RuntimeError, ValueError):
        raise CMError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise CMError(f"device {name!r} is not available: this machine has "
                      f"{torch.cuda.device_count()} CUDA device(s); use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise CMError(f"device {name!r} is not supported; use cpu, cuda or cuda:N")
    return dev


def autocast(precision: str, device: torch.device):
    """torch.autocast for bf16/fp16, a no-op for fp32: for the networks only, never the metric or the
    ODE arithmetic (ConsistencyFunction casts F's output back to fp32 before the skip)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def under_autocast(fn: Callable | None, precision: str, device: torch.device) -> Callable | None:
    """fn(*args) under autocast(precision)."""
    if fn is None:
        return None

    def call(*args, **kwargs):
        with autocast(precision, device):
            return fn(*args, **kwargs)
    return call


def grid_name(how: str, step: int) -> str:
    """The file name of a sample grid, the same in cm.py and full/: grid-1step-0000800.png, grid-heun-..."""
    return f"grid-{how.replace('-', '')}-{step:07d}.png"


def finite_samples(x: Tensor, what: str) -> Tensor:
    """x, or a CMError if a sample is NaN or infinite: weights that are finite but absurd (a tampered or
    diverged checkpoint) must not become a black grid or a NaN score."""
    if not torch.isfinite(x).all():
        raise CMError(f"{what}: the samples are not finite (NaN or inf): the weights are corrupt or diverged")
    return x


def save_grid(x: Tensor, path: str | os.PathLike, nrow: int | None = None) -> Path:
    """PNG grid of images in [-1, 1] (tiny ones upscaled to 32 pixels), or a scatter plot of 2-D points,
    written atomically into a folder it creates; non-finite samples are refused (finite_samples)."""
    finite_samples(x, f"{Path(path).name[:80]}")  # a last guard; the samplers' callers check first
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if x.ndim == 2:
        from matplotlib.figure import Figure  # no pyplot: leaves a notebook's backend alone
        fig = Figure(figsize=(4, 4))
        ax = fig.subplots()
        ax.scatter(*x.cpu().T, s=2)
        ax.set(xlim=(-1.2, 1.2), ylim=(-1.2, 1.2), aspect="equal", title=path.stem)
        return atomic_write(path, lambda fh: fig.savefig(fh, dpi=80, format="png"))
    import torchvision
    x = (x.clamp(-1, 1) + 1) / 2
    if x.shape[-1] < 32:
        x = F.interpolate(x, scale_factor=32 // x.shape[-1], mode="nearest")
    nrow = nrow or max(1, int(math.sqrt(len(x))))
    return atomic_write(path, lambda fh: torchvision.utils.save_image(x.float().cpu(), fh, format="png",
                                                                      nrow=nrow, padding=2, pad_value=1))


def energy_distance(x: Tensor, y: Tensor) -> float:
    """Energy distance 2E‖X-Y‖ - E‖X-X'‖ - E‖Y-Y'‖ (zero iff same law; unbiased, so ≈ 0 can dip below)."""
    x, y = x.flatten(1).double(), y.flatten(1).double()
    off = lambda d: d.sum() / (d.numel() - d.shape[0])  # noqa: E731  (mean over i != j)
    return (2 * torch.cdist(x, y).mean() - off(torch.cdist(x, x)) - off(torch.cdist(y, y))).item()


def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> float:
    """‖μ₁ - μ₂‖² + tr(Σ₁ + Σ₂ - 2 (Σ₁Σ₂)^½) (FID's formula), in float64. tr (Σ₁Σ₂)^½ is the sum of the
    square roots of the eigenvalues of Σ₁^½ Σ₂ Σ₁^½ (symmetric, so torch.linalg.eigh suffices)."""
    mu1, sigma1, mu2, sigma2 = (v.double() for v in (mu1, sigma1, mu2, sigma2))
    w, V = torch.linalg.eigh(sigma1)
    root1 = V @ torch.diag(w.clamp(min=0).sqrt()) @ V.T
    cross = torch.linalg.eigvalsh(root1 @ sigma2 @ root1).clamp(min=0).sqrt().sum()
    return ((mu1 - mu2).pow(2).sum() + sigma1.trace() + sigma2.trace() - 2 * cross).item()


class DigitsClassifier(nn.Module):
    """A small CNN for 8x8 digits in [-1, 1]; `features` is its 64-d penultimate layer."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.SiLU(),
                                      nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.SiLU(),  # (B, 64, 4, 4)
                                      nn.Flatten(), nn.Linear(64 * 16, 64), nn.SiLU())
        self.head = nn.Linear(64, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def cache_dir() -> Path:
    """$CM_CACHE, else ~/.cache/consistency-models."""
    return Path(os.environ.get("CM_CACHE") or Path.home() / ".cache" / "consistency-models")


def digits_classifier(seed: int = 0, epochs: int = 30, verbose: bool = True) -> DigitsClassifier:
    """The digits classifier, trained once (1,437 training digits, Adam, seconds on a CPU) and cached in
    cache_dir(); its accuracy on the 360 held-out digits is printed when it is trained. The caller's RNG
    is left alone; a corrupt cache is rebuilt, never trusted."""
    path = cache_dir() / f"digits_classifier_s{seed}_e{epochs}.pt"
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = DigitsClassifier()
        if path.is_file():
            try:
                net.load_state_dict(read_weights_only(path)["model"])
                return net.eval().requires_grad_(False)
            except (CMError, KeyError, RuntimeError):
                net = DigitsClassifier()
        x, y = load_digits(labels=True)
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(len(x), generator=g)
        train, test = perm[:1437], perm[1437:]
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        for _ in range(epochs):
            for idx in train[torch.randperm(len(train), generator=g)].split(64):
                loss = F.cross_entropy(net(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
    net.eval().requires_grad_(False)
    acc = (net(x[test]).argmax(1) == y[test]).float().mean().item()
    if verbose:
        print(f"digits feature classifier: test accuracy {acc:.3f} on {len(test)} held-out digits "
              f"(cached in {path})")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(path, {"model": net.state_dict(), "test_accuracy": acc})
    except (OSError, CMError):  # a read-only home: retrained next time, nothing else lost
        pass
    return net


def digits_feature_distance(x: Tensor, y: Tensor, net: DigitsClassifier | None = None) -> float:
    """Fréchet distance between the classifier features of two sets of 8x8 digits (N, 1, 8, 8) in
    [-1, 1]: FID's formula on a download-free feature space. Real against real is its floor."""
    net = net or digits_classifier()
    with torch.no_grad():
        fx, fy = (net.features(v.float().cpu()).double() for v in (x, y))
    return frechet_distance(fx.mean(0), torch.cov(fx.T), fy.mean(0), torch.cov(fy.T))


def distance_table(samples: dict[str, Tensor], real: Callable[[], Tensor], title: str,
                   features: bool) -> dict:
    """Print and return each sample set's energy distance to fresh data (each real() call draws a fresh
    set); with `features` (the digits), also the feature Fréchet distance, which judges the digits' shapes
    where the energy distance of raw pixels is dominated by per-pixel brightness."""
    rows = {k: energy_distance(v, real()) for k, v in samples.items()}
    fd = {}
    if features:
        net = digits_classifier()
        fd = {k: digits_feature_distance(v, real(), net) for k, v in samples.items()}
    print(f"\ndistance to fresh data ({title}): energy" + ", feature Fréchet" * bool(fd))
    for k, v in rows.items():
        print(f"  {k:34s} {v:8.4f}" + (f"  {fd[k]:8.2f}" if fd else ""))
    return rows | {f"{k} [feature FD]": v for k, v in fd.items()}


# ----------------------------------------------------------------------------------------------
# 12. The trainer's settings: every field is a flag (--batch-size 64, --no-init-from-teacher, ...)

@dataclass
class TrainConfig:
    # what to train
    dataset: str = "digits"         # toy (2-D ring) | digits (8x8, scikit-learn) | cifar10 (torchvision)
    #                                 | a folder of PNG/JPEG/WebP images (cifar10's defaults, metric l2)
    resolution: int = 32            # a folder's images are center-cropped and resized to this side
    data_dir: str = "data"          # where cifar10 lives / is downloaded to
    teacher: str = ""               # cd, ect: an edm checkpoint ('' -> train one into <out>/teacher first)
    teacher_steps: int = 0          # cd, ect without --teacher: the teacher's steps (0 -> the edm default)
    out: str = ""                   # run folder ('' -> runs/<dataset>-<mode>)
    cm: CMConfig = field(default_factory=CMConfig)  # the math (section 6); its fields are flags too
    # optimisation
    steps: int = 800                # training steps K
    batch_size: int = 128
    lr: float = 2e-4                # RAdam (cm) / Adam (edm) learning rate
    ema: float = 0.999              # evaluation EMA rate
    ema_warmup: bool = True         # the EMA rate ramps as min(ema, (1+k)/(10+k)) (off: the paper's runs)
    flip: bool = False              # random horizontal flips of the images (cifar10 sets it, ect does not)
    channels: int = 32              # network width
    dropout: float = 0.0            # dropout in the network
    time_scale: float = 100.0       # of c_noise in the time embedding (timestep_embedding); 1 for sct, scd
    precision: str = "fp32"         # fp32 | bf16 (autocast of F only; c_skip x stays in fp32)
    init_from_teacher: bool = True  # cd: start f_theta from the teacher's weights (as the official runs)
    # output
    seed: int = 0                   # everything random derives from it
    log_every: int = 50             # steps between lines in log.jsonl
    tensorboard: bool = False       # also write TensorBoard events into <out>/tb (pip install tensorboard)
    sample_every: int = 0           # steps between sample grids (0 -> 4 grids per run)
    grid_minutes: float = 10.0      # also a grid every this many minutes of training (0: only by steps)
    ckpt_every: int = 500           # steps between checkpoints
    report: bool = True             # end with the distance table (a teacher trained for cd skips its own)
    ts: str = ""                    # two-step sampling levels, official index convention ('' -> default)
    grid_steps: int = 18            # the grid size N the ts indices refer to
    mid_t: float = 1.0              # ict, ect, sct, scd: the second level of two-step sampling without --ts
    device: str = ""                # '' -> cuda if available, else cpu
    resume: bool = False            # continue from <out>/ckpt.pt if it exists
    overwrite: bool = False         # start afresh in a folder that holds a run (its ckpt.pt is replaced)
    allow_config_change: bool = False  # resume with other settings (e.g. more --steps, another --lr)


DATASETS = ("toy", "digits", "cifar10")
TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)} - {"cm"}
MATH_FIELDS = {f.name for f in dataclasses.fields(CMConfig)}
FIELD_DEFAULTS = {f.name: f.default for c in (TrainConfig, CMConfig) for f in dataclasses.fields(c)}


def readers(name: str) -> tuple[str, ...]:
    """The modes that read the setting `name`: a recipe's CMConfig fields (Recipe.fields), the teacher's
    settings where the recipe has one, the two-step levels where grids have two steps; others: every mode."""
    if any(name in r.fields for r in RECIPES.values()):
        return tuple(m for m, r in RECIPES.items() if name in r.fields)
    if name in ("teacher", "teacher_steps", "init_from_teacher"):  # init: ect always starts from D_φ
        return tuple(m for m, r in RECIPES.items() if r.teacher and (name != "init_from_teacher"
                                                                     or r.teacher == "loss"))
    if name in ("ts", "grid_steps", "mid_t"):  # edm grids: the Heun sampler; mid_t: the T, mid_t modes
        return ("ict", "ect", "sct", "scd") if name == "mid_t" else tuple(m for m in RECIPES if m != "edm")
    return tuple(RECIPES)


def refuse_unread(mode: str, names: Sequence[str]) -> None:
    """Settings `mode` never reads (--ablate for ct, --teacher for edm) are refused: ignored without a
    word, the run would not be the one asked for."""
    if unread := sorted(k for k in names if mode not in readers(k)):
        raise CMError(f"--mode {mode} does not read " + "; ".join(
            f"--{k.replace('_', '-')} (a setting of {', '.join(readers(k))})" for k in unread))


def config(dataset: str = "digits", mode: str = "cd", **flags) -> TrainConfig:
    """A run's settings: the defaults of `dataset` and `mode` below, then `flags` (any field of
    TrainConfig or CMConfig, by name), checked. The defaults make `python cm.py` end in minutes on a
    CPU; cifar10 takes the papers' values [CM Tab. 3, iCT Sec. 3-5, locuslab/ect run_ecm.sh]."""
    if dataset not in DATASETS and not os.path.isdir(dataset):
        try:
            os.stat(dataset)
            why = "not a folder"
        except OSError as e:
            why = e.strerror if e.errno in PATH_ERRNOS else "no such dataset or folder"
        shown = dataset if len(dataset) <= 80 else dataset[:80] + "..."
        raise CMError(f"--dataset {shown!r}: {why}; choose one of {', '.join(DATASETS)} or an image folder")
    if mode not in RECIPES:
        raise CMError(f"unknown mode {mode!r}; choose one of {', '.join(RECIPES)}")
    unknown = set(flags) - TRAIN_FIELDS - MATH_FIELDS
    if unknown:
        raise CMError(f"unknown setting(s) {', '.join(sorted(unknown))}")
    # at its default value a setting changes nothing: a script's dict of settings may name it for every mode
    refuse_unread(mode, [k for k in flags if flags[k] != FIELD_DEFAULTS[k]])
    reads_files = {"resolution": dataset not in DATASETS, "data_dir": dataset == "cifar10",  # per dataset
                   "teacher_steps": not flags.get("teacher")}  # a teacher given is not trained
    if unused := sorted(k for k, ok in reads_files.items() if k in flags and not ok):
        raise CMError(f"--{unused[0].replace('_', '-')} does nothing here: --resolution is for an image "
                      "folder, --data-dir for cifar10, --teacher-steps for a teacher cm.py trains itself")
    if "ts" in flags and "mid_t" in flags:
        raise CMError("--ts sets both two-step levels and --mid-t the second one: pass one of them")
    metric = {"ict": "pseudo_huber", "ect": "l2_norm"}.get(mode, "l2")  # [iCT Sec. 3.3], [ECT Sec. 3]
    c = dict(mode=mode, metric=metric, s0=10 if mode == "ict" else 2, mu_rule="paper", P_mean=-1.1)
    if RECIPES[mode].trigflow:  # [sCM Sec. 4]: TrigFlow's own c_noise for sCT, the EDM teacher's for sCD
        c.update(P_mean=-1.0, P_std=1.4, noise_cond="trig" if mode == "sct" else "edm")
    if dataset == "toy":
        t = dict(steps=dict(edm=4000, cd=4000, ct=6000, ict=6000, ect=4000, sct=3000, scd=2000)[mode],
                 batch_size=512, channels=256, lr=3e-4 if RECIPES[mode].trigflow else 1e-3)
        # sCT/sCD: at 1e-3 their samples swing between good and poor every few hundred steps
        c.update(s1=80, stage_steps=1000,  # ECT: 4 stages (8 of 500 left one-step samples at CT's level)
                 tangent_warmup=500)
    elif dataset == "digits":
        t = dict(steps=dict(edm=1500, cd=800, ct=3000, ict=3000, ect=1500, sct=1000, scd=400)[mode],
                 batch_size=128, channels=32, lr=2e-4)  # scd: its distance is flat from 400 steps on
        if mode == "scd":  # sct and scd (a JVP per step) within 10 minutes on 2 CPU cores, teacher included
            t.update(teacher_steps=1000)
        c.update(tangent_warmup=300)
        if RECIPES[mode].trigflow:  # --search-ts --search-sigma on sCT and sCD runs: the best middle level
            t.update(mid_t=0.05)    # is low (0.045-0.084); at 1.0 sCD's two steps are worse than one
        c.update(s1=160 if mode == "ict" else 40, P_mean=0.0)  # not -1.1: more high-noise draws halve the
        #                                                        digits' one-step distance (docs/results.md)
    else:  # cifar10 [CM Tab. 3]; edm: EDM's 200M images at batch 512; ict [iCT]; ect (locuslab/ect)
        # CD/CT evaluate EMA 0.9999 without warm-up [CM Tab. 3]; flips as the CM runs, none for ect
        # (locuslab/ect ct_train.py: --xflip False, run_ecm.sh: --augment 0)
        t = dict(steps=dict(edm=390_625, cd=800_000, ct=800_000, ict=400_000, ect=200_000, sct=350_000,
                            scd=500_000)[mode],
                 batch_size=dict(ict=1024, ect=128).get(mode, 512), channels=128,
                 lr=1e-4 if mode in ("ict", "ect", "sct", "scd") else 4e-4,
                 mid_t=0.5 * math.tan(1.1) if mode in ("sct", "scd") else 0.821,  # sCM: t_mid = 1.1
                 dropout=dict(ict=0.3, ect=0.2, sct=0.2).get(mode, 0.0), flip=mode != "ect")
        t.update(dict(ema=0.9999, ema_warmup=False) if dataset == "cifar10" and mode in ("cd", "ct") else {})
        # LPIPS for cifar10 CD/CT; a folder: l2 unless --metric lpips; sCM has no metric (its loss is its own)
        lpips = dataset == "cifar10" and mode in ("cd", "ct")
        c.update(mu_rule="code", metric="lpips" if lpips else metric,
                 s1=1280 if mode == "ict" else 150)
    if RECIPES[mode].trigflow:  # time features of frequency <= 1, also in sCD's teacher: timestep_embedding
        t["time_scale"] = 1.0
    t.update({k: v for k, v in flags.items() if k in TRAIN_FIELDS})
    c.update({k: v for k, v in flags.items() if k in MATH_FIELDS})
    c.setdefault("stage_steps", max(-(-t["steps"] // 8), 1))  # ⌈K/8⌉: eight stages, never a ninth
    t.setdefault("sample_every", max(t["steps"] // 4, 1))
    t.setdefault("out", f"runs/{Path(dataset).name if dataset not in DATASETS else dataset}-{mode}")
    cfg = TrainConfig(dataset=dataset, cm=CMConfig(**c), **t)
    return check(cfg)


def check(cfg: TrainConfig) -> TrainConfig:
    """The range checks of the trainer's settings and of the math (CMConfig.check): one-line CMErrors."""
    cfg.cm.check()
    if cfg.precision not in ("fp32", "bf16"):
        raise CMError(f"unknown precision {cfg.precision!r}; choose one of fp32, bf16")
    if min(cfg.steps, cfg.batch_size, cfg.channels, cfg.log_every, cfg.ckpt_every, cfg.sample_every) < 1:
        raise CMError("steps, batch-size, channels, log-every, ckpt-every and sample-every must be >= 1")
    if cfg.dataset not in DATASETS and not (8 <= cfg.resolution <= 1024 and cfg.resolution % 8 == 0):
        raise CMError(f"resolution must be a multiple of 8 in 8..1024 (the UNet halves it 3 times), "
                      f"got {cfg.resolution}")
    if cfg.teacher_steps < 0:
        raise CMError(f"teacher-steps must be >= 0, got {cfg.teacher_steps}")
    if not (0 <= cfg.seed <= MAX_SEED and cfg.batch_size <= 2 ** 16 and cfg.channels <= 4096
            and 2 <= cfg.grid_steps <= MAX_LEVELS):
        raise CMError(f"need 0 <= seed <= 2^62, batch-size <= 65536, channels <= 4096 and 2 <= grid-steps <= "
                      f"{MAX_LEVELS} (got {cfg.seed}, {cfg.batch_size}, {cfg.channels}, {cfg.grid_steps})")
    if cfg.dataset != "toy":  # the UNet's group norms and attention heads must divide its widths
        side = {"digits": 8, "cifar10": 32}.get(cfg.dataset, cfg.resolution)
        shape = (1 if cfg.dataset == "digits" else 3, side, side)
        try:
            with torch.device("meta"):  # shapes only: no memory, no weights
                make_net(cfg, shape)(torch.zeros(1, *shape), torch.zeros(1))
        except (ValueError, RuntimeError, ZeroDivisionError) as e:
            raise CMError(f"channels={cfg.channels} does not fit the UNet ({str(e)[:80]}); "
                          "a multiple of 32 always does") from None
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if isinstance(v, float) and not math.isfinite(v):
            raise CMError(f"--{f.name.replace('_', '-')} must be a finite number, got {v}")
    if cfg.grid_minutes < 0:
        raise CMError(f"--grid-minutes must be >= 0 (0: grids by steps only), got {cfg.grid_minutes}")
    if not (math.isfinite(cfg.lr) and cfg.lr > 0 and 0 <= cfg.dropout < 1 and 0 <= cfg.ema < 1
            and 1e-4 <= cfg.time_scale <= 1e4):
        raise CMError(f"need a finite lr > 0, 0 <= dropout < 1, 0 <= ema < 1 and 1e-4 <= time-scale <= 1e4 "
                      f"(got lr={cfg.lr}, dropout={cfg.dropout}, ema={cfg.ema}, time-scale={cfg.time_scale})")
    # what a stored config may hold (steps, teacher_steps <= 2^40, ...): a run that could not be resumed
    settings = {**dataclasses.asdict(cfg.cm), **{k: getattr(cfg, k) for k in TRAIN_FIELDS}}
    check_stored_sizes(settings, flags=True)
    out_folder(cfg.out)
    try:
        two_step_levels(cfg)  # a bad --ts or --mid-t fails now, not after the first sample_every steps
    except ValueError as e:
        uses_mid_t = cfg.cm.mode in ("ict", "ect", "sct", "scd") and not cfg.ts
        flag = f"--mid-t {cfg.mid_t}: " if uses_mid_t else f"--ts {cfg.ts}: " if cfg.ts else ""
        raise CMError(f"{flag}{e}") from None
    return cfg


def two_step_levels(cfg: TrainConfig) -> list[float]:
    """Two-step levels: --ts, else the official CIFAR-10 CD choice 0,11,17 of 18 for cd, 0,8,17 (τ₂ ≈ 3.3)
    for ct, whose short runs learn low levels best; T, mid_t for ict and ect (0.821 in both papers)."""
    c = cfg.cm
    if c.mode in ("ict", "ect", "sct", "scd") and not cfg.ts:
        return check_levels([c.sigma_max, cfg.mid_t], c.sigma_min, c.sigma_max)
    ts = parse_ts(cfg.ts) if cfg.ts else [0, 11, 17] if c.mode == "cd" else [0, 8, 17]
    return ts_to_sigmas(ts, cfg.grid_steps, c.sigma_min, c.sigma_max, c.rho)


def parse_ts(text: str) -> list[int]:
    """'0,8,17' -> [0, 8, 17], the official indices as --ts takes them; a ValueError for anything else."""
    try:
        return [int(i) for i in text.split(",")]
    except ValueError:
        raise ValueError(f"ts must be comma-separated grid indices such as 0,8,17, got {text!r}") from None


# Settings that change what a run computes (with CMConfig.run_fields): a resume with other values is
# refused, naming them, unless --allow-config-change; folders, intervals and the device may differ.
RUN_FIELDS = ("dataset", "channels", "time_scale", "steps", "batch_size", "lr", "dropout", "precision", "ema",
              "seed", "init_from_teacher", "teacher")


# Sizes of the settings that a grid, a schedule or a network is made from, bounded before a stored config
# is checked or used (the papers' largest: N = 1281 grid points, s1 = 1280, a few hundred channels).
STORED_BOUNDS = dict(grid_steps=10 ** 5, N=10 ** 5, s0=10 ** 6, s1=10 ** 6, channels=4096, batch_size=1 << 20,
                     batch=1 << 24, microbatch=1 << 24, resolution=4096, steps=1 << 40, teacher_steps=1 << 40,
                     stage_steps=1 << 40, tangent_warmup=1 << 40, sample_num=1 << 20, fid_samples=1 << 24)


def check_stored_sizes(d: dict, prefix: str = "", flags: bool = False) -> None:
    """The integers of STORED_BOUNDS in a stored config section within their bounds (one-line CMError);
    flags: d is a new run's settings, named as flags (a run that could not be resumed is not started)."""
    for k, hi in STORED_BOUNDS.items():
        v = d.get(k)
        if isinstance(v, int) and not isinstance(v, bool) and not -hi <= v <= hi:
            raise CMError(f"--{k.replace('_', '-')} {v} is out of range (at most {hi})" if flags else
                          f"its config field {prefix}{k}={v} is out of range (at most {hi})")


def config_of(state: dict) -> TrainConfig:
    """The TrainConfig stored in a checkpoint (also the flat one of older files); a field of the wrong
    type (a str step, a float channel count, a bool for a number) is a one-line CMError."""
    if not isinstance(state.get("config"), dict):
        raise CMError("the checkpoint has no config dict")
    saved = dict(state["config"])
    saved.setdefault("grid_steps", saved.pop("ts_grid", 18))
    math_ = saved.pop("cm", None) or {k: saved[k] for k in MATH_FIELDS if k in saved}
    if not isinstance(math_, dict):
        raise CMError(f"its config's cm entry is a {type(math_).__name__}, not a dict")
    math_ = dict(math_)
    if not isinstance(math_.get("P_mean", 0.0), float) or math_.get("P_mean") != math_.get("P_mean"):
        math_.pop("P_mean", None)  # an older file's "unset"
    math_ = {k: v for k, v in math_.items() if k in MATH_FIELDS}
    train_ = {k: v for k, v in saved.items() if k in TRAIN_FIELDS}
    if math_.get("noise_cond") == "trig" and "time_scale" not in train_:  # 100 for the ln(σ)/4 others
        raise CMError("its config has no time_scale, and an sct file without one may have either 1 or 100 "
                      "(the TrigFlow time embedding changed): retrain it")
    for cls, d, prefix in ((CMConfig, math_, "cm."), (TrainConfig, train_, "")):
        check_stored_sizes(d, prefix)
        hints = typing.get_type_hints(cls)
        for k, v in d.items():
            tp = hints[k]
            ok = isinstance(v, bool) if tp is bool else isinstance(v, tp) and not isinstance(v, bool) \
                if tp in (int, str) else isinstance(v, (int, float)) and not isinstance(v, bool)
            if not ok:
                raise CMError(f"its config field {prefix}{k}={str(v)[:40]!r} is not of type {tp.__name__}")
    return TrainConfig(cm=CMConfig(**math_), **train_)


def check_outputs(f: nn.Module, c: CMConfig, shape: Sequence[int], what: str, num_classes: int = 0) -> None:
    """f's outputs on noisy inputs at σ_min, 1 and σ_max are finite. Weights that are each finite can still
    be absurd (a tampered file, ×1e30): refused when they are loaded, not after a run or as a black grid.
    Draws from its own generator, so a resume stays bit-exact."""
    p = next(f.parameters())
    g = torch.Generator().manual_seed(0)
    sigma = torch.tensor([c.sigma_min, 1.0, c.sigma_max])
    x = (torch.randn(3, *shape, generator=g) * append_dims(sigma, 1 + len(shape))).to(p.device, p.dtype)
    was = f.training
    y = (torch.zeros(3, dtype=torch.long, device=p.device),) if num_classes else ()
    with torch.no_grad():
        ok = torch.isfinite(f.eval()(x, sigma.to(p.device, p.dtype), *y)).all()
    f.train(was)
    if not ok:
        raise CMError(f"{what} give NaN or infinite outputs: finite but absurd weights (a tampered or "
                      "diverged file)")


def model_from_checkpoint(state: dict, key: str = "ema") -> tuple[nn.Module, TrainConfig]:
    """Rebuild f (D for an edm or ect checkpoint, TrigFlow for sct, scd) with the weights under `key`,
    checked to give finite outputs."""
    try:
        cfg = config_of(state)
        model = parameterize(cfg.cm, make_net(cfg, state["shape"]))
        model.load_state_dict(state[key])
    except (RuntimeError, KeyError, TypeError, ValueError) as e:
        raise CMError(f"checkpoint weights do not match its network ({type(e).__name__})") from e
    check_outputs(model, cfg.cm, state["shape"], f"the checkpoint's {key} weights")
    return model.eval().requires_grad_(False), cfg


def run_changes(saved: TrainConfig, cfg: TrainConfig) -> list[str]:
    """The settings a run computes with that differ between a checkpoint's config and this one."""
    return changed_fields(dataclasses.asdict(saved), dataclasses.asdict(cfg), RUN_FIELDS) + \
        changed_fields(dataclasses.asdict(saved.cm), dataclasses.asdict(cfg.cm), cfg.cm.run_fields())


def finished(path: str | os.PathLike, steps: int) -> bool:
    """A checkpoint of a run of `steps` steps that reached its end."""
    if not Path(path).is_file():
        return False
    state = load_checkpoint(path)
    return state["step"] == state["config"]["steps"] == steps


# ----------------------------------------------------------------------------------------------
# 13. The trainer: set up (teacher, resume), then the loop; each step is one recipe_loss

def train(cfg: TrainConfig) -> dict:
    """Train one mode; returns the final distances (empty with report=False). Resumes if asked."""
    check(cfg)
    if RECIPES[cfg.cm.mode].teacher and not cfg.teacher:  # a teacher first, or reuse a finished one
        flags = {k: getattr(cfg, k) for k in ("data_dir", "resolution", "seed", "device", "precision",
                                               "log_every", "ckpt_every", "grid_minutes", "overwrite")
                 if k not in ("data_dir", "resolution") or getattr(cfg, k) != FIELD_DEFAULTS[k]}
        flags.update(sigma_min=cfg.cm.sigma_min, sigma_max=cfg.cm.sigma_max, sigma_data=cfg.cm.sigma_data,
                     rho=cfg.cm.rho, channels=cfg.channels, time_scale=cfg.time_scale,
                     out=f"{cfg.out}/teacher", resume=True,
                     report=False)
        if cfg.teacher_steps:
            flags["steps"] = cfg.teacher_steps
        tcfg = config(cfg.dataset, "edm", **flags)
        cfg = dataclasses.replace(cfg, teacher=f"{tcfg.out}/ckpt.pt")
        if Path(cfg.teacher).is_file():  # an earlier teacher is reused only if it has this run's settings
            changed = run_changes(config_of(load_checkpoint(cfg.teacher)), tcfg)
            if changed and not cfg.overwrite:
                raise CMError(f"{cfg.teacher} was trained with other {', '.join(changed)}; pass --overwrite "
                              "to train a new teacher, or --teacher PATH to use it as it is")
            if changed:
                tcfg = dataclasses.replace(tcfg, resume=False)  # --overwrite: the teacher starts afresh too
        if not tcfg.resume or not finished(cfg.teacher, tcfg.steps):
            print(f"no --teacher given: training an EDM teacher in {tcfg.out} first")
            train(tcfg)
    with RunFolder(cfg.out) as folder:
        return Run(cfg, pick_device(cfg.device), folder.out).loop()


def not_the_input(out: str | os.PathLike, src: str | os.PathLike, flag: str = "--out") -> None:
    """A tool's output may not be its input, nor a folder that holds it: the write would replace the very
    file it read (a resume checkpoint turned into an export, source images into their statistics)."""
    try:
        o, i = Path(out).resolve(), Path(src).resolve()
    except (OSError, RuntimeError):  # a loop of links: the tool's own reads say so
        return
    if o == i or o in i.parents:
        raise CMError(f"{flag} {out} is {'the input' if o == i else 'a folder holding the input'} {src}: "
                      f"writing it would destroy what is read; give another {flag}")


def files_or_absent(*paths: Path) -> None:
    """Each of a run folder's own files (log.jsonl, config.json, ...) is a regular file or not there: a
    folder cannot be appended to, opening a FIFO blocks for ever, a loop of links never resolves."""
    for p in paths:
        if (p.is_symlink() or p.exists()) and not p.is_file():
            raise CMError(f"{p} is not a regular file: move it out of the run folder")


def dtype_mismatch(module: nn.Module, state: dict) -> str | None:
    """The first weight of `state` of another dtype than the module's (load_state_dict casts it), or None."""
    own = module.state_dict()
    bad = next((k for k, v in state.items()
                if k in own and isinstance(v, Tensor) and v.dtype != own[k].dtype), None)
    return None if bad is None else f"{bad} is {state[bad].dtype}, the network's {own[bad].dtype}"


def load_for_resume(obj: nn.Module | torch.optim.Optimizer, state: dict, what: str, path,
                    steps: int = 0) -> None:
    """obj.load_state_dict(state) for a resume, refusing (one line) what load_state_dict would take without
    a word: a weight or an optimiser moment of another dtype (it casts them), a moment of another shape
    than its parameter (Adam would fail at the next step, after the run's files were rewritten), a
    negative second moment (its square root is NaN), optimiser state of a parameter the optimiser lacks,
    an optimiser step count (Adam's bias correction) that is not a whole number in 0..steps, the
    checkpoint's training steps (fewer where fp16's grad scaler skipped a step)."""
    def refuse(why: str):
        raise CMError(f"{path}: the {what} state does not fit this run: {why}")
    try:
        if isinstance(obj, nn.Module):
            if why := dtype_mismatch(obj, state):
                refuse(why)
            obj.load_state_dict(state)
            return
        params = [p for g in obj.param_groups for p in g["params"]]
        if extra := sorted(set(state["state"]) - set(range(len(params))), key=str):
            refuse(f"moments of {len(extra)} parameter(s) it does not have (e.g. {str(extra[0])[:20]})")
        for i, moments in state["state"].items():  # before loading: load_state_dict casts them
            for name, v in moments.items():
                if isinstance(v, Tensor) and name != "step" and v.dtype != params[i].dtype:
                    refuse(f"{name} of parameter {i} is {v.dtype}, the parameter {params[i].dtype}")
        obj.load_state_dict(state)
    except CMError:
        raise
    except (RuntimeError, KeyError, ValueError, TypeError, AttributeError) as e:
        refuse(f"{type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}")
    for i, p in enumerate(params):
        for name, v in obj.state.get(p, {}).items():
            if not isinstance(v, Tensor):
                continue
            if name == "step":
                if v.numel() != 1 or not v.is_floating_point():
                    refuse(f"the step of parameter {i} is not one number")
                if not (0 <= (t := float(v)) <= steps and t.is_integer()):
                    refuse(f"the step count of parameter {i} is {t:g}, not a whole number in 0..{steps} (the "
                           "checkpoint's step)")
            elif v.shape != p.shape or v.dtype != p.dtype:
                refuse(f"{name} of parameter {i} is {v.dtype} {tuple(v.shape)}, the parameter "
                       f"{p.dtype} {tuple(p.shape)}")
            elif name == "exp_avg_sq" and bool((v < 0).any()):
                refuse(f"{name} of parameter {i} holds negative values")


class Run:
    """One training run: the networks (θ, θ⁻ where kept, evaluation EMA, teacher), optimiser and files."""

    def __init__(self, cfg: TrainConfig, dev: torch.device, out: Path):
        torch.manual_seed(cfg.seed)
        c, recipe = cfg.cm, RECIPES[cfg.cm.mode]
        self.ckpt, self.teacher, state = out / "ckpt.pt", None, None
        if recipe.teacher:  # first: the network's width is the teacher's, also for the resume check
            teacher, tcfg = model_from_checkpoint(load_checkpoint(cfg.teacher))
            if tcfg.cm.mode != "edm" or tcfg.dataset != cfg.dataset:
                raise CMError(f"--teacher must be an edm checkpoint of {cfg.dataset} "
                              f"(got mode {tcfg.cm.mode}, dataset {tcfg.dataset})")
            cfg = dataclasses.replace(cfg, channels=tcfg.channels, time_scale=tcfg.time_scale)
            self.teacher = teacher.to(dev)
        files_or_absent(out / "log.jsonl", out / "config.json", self.ckpt)
        foreign = sorted(p.name for p in [out / "export.pt", *out.glob("ckpt-*.pt")] if p.exists())
        if foreign and not cfg.overwrite and not self.ckpt.is_file():  # a full.train run, not one of ours
            raise CMError(f"{out} holds a full.train run ({foreign[0]}); use another --out, or --overwrite "
                          "to train into it")
        if self.ckpt.is_file() or (out / "log.jsonl").is_file():
            if cfg.resume and self.ckpt.is_file():
                state = load_checkpoint(self.ckpt)
                changed = run_changes(config_of(state), cfg)
                if changed and not cfg.allow_config_change:
                    raise CMError(f"{self.ckpt} was trained with other {', '.join(changed)}; use another "
                                  "--out, or --allow-config-change to continue it with the new settings")
            elif not cfg.overwrite and not cfg.resume:
                raise CMError(f"{out} already holds a run; pass --resume to continue it or --overwrite to "
                              "start afresh")
            elif not cfg.overwrite and (out / "log.jsonl").stat().st_size > 0:  # --resume, but no ckpt.pt
                raise CMError(f"{out} holds the log.jsonl of a run that wrote no ckpt.pt yet: nothing to "
                              "resume; pass --overwrite to start afresh")
        self.cfg, self.dev, self.out = cfg, dev, out
        self.data = load_data(cfg)
        self.shape = (2,) if self.data is None else tuple(self.data.shape[1:])
        self.model = parameterize(c, make_net(cfg, self.shape)).to(dev)  # f_θ; D (ε = 0) for edm, ect
        if self.teacher is not None and (cfg.init_from_teacher or recipe.teacher == "init"):
            self.model.net.load_state_dict(self.teacher.net.state_dict())
        # θ⁻ (section 6: only where μ can be > 0), in train mode when it replays the online dropout masks
        self.shared_dropout = c.mode != "edm" and cfg.dropout > 0
        self.target = (copy.deepcopy(self.model).requires_grad_(False).train(self.shared_dropout)
                       if keeps_target_copy(c) else None)
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()  # evaluation EMA
        opt = torch.optim.Adam if c.mode == "edm" else torch.optim.RAdam
        betas = (0.9, 0.99) if recipe.trigflow else (0.9, 0.999)  # sCM: RAdam with β₂ 0.99
        self.opt = opt(self.model.parameters(), lr=cfg.lr, betas=betas)
        self.metric = make_metric(c, dev)
        self.step, self.saved = 0, None  # saved: the last good checkpoint of this run
        self.acc = Accounting(cfg.batch_size, 1, state.get("accounting") if state is not None else None)
        if state is not None:
            self.restore(state)
        text = json.dumps(dataclasses.asdict(cfg), indent=1).encode()
        atomic_write(out / "config.json", lambda fh: fh.write(text))
        self.resumed = state is not None

    def restore(self, state: dict) -> None:
        for name in ("model", "target", "ema", "opt"):
            m = getattr(self, name)
            if m is not None:
                load_for_resume(m, state[name], name, self.ckpt, state["step"])
        check_outputs(self.ema, self.cfg.cm, self.shape, f"{self.ckpt}: its ema weights")
        for g in self.opt.param_groups:  # the lr of this command, also when --allow-config-change changed it
            g["lr"] = self.cfg.lr
        torch.set_rng_state(state["rng"])
        if self.dev.type == "cuda" and "rng_cuda" in state:
            torch.cuda.set_rng_state(state["rng_cuda"], self.dev)
        self.step = state["step"]
        self.saved = self.ckpt
        print(f"resumed from {self.ckpt} at step {self.step}")
        if dropped := trim_log(self.ckpt.parent / "log.jsonl", self.step):
            print(f"log.jsonl: removed its last {dropped} line(s), written after this checkpoint")

    def save(self) -> None:
        """The resume checkpoint; never of non-finite weights (θ, θ⁻ or the EMA)."""
        nets = [m for m in (self.model, self.target, self.ema) if m is not None]
        if not all(torch.isfinite(v).all() for m in nets for v in m.state_dict().values()
                   if v.is_floating_point()):
            raise CMError(f"non-finite weights at step {self.step}; " + self.last_good())
        rng_cuda = dict(rng_cuda=torch.cuda.get_rng_state(self.dev)) if self.dev.type == "cuda" else {}
        save_checkpoint(self.ckpt, dict(
            model=self.model.state_dict(), target=None if self.target is None else self.target.state_dict(),
            ema=self.ema.state_dict(), opt=self.opt.state_dict(), step=self.step, rng=torch.get_rng_state(),
            **rng_cuda, config=dataclasses.asdict(self.cfg), shape=list(self.shape), format=FORMAT,
            kind="cm", accounting=self.acc.state()))
        self.saved = self.ckpt

    def last_good(self) -> str:
        return f"the last good checkpoint is {self.saved}" if self.saved else "no checkpoint was written yet"

    def batch(self) -> Tensor:
        """Fresh toy points, or a random subset of the images (indices from the checkpointed CPU RNG)."""
        cfg, dev = self.cfg, self.dev
        if self.data is None:
            return toy_ring(cfg.batch_size).to(dev)
        x = self.data_dev[torch.randint(0, len(self.data), (cfg.batch_size,)).to(dev)]
        if cfg.flip:  # random horizontal flips (cifar10 and image folders, but ect)
            x = torch.where(torch.rand(len(x), 1, 1, 1).to(dev) < 0.5, x.flip(3), x)
        return x

    def loss(self, s: Schedule) -> Tensor:
        """The mode's loss at schedule s on a fresh batch."""
        cfg, c = self.cfg, self.cfg.cm
        x = self.batch()
        z = torch.randn(x.shape, device=self.dev)
        # only the networks run under autocast (--precision bf16), never the metric or the ODE arithmetic
        target = self.model if self.target is None else self.target
        f, D = (under_autocast(m, cfg.precision, self.dev) for m in (self.model, self.teacher))
        # sCT/sCD: θ⁻ runs only inside trig_jvp, which stays in float32
        f_target = target if RECIPES[c.mode].trigflow else under_autocast(target, cfg.precision, self.dev)
        if self.shared_dropout:  # θ and θ⁻ draw the same dropout masks [iCT Sec. 3.1]
            share = SharedDropout(self.dev)
            f, f_target = share.wrap(f), share.wrap(f_target)
        return recipe_loss(c, s, f, f_target, D, x, z, self.metric)

    def train_step(self) -> tuple[Tensor, Schedule]:
        """One optimiser step of the mode's loss at its schedule, then θ⁻ and the evaluation EMA."""
        cfg = self.cfg
        s = schedule(cfg.cm, self.step, cfg.steps)
        loss = self.loss(s)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if self.target is not None:
            ema_update(self.target, self.model, s.mu)  # θ⁻ ← μ θ⁻ + (1 - μ) θ
        ema_update(self.ema, self.model, ema_warmup_rate(cfg.ema, self.step) if cfg.ema_warmup else cfg.ema)
        self.step += 1
        return loss.detach(), s

    def loop(self) -> dict:
        cfg = self.cfg
        try:
            from tqdm import tqdm
        except ImportError:
            tqdm = None
        bar = tqdm(initial=self.step, total=cfg.steps, desc=f"{cfg.cm.mode} {cfg.dataset}", mininterval=1.0,
                   disable=None) if tqdm else None
        tb = tensorboard_writer(self.out, self.step) if cfg.tensorboard else None  # before step 0
        self.data_dev = None if self.data is None else self.data.to(self.dev)  # the whole set, moved once
        bad = torch.zeros((), dtype=torch.long, device=self.dev)  # first step of a non-finite loss (0: none)
        s0 = schedule(cfg.cm, self.step, cfg.steps)
        self.acc.flops_per_step = step_flops(lambda: self.loss(s0), self.model, self.dev)
        t0 = t_log = t_grid = self.acc.t0 = time.time()
        step_log = self.step
        with open(self.out / "log.jsonl", "ab" if self.resumed else "wb", buffering=0) as log:
            while self.step < cfg.steps:
                loss, s = self.train_step()
                bad = torch.where((bad == 0) & ~torch.isfinite(loss), self.step, bad)
                k = self.step
                if bar is not None:
                    bar.update(1)
                log_now = k % cfg.log_every == 0 or k == 1
                ckpt_now = k % cfg.ckpt_every == 0 or k == cfg.steps
                grid_now = k % cfg.sample_every == 0 or 0 < cfg.grid_minutes * 60 <= time.time() - t_grid
                if (log_now or grid_now or ckpt_now) and (first := int(bad)):  # one host read, not every step
                    raise CMError(f"loss is not finite at step {first}; " + self.last_good())
                if log_now:
                    now = time.time()
                    ips, t_log, step_log = cfg.batch_size * (k - step_log) / max(now - t_log, 1e-9), now, k
                    rec = dict(step=k, loss=loss.item(), N=s.N, mu=s.mu, stage=s.stage, sec=now - t0,
                               img_per_s=ips, **(dict(r=s.r) if RECIPES[cfg.cm.mode].trigflow else {}),
                               **self.acc.fields(k))
                    if tb is not None:
                        tensorboard_scalars(tb, rec | dict(lr=cfg.lr), k, cfg.cm.mode)
                    if bar is not None:
                        bar.set_postfix({n: rec[n] for n in ("N", "stage") if rec[n]},
                                        loss=f"{rec['loss']:.4g}", mu=f"{s.mu:.4f}", img_s=f"{ips:.0f}")
                    log_line(log, rec)
                if ckpt_now:  # before the grids: they may fail
                    self.save()
                if grid_now or k == cfg.steps:
                    grids = write_grids(self.ema, cfg, self.shape, self.out, k)
                    if tb is not None:
                        tensorboard_grids(tb, grids, k)
                    t_grid = time.time()
        if bar is not None:
            bar.close()
        if tb is not None:
            tb.close()
        print(summary_line(self.acc.summary(self.step)))
        return report(self.ema, cfg, self.data, self.shape, self.teacher) if cfg.report else {}


def write_grids(model: nn.Module, cfg: TrainConfig, shape: Sequence[int], out: Path, step: int) -> list[Path]:
    n = 512 if len(shape) == 1 else 64
    return [save_grid(sample(model, cfg, shape, n, cfg.seed, how), out / grid_name(how, step))
            for how in (("heun",) if cfg.cm.mode == "edm" else ("1-step", "2-step"))]


def sample(model: nn.Module, cfg: TrainConfig, shape: Sequence[int], n: int, seed: int, how: str) -> Tensor:
    """n samples (seeds seed + i): 'heun' (a denoiser, 18 levels), '1-step' or '2-step'."""
    levels = None if how == "heun" else [cfg.cm.sigma_max] if how == "1-step" else two_step_levels(cfg)
    return finite_samples(generate(model, cfg.cm, shape, range(n), levels, seed)[0],
                          f"the {cfg.cm.mode} model ({how})")


def report(model: nn.Module, cfg: TrainConfig, data: Tensor | None, shape, teacher=None) -> dict:
    """Energy distance to fresh data of each sampler, beside data against data (the floor); on the
    digits also the Fréchet distance of a small classifier's features (section 11, no download)."""
    n = 2000 if data is None else min(1000, len(data) // 2)
    g = torch.Generator().manual_seed(cfg.seed + 123)

    def real():
        return toy_ring(n, g) if data is None else data[torch.randperm(len(data), generator=g)[:n]]
    samples = {"data vs data (floor)": real()}
    seed = cfg.seed + 1_000_000  # other seeds than the grids'
    for how in ["heun"] if cfg.cm.mode == "edm" else ["1-step", "2-step"]:
        name = {"heun": "EDM Heun, 18 levels (35 NFE)"}.get(how, how)
        samples[name] = sample(model, cfg, shape, n, seed, how)
    if teacher is not None:
        samples["teacher Heun, 18 levels (35 NFE)"] = sample(teacher, cfg, shape, n, seed, "heun")
    return distance_table(samples, real, f"{n} samples each, {cfg.dataset}, {cfg.cm.mode}",
                          features=cfg.dataset == "digits")


class Accounting:
    """The compute a run has spent: images seen (step × global batch), device hours (wall hours × number
    of processes, summed over resumes through the checkpoint's "accounting" entry) and the FLOPs of one
    training step (measured once, step_flops), so flops = flops_per_step × steps done."""

    def __init__(self, batch: int, world: int = 1, stored: dict | None = None):
        self.batch, self.world = batch, world
        self.hours0 = float((stored or {}).get("device_hours", 0.0))
        self.flops_per_step = (stored or {}).get("flops_per_step")
        self.t0 = time.time()

    def device_hours(self) -> float:
        return self.hours0 + (time.time() - self.t0) / 3600 * self.world

    def fields(self, step: int) -> dict:
        """What every log.jsonl line carries."""
        return dict(images=step * self.batch, device_hours=self.device_hours())

    def state(self) -> dict:
        """The checkpoint entry."""
        return dict(device_hours=self.device_hours(), flops_per_step=self.flops_per_step)

    def summary(self, step: int) -> dict:
        f = self.flops_per_step
        return self.fields(step) | dict(flops_per_step=f, flops=None if f is None else f * step)


def step_flops(loss_fn: Callable[[], Tensor], model: nn.Module, dev: torch.device) -> int:
    """The FLOPs (torch.utils.flop_counter: matrix products and convolutions) of one forward and backward
    of loss_fn(); the RNG streams and the gradients of `model` are left as they were."""
    from torch.utils.flop_counter import FlopCounterMode
    grads = [p.grad for p in model.parameters()]
    for p in model.parameters():  # backward would add into these tensors in place
        p.grad = None
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        with FlopCounterMode(display=False) as counter:
            loss_fn().backward()
    for p, g in zip(model.parameters(), grads):
        p.grad = g
    return int(counter.get_total_flops())


def tensorboard_writer(out: str | os.PathLike, step: int = 0, flag: str = "--tensorboard"):
    """A torch.utils.tensorboard SummaryWriter into <out>/tb for a run starting at `step` (0, or the
    resumed checkpoint's): earlier events there of later steps are dropped (those logged after that
    checkpoint, or all of an overwritten run), so the curves go on without repeats. The package is
    imported only here."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise CMError(f"{flag} needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter(str(Path(out) / "tb"), purge_step=step + 1)


def tensorboard_scalars(writer, rec: dict, step: int, mode: str) -> None:
    """A log line's numbers as TensorBoard scalars: loss, lr, img/s, images, device_hours, and N, μ and
    ECT's stage where the recipe has them (N, stage: nonzero; μ: not edm)."""
    ips = rec.get("img_per_s", rec.get("img/s"))
    for tag, v in dict(loss=rec.get("loss"), lr=rec.get("lr"), **{"img/s": ips}, images=rec.get("images"),
                       device_hours=rec.get("device_hours"), N=rec.get("N") or None,
                       mu=None if mode == "edm" else rec.get("mu"), stage=rec.get("stage") or None,
                       fid=rec.get("fid")).items():
        if v is not None:
            writer.add_scalar(tag, float(v), step)


def summary_line(acc: dict) -> str:
    """The final line of a run: its compute (Accounting.summary) as JSON, after 'compute: '."""
    return "compute: " + json.dumps(acc)


def tensorboard_grids(writer, paths: Sequence[Path], step: int) -> None:
    """The PNG grids just written (images or scatter plots), as TensorBoard images grid/<how>."""
    import numpy as np
    from PIL import Image
    for p in paths:
        with Image.open(p) as im:
            img = np.asarray(im.convert("RGB"))
        writer.add_image("grid/" + p.stem.split("-")[1], img, step, dataformats="HWC")


# ----------------------------------------------------------------------------------------------
# 14. Command line: every field of TrainConfig and CMConfig is a flag

def add_field_flags(p: argparse.ArgumentParser, cls: type, skip: Sequence[str] = ()) -> None:
    """One flag per field of the dataclass `cls` (--batch-size for batch_size; --x / --no-x for a bool),
    its help the comment on that field in the source."""
    notes = dict(re.findall(r"^ +(\w+): \w+ = .*?# *(.*)$", inspect.getsource(cls), re.M))
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag, help = "--" + f.name.replace("_", "-"), notes.get(f.name, "").replace("%", "%%")
        if f.type in ("bool", bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, help=help)
        else:
            p.add_argument(flag, type=type(f.default), help=help)


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line `error: ...` (exit status 2), as every other error."""

    def error(self, message: str):
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def main(argv: Sequence[str] | None = None) -> None:
    p = Parser(description="Consistency models: train (cd, ct, ict, ect, edm) or sample.",
               argument_default=argparse.SUPPRESS)  # unset flags keep the defaults
    add_field_flags(p, TrainConfig, skip=("cm",))
    add_field_flags(p, CMConfig, skip=("lpips_pretrained",))
    p.add_argument("--checkpoint", "--sample", metavar="CKPT", dest="checkpoint",
                   help="write sample grids from a cm.py checkpoint and exit")
    p.add_argument("--print-config", action="store_true", help="print the run's settings and exit")
    p.add_argument("--search-ts", action="store_true", help="with --checkpoint: pick the two-step middle "
                   "level by a ternary search (energy distance on toy, digits feature distance on digits)")
    p.add_argument("--search-sigma", action="store_true", help="--search-ts over log sigma instead")
    p.add_argument("--num-samples", type=int, help="--search-ts: samples per candidate (default 1000)")
    args = vars(p.parse_args(argv))
    show = args.pop("print_config", False)
    search = {k: args.pop(k) for k in ("search_ts", "search_sigma", "num_samples") if k in args}
    try:
        if args.get("resume") and args.get("overwrite"):
            raise CMError("--resume continues the run and --overwrite starts afresh: pass one of them")
        if search and not (search.get("search_ts") and "checkpoint" in args):
            raise CMError("--search-sigma and --num-samples go with --checkpoint CKPT --search-ts")
        with interrupts_as_errors():
            if search:
                return search_cli(args.pop("checkpoint"), args, search.get("search_sigma", False),
                                  search.get("num_samples", 1000))
            if "checkpoint" in args:
                return sample_grids(args.pop("checkpoint"), args)
            cfg = config(**args)
            refuse_unread(cfg.cm.mode, list(args))  # typed on the command line: even at its default value
            print(json.dumps(dataclasses.asdict(cfg), indent=1)) if show else train(cfg)
    except CMError as e:
        exit_on(e)


def sample_grids(path: str, flags: dict) -> None:
    """--checkpoint: the grids of a checkpoint's EMA; --ts, --grid-steps, --mid-t, --seed, --device and
    --out override its settings, nothing else (so the grids equal the training-time ones)."""
    state = load_checkpoint(path)
    model, cfg = model_from_checkpoint(state)
    keep = ("ts", "grid_steps", "mid_t", "seed", "device")
    only_flags(flags, (*keep, "out"), "--checkpoint")
    cfg = dataclasses.replace(cfg, **{k: v for k, v in flags.items() if k in keep},
                              out=str(Path(path).parent))
    check(cfg)
    out = out_folder(flags.get("out") or Path(path).parent, make=True)
    write_grids(model.to(pick_device(cfg.device)), cfg, state["shape"], out, state["step"])
    print(f"wrote sample grids to {out}")


def only_flags(flags: dict, allowed: Sequence[str], what: str) -> None:
    """Refuse the flags `what` does not read (--steps, --resume, --lr with --checkpoint would be ignored)."""
    if other := sorted(set(flags) - set(allowed)):
        name = lambda k: "--" + k.replace("_", "-")  # noqa: E731
        raise CMError(f"{what} takes {', '.join(map(name, allowed))}; not {', '.join(map(name, other))}")


def search_cli(path: str, flags: dict, log_sigma: bool, n: int) -> dict:
    """--checkpoint CKPT --search-ts: search_two_step on n samples of the checkpoint's EMA (seeds seed + i
    for every candidate) against one fixed draw of the data: the energy distance to 2,000 ring points
    (toy), the digits feature distance to the 1,797 digits; prints the table, writes <out>/search.json."""
    state = load_checkpoint(path)
    model, cfg = model_from_checkpoint(state)
    keep = ("grid_steps", "seed", "device")
    only_flags(flags, (*keep, "out", "num_samples"), "--search-ts")
    cfg = dataclasses.replace(cfg, **{k: v for k, v in flags.items() if k in keep})
    if cfg.cm.mode == "edm":
        raise CMError(f"{path} is an edm denoiser (Heun sampler); --search-ts is for consistency models")
    if not 2 <= n <= 10 ** 6:
        raise CMError(f"--search-ts needs 2 <= --num-samples <= 10^6 (a distance of sample sets), got {n}")
    if cfg.dataset == "toy":
        real, name, dist = toy_ring(2000, torch.Generator().manual_seed(cfg.seed + 123)), "energy_distance", \
            energy_distance
    elif cfg.dataset == "digits":
        real, net, name = load_digits(), digits_classifier(verbose=False), "digits_feature_distance"
        dist = lambda x, y: digits_feature_distance(x, y, net)  # noqa: E731
    else:
        raise CMError(f"--search-ts scores the toy and digits data; for {cfg.dataset} use "
                      "python -m full.sample --search-ts --ref STATS.npz (FID)")
    model = model.to(pick_device(cfg.device))

    def score(levels: list[float]) -> float:
        x = finite_samples(generate(model, cfg.cm, state["shape"], range(n), levels, cfg.seed)[0], path)
        value = dist(x, real)
        print(f"  sigma {levels[1]:.6g}: {name} {value:.6g}", flush=True)
        return value

    try:
        result = search_two_step(score, cfg.grid_steps, cfg.cm, log_sigma, name)
    except ValueError as e:
        raise CMError(f"--search-ts: {e}") from None
    result.update(num_samples=n, seed=cfg.seed)
    write_search(result, out_folder(flags.get("out") or Path(path).parent, make=True))
    return result


def write_search(result: dict, out: Path) -> None:
    """The step search's table on stdout and as <out>/search.json."""
    print(search_table(result))
    atomic_write(out / "search.json", lambda fh: fh.write(json.dumps(result, indent=1).encode()))
    print(f"wrote {out / 'search.json'}")


if __name__ == "__main__":
    main()
