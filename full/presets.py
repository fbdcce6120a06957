"""Named runs of the paper as typed dataclasses, and a typed `section.field=value` override parser.

    python -m full.train --preset cifar10-cd-lpips opt.lr=2e-4 run.out='runs/x' --print-config

A `RunConfig` has one section per concern: `net` (NCSNppConfig or ADMConfig from full/networks.py),
`cm` (the math of cm.py), `opt` (optimiser, batch, steps, precision), `ema` (evaluation EMA rates),
`data` (full/data.py), `run` (folders, intervals, seed, teacher). Each paper run is one preset, with the
hyperparameters of [CM Tab. 3] (CM) and [EDM Tab. 7 / training configs] (teachers); where the official
launch scripts (openai/consistency_models scripts/launch.sh) differ, a comment says so. The `tiny-*`
presets run on a laptop CPU in seconds (8x8 digits, ~0.1M-parameter networks) for tests and smoke runs.

References
    [CM]  Song, Dhariwal, Chen, Sutskever. Consistency Models. arXiv:2303.01469v2 (Tab. 3, App. C).
    [EDM] Karras, Aittala, Aila, Laine. Elucidating the Design Space of Diffusion-Based Generative
          Models. arXiv:2206.00364 (App. F: training configurations).
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import sys
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from cm import CMError, check_math, exit_on, ts_to_sigmas
from full.networks import ADMConfig, NCSNppConfig

NET_CONFIGS: dict[str, type] = {"ncsnpp": NCSNppConfig, "adm": ADMConfig}


class ConfigError(CMError, ValueError):
    """A bad preset name, override or value (a ValueError too, for callers that catch those)."""


def _ema_beta(batch: int, halflife_images: float) -> float:
    """EDM's EMA rate from a half-life in images: β = 0.5^(batch / halflife).  [EDM App. F.1]"""
    return 0.5 ** (batch / halflife_images)


# ----------------------------------------------------------------------------------------------
# Sections


@dataclass
class CMSection:
    """The math [CM Sec. 4-5, App. C]; names as in cm.py."""

    mode: str = "ct"                  # ct | cd | ict | ect | edm (the teacher's own denoising score matching)
    sigma_min: float = 0.002          # ε
    sigma_max: float = 80.0           # T
    sigma_data: float = 0.5           # σ_data of the scalings
    rho: float = 7.0                  # Karras grid exponent
    noise_cond: str = "edm"           # c_noise: edm = ln(t)/4 (NCSN++) | adm = 1000 ln(t + 1e-44)/4 (ADM)
    N: int = 18                       # cd: grid points (Heun teacher steps between neighbours)
    mu: float = 0.0                   # cd: constant target EMA rate μ
    s0: int = 2                       # ct: N(0) = s0
    s1: int = 150                     # ct: N(K) = s1 + 1
    mu0: float = 0.9                  # ct: μ(0) = μ0
    mu_rule: str = "code"             # ct: μ(k) divides by N(k)-1 'code' (official runs) | N(k) 'paper'
    metric: str = "lpips"             # l2 | l1 | pseudo_huber | l2_norm | lpips (CIFAR-10) | lpips_piq (ADM)
    lpips_pretrained: bool = True     # False: random VGG (offline tests only; never for real runs)
    P_mean: float = -1.2              # edm: ln t ~ N(P_mean, P_std²) [EDM Tab. 1]; ict/ect: -1.1, 2.0
    P_std: float = 1.2
    q: float = 2.0                    # ect: the gap t - r shrinks by q per stage (cm.ect_r)
    stage_steps: int = 25_000         # ect: steps per stage


@dataclass
class OptSection:
    """Optimiser and batch. The global batch splits into per-GPU batch x accumulation rounds."""

    optimizer: str = "radam"          # radam (CM) | adam (EDM teachers)
    lr: float = 4e-4                  # learning rate
    betas: tuple[float, ...] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup: int = 0                   # linear learning-rate ramp over this many steps (EDM: 10 Mimg)
    grad_clip: float = 0.0            # max gradient norm; 0 = none (as the official runs)
    batch: int = 512                  # global batch (all GPUs, all accumulation rounds)
    microbatch: int = 0               # per-GPU batch of one round; 0 = batch / world (no accumulation)
    steps: int = 800_000              # total training steps K
    precision: str = "bf16"           # bf16 | fp16 (autocast + GradScaler) | fp32; only F is autocast


@dataclass
class EMASection:
    """Evaluation EMAs (never the target θ⁻): one averaged copy of θ per rate."""

    rates: tuple[float, ...] = (0.9999,)
    eval_rate: float = 0.0            # what sampling, grids and exports read by default; 0 = rates[0]
    warmup: bool = False              # rate min(r, (1+k)/(10+k)) as cm.py (short runs); official: no

    def for_eval(self) -> float:
        """The rate evaluated by default: the one the paper reports [CM Tab. 3]."""
        return self.eval_rate or self.rates[0]


@dataclass
class DataSection:
    """full/data.py's make_dataset / make_loader arguments."""

    name: str = "cifar10"             # cifar10 | imagenet64 | folder | digits
    root: str = "data/cifar10"        # where the files are
    resolution: int = 0               # 0 = native size (folder: required)
    random_flip: bool = True          # horizontal flips (both official code bases flip)
    class_cond: bool = False          # feed labels to the network
    download: bool = False            # cifar10: let torchvision download it
    num_workers: int = 2              # DataLoader workers per rank


@dataclass
class RunSection:
    """Folders, intervals, seeds and the CD teacher."""

    out: str = ""                     # run folder; '' = runs/<preset>
    seed: int = 0                     # init, noise, data order and dropout all derive from it
    device: str = ""                  # '' = cuda if available else cpu
    resume: bool | str = "auto"       # auto: resume if the run folder has a checkpoint | True | False
    ckpt_every: int = 10_000          # steps between resume checkpoints (and one at the end)
    keep_last: int = 3                # resume checkpoints kept
    log_every: int = 100              # steps between log.jsonl lines
    sample_every: int = 10_000        # steps between PNG grids (0 = only at the end)
    sample_num: int = 64              # images per grid
    ts: tuple[int, ...] = (0, 11, 17)  # two-step grid levels, official index convention (cm.ts_to_sigmas)
    grid_steps: int = 18              # the grid size the ts indices refer to (formerly ts_grid)
    sigmas: tuple[float, ...] = ()    # two-step levels as numbers, e.g. (80.0, 0.821) [iCT, ECT]; replaces ts
    teacher: str = ""                 # cd, ect (ct: optional): a full/ checkpoint of an edm run, or a
    #                                   released one: CM's edm_*.pt, EDM's .pkl (checkpoints.import_official)
    init_from_teacher: bool = True    # θ starts from run.teacher's weights (official CD, and OCM's CT script)
    teacher_arch: str = ""            # released .pt teacher: architecture (default: from keys and shapes)
    teacher_kind: str = ""            # released .pt teacher: edm | cd | ct (default: from the file name)


@dataclass
class RunConfig:
    """One training run. `arch` names the type of `net` (it is derived; asdict keeps it for reloading)."""

    preset: str = ""
    net: NCSNppConfig | ADMConfig = field(default_factory=NCSNppConfig)
    cm: CMSection = field(default_factory=CMSection)
    opt: OptSection = field(default_factory=OptSection)
    ema: EMASection = field(default_factory=EMASection)
    data: DataSection = field(default_factory=DataSection)
    run: RunSection = field(default_factory=RunSection)
    arch: str = ""

    def __post_init__(self):
        self.arch = next(k for k, v in NET_CONFIGS.items() if isinstance(self.net, v))
        validate(self)

    @property
    def out(self) -> str:
        """The run folder: run.out, else runs/<preset>."""
        return self.run.out or f"runs/{self.preset or 'run'}"


CHOICES = {("cm", "mode"): ("ct", "cd", "ict", "ect", "edm"), ("cm", "noise_cond"): ("edm", "adm"),
           ("cm", "mu_rule"): ("code", "paper"),
           ("cm", "metric"): ("l2", "l1", "pseudo_huber", "l2_norm", "lpips", "lpips_piq"),
           ("opt", "optimizer"): ("radam", "adam"),
           ("opt", "precision"): ("bf16", "fp16", "fp32"),
           ("data", "name"): ("cifar10", "imagenet64", "folder", "digits")}


def validate(cfg: RunConfig) -> None:
    """Range and choice checks of every setting, before step 0; each failure is a one-line ConfigError."""
    for (sec, name), valid in CHOICES.items():
        if getattr(getattr(cfg, sec), name) not in valid:
            raise ConfigError(f"{sec}.{name}={getattr(getattr(cfg, sec), name)!r} is not one of "
                              f"{', '.join(valid)}")
    c, o, r = cfg.cm, cfg.opt, cfg.run
    if r.resume not in (True, False, "auto"):
        raise ConfigError(f"run.resume must be True, False or 'auto', got {r.resume!r}")
    try:
        check_math("cm.", N=c.N, s0=c.s0, s1=c.s1, sigma_min=c.sigma_min, sigma_max=c.sigma_max,
                   sigma_data=c.sigma_data, rho=c.rho, mu=c.mu, mu0=c.mu0, ema=list(cfg.ema.rates),
                   P_mean=c.P_mean, P_std=c.P_std, lr=o.lr, betas=list(o.betas), eps=o.eps,
                   weight_decay=o.weight_decay, grad_clip=o.grad_clip)
        if c.mode != "edm":  # the two-step grids fail now, not after the first sample_every steps
            ts_to_sigmas(list(r.ts), r.grid_steps, c.sigma_min, c.sigma_max, c.rho)
    except (CMError, ValueError) as e:
        raise ConfigError(f"{e}".replace("ts must", "run.ts must")) from None
    if c.stage_steps < 1 or c.q <= 1:
        raise ConfigError(f"need cm.stage_steps >= 1 and cm.q > 1 (got {c.stage_steps}, {c.q})")
    if c.P_std <= 0 or o.eps <= 0 or o.weight_decay < 0 or o.grad_clip < 0 or \
            not all(0 <= b < 1 for b in o.betas) or len(o.betas) != 2:
        raise ConfigError("need cm.P_std > 0, opt.eps > 0, opt.weight_decay >= 0, opt.grad_clip >= 0 and two "
                          f"opt.betas in [0, 1) (got {c.P_std}, {o.eps}, {o.weight_decay}, {o.grad_clip}, "
                          f"{o.betas})")
    if o.batch < 1 or o.microbatch < 0 or o.steps < 1 or o.lr <= 0 or o.warmup < 0:
        raise ConfigError("need opt.batch >= 1, opt.microbatch >= 0, opt.steps >= 1, opt.lr > 0, "
                          f"opt.warmup >= 0 (got {o.batch}, {o.microbatch}, {o.steps}, {o.lr}, {o.warmup})")
    if cfg.ema.eval_rate and cfg.ema.eval_rate not in cfg.ema.rates:
        raise ConfigError(f"ema.eval_rate={cfg.ema.eval_rate} is not one of ema.rates {cfg.ema.rates}")
    if min(r.ckpt_every, r.keep_last, r.log_every, r.sample_num) < 1 or r.sample_every < 0:
        raise ConfigError("need run.ckpt_every, keep_last, log_every, sample_num >= 1, sample_every >= 0")
    if cfg.data.resolution < 0 or cfg.data.num_workers < 0:
        raise ConfigError("need data.resolution >= 0 and data.num_workers >= 0")


# ----------------------------------------------------------------------------------------------
# Presets: one per paper run [CM Tab. 3], the EDM teachers, and CPU-sized tiny runs


def _cifar10(mode: str, lr: float = 4e-4, **cm) -> RunConfig:
    """CIFAR-10, NCSN++ ~56M, RAdam lr 4e-4 (CD-l1 2e-4), batch 512, 800k steps, EMA 0.9999.  [CM Tab. 3]"""
    # fp32: the official CIFAR-10 runs are JAX in fp32 (override with opt.precision='bf16')
    return RunConfig(net=NCSNppConfig.cifar10(), cm=CMSection(mode=mode, **cm),
                     opt=OptSection("radam", lr, batch=512, steps=800_000, precision="fp32"),
                     ema=EMASection((0.9999,), eval_rate=0.9999),
                     data=DataSection("cifar10", "data/cifar10"),
                     run=RunSection(ts=(0, 11, 17), grid_steps=18))


# ImageNet-64 / LSUN-256 (ADM). The official scripts keep three eval EMAs; 0.9999432189950708 is
# EDM's half-life of 50 Mimg at batch 4096, the rate [CM Tab. 3] quotes as 0.999943 and evaluates.
# Precision: the official runs train these in fp16 (fp32 master weights, dynamic loss scaling), which
# is fp16 autocast + GradScaler here (CUDA only).
_EVAL_EMA = 0.9999432189950708
_ADM_EMAS = (0.999, 0.9999, _EVAL_EMA)


def _imagenet64(mode: str, lr: float, steps: int, ts=(0, 22, 39), grid_steps=40, **cm) -> RunConfig:
    """ImageNet-64 (class-conditional), ADM ~296M, batch 2048, c_noise of the ADM code.  [CM Tab. 3]"""
    return RunConfig(net=ADMConfig.imagenet64(), cm=CMSection(mode=mode, noise_cond="adm", **cm),
                     opt=OptSection("radam", lr, batch=2048, steps=steps, precision="fp16"),
                     ema=EMASection(_ADM_EMAS, eval_rate=_EVAL_EMA),
                     data=DataSection("imagenet64", "data/imagenet64", class_cond=True),
                     run=RunSection(ts=ts, grid_steps=grid_steps))


def _lsun256(mode: str, steps: int, ts: tuple, grid_steps: int, **cm) -> RunConfig:
    """LSUN-256 bedroom or cat (the same recipe; point data.root at either), ADM ~526M.  [CM Tab. 3]

    Paper: batch 2048, lr 1e-5. The launch scripts use batch 256 (and lr 5e-5 for CT)."""
    return RunConfig(net=ADMConfig.lsun256(), cm=CMSection(mode=mode, noise_cond="adm", **cm),
                     opt=OptSection("radam", 1e-5, batch=2048, steps=steps, precision="fp16"),
                     ema=EMASection((0.9999, 0.99994, _EVAL_EMA), eval_rate=_EVAL_EMA),
                     data=DataSection("folder", "data/lsun_bedroom", resolution=256),
                     run=RunSection(ts=ts, grid_steps=grid_steps))


def _edm_ocm(base: RunConfig, net, batch: int, steps: int) -> RunConfig:
    """An EDM teacher as openai/consistency_models' scripts/edm_train.py ran it (scripts/launch.sh):
    RAdam lr 1e-4 without warm-up, fp16, dropout 0.1, EMAs 0.999, 0.9999, 0.999943, ln t ~ N(-1.2, 1.2²).
    The script sets no length (lr_anneal_steps 0 trains until stopped): `steps` is our choice."""
    return dataclasses.replace(base, net=net, opt=OptSection("radam", 1e-4, batch=batch, steps=steps,
                                                             precision="fp16"),
                               ema=EMASection(_ADM_EMAS, eval_rate=_EVAL_EMA))


def _tiny(mode: str, **cm) -> RunConfig:
    """8x8 digits, tiny NCSN++ (~0.1M), batch 32, l2, fp32: a few seconds on a CPU."""
    net = dataclasses.replace(NCSNppConfig.tiny(8), in_channels=1, out_channels=1)
    return RunConfig(net=net, cm=CMSection(**{"mode": mode, "metric": "l2", **cm}),
                     opt=OptSection("adam" if mode == "edm" else "radam", 1e-3 if mode == "edm" else 2e-4,
                                    batch=32, steps=20, precision="fp32"),
                     ema=EMASection((0.99, 0.999), warmup=True),
                     data=DataSection("digits", "", random_flip=False, num_workers=0),
                     run=RunSection(ckpt_every=10, keep_last=2, log_every=5, sample_every=0, sample_num=16,
                                    ts=(0, 8, 17), grid_steps=18))


PRESETS: dict[str, Callable[[], RunConfig]] = {
    # EDM teacher for CIFAR-10 CD as the official JAX config ran it (configs/cifar10_k_ve.py): NCSN++ (VE),
    # dropout 0.13, Adam lr 1e-3 with a 10 Mimg ramp, batch 512, 400k steps (n_iters 400,001), EMA
    # half-life 0.5 Mimg, fp32. [EDM App. F.1] (EDM's non-leaky augmentation is not implemented.)
    "cifar10-edm": lambda: dataclasses.replace(
        _cifar10("edm"), net=NCSNppConfig.cifar10(dropout=0.13),
        opt=OptSection("adam", 1e-3, warmup=19_531, batch=512, steps=400_000, precision="fp32"),
        ema=EMASection((_ema_beta(512, 5e5),))),
    "cifar10-cd-lpips": lambda: _cifar10("cd", N=18, mu=0.0, metric="lpips"),
    "cifar10-cd-l2": lambda: _cifar10("cd", N=18, mu=0.0, metric="l2"),
    "cifar10-cd-l1": lambda: _cifar10("cd", 2e-4, N=18, mu=0.0, metric="l1"),  # launch.sh: lr 2e-4 for l1
    "cifar10-ct": lambda: _cifar10("ct", s0=2, s1=150, mu0=0.9, metric="lpips"),
    # EDM's ImageNet-64 ADM teacher: dropout 0.1, Adam lr 2e-4, batch 4096, 2500 Mimg, EMA half-life 50 Mimg,
    # fp16 [EDM App. F.1]; and the same network as OCM's edm_train ran it (released: edm_imagenet64_ema.pt).
    "imagenet64-edm": lambda: dataclasses.replace(
        _imagenet64("edm", 2e-4, 610_352), net=ADMConfig.imagenet64(dropout=0.1),
        opt=OptSection("adam", 2e-4, warmup=2_441, batch=4096, steps=610_352, precision="fp16"),
        ema=EMASection((_ema_beta(4096, 5e7),))),
    "imagenet64-edm-ocm": lambda: _edm_ocm(_imagenet64("edm", 1e-4, 610_352),
                                           ADMConfig.imagenet64(dropout=0.1), batch=4096, steps=610_352),
    "imagenet64-cd-lpips": lambda: _imagenet64("cd", 8e-6, 600_000, N=40, mu=0.95, metric="lpips_piq"),
    "imagenet64-cd-l2": lambda: _imagenet64("cd", 8e-6, 600_000, N=40, mu=0.95, metric="l2"),
    # Paper lr 8e-6; the launch script uses 1e-4, and passes a teacher that CT starts from (run.teacher=...).
    # Two-step ts of the launch scripts: CT 0,106,200 of 201, LSUN CD-lpips 0,17,39 and CD-l2 0,18,39 of 40,
    # LSUN bedroom CT 0,67,150 of 151 (cat: 0,62,150).
    "imagenet64-ct": lambda: _imagenet64("ct", 8e-6, 800_000, ts=(0, 106, 200), grid_steps=201,
                                         s0=2, s1=200, mu0=0.95, metric="lpips_piq"),
    # LSUN-256 EDM teachers (bedroom, cat) as OCM's launch script trains them: batch 256, no scale-shift norm.
    "lsun256-edm": lambda: _edm_ocm(_lsun256("edm", 600_000, (0, 17, 39), 40),
                                    ADMConfig.lsun256(dropout=0.1), batch=256, steps=600_000),
    "lsun256-cd-lpips": lambda: _lsun256("cd", 600_000, (0, 17, 39), 40, N=40, mu=0.95, metric="lpips_piq"),
    "lsun256-cd-l2": lambda: _lsun256("cd", 600_000, (0, 18, 39), 40, N=40, mu=0.95, metric="l2"),
    "lsun256-ct": lambda: _lsun256("ct", 1_000_000, (0, 67, 150), 151, s0=2, s1=150, mu0=0.95,
                                   metric="lpips_piq"),
    # iCT [iCT Sec. 3-5]: no teacher, μ = 0, pseudo-Huber, s0 10 -> s1 1280 doubling, lognormal n
    # (P_mean -1.1, P_std 2.0), λ = 1/(t_{n+1} - t_n), dropout 0.3, Fourier scale 0.02, RAdam lr 1e-4,
    # batch 1024, eval EMA 0.99993, two steps at (80, 0.821). 400k steps: iCT's appendix as we read it,
    # not re-checked here.
    "cifar10-ict": lambda: dataclasses.replace(
        _cifar10("ict", s0=10, s1=1280, mu=0.0, metric="pseudo_huber", P_mean=-1.1, P_std=2.0),
        net=dataclasses.replace(NCSNppConfig.cifar10(dropout=0.3), fourier_scale=0.02),
        opt=OptSection("radam", 1e-4, batch=1024, steps=400_000, precision="fp32"),
        ema=EMASection((0.99993,)), run=RunSection(sigmas=(80.0, 0.821))),
    # ECT (locuslab/ect run_ecm.sh, ct_train.py defaults): tune the EDM teacher (run.teacher), RAdam lr 1e-4,
    # batch 128, dropout 0.2, 25.6 Mimg = 200k steps, a stage every 250 ticks x 12.8 kimg = 25k steps,
    # q 2, ln t ~ N(-1.1, 2.0²), ‖·‖₂ (c = 0), eval EMA 0.9999, two steps at (80, 0.821), no flips
    # (--augment 0, --xflip False). The network is the teacher's: NCSN++ as cifar10-edm trains it (the
    # official run tuned EDM's released DDPM++ VP model; README, "Differences from the official runs").
    "cifar10-ect": lambda: dataclasses.replace(
        _cifar10("ect", metric="l2_norm", P_mean=-1.1, P_std=2.0, q=2.0, stage_steps=25_000),
        net=NCSNppConfig.cifar10(dropout=0.2), opt=OptSection("radam", 1e-4, batch=128, steps=200_000,
                                                              precision="fp32"),
        data=DataSection("cifar10", "data/cifar10", random_flip=False), run=RunSection(sigmas=(80.0, 0.821))),
    "tiny-edm": lambda: _tiny("edm"),
    "tiny-cd": lambda: _tiny("cd", N=18, mu=0.0),
    "tiny-ct": lambda: _tiny("ct", s0=2, s1=20, mu0=0.9),
    "tiny-ict": lambda: _tiny("ict", s0=2, s1=16, metric="pseudo_huber", P_mean=-1.1, P_std=2.0),
    "tiny-ect": lambda: _tiny("ect", metric="l2_norm", P_mean=-1.1, P_std=2.0, stage_steps=5),
    # Class-conditional path (ADM, labels 0..9) at CPU size.
    "tiny-ct-adm": lambda: dataclasses.replace(
        _tiny("ct", s0=2, s1=20, mu0=0.9),
        net=dataclasses.replace(ADMConfig.tiny(8, num_classes=10), in_channels=1, out_channels=1),
        cm=CMSection("ct", noise_cond="adm", s0=2, s1=20, mu0=0.9, metric="l2"),
        data=DataSection("digits", "", random_flip=False, class_cond=True, num_workers=0)),
}


def get_preset(name: str) -> RunConfig:
    """The preset `name`, its `preset` field filled in."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name](), preset=name)


# ----------------------------------------------------------------------------------------------
# Typed overrides: section.field=value, value parsed by ast.literal_eval


def _type_ok(value: Any, tp: Any) -> bool:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in args)
    if origin is tuple:
        return isinstance(value, tuple) and all(_type_ok(v, args[0]) for v in value)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _coerce(value: Any, tp: Any) -> Any:
    if typing.get_origin(tp) is tuple and isinstance(value, list):
        value = tuple(value)
    if typing.get_origin(tp) is tuple and not isinstance(value, tuple):
        value = (value,)  # ema.rates=0.999 means (0.999,)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if typing.get_origin(tp) is tuple and typing.get_args(tp)[0] is float:
        value = tuple(float(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in value)
    return value


# Fields renamed since older configs and checkpoints were written: section -> {old name: new name}.
OLD_NAMES = {"run": {"ts_grid": "grid_steps"}}


def apply_override(cfg: RunConfig, item: str) -> RunConfig:
    """Set one `section.field=value` (a leading `--` is allowed); wrong names or types -> ValueError."""
    key, sep, text = item.removeprefix("--").partition("=")
    sections = [f.name for f in dataclasses.fields(cfg) if dataclasses.is_dataclass(getattr(cfg, f.name))]
    sec, _, name = key.partition(".")
    name = OLD_NAMES.get(sec, {}).get(name, name)
    if not sep or sec not in sections or not name:
        raise ConfigError(f"bad override {item!r}: expected section.field=value with section one of "
                         f"{', '.join(sections)}")
    obj = getattr(cfg, sec)
    hints = typing.get_type_hints(type(obj))
    if name not in hints:
        raise ConfigError(f"unknown field {sec}.{name}; valid fields: {', '.join(hints)}")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text  # a bare word: only valid for str fields
    value = _coerce(value, hints[name])
    if not _type_ok(value, hints[name]):
        raise ConfigError(f"{sec}.{name}={text!r} has the wrong type: expected {_type_name(hints[name])}")
    new = dataclasses.replace(obj, **{name: value}) if not isinstance(obj, (NCSNppConfig, ADMConfig)) \
        else _replace_net(obj, name, value)
    return dataclasses.replace(cfg, **{sec: new})


def _replace_net(net, name: str, value):
    try:
        return dataclasses.replace(net, **{name: value})
    except ValueError as e:  # the network configs' own checks
        raise ConfigError(f"net.{name}={value!r}: {e}") from None


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def resolve(preset: str, overrides: Sequence[str] = ()) -> RunConfig:
    """The preset with the overrides applied in order (then validated again)."""
    cfg = get_preset(preset)
    for item in overrides:
        cfg = apply_override(cfg, item)
    validate(cfg)
    return cfg


def config_from_dict(d: dict) -> RunConfig:
    """Rebuild a RunConfig from `dataclasses.asdict(cfg)` (as stored in checkpoints)."""
    try:
        net_cls = NET_CONFIGS[d["arch"]]
        sections = {f.name: f for f in dataclasses.fields(RunConfig)}
        kw = {}
        for name, value in d.items():
            if name == "net":
                kw[name] = _from_dict(net_cls, value)
            elif name in ("preset", "arch"):
                kw[name] = value
            elif name in sections:
                old = OLD_NAMES.get(name, {})
                value = {old.get(k, k): v for k, v in value.items() if not (k in old and old[k] in value)}
                kw[name] = _from_dict(type(getattr(RunConfig(), name)), value)
        return RunConfig(**kw)
    except (KeyError, TypeError, ValueError, AssertionError) as e:
        raise CMError(f"the stored config does not match this code ({type(e).__name__}: {e})") from None


def _from_dict(cls: type, d: dict):
    hints = typing.get_type_hints(cls)
    return cls(**{k: _coerce(v, hints[k]) for k, v in d.items()})


def to_json(cfg: RunConfig) -> str:
    return json.dumps(dataclasses.asdict(cfg), indent=1)


class CLIParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line `error: ...` with exit status 2."""

    def error(self, message: str):
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def main(argv: Sequence[str] | None = None) -> None:
    """List the presets (or print one resolved)."""
    p = CLIParser(description=main.__doc__)
    p.add_argument("--preset", default=None)
    args, rest = p.parse_known_args(argv)
    try:
        if args.preset is None:
            for name in PRESETS:
                c = get_preset(name)
                print(f"{name:20s} {c.arch:7s} {c.cm.mode:4s} batch {c.opt.batch:5d} lr {c.opt.lr:<8g} "
                      f"steps {c.opt.steps}")
            return
        print(to_json(resolve(args.preset, rest)))
    except CMError as e:
        exit_on(e)


if __name__ == "__main__":
    main()
