"""A run's settings as typed dataclasses, and a typed `section.field=value` override parser.

A `RunConfig` has one section per concern: `net` (NCSNppConfig or ADMConfig from full/networks.py),
`cm` (cm.CMConfig: the math, validated by cm.py itself), `opt` (optimiser, batch, steps, precision),
`ema` (evaluation EMA rates), `data` (full/data.py), `run` (folders, intervals, seed, teacher).
The named paper runs are full/presets.py.
"""
from __future__ import annotations

import ast
import copy
import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from cm import FORMAT, MAX_LEVELS, MAX_SEED, RECIPES, CMConfig, CMError, Parser, check_levels, ts_to_sigmas
from full.networks import ADMConfig, NCSNppConfig

NET_CONFIGS: dict[str, type] = {"ncsnpp": NCSNppConfig, "adm": ADMConfig}


def ema_beta(batch: int, halflife_images: float) -> float:
    """EDM's EMA rate from a half-life in images: β = 0.5^(batch / halflife).  [EDM App. F.1]"""
    return 0.5 ** (batch / halflife_images)


# ----------------------------------------------------------------------------------------------
# Sections


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
    fid_every: int = 0                # steps between FIDs of one-step samples vs the training set (0: off)
    fid_samples: int = 5000           # samples per such FID (the papers' FIDs use 50,000: full.evaluate)
    tensorboard: bool = False         # also write TensorBoard events into <run>/tb (pip install tensorboard)
    ts: tuple[int, ...] = (0, 11, 17)  # two-step grid levels, official index convention (cm.ts_to_sigmas)
    grid_steps: int = 18              # the grid size the ts indices refer to (formerly ts_grid)
    sigmas: tuple[float, ...] = ()    # two-step levels as numbers, e.g. (80.0, 0.821) [iCT, ECT]; replaces ts
    # How samples are drawn and stored (grids, run.fid_every, full.sample); the defaults are the CM codes'.
    eval_sigma_min: float = -1.0      # ε of f when sampling; -1: the trained wrapper's (ε; 0 for ect's D)
    renoise_sigma_min: float = -1.0   # ε of the re-noising √(τ² - ε²) between steps; -1: cm.sigma_min
    clamp_mid: bool = True            # clamp each f(·) to [-1, 1] before re-noising (both CM codes do)
    uint8: str = "truncate"           # samples -> uint8: truncate (x+1)·127.5 (CM) | round x·127.5+128 (ECT)
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
    cm: CMConfig = field(default_factory=CMConfig)
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


CHOICES = {("opt", "optimizer"): ("radam", "adam"),
           ("opt", "precision"): ("bf16", "fp16", "fp32"),
           ("data", "name"): ("cifar10", "imagenet64", "folder", "digits"),
           ("run", "uint8"): ("truncate", "round")}

# Integer settings that size an allocation or a loop, with their ranges: a value outside is refused before
# step 0 (not an OverflowError, a MemoryError or 10^6 worker processes later). Every other integer setting
# lies within +-2^62, so the seeds and counters made from it stay inside torch's int64.
INT_RANGES = {"run.seed": (0, MAX_SEED), "run.grid_steps": (2, MAX_LEVELS), "run.sample_num": (1, 4096),
              "run.fid_samples": (0, 10 ** 7), "data.num_workers": (0, 128), "data.resolution": (0, 4096),
              "opt.batch": (1, 1 << 20), "opt.microbatch": (0, 1 << 20)}


def validate(cfg: RunConfig) -> None:
    """Type, range and choice checks of every setting, before step 0; each failure is a one-line CMError.
    Types first: every later check (and cm.check) may then compute with a field as its annotation says."""
    for sec in dataclasses.fields(cfg):
        obj = getattr(cfg, sec.name)
        if not dataclasses.is_dataclass(obj):
            continue
        hints = typing.get_type_hints(type(obj))
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if not _type_ok(v, hints[f.name]):
                raise CMError(f"{sec.name}.{f.name}={str(v)[:40]!r} has the wrong type ({hints[f.name]} "
                              "expected)".replace("<class '", "").replace("'>", ""))
            if any(isinstance(x, float) and not math.isfinite(x) for x in (v if type(v) is tuple else [v])):
                raise CMError(f"{sec.name}.{f.name}={v} holds a number that is not finite")
            lo, hi = INT_RANGES.get(f"{sec.name}.{f.name}", (-2 ** 62, 2 ** 62))
            if any(type(x) is int and not lo <= x <= hi for x in (v if type(v) is tuple else [v])):
                raise CMError(f"{sec.name}.{f.name}={str(v)[:40]} is out of range: it must lie in {lo}..{hi}")
    for (sec, name), valid in CHOICES.items():
        if getattr(getattr(cfg, sec), name) not in valid:
            raise CMError(f"{sec}.{name}={getattr(getattr(cfg, sec), name)!r} is not one of "
                              f"{', '.join(valid)}")
    o, r = cfg.opt, cfg.run
    if r.resume not in (True, False, "auto"):
        raise CMError(f"run.resume must be True, False or 'auto', got {r.resume!r}")
    cfg.cm.check("cm.")  # the math: cm.py's one validation
    for name, v in dict(lr=o.lr, eps=o.eps, weight_decay=o.weight_decay, grad_clip=o.grad_clip).items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise CMError(f"opt.{name} must be a finite number, got {v!r}")
    if not cfg.ema.rates or not all(isinstance(e, (int, float)) and 0 <= e < 1 for e in cfg.ema.rates):
        raise CMError(f"need EMA rates in [0, 1) (got ema.rates={cfg.ema.rates})")
    try:
        if cfg.cm.mode != "edm":  # the two-step grids fail now, not after the first sample_every steps
            two_step_levels(cfg)
    except ValueError as e:
        msg = f"run.sigmas: {e}" if cfg.run.sigmas else f"{e}".replace("ts must", "run.ts must")
        raise CMError(msg) from None
    if o.eps <= 0 or o.weight_decay < 0 or o.grad_clip < 0 or \
            not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in o.betas) or len(o.betas) != 2:
        raise CMError("need opt.eps > 0, opt.weight_decay >= 0, opt.grad_clip >= 0 and two opt.betas in "
                      f"[0, 1) (got {o.eps}, {o.weight_decay}, {o.grad_clip}, {o.betas})")
    if o.batch < 1 or o.microbatch < 0 or o.steps < 1 or o.lr <= 0 or o.warmup < 0:
        raise CMError("need opt.batch >= 1, opt.microbatch >= 0, opt.steps >= 1, opt.lr > 0, "
                      f"opt.warmup >= 0 (got {o.batch}, {o.microbatch}, {o.steps}, {o.lr}, {o.warmup})")
    if cfg.ema.eval_rate and cfg.ema.eval_rate not in cfg.ema.rates:
        raise CMError(f"ema.eval_rate={cfg.ema.eval_rate} is not one of ema.rates {cfg.ema.rates}")
    if min(r.ckpt_every, r.keep_last, r.log_every, r.sample_num) < 1 or r.sample_every < 0:
        raise CMError("need run.ckpt_every, keep_last, log_every, sample_num >= 1, sample_every >= 0")
    if r.fid_every < 0 or (r.fid_every and r.fid_samples < 2):
        raise CMError(f"need run.fid_every >= 0 and run.fid_samples >= 2 "
                      f"(got {r.fid_every}, {r.fid_samples})")
    for name in ("eval_sigma_min", "renoise_sigma_min"):
        v = getattr(r, name)
        if not (v == -1 or 0 <= v < cfg.cm.sigma_max):
            raise CMError(f"run.{name} must be -1 (unset) or in [0, cm.sigma_max), got {v}")
    teacher_modes = [m for m, rec in RECIPES.items() if rec.teacher] + ["ct", "sct"]  # ct, sct: may start
    #                                                                                  from its weights
    if r.teacher and cfg.cm.mode not in teacher_modes:
        raise CMError(f"cm.mode={cfg.cm.mode} takes no run.teacher (the modes that read it: "
                      f"{', '.join(teacher_modes)})")
    if (r.teacher_arch or r.teacher_kind) and not r.teacher:
        raise CMError("run.teacher_arch and run.teacher_kind describe run.teacher, which is not set")
    if cfg.data.resolution < 0 or cfg.data.num_workers < 0:
        raise CMError("need data.resolution >= 0 and data.num_workers >= 0")


def two_step_levels(cfg: RunConfig) -> list[float]:
    """The two-step grid's levels: run.sigmas as numbers, else run.ts of a run.grid_steps grid."""
    c, r = cfg.cm, cfg.run
    if r.sigmas:
        return check_levels(r.sigmas, c.sigma_min, c.sigma_max)
    return ts_to_sigmas(list(r.ts), r.grid_steps, c.sigma_min, c.sigma_max, c.rho)


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
        raise CMError(f"bad override {item!r}: expected section.field=value with section one of "
                         f"{', '.join(sections)}")
    obj = getattr(cfg, sec)
    hints = typing.get_type_hints(type(obj))
    if name not in hints:
        raise CMError(f"unknown field {sec}.{name}; valid fields: {', '.join(hints)}")
    if any("\udc80" <= c <= "\udcff" for c in text):  # bytes that are not UTF-8 (argv's surrogateescape)
        if text[:1] in "'\"" and text[-1:] == text[:1]:  # literal_eval cannot take them: strip the quotes
            text = text[1:-1]
        value = text  # a string, whose bytes os.fsencode gives back
    else:
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):  # {[]: 1}; nested past
            value = text  # a bare word: only valid for str fields           # the parser's limits
    value = _coerce(value, hints[name])
    if not _type_ok(value, hints[name]):
        shown = repr(text) if len(text) <= 200 else f"{text[:200]!r} (and {len(text) - 200} characters more)"
        raise CMError(f"{sec}.{name}={shown} has the wrong type: expected {_type_name(hints[name])}")
    new, obj = copy.copy(cfg), copy.copy(obj)  # set, not yet checked: fields that go together
    setattr(obj, name, value)                  # (img_resolution, attn_resolutions) may be set in any order
    setattr(new, sec, obj)
    return new


def checked(cfg: RunConfig) -> RunConfig:
    """cfg after overrides, with every check run again: the network config's own (named fields, the
    widths its group norms divide) and validate's."""
    try:
        net = dataclasses.replace(cfg.net)
    except ValueError as e:
        raise CMError(f"net.*: {e}") from None
    return dataclasses.replace(cfg, net=net)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def config_from_dict(d: dict) -> RunConfig:
    """Rebuild a RunConfig from `dataclasses.asdict(cfg)` (as stored in checkpoints)."""
    try:
        net_cls = NET_CONFIGS[d["arch"]]
        sections = {f.name: f for f in dataclasses.fields(RunConfig)}
        kw = {}
        for name, value in d.items():
            want = str if name in ("preset", "arch") else dict if name in sections else object
            if not isinstance(value, want):
                raise CMError(f"the stored config's {name} is a {type(value).__name__}, not a "
                              f"{'name' if want is str else 'section (a dict)'}")
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


def export_dict(cfg: RunConfig, ema: dict[float, dict], step: int, official: dict | None = None) -> dict:
    """The export container (sampling, teachers): EMA state dicts by rate, the config, the step; the one
    constructor of full.train's export.pt and of every released-weight reader (`official` says what was
    inferred about a released file)."""
    d = {"ema": {float(r): sd for r, sd in ema.items()}, "config": dataclasses.asdict(cfg), "step": int(step),
         "format": FORMAT, "kind": "full", "export": True}
    return d | ({"official": official} if official is not None else {})


def to_json(cfg: RunConfig) -> str:
    return json.dumps(dataclasses.asdict(cfg), indent=1)


CLIParser = Parser  # usage errors as one line `error: ...`, exit status 2
