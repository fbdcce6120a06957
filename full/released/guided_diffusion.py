"""The released CM checkpoints (openai/consistency_models) as full/ export dicts, in memory.

    python -m full.sample --checkpoint cd_imagenet64_lpips.pt --ts 0,22,39 --grid-steps 40
    python -m full.sample --checkpoint edm_imagenet64_ema.pt --sampler heun --steps 40
    python -m full.train --preset imagenet64-cd-lpips run.teacher=edm_imagenet64_ema.pt

Each released `.pt` is a raw state dict (no `format` key) of `cm/unet.py`'s UNetModel, whose key names and
shapes full/'s ADMUNet reproduces. The file says nothing about its settings, so they are inferred:
  architecture  from the keys and shapes: the first entry of ARCHS that the file fits exactly (ImageNet-64
                class-conditional, or LSUN-256 unconditional, the official launch script's settings);
  kind          from the file name's prefix: `edm_` = the EDM teacher, a denoiser D with the ε = 0 scalings,
                sampled with Heun; `cd_` / `ct_` = a consistency model f with the boundary-condition scalings.
`arch` / `kind` arguments (`--arch` / `--kind`, `run.teacher_arch` / `run.teacher_kind`) override both; one
printed line states the result. Both kinds take c_noise = 1000 · 0.25 ln(t + 1e-44) (cm.py's "adm"). The
official sampler clamps every denoised image to [-1, 1] (`clip_denoised=True` in scripts/image_sample.py).
Official two-step `ts` (scripts/launch.sh) per file are in OFFICIAL_TS; the released files carry one set of
weights (their EMA is baked in) and are stored here under the EMA key 0.0.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import torch

from cm import CMError
from full import dist
from full.config import export_dict
from full.networks import ADMConfig, build_network
from full.presets import get_preset

# name -> (network config, the preset whose data / optimiser / EMA sections a run from this file uses)
ARCHS: dict[str, tuple[Callable[[], ADMConfig], str]] = {
    "imagenet64": (ADMConfig.imagenet64, "imagenet64-cd-lpips"),
    "lsun256": (ADMConfig.lsun256, "lsun256-cd-lpips"),
}
KINDS = {"edm": "edm", "cd": "cd", "ct": "ct"}  # file-name prefix -> cm.mode
# Official two-step levels of scripts/launch.sh as (ts, grid size). cd_cat256_* have none published.
OFFICIAL_TS = {
    "cd_imagenet64_l2": ((0, 22, 39), 40), "cd_imagenet64_lpips": ((0, 22, 39), 40),
    "ct_imagenet64": ((0, 106, 200), 201),
    "cd_bedroom256_l2": ((0, 18, 39), 40), "cd_bedroom256_lpips": ((0, 17, 39), 40),
    "ct_bedroom256": ((0, 67, 150), 151), "ct_cat256": ((0, 62, 150), 151),
}
HEUN_STEPS = 40  # the launch script samples the EDM teachers with Heun, --steps 40


def is_guided_diffusion(obj) -> bool:
    """A raw state dict with guided-diffusion's UNet key names (and no full/ `format` key)."""
    return (isinstance(obj, dict) and "format" not in obj and "time_embed.0.weight" in obj
            and "input_blocks.0.0.weight" in obj and all(isinstance(v, torch.Tensor) for v in obj.values()))


def _expected_shapes(cfg: ADMConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):  # shapes only, nothing allocated
        return {k: tuple(v.shape) for k, v in build_network(cfg).state_dict().items()}


def mismatch(sd: dict, cfg: ADMConfig) -> str | None:
    """The first key missing from / unexpected in the file, or the first shape that differs; None if it fits.

    Attention qkv / proj_out weights may be 3-D (guided-diffusion's Conv1d) where ADMUNet's are 1x1 Conv2d."""
    want = _expected_shapes(cfg)
    missing = [k for k in want if k not in sd]
    if missing:
        return f"missing key {missing[0]}"
    unexpected = [k for k in sd if k not in want]
    if unexpected:
        return f"unexpected key {unexpected[0]}"
    for k, shape in want.items():
        got = tuple(sd[k].shape)
        if got != shape and got + (1,) != shape:
            return f"{k} has shape {list(got)}, expected {list(shape)}"
    return None


def infer_arch(sd: dict, arch: str = "") -> str:
    """The ARCHS entry the state dict fits exactly (or `arch`, checked); else a one-line CMError."""
    if arch:
        if arch not in ARCHS:
            raise CMError(f"unknown architecture {arch!r}; known: {', '.join(ARCHS)}")
        why = mismatch(sd, ARCHS[arch][0]())
        if why:
            raise CMError(f"the state dict does not fit the {arch} architecture: {why}")
        return arch
    reasons = {}
    for name, (make, _) in ARCHS.items():
        why = mismatch(sd, make())
        if why is None:
            return name
        reasons[name] = why
    name = min(reasons, key=lambda n: len(set(sd) ^ set(_expected_shapes(ARCHS[n][0]()))))
    raise CMError(f"the state dict fits no known architecture ({', '.join(ARCHS)}); closest {name}: "
                  f"{reasons[name]}")


def infer_kind(path: Path, kind: str = "") -> str:
    """cm.mode from `kind` or the file name's prefix (edm_ / cd_ / ct_), else a one-line CMError."""
    if kind:
        if kind not in KINDS:
            raise CMError(f"unknown kind {kind!r}; one of {', '.join(KINDS)}")
        return KINDS[kind]
    prefix = Path(path).name.split("_")[0].lower()
    if prefix not in KINDS:
        raise CMError(f"{Path(path).name}: cannot tell the kind from the name (edm_, cd_, ct_ ...); "
                      f"say it with --kind / run.teacher_kind ({', '.join(KINDS)})")
    return KINDS[prefix]


def read_state_dict(path: Path, obj, arch: str = "", kind: str = "") -> dict | None:
    """checkpoints.import_official's reader for CM's .pt files: an export dict, or None if not this format."""
    if not is_guided_diffusion(obj):
        return None
    bad = next((k for k, v in obj.items() if not v.is_floating_point()), None)
    if bad is not None:  # NaN and infinite values: read_weights_only has refused them
        raise CMError(f"{path}: {bad} is a {obj[bad].dtype} tensor, not a floating-point weight")
    try:
        name = infer_arch(obj, arch)
        mode = infer_kind(path, kind)
    except CMError as e:
        raise CMError(f"{path}: {e}") from None
    make, preset = ARCHS[name]
    cfg = get_preset(preset)
    ts, grid = OFFICIAL_TS.get(Path(path).stem, (cfg.run.ts, cfg.run.grid_steps))
    if mode == "edm":
        grid = HEUN_STEPS
    cfg = dataclasses.replace(cfg, net=make(), cm=dataclasses.replace(cfg.cm, mode=mode, noise_cond="adm"),
                              run=dataclasses.replace(cfg.run, ts=tuple(ts), grid_steps=grid))
    how = ("EDM teacher D (eps = 0 scalings), Heun sampler" if mode == "edm" else
           f"consistency model f ({mode.upper()}, boundary-condition scalings), official ts "
           f"{','.join(map(str, ts))} of {grid}")
    dist.print0(f"{Path(path).name}: guided-diffusion state dict; architecture {name} "
                f"({'given' if arch else 'from keys and shapes'}), kind {mode} "
                f"({'given' if kind else 'from the file name'}): {how}")
    return export_dict(cfg, {0.0: {f"net.{k}": v for k, v in obj.items()}}, 0,
                       {"source": "guided-diffusion", "arch": name, "kind": mode, "clamp": True})
