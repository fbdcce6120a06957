"""Consistency Models in one file: the method top to bottom, and a trainer that runs on a laptop.

    python cm.py                                  # CD on 8x8 digits (EDM teacher, then CD), CPU, minutes
    python cm.py --mode ct                        # CT: no teacher at all; --mode ict, ect: [iCT], [ECT]
    python cm.py --dataset toy --mode edm         # a 2-D ring (--dataset cifar10: the real thing, on a GPU)
    python cm.py --sample runs/digits-cd/ckpt.pt  # a grid from a checkpoint

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

Sections: 1 config · 2 noise levels · 3 parameterization · 4 networks · 5 ODE steps · 6 losses (6b iCT, ECT) ·
7 samplers · 8 target & EMA · 9 data · 10 checkpoints · 11 training · 12 command line. What is not the method
(errors, files, the checkpoint container, devices, grids, LPIPS, distances) comes from full/common.py.
Importing this module has no side effects; everything runs from main().
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from full.common import (CKPT_FORMAT, KINDS, LPIPS, SIGMA_MAX_LIMIT, CMError, PiqLPIPS, RunFolder,
                         add_field_flags, atomic_write, changed_fields, check_levels, check_math,
                         checkpoint_kind, distance_table, energy_distance, exit_on, fid_score, finished,
                         grid_name, load_checkpoint, out_folder, pick_device, read_weights_only, restore,
                         save_checkpoint, save_grid, uint8_to_unit, under_autocast)


# ----------------------------------------------------------------------------------------------
# 1. Config

@dataclass
class Config:
    # what to train
    mode: str = "cd"                # cd (distillation) | ct (consistency training) | ict | ect | edm
    dataset: str = "digits"         # toy (2-D ring) | digits (8x8, scikit-learn) | cifar10 (torchvision)
    data_dir: str = "data"          # where cifar10 lives / is downloaded to
    teacher: str = ""               # cd, ect: an edm checkpoint ('' -> train one into <out>/teacher first)
    teacher_steps: int = 0          # cd, ect without --teacher: the teacher's steps (0 -> the edm default)
    out: str = ""                   # run folder; default runs/<dataset>-<mode>
    # the math [CM Sec. 4, App. C]
    sigma_min: float = 0.002        # epsilon
    sigma_max: float = 80.0         # T
    sigma_data: float = 0.5         # data std used by the scalings
    rho: float = 7.0                # Karras grid exponent
    N: int = 18                     # cd: number of grid points (N = 18 for CIFAR-10, Heun teacher)
    s0: int = 0                     # ct, ict: initial discretization steps (0 -> per-dataset default)
    s1: int = 0                     # ct, ict: final discretization steps (0 -> per-dataset default)
    mu0: float = 0.9                # ct: initial target EMA rate mu(0)
    mu_rule: str = ""               # ct: mu(k) divides by N(k)-1 'code' (official runs) | N(k) 'paper'
    mu: float = 0.0                 # cd, ict, ect: constant target EMA rate (0 for CIFAR-10 in [CM Tab. 3])
    P_mean: float = math.nan        # ict, ect: ln t ~ N(P_mean, P_std²) (nan -> per-dataset default)
    P_std: float = 2.0
    q: float = 2.0                  # ect: the gap t - r shrinks by q per stage [ECT code default]
    stage_steps: int = 0            # ect: steps per stage (0 -> per-dataset, else ⌈steps/8⌉: 25k of 200k on CIFAR-10)
    ablate: str = ""                # ict: pieces switched back to CT's, any of weight,lognormal,doubling
    metric: str = ""                # l2 | l1 | lpips | lpips_piq | pseudo_huber | l2_norm ('' -> per-dataset)
    # optimisation
    steps: int = 0                  # training steps K (0 -> per-dataset and per-mode default)
    batch_size: int = 0             # (0 -> per-dataset default)
    lr: float = 0.0                 # RAdam (cm) / Adam (edm) learning rate (0 -> per-dataset default)
    ema: float = 0.999              # evaluation EMA rate (with a (1+k)/(10+k) warm-up)
    channels: int = 0               # network width (0 -> per-dataset default)
    dropout: float = -1.0           # dropout in the network (-1 -> per-dataset default)
    precision: str = "fp32"         # fp32 | bf16 (autocast of F only; c_skip x stays in fp32)
    init_from_teacher: bool = True  # cd: start f_theta from the teacher's weights (as the official runs)
    # output
    seed: int = 0                   # everything random derives from it
    log_every: int = 50             # steps between lines in log.jsonl
    sample_every: int = 0           # steps between sample grids (0 -> 4 grids per run)
    grid_minutes: float = 10.0      # also a grid every this many minutes of training (0: only by steps)
    fid_every: int = 0              # steps between FIDs of one-step samples (full.evaluate; 0: off)
    fid_samples: int = 5000         # samples per FID (the paper's FIDs use 50,000)
    ckpt_every: int = 500           # steps between checkpoints
    ts: str = ""                    # two-step sampling levels, official index convention ('' -> default)
    grid_steps: int = 18            # the grid size N the ts indices refer to
    mid_t: float = 0.0              # ict, ect: two-step level without --ts (0 -> per-dataset default)
    device: str = ""                # '' -> cuda if available, else cpu
    resume: bool = False            # continue from <out>/ckpt.pt if it exists
    overwrite: bool = False         # start afresh in a folder that holds a run (its ckpt.pt is replaced)
    allow_config_change: bool = False  # resume with other settings (e.g. more --steps, another --lr)


# Per-dataset defaults for the fields left at 0 / '' / -1 / nan; a dict gives one value per mode ("*": the rest).
# Chosen so `python cm.py` ends in minutes on a CPU; cifar10 keeps the papers' values. mu_rule: cifar10
# follows the official runs; the short CPU runs keep the paper's text (README's numbers).
DEFAULTS = {
    "toy":     dict(steps=dict(edm=4000, cd=4000, ct=6000, ict=6000, ect=4000), batch_size=512, channels=256,
                    lr=1e-3, metric=dict(ict="pseudo_huber", ect="l2_norm", **{"*": "l2"}), mu_rule="paper",
                    s0=dict(ict=10, **{"*": 2}), s1=80, mid_t=1.0, dropout=0.0, P_mean=-1.1,
                    stage_steps=1000),  # ECT: 4 stages here (8 of 500 left one step at CT's level, README)
    "digits":  dict(steps=dict(edm=1500, cd=800, ct=3000, ict=3000, ect=1500), batch_size=128, channels=32,
                    lr=2e-4, metric=dict(ict="pseudo_huber", ect="l2_norm", **{"*": "l2"}), mu_rule="paper",
                    s0=dict(ict=10, **{"*": 2}), s1=dict(ict=160, **{"*": 40}), mid_t=1.0, dropout=0.0,
                    P_mean=0.0),  # not -1.1: more high-noise draws halve the 1-step distance here (README)
    # [CM Tab. 3] for cd/ct; edm: EDM's 200M images at batch 512. ict [iCT Sec. 3-5]: batch 1024, lr 1e-4,
    # s0 10, s1 1280, pseudo-Huber, dropout 0.3, two steps at 0.821 (400k steps: iCT App., not re-checked
    # here). ect (locuslab/ect run_ecm.sh): batch 128, lr 1e-4, dropout 0.2, 25.6M images = 200k steps,
    # a stage every 250 ticks of 12.8k images = 25k steps, ‖·‖₂ (c = 0), mid_t 0.821 (ct_train.py).
    "cifar10": dict(steps=dict(edm=390_625, cd=800_000, ct=800_000, ict=400_000, ect=200_000),
                    batch_size=dict(ict=1024, ect=128, **{"*": 512}), channels=128, mu_rule="code",
                    lr=dict(ict=1e-4, ect=1e-4, **{"*": 4e-4}),
                    metric=dict(ict="pseudo_huber", ect="l2_norm", **{"*": "lpips"}),
                    s0=dict(ict=10, **{"*": 2}), s1=dict(ict=1280, **{"*": 150}), mid_t=0.821,
                    dropout=dict(ict=0.3, ect=0.2, **{"*": 0.0}), P_mean=-1.1),
}
MODES = ("cd", "ct", "ict", "ect", "edm")


def unset(name: str, value) -> bool:
    """A field left for DEFAULTS to fill: 0 or '' (dropout: -1; P_mean: nan, as 0 is a valid P_mean)."""
    return value != value if name == "P_mean" else value in ((-1,) if name == "dropout" else (0, ""))


def resolve(cfg: Config) -> Config:
    """Fill the per-dataset defaults and check every field; bad values raise CMError."""
    if cfg.dataset not in DEFAULTS:
        raise CMError(f"unknown dataset {cfg.dataset!r}; choose one of {', '.join(DEFAULTS)}")
    cfg = dataclasses.replace(cfg)
    for k, v in DEFAULTS[cfg.dataset].items():
        if unset(k, getattr(cfg, k)):
            setattr(cfg, k, v.get(cfg.mode, v.get("*")) if isinstance(v, dict) else v)
    for k, ok in dict(mode=MODES, metric=METRICS, mu_rule=MU_RULES, precision=("fp32", "bf16")).items():
        if getattr(cfg, k) not in ok:
            raise CMError(f"unknown {k.replace('_', '-')} {getattr(cfg, k)!r}; choose one of {', '.join(ok)}")
    cfg.out = cfg.out or f"runs/{cfg.dataset}-{cfg.mode}"
    out_folder(cfg.out)
    cfg.sample_every = cfg.sample_every or max(cfg.steps // 4, 1)
    cfg.stage_steps = cfg.stage_steps or max(-(-cfg.steps // 8), 1)  # ⌈K/8⌉: eight stages, never a ninth
    if min(cfg.steps, cfg.batch_size, cfg.channels, cfg.log_every, cfg.ckpt_every, cfg.sample_every) < 1:
        raise CMError("steps, batch-size, channels, log-every, ckpt-every and sample-every must be >= 1")
    if cfg.fid_every and (cfg.dataset == "toy" or cfg.fid_every < 0 or cfg.fid_samples < 2):
        raise CMError("--fid-every needs image data (digits, cifar10) and --fid-samples >= 2")
    if cfg.teacher_steps < 0:
        raise CMError(f"teacher-steps must be >= 0, got {cfg.teacher_steps}")
    check_math(N=cfg.N, s0=cfg.s0, s1=cfg.s1, sigma_min=cfg.sigma_min, sigma_max=cfg.sigma_max,
               sigma_data=cfg.sigma_data, rho=cfg.rho, mu=cfg.mu, mu0=cfg.mu0, ema=[cfg.ema])
    if not (math.isfinite(cfg.lr) and cfg.lr > 0 and 0 <= cfg.dropout < 1):
        raise CMError(f"need a finite lr > 0 and 0 <= dropout < 1 (got lr={cfg.lr}, dropout={cfg.dropout})")
    if cfg.stage_steps < 1 or cfg.q <= 1 or cfg.P_std <= 0 or cfg.mid_t <= 0 or not math.isfinite(cfg.P_mean):
        raise CMError("need stage-steps >= 1, q > 1, a finite P-mean, P-std > 0 and mid-t > 0")
    if set(filter(None, cfg.ablate.split(","))) - {"weight", "lognormal", "doubling"}:
        raise CMError(f"unknown --ablate {cfg.ablate!r}; choose from weight, lognormal, doubling")
    try:
        two_step_levels(cfg)  # a bad --ts fails now, not after the first sample_every steps
    except ValueError as e:
        raise CMError(str(e)) from None
    return cfg


# ----------------------------------------------------------------------------------------------
# 2. Noise levels

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


# ----------------------------------------------------------------------------------------------
# 3. Parameterization: f(x, t) = c_skip(t) x + c_out(t) F(c_in(t) x, c_noise(t))  [CM Eq. 7]

def append_dims(v: Tensor, ndim: int) -> Tensor:
    """(B,) -> (B, 1, ..., 1) with ndim dimensions, to broadcast per-sample scalars over x."""
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


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

    def __init__(self, net: nn.Module, sigma_data: float = 0.5, sigma_min: float = 0.002, noise_cond: str = "edm"):
        super().__init__()
        self.net, self.sigma_data, self.sigma_min = net, sigma_data, sigma_min
        self.c_noise = NOISE_CONDITIONING[noise_cond]

    def forward(self, x: Tensor, sigma: Tensor | float, class_labels: Tensor | None = None) -> Tensor:
        x = x if x.dtype == torch.float64 else x.float()  # the skip path never runs in low precision
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(x.shape[0])  # (B,)
        c_skip, c_out, c_in = (append_dims(c, x.ndim)
                               for c in boundary_scalings(sigma, self.sigma_data, self.sigma_min))
        F_x = self.net(c_in * x, self.c_noise(sigma), class_labels)
        return c_skip * x + c_out * F_x.to(x.dtype)


# ----------------------------------------------------------------------------------------------
# 4. Networks F(x, c_noise, class_labels) -> same shape as x. Small on purpose; full/ has NCSN++/ADM.

def timestep_embedding(c_noise: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """Sinusoidal embedding of the scalar c_noise, (B,) -> (B, dim). c_noise = ln(t)/4 only spans
    about [-1.6, 1.1], so it is scaled by 100 first (frequencies 100 down to 0.01)."""
    half = torch.arange(dim // 2, device=c_noise.device, dtype=c_noise.dtype) / (dim // 2)
    args = 100 * c_noise[:, None] * torch.exp(-math.log(max_period) * half)[None]  # (B, dim/2)
    return torch.cat([args.cos(), args.sin()], dim=1)


class Embedding(nn.Module):
    """c_noise (and an optional class label) -> a vector that conditions every block."""

    def __init__(self, dim: int, num_classes: int = 0):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.label = nn.Embedding(num_classes, dim) if num_classes else None

    def forward(self, c_noise: Tensor, class_labels: Tensor | None) -> Tensor:
        emb = self.mlp(timestep_embedding(c_noise, self.mlp[0].in_features))
        if (self.label is None) != (class_labels is None):
            raise ValueError("pass class_labels exactly when the network has num_classes > 0")
        return emb if self.label is None else emb + self.label(class_labels)


class MLP(nn.Module):
    """Residual MLP for 2-D data; the embedding is added at the input of every block."""

    def __init__(self, dim: int = 2, hidden: int = 256, depth: int = 4, num_classes: int = 0, dropout: float = 0.0):
        super().__init__()
        self.emb, self.inp = Embedding(hidden, num_classes), nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Dropout(dropout),
                                                  nn.Linear(hidden, hidden)) for _ in range(depth))
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
        self.out = nn.Sequential(norm(cout), nn.SiLU(), nn.Dropout(dropout), nn.Conv2d(cout, cout, 3, padding=1))
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
                 resolution: int = 8, num_classes: int = 0, dropout: float = 0.0):
        super().__init__()
        self.emb, self.inp = Embedding(4 * ch, num_classes), nn.Conv2d(in_ch, ch, 3, padding=1)
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
        self.out = nn.Sequential(nn.GroupNorm(min(32, c // 4), c), nn.SiLU(), nn.Conv2d(c, in_ch, 3, padding=1))

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
# 5. ODE steps for the probability-flow ODE dx/dt = (x - D(x, t)) / t  [EDM Eq. 3 with σ(t) = t]

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
# 6. Losses. Each returns a scalar; randomness (indices n, noise z) can be passed in.

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


METRICS = {"l2": l2, "l1": l1, "pseudo_huber": pseudo_huber, "l2_norm": l2_norm, "lpips": LPIPS, "lpips_piq": PiqLPIPS}


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
    λ (≡ 1 unless given) and metric d. At r = 0 the target is x itself (the boundary condition, [ECT Sec. 3])."""
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
# 6b. Improved recipes: iCT (from data, no teacher) and ECT (tuning a diffusion model). Each piece is
#     one function; both recipes are consistency_loss with their own (t, r), λ and d, and μ = 0.

def ict_num_steps(k: int, K: int, s0: int = 10, s1: int = 1280) -> int:
    """N(k) = min(s0·2^⌊k/K'⌋, s1) + 1, K' = ⌊K / (log₂⌊s1/s0⌋ + 1)⌋: N doubles every K' steps.  [iCT Sec. 3.4]
    With s0 10, s1 1280: N = 11, 21, ..., 1281, eight stages of K' steps."""
    K_ = max(math.floor(K / (math.log2(s1 // s0) + 1)), 1)  # the log is not floored: s1/s0 need not be 2^m
    return min(s0 * 2 ** min(max(k, 0) // K_, 62), s1) + 1


def lognormal_index_probs(sigmas: Tensor, P_mean: float = -1.1, P_std: float = 2.0) -> Tensor:
    """p(n) ∝ erf((ln t_{n+1} - P_mean)/(√2 P_std)) - erf((ln t_n - P_mean)/(√2 P_std)), n = 1..N-1:
    the lognormal mass between neighbouring levels (P_mean -1.1, P_std 2.0).  [iCT Sec. 3.5]"""
    cdf = torch.erf((sigmas.double().log() - P_mean) / (math.sqrt(2) * P_std))
    p = cdf[1:] - cdf[:-1]
    return p / p.sum()


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


def improved_loss(cfg: Config, k: int, f: Callable, f_target: Callable, x: Tensor, z: Tensor,
                  metric: Callable) -> tuple[Tensor, int, float]:
    """(loss, N, μ) of --mode ict or ect at step k (N is the stage a = 1 + ⌊k / stage_steps⌋ for ECT).
    μ = cfg.mu = 0 [iCT Sec. 3.2]; --ablate switches iCT pieces back to CT's (for ablations)."""
    if cfg.mode == "ect":
        a = 1 + k // cfg.stage_steps
        loss = ect_loss(f, f_target, x, a, metric, z=z, P_mean=cfg.P_mean, P_std=cfg.P_std, q=cfg.q)
        return loss, a, cfg.mu
    off = cfg.ablate.split(",")
    N = (ct_num_steps if "doubling" in off else ict_num_steps)(k, cfg.steps, cfg.s0, cfg.s1)
    sigmas = karras_sigmas(N, cfg.sigma_min, cfg.sigma_max, cfg.rho)
    probs = None if "lognormal" in off else lognormal_index_probs(sigmas, cfg.P_mean, cfg.P_std)
    weight = None if "weight" in off else gap_weight
    return ct_loss(f, f_target, x, sigmas, metric, z=z, weight=weight, index_probs=probs), N, cfg.mu


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
# 9. Data: everything as one in-memory tensor in [-1, 1] (toy data is drawn fresh each batch)

def toy_ring(n: int, generator: torch.Generator | None = None) -> Tensor:
    """8 Gaussians (std 0.05) on a circle of radius 0.7: per-coordinate std ≈ 0.5 = σd. (n, 2)"""
    k = torch.randint(0, 8, (n,), generator=generator).float()
    centers = 0.7 * torch.stack([torch.cos(k * math.pi / 4), torch.sin(k * math.pi / 4)], 1)
    return centers + 0.05 * torch.randn(n, 2, generator=generator)


def load_digits() -> Tensor:
    """scikit-learn's 1,797 handwritten 8x8 digits (values 0..16) -> (1797, 1, 8, 8) in [-1, 1]."""
    from sklearn.datasets import load_digits as sk_digits
    return torch.tensor(sk_digits().images, dtype=torch.float32)[:, None] / 8 - 1


def load_cifar10(data_dir: str | os.PathLike, download: bool = True) -> Tensor:
    """CIFAR-10 training set through torchvision -> (50000, 3, 32, 32) in [-1, 1]."""
    import torchvision
    root = Path(data_dir)
    try:
        ds = torchvision.datasets.CIFAR10(root, train=True, download=download and not
                                          (root / "cifar-10-batches-py").is_dir())
    except Exception as e:
        raise CMError(f"CIFAR-10 is not in {root / 'cifar-10-batches-py'} and could not be downloaded "
                      f"({type(e).__name__}); extract https://www.cs.toronto.edu/~kriz/"
                      f"cifar-10-python.tar.gz into {root}") from e
    return uint8_to_unit(ds.data).permute(0, 3, 1, 2)


def load_data(cfg: Config) -> Tensor | None:
    """The training set as a tensor, or None for the toy data (infinite, drawn per batch)."""
    return {"toy": lambda: None, "digits": load_digits, "cifar10": lambda: load_cifar10(cfg.data_dir)}[cfg.dataset]()


def make_net(cfg: Config, shape: Sequence[int]) -> nn.Module:
    if len(shape) == 1:
        return MLP(shape[0], cfg.channels, dropout=cfg.dropout)
    small = shape[-1] <= 8  # 8x8 digits: one block per level keeps a CPU step near 0.1 s
    return UNet(shape[0], cfg.channels, (1, 2, 2) if small else (1, 2, 2, 2), blocks=1 if small else 2,
                resolution=shape[-1], dropout=cfg.dropout)


# ----------------------------------------------------------------------------------------------
# 10. Checkpoints: a model back from its state dict (the file itself, written atomically and read with
#     weights_only=True, is full/common.py's)

def config_of(state: dict) -> Config:
    """The Config stored in a checkpoint (older files named grid_steps ts_grid)."""
    saved = dict(state["config"])
    saved.setdefault("grid_steps", saved.pop("ts_grid", 18))
    names = {f.name for f in dataclasses.fields(Config)}
    return Config(**{k: v for k, v in saved.items() if k in names})


def model_from_checkpoint(state: dict, key: str = "ema") -> tuple[ConsistencyFunction, Config]:
    """Rebuild f (or D, for an edm checkpoint) with the weights under `key`."""
    try:
        cfg = config_of(state)
        net = make_net(cfg, state["shape"])
        model = ConsistencyFunction(net, cfg.sigma_data, 0.0 if cfg.mode in ("edm", "ect") else cfg.sigma_min)
        model.load_state_dict(state[key])
    except (RuntimeError, KeyError, TypeError, ValueError) as e:
        raise CMError(f"checkpoint weights do not match its network ({type(e).__name__})") from e
    return model.eval().requires_grad_(False), cfg


# ----------------------------------------------------------------------------------------------
# 11. Training

def two_step_levels(cfg: Config) -> list[float]:
    """Two-step levels: --ts, else the official CIFAR-10 CD choice 0,11,17 of 18 for cd, 0,8,17 (τ₂ ≈ 3.3) for
    ct, whose short runs learn low levels best; T, mid_t for ict and ect (0.821 in both papers on CIFAR-10)."""
    if cfg.mode in ("ict", "ect") and not cfg.ts:
        return [cfg.sigma_max, cfg.mid_t]
    ts = [int(i) for i in cfg.ts.split(",")] if cfg.ts else ([0, 11, 17] if cfg.mode == "cd" else [0, 8, 17])
    return ts_to_sigmas(ts, cfg.grid_steps, cfg.sigma_min, cfg.sigma_max, cfg.rho)


def generate(model: Callable, cfg: Config, shape: Sequence[int], n: int, seed: int, how: str) -> Tensor:
    """n samples from fixed noise (drawn on the CPU, so any device gives the same samples)."""
    g = torch.Generator().manual_seed(seed)
    dev = next(model.parameters()).device
    z = torch.randn(n, *shape, generator=g).to(dev)
    if how == "heun":
        return sample_heun(model, z, 18, cfg.sigma_min, cfg.sigma_max, cfg.rho)
    levels = [cfg.sigma_max] if how == "1-step" else two_step_levels(cfg)
    return sample_multistep(model, z, levels, cfg.sigma_min, generator=g)


# Settings that change what a run computes: a resume with other values is refused (naming them) unless
# --allow-config-change; the others (folders, intervals, device) may differ freely.
RUN_FIELDS = dict(common=("mode", "dataset", "channels", "steps", "batch_size", "lr", "sigma_min", "sigma_max",
                          "sigma_data", "rho", "dropout", "precision", "ema", "seed"),
                  edm=(), ct=("s0", "s1", "mu0", "metric"), cd=("N", "mu", "metric", "init_from_teacher", "teacher"),
                  ict=("s0", "s1", "mu", "metric", "P_mean", "P_std", "ablate"),
                  ect=("mu", "metric", "P_mean", "P_std", "q", "stage_steps", "teacher"))


def train(cfg: Config) -> dict:
    """Train one mode; returns the final two-sample distances. Resumes from out/ckpt.pt if asked."""
    cfg, asked = resolve(cfg), cfg
    dev = pick_device(cfg.device)
    if cfg.mode in ("cd", "ect") and not cfg.teacher:  # a teacher first, or reuse a finished one
        tcfg = resolve(dataclasses.replace(asked, mode="edm", out=f"{cfg.out}/teacher",  # not ect's lr etc.
                                           steps=cfg.teacher_steps, sample_every=0, resume=True))
        cfg.teacher = f"{tcfg.out}/ckpt.pt"
        if not finished(cfg.teacher, tcfg.steps):
            print(f"no --teacher given: training an EDM teacher in {tcfg.out} first")
            train(tcfg)
    with RunFolder(cfg.out) as folder:
        return _train(cfg, dev, folder.out)


def _train(cfg: Config, dev: torch.device, out: Path) -> dict:
    torch.manual_seed(cfg.seed)
    step, ckpt, state, teacher = 0, out / "ckpt.pt", None, None
    if cfg.mode in ("cd", "ect"):  # first: the network's width is the teacher's, also for the resume check
        teacher, tcfg = model_from_checkpoint(load_checkpoint(cfg.teacher))
        if tcfg.mode != "edm" or tcfg.dataset != cfg.dataset:
            raise CMError(f"--teacher must be an edm checkpoint of {cfg.dataset} "
                          f"(got mode {tcfg.mode}, dataset {tcfg.dataset})")
        cfg.channels, teacher = tcfg.channels, teacher.to(dev)
    if ckpt.is_file() or (out / "log.jsonl").is_file():
        if cfg.resume and ckpt.is_file():
            state = load_checkpoint(ckpt)
            fields = RUN_FIELDS["common"] + RUN_FIELDS[cfg.mode]
            changed = changed_fields(state["config"], dataclasses.asdict(cfg), fields)
            if changed and not cfg.allow_config_change:
                raise CMError(f"{ckpt} was trained with other {', '.join(changed)}; use another --out, or "
                              "--allow-config-change to continue it with the new settings")
        elif not cfg.overwrite and not cfg.resume:
            raise CMError(f"{out} already holds a run; pass --resume to continue it or --overwrite to start afresh")
    data = load_data(cfg)
    shape = (2,) if data is None else tuple(data.shape[1:])
    model = ConsistencyFunction(make_net(cfg, shape), cfg.sigma_data,  # ECT tunes EDM's D: ε = 0
                                0.0 if cfg.mode in ("edm", "ect") else cfg.sigma_min).to(dev)
    if teacher is not None and (cfg.init_from_teacher or cfg.mode == "ect"):
        model.net.load_state_dict(teacher.net.state_dict())
    target = copy.deepcopy(model).requires_grad_(False).eval()  # θ⁻ (unused by edm), eval mode: no dropout...
    target.train(cfg.mode in ("ict", "ect") and cfg.dropout > 0)  # ...but iCT, ECT replay the online masks
    ema = copy.deepcopy(model).requires_grad_(False).eval()     # evaluation EMA
    opt = (torch.optim.Adam if cfg.mode == "edm" else torch.optim.RAdam)(model.parameters(), lr=cfg.lr)
    metric = METRICS[cfg.metric]().to(dev) if cfg.metric.startswith("lpips") else METRICS[cfg.metric]
    if state is not None:
        step = restore(state, ckpt, dev, model=model, target=target, ema=ema, opt=opt)
        for g in opt.param_groups:  # the lr of this command, also when --allow-config-change changed it
            g["lr"] = cfg.lr
        print(f"resumed from {ckpt} at step {step}")
    # only the networks run under autocast (--precision bf16), never the metric or the ODE arithmetic
    f, f_target, D = (m and under_autocast(m, cfg.precision, dev) for m in (model, target, teacher))
    atomic_write(out / "config.json", lambda fh: fh.write(json.dumps(dataclasses.asdict(cfg), indent=1).encode()))
    saved = ckpt if state is not None else None  # the last good checkpoint of this run, if any

    def checkpoint():
        rng_cuda = dict(rng_cuda=torch.cuda.get_rng_state(dev)) if dev.type == "cuda" else {}
        if not all(torch.isfinite(p).all() for p in model.parameters()):  # never save broken weights
            raise CMError(f"non-finite weights at step {step}; " + last_good())
        save_checkpoint(ckpt, dict(model=model.state_dict(), target=target.state_dict(), ema=ema.state_dict(),
                                   opt=opt.state_dict(), step=step, rng=torch.get_rng_state(),
                                   **rng_cuda, config=dataclasses.asdict(cfg), shape=list(shape),
                                   format=CKPT_FORMAT, kind="cm"))

    def last_good() -> str:
        return f"the last good checkpoint is {saved}" if saved else "no checkpoint was written yet"

    from tqdm import tqdm
    bar = tqdm(initial=step, total=cfg.steps, desc=f"{cfg.mode} {cfg.dataset}", mininterval=1.0, disable=None)
    t0 = t_log = t_grid = time.time()
    step_log, fid_cache = step, {}
    fid_draw = lambda b, i: generate(ema, cfg, shape, b, cfg.seed + 2 + i, "1-step")  # FIDs' one-step samples
    data_dev = None if data is None else data.to(dev)  # the whole set moves to the device once
    bad = torch.zeros((), dtype=torch.long, device=dev)  # first step with a non-finite loss (0: none)

    def check_finite():  # one host read before anything is logged or saved (every step would stall a GPU)
        if first := int(bad):
            raise CMError(f"loss is not finite at step {first}; " + last_good())

    with open(out / "log.jsonl", "a" if state is not None else "w") as log:
        while step < cfg.steps:
            # a batch: fresh toy points, or a random subset of the images (indices: the checkpointed CPU RNG)
            x = (toy_ring(cfg.batch_size).to(dev) if data is None else
                 data_dev[torch.randint(0, len(data), (cfg.batch_size,)).to(dev)])
            if cfg.dataset == "cifar10":  # random horizontal flips
                x = torch.where(torch.rand(len(x), 1, 1, 1).to(dev) < 0.5, x.flip(3), x)
            z = torch.randn(x.shape, device=dev)
            if cfg.mode in ("ict", "ect"):  # section 6b
                share = SharedDropout(dev)
                loss, N, mu = improved_loss(cfg, step, share.wrap(f), share.wrap(f_target), x, z, metric)
            elif cfg.mode == "edm":
                N, mu, sigma = 0, 0.0, (EDM_P_MEAN + EDM_P_STD * torch.randn(len(x))).exp().to(dev)
                loss = edm_loss(f, x, sigma=sigma, z=z, sigma_data=cfg.sigma_data)
            else:  # ct: N(k), μ(k) [CM App. C]; cd: fixed N and μ
                N, mu = (ct_num_steps(step, cfg.steps, cfg.s0, cfg.s1), ct_target_rate(
                    step, cfg.steps, cfg.s0, cfg.s1, cfg.mu0, cfg.mu_rule)) if cfg.mode == "ct" else (cfg.N, cfg.mu)
                n = torch.randint(0, N - 1, (len(x),)).to(dev)
                sigmas = karras_sigmas(N, cfg.sigma_min, cfg.sigma_max, cfg.rho)  # t_1 < ... < t_N at this k
                loss = (ct_loss(f, f_target, x, sigmas, metric, n=n, z=z) if cfg.mode == "ct" else
                        cd_loss(f, f_target, D, x, sigmas, metric, n=n, z=z))
            bad = torch.where((bad == 0) & ~torch.isfinite(loss.detach()), step + 1, bad)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            ema_update(target, model, mu)  # θ⁻ (with mu = 0 it is a copy of θ)
            ema_update(ema, model, ema_warmup_rate(cfg.ema, step))
            step += 1
            bar.update(1)
            log_now = step % cfg.log_every == 0 or step == 1
            ckpt_now = step % cfg.ckpt_every == 0 or step == cfg.steps
            grid_now = step % cfg.sample_every == 0 or 0 < cfg.grid_minutes * 60 <= time.time() - t_grid
            fid_now = cfg.fid_every and step % cfg.fid_every == 0
            if log_now or grid_now or ckpt_now or fid_now:
                check_finite()
            if log_now:
                now = time.time()
                ips, t_log, step_log = cfg.batch_size * (step - step_log) / max(now - t_log, 1e-9), now, step
                bar.set_postfix(loss=f"{loss.item():.4g}", N=N, mu=f"{mu:.4f}", img_s=f"{ips:.0f}")
                log.write(json.dumps(dict(step=step, loss=loss.item(), N=N, mu=mu, sec=now - t0, img_per_s=ips)) + "\n")
                log.flush()
            if ckpt_now:  # before the grids: they may fail
                checkpoint()
                saved = ckpt
            if fid_now and (fid := fid_score(fid_draw, cfg.fid_samples, cfg.batch_size, data, out, fid_cache,
                                             dev)) is not None:
                bar.write(f"step {step}: FID {fid:.2f} ({cfg.fid_samples} one-step samples, training set)")
                log.write(json.dumps(dict(step=step, fid=fid, sec=time.time() - t0)) + "\n")
            if grid_now or step == cfg.steps:
                write_grids(ema, cfg, shape, out, step)
                t_grid = time.time()
    bar.close()
    return report(ema, cfg, data, shape, teacher)


def write_grids(model: nn.Module, cfg: Config, shape: Sequence[int], out: Path, step: int) -> None:
    n = 512 if len(shape) == 1 else 64
    for how in ("heun",) if cfg.mode == "edm" else ("1-step", "2-step"):
        save_grid(generate(model, cfg, shape, n, cfg.seed + 1, how), out / grid_name(how, step))


def report(model: nn.Module, cfg: Config, data: Tensor | None, shape, teacher=None) -> dict:
    """Energy distance to fresh data of each sampler, beside data against data (the floor); on the
    digits also the Fréchet distance of a small classifier's features (full/evaluate.py, no download)."""
    n = 2000 if data is None else min(1000, len(data) // 2)
    g = torch.Generator().manual_seed(cfg.seed + 123)
    def real():
        return toy_ring(n, g) if data is None else data[torch.randperm(len(data), generator=g)[:n]]
    samples = {"data vs data (floor)": real()}
    for how in ["heun"] if cfg.mode == "edm" else ["1-step", "2-step"]:
        name = {"heun": "EDM Heun, 18 levels (35 NFE)"}.get(how, how)
        samples[name] = generate(model, cfg, shape, n, cfg.seed + 7, how).cpu()
    if teacher is not None:
        samples["teacher Heun, 18 levels (35 NFE)"] = generate(teacher, cfg, shape, n, cfg.seed + 7, "heun").cpu()
    return distance_table(samples, real, f"{n} samples each, {cfg.dataset}, {cfg.mode}",
                          features=cfg.dataset == "digits")


# ----------------------------------------------------------------------------------------------
# 12. Command line: every Config field is a flag (--batch-size 64, --no-init-from-teacher, ...)

def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Consistency models: train (ct, cd, edm) or sample.",
                                argument_default=argparse.SUPPRESS)  # unset flags keep Config's defaults
    add_field_flags(p, Config)  # each flag's help is the comment on its Config field
    p.add_argument("--ts-grid", dest="grid_steps", type=int, help=argparse.SUPPRESS)  # the old name
    p.add_argument("--checkpoint", "--sample", metavar="CKPT", dest="checkpoint",
                   help="write sample grids from a cm.py checkpoint and exit")
    args = vars(p.parse_args(argv))
    try:
        sample_grids(args.pop("checkpoint"), args) if "checkpoint" in args else train(Config(**args))
    except CMError as e:
        exit_on(e)


def sample_grids(path: str, flags: dict) -> None:
    """--checkpoint: the grids of a checkpoint's EMA; --ts, --grid-steps, --seed, --device, --out override
    the checkpoint's own settings, and nothing else changes (so the grids equal the training-time ones)."""
    state = load_checkpoint(path)
    model, cfg = model_from_checkpoint(state)
    keep = ("ts", "grid_steps", "seed", "device")  # the flags that may override the checkpoint's settings
    cfg = resolve(dataclasses.replace(cfg, **{k: v for k, v in flags.items() if k in keep}))
    out = out_folder(flags.get("out") or Path(path).parent, make=True)
    write_grids(model.to(pick_device(cfg.device)), cfg, state["shape"], out, state["step"])
    print(f"wrote sample grids to {out}")


if __name__ == "__main__":
    main()
