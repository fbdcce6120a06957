"""Resume checkpoints and sampling exports: plain state dicts, written atomically, read with weights_only.

Resume file `<run>/ckpt-{step:07d}.pt` (the last `keep_last` are kept):
    {"model", "target", "ema": {rate: state_dict}, "opt", "scaler", "step",
     "rng": {"cpu": [per rank], "cuda": [[per device] per rank]}, "data": {"start_step", "world", "batch"},
     "config": asdict(RunConfig), "format": 1}
Export file (for sampling, teachers):
    {"ema": {rate: state_dict}, "config", "step", "format": 1, "export": True}.
State dicts come from the unwrapped module (no DDP `module.` or torch.compile `_orig_mod.` prefixes). Files
hold only tensors and Python primitives, so `torch.load(p, weights_only=True)` always reads them.

Released checkpoints of the official code bases are converted in memory into an export dict by
`import_official` (one reader per format, tried in order; each answers None for a file that is not its
format): CM's raw guided-diffusion state dicts (full/released/guided_diffusion.py), the paper's
CIFAR-10 Flax checkpoints (full/released/flax.py; a run folder means its newest checkpoint_<N>) and
EDM's .pkl snapshots, read without running them (full/released/edm_pickle.py). The export dict then has
an "official" entry saying what was inferred. A diffusers ConsistencyModelPipeline folder (one with
model_index.json) and a .safetensors export are read by full/diffusers_io.py.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch.nn as nn

from cm import FORMAT, CMError, ConsistencyFunction, checkpoint_kind, read_weights_only, save_checkpoint
from full import diffusers_io
from full.config import RunConfig, config_from_dict, export_dict
from full.model import make_model
from full.released import edm_pickle, flax, guided_diffusion, hub

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


def load(path: str | os.PathLike, arch: str = "", kind: str = "") -> dict:
    """Read a full/ resume or export file, or a released official checkpoint (import_official), as a dict.

    Files are read with weights_only (pickles never run); a missing, corrupt or foreign file -> one-line
    CMError. arch / kind override what import_official infers for an official file (ignored otherwise). A
    released name (`cd_imagenet64_l2`, full/released/hub.py) means its cached file, downloaded if need be."""
    path = Path(hub.resolve(path))
    if diffusers_io.is_folder(path):  # a diffusers pipeline folder (model_index.json)
        return diffusers_io.read_folder(path, kind)
    if path.is_dir():  # a Flax run folder (full/released/flax.py): its newest checkpoint_<N>
        path = flax.find_checkpoint(path)
    if not path.is_file():
        raise CMError(f"no checkpoint at {path}")
    with open(path, "rb") as fh:
        head = fh.read(16)
    if diffusers_io.is_safetensors(head, path.stat().st_size):
        return diffusers_io.read_safetensors(path)
    if not (head.startswith(b"PK") or head.startswith(_TORCH_LEGACY)):  # not torch.save: .pkl, msgpack, ...
        return import_official(path, None, arch, kind)
    state = read_weights_only(path)  # cm.py's reader: weights_only, one-line errors
    found = checkpoint_kind(state)
    if found == "full":
        return state
    if found == "cm":
        raise CMError(f"{path} is a cm.py checkpoint, not a full/ one: use python cm.py --checkpoint {path}")
    return import_official(path, state, arch, kind)


_TORCH_LEGACY = b"\x80\x02\x8a\x0a"  # torch.save's pre-zip format: pickle protocol 2, then a magic number


def import_official(path: str | os.PathLike, obj=None, arch: str = "", kind: str = "") -> dict:
    """A released checkpoint of another code base as a full/ export dict: each format's reader, in order.

    obj: what torch.load(weights_only=True) returned for a torch file, None for any other file. A reader
    `read(path, obj, arch, kind)` returns None when the file is not its format; add a format with one line."""
    readers = (guided_diffusion.read_state_dict,  # CM .pt: a raw guided-diffusion state dict
               flax.read_checkpoint,  # the paper's CIFAR-10 Flax (msgpack) checkpoints
               edm_pickle.read_pickle)     # EDM .pkl: persistence pickles, read without running them
    for read in readers:
        state = read(Path(path), obj, arch, kind)
        if state is not None:
            return state
    if obj is None:
        raise CMError(f"cannot read checkpoint {path}: corrupt or truncated, or a format this project does "
                      "not read (full/ .pt, guided-diffusion .pt, Flax msgpack, EDM .pkl)")
    raise CMError(f"{path} is not a full/ checkpoint (format {FORMAT}) nor a released official one "
                  "(a guided-diffusion state dict)")


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
    """f (or D for an edm run) with the EMA weights of `rate` (default: the run's ema.eval_rate), in eval
    mode."""
    cfg = config_of(state)
    rates = ema_rates(state)
    rate = (cfg.ema.eval_rate if cfg.ema.eval_rate in rates else rates[0]) if rate is None else rate
    key = next((r for r in state["ema"] if abs(float(r) - rate) < 1e-15), None)
    if key is None:
        raise CMError(f"{path}: no EMA at rate {rate}; it has {', '.join(map(str, rates))}")
    f = make_model(cfg, denoiser)
    load_weights(f, state["ema"][key], f"EMA {rate}", path)
    if "precond" in state.get("official", {}):  # an EDM pickle keeps its own preconditioning (VE, VP, EDM)
        f = edm_pickle.denoiser_from_state(state, f.net)
    return f.eval().requires_grad_(False), cfg


def export(path: str | os.PathLike, emas: dict[float, nn.Module], cfg: RunConfig, step: int) -> Path:
    """Write an export file: EMA weights + config only (a tenth of a resume file with Adam states)."""
    path = Path(path)
    save_checkpoint(path, export_dict(cfg, {r: unwrap(m).state_dict() for r, m in emas.items()}, step))
    return path
