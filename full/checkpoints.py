"""Resume checkpoints and sampling exports: plain state dicts, written atomically, read with weights_only.

Resume file `<run>/ckpt-{step:07d}.pt` (the last `keep_last` are kept):
    {"model", "target", "ema": {rate: state_dict}, "opt", "scaler", "step",
     "rng": {"cpu": [per rank], "cuda": [[per device] per rank]}, "data": {"start_step", "world", "batch"},
     "config": asdict(RunConfig), "format": 1}
Export file (for sampling, teachers):
    {"ema": {rate: state_dict}, "config", "step", "format": 1, "export": True}.
State dicts come from the unwrapped module (no DDP `module.` or torch.compile `_orig_mod.` prefixes). Files
hold only tensors and Python primitives, so `torch.load(p, weights_only=True)` always reads them.
Official checkpoints (EDM .pkl, CM .pt) are not read here yet: `import_official` is the hook.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch
import torch.nn as nn

from cm import CMError, ConsistencyFunction, load_checkpoint, save_checkpoint
from full.model import make_model
from full.presets import RunConfig, config_from_dict

FORMAT = 1
_NAME = re.compile(r"^ckpt-(\d{7,})\.pt$")


def unwrap(module: nn.Module) -> nn.Module:
    """The plain module under DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        if isinstance(module, nn.parallel.DistributedDataParallel):
            module = module.module
        elif hasattr(module, "_orig_mod"):
            module = module._orig_mod
        else:
            return module


def ckpt_path(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / f"ckpt-{step:07d}.pt"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Resume checkpoints of a run folder, oldest first."""
    d = Path(run_dir)
    found = [(int(m.group(1)), p) for p in d.glob("ckpt-*.pt") if (m := _NAME.match(p.name))] \
        if d.is_dir() else []
    return [p for _, p in sorted(found)]


def latest(run_dir: str | os.PathLike) -> Path | None:
    """The newest resume checkpoint of a run folder, or None."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def save(run_dir: str | os.PathLike, state: dict, keep_last: int) -> Path:
    """Write ckpt-{step}.pt atomically (cm.save_checkpoint), then delete all but the newest keep_last."""
    path = ckpt_path(run_dir, state["step"])
    save_checkpoint(path, {**state, "format": FORMAT, "kind": "full"})
    for old in list_checkpoints(run_dir)[:-keep_last]:
        old.unlink(missing_ok=True)
    return path


def load(path: str | os.PathLike) -> dict:
    """Read a resume or export file (weights_only); a missing, corrupt or foreign file -> one-line CMError."""
    path = Path(path)
    if path.suffix == ".pkl" and path.is_file():
        import_official(path)
    return load_checkpoint(path, kind="full")  # cm.py's reader: weights_only, one-line errors


def import_official(path: str | os.PathLike):
    """Hook for the released EDM (.pkl) and CM (.pt) checkpoints; not implemented yet."""
    raise CMError(f"{path}: importing official checkpoints is not supported yet; "
                  "pass a full/ checkpoint (python -m full.train --preset ...-edm)")


def load_weights(module: nn.Module, state_dict: dict, what: str, path: str | os.PathLike = "") -> None:
    """load_state_dict(strict) with a one-line CMError on a key or shape mismatch (another network)."""
    try:
        module.load_state_dict(state_dict)
    except (RuntimeError, KeyError, TypeError) as e:
        first = str(e).replace("\n", " ").replace("\t", "")[:160]
        raise CMError(f"{path}: the {what} weights do not fit this network "
                      f"(another network or config?): {first}") from None


def config_of(state: dict) -> RunConfig:
    return config_from_dict(state["config"])


def ema_rates(state: dict) -> list[float]:
    return [float(r) for r in state["ema"]]


def model_from_state(state: dict, rate: float | None = None, path: str | os.PathLike = "",
                     denoiser: bool | None = None) -> tuple[ConsistencyFunction, RunConfig]:
    """f (or D for an edm run) with the EMA weights of `rate` (default: the first), in eval mode."""
    cfg = config_of(state)
    rates = ema_rates(state)
    rate = rates[0] if rate is None else rate
    key = next((r for r in state["ema"] if abs(float(r) - rate) < 1e-15), None)
    if key is None:
        raise CMError(f"{path}: no EMA at rate {rate}; it has {', '.join(map(str, rates))}")
    f = make_model(cfg, denoiser)
    load_weights(f, state["ema"][key], f"EMA {rate}", path)
    return f.eval().requires_grad_(False), cfg


def export(path: str | os.PathLike, emas: dict[float, nn.Module], cfg: RunConfig, step: int) -> Path:
    """Write an export file: EMA weights + config only (a tenth of a resume file with Adam states)."""
    import dataclasses
    path = Path(path)
    save_checkpoint(path, {"ema": {float(r): unwrap(m).state_dict() for r, m in emas.items()},
                           "config": dataclasses.asdict(cfg), "step": int(step), "format": FORMAT,
                           "kind": "full", "export": True})
    return path
