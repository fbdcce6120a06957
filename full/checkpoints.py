"""Resume checkpoints and sampling exports: plain state dicts, written atomically, read with weights_only.

Resume file `<run>/ckpt-{step:07d}.pt` (the last `keep_last` are kept):
    {"model", "target", "ema": {rate: state_dict}, "opt", "scaler", "step",
     "rng": {"cpu": [per rank], "cuda": [[per device] per rank]}, "data": {"start_step", "world", "batch"},
     "config": asdict(RunConfig), "format": 1, "accounting": {"device_hours", "flops_per_step"}}
Export file (for sampling, teachers):
    {"ema": {rate: state_dict}, "config", "step", "format": 1, "export": True, "accounting": {"images",
     "device_hours", "flops_per_step", "flops"}} (accounting: absent in older files).
State dicts come from the unwrapped module (no DDP `module.` or torch.compile `_orig_mod.` prefixes). Files
hold only tensors and Python primitives, so `torch.load(p, weights_only=True)` always reads them, and a
"sha256" entry (cm.save_checkpoint: the digest of everything else) that load verifies. Before anything is
built from a file, load checks it as data (check_state): finite tensors everywhere, every config field of
its type and range, network sizes bounded by the file's own weights, the step within the run, the RNG,
optimiser and data entries; any failure is one line (CMError).

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

import torch
import torch.nn as nn

from cm import (
    FORMAT,
    CMError,
    ConsistencyFunction,
    check_accounting,
    check_int,
    check_opt_state,
    check_outputs,
    check_rng,
    check_state_dict,
    check_stored_sizes,
    checkpoint_kind,
    dtype_mismatch,
    read_weights_only,
    save_checkpoint,
)
from full import diffusers_io
from full.config import NET_CONFIGS, RunConfig, config_from_dict, export_dict
from full.model import image_shape, make_model
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
    CMError. arch / kind override what import_official infers for an official file (refused for others). A
    released name (`cd_imagenet64_l2`, full/released/hub.py) means its cached file, downloaded if need be."""
    path = Path(hub.resolve(path))
    state = _read(path, arch, kind)
    try:
        check_state(state)  # every format, as data: types, sizes, finite tensors
    except CMError as e:
        raise CMError(f"{path}: {e}") from None
    named = _NAME.match(path.name)
    if named and not state.get("export") and int(named.group(1)) != state["step"]:  # resume would go back
        raise CMError(f"{path} holds step {state['step']}, its name says {int(named.group(1))}: a copied or "
                      "renamed checkpoint; remove it, or rename it to the step it holds")
    return state


def _overrides_unread(path: Path, what: str, arch: str, kind: str = "") -> None:
    """--arch / --kind name what an official file leaves out; a file that states it refuses them (they
    would be ignored without a word)."""
    if flag := ("--arch" if arch else "") or ("--kind" if kind else ""):
        raise CMError(f"{flag} (run.teacher_{flag[2:]}) applies to a released official file; {path} is "
                      f"{what}, which names its own {'network' if flag == '--arch' else 'mode'}")


def _read(path: Path, arch: str, kind: str) -> dict:
    if diffusers_io.is_folder(path):  # a diffusers pipeline folder (model_index.json)
        _overrides_unread(path, "a diffusers pipeline folder", arch)  # its kind: --kind, else the folder name
        return diffusers_io.read_folder(path, kind)
    if path.is_dir():  # a Flax run folder (full/released/flax.py): its newest checkpoint_<N>
        path = flax.find_checkpoint(path)
    if not path.is_file():
        raise CMError(f"no checkpoint at {path}")
    with open(path, "rb") as fh:
        head = fh.read(16)
    if diffusers_io.is_safetensors(head, path.stat().st_size):
        _overrides_unread(path, "a full/ safetensors export", arch, kind)
        return diffusers_io.read_safetensors(path)
    if not (head.startswith(b"PK") or head.startswith(_TORCH_LEGACY)):  # not torch.save: .pkl, msgpack, ...
        return import_official(path, None, arch, kind)
    state = read_weights_only(path)  # cm.py's reader: weights_only, checksum, finite tensors, one line
    found = checkpoint_kind(state)
    if found == "cm":
        raise CMError(f"{path} is a cm.py checkpoint, not a full/ one: use python cm.py --checkpoint {path}")
    if found == "full":
        _overrides_unread(path, "a full/ checkpoint", arch, kind)
        return state
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


def load_weights(module: nn.Module, state_dict: dict, what: str, path: str | os.PathLike = "",
                 same_dtypes: bool = False) -> None:
    """load_state_dict(strict) with a one-line CMError on a key or shape mismatch (another network), and
    with same_dtypes (a resume: the file is this code's own) on a dtype other than the network's, which
    load_state_dict would cast without a word (float16 weights resumed as float32 lose their low bits)."""
    if same_dtypes and (why := dtype_mismatch(module, state_dict)):
        raise CMError(f"{path}: the {what} state does not fit this run: {why}")
    try:
        module.load_state_dict(state_dict)
    except (RuntimeError, KeyError, TypeError) as e:
        first = str(e).replace("\n", " ").replace("\t", "")[:160]
        raise CMError(f"{path}: the {what} weights do not fit this network "
                      f"(another network or config?): {first}") from None


# The integer sizes of a stored network config are bounded by the config itself (networks.NET_SIZES, in
# its __post_init__); its floats and the lengths of its lists here. Floats: (lo, hi], dropout [lo, hi):
# a residual sum scaled up by 1e6 overflows in a few blocks.
NET_FLOATS = dict(skip_scale=(0.0, 1.0), fourier_scale=(0.0, 1000.0), dropout=(0.0, 1.0))
NET_TUPLES = dict(channel_mult=(1, 64, 12), attn_resolutions=(1, 4096, 16),
                  attention_resolutions=(1, 4096, 16), resample_filter=(-1000, 1000, 16))


def config_of(state: dict) -> RunConfig:
    """The stored RunConfig, every field of its declared type and in range (config.validate), its
    network's sizes within networks.NET_SIZES; else a one-line CMError."""
    d = state.get("config")
    if not isinstance(d, dict) or not isinstance(d.get("arch"), str) or d["arch"] not in NET_CONFIGS \
            or not isinstance(d.get("net"), dict):
        raise CMError("the checkpoint has no config dict with an arch and a net section")
    for k, (_, _, most) in NET_TUPLES.items():  # before the net config turns them into tuples
        v = d["net"].get(k, ())
        if not isinstance(v, (list, tuple)) or len(v) > most:
            raise CMError(f"its config field net.{k} is not a list of at most {most} integers")
    for sec in ("cm", "opt", "data", "run"):  # before validate (run at construction) makes grids of them
        if isinstance(d.get(sec), dict):
            check_stored_sizes(d[sec], f"{sec}.")
            for k in ("ts", "sigmas", "rates", "betas"):
                if isinstance(d[sec].get(k), (list, tuple)) and len(d[sec][k]) > 64:
                    raise CMError(f"its config field {sec}.{k} holds more than 64 values")
    try:
        cfg = config_from_dict(d)
    except (ArithmeticError, MemoryError, RecursionError) as e:
        raise CMError(f"the stored config does not form a run config ({type(e).__name__})") from None
    for k, (lo, hi, _) in NET_TUPLES.items():
        for i, x in enumerate(getattr(cfg.net, k, ())):
            check_int(x, f"config field net.{k}[{i}]", lo, hi)
    for k, (lo, hi) in NET_FLOATS.items():
        v = getattr(cfg.net, k, None)
        if v is not None and not (lo <= v < hi if k == "dropout" else lo < v <= hi):
            raise CMError(f"its config field net.{k}={v} is out of range")
    if not cfg.net.channel_mult:
        raise CMError("its config field net.channel_mult is empty")
    return cfg


def weight_bound(net) -> int:
    """An upper bound on the number of weights of the network a config declares (each of its levels x
    (blocks + 2) blocks: at most 64 c² weights at the widest level's c; the class embedding), from its
    sizes alone: what is built is never far larger than the file that declares it."""
    blocks = getattr(net, "num_blocks", getattr(net, "num_res_blocks", 1))
    c = net.model_channels * max(net.channel_mult)
    return 64 * len(net.channel_mult) * (blocks + 2) * c * c + 4 * c * (net.num_classes + 1)


def check_state(state: dict) -> None:
    """A full/ resume or export dict as data, before anything is built from it (read_weights_only has
    checked every tensor finite and the checksum): the config (config_of), the EMA rates and their state
    dicts, which must hold as many weights as the config's network roughly has (weight_bound: so the
    network later built is not far larger than the file), the step; a resume file's model, target,
    optimiser, scaler, RNG and data entries; the preconditioning an imported EDM pickle records."""
    cfg = config_of(state)
    ema = state.get("ema")
    if not isinstance(ema, dict) or not 0 < len(ema) <= 64:
        raise CMError("its ema entry is not a dict of 1 to 64 EMA rates")
    for r, sd in ema.items():
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r < 1:
            raise CMError(f"its EMA rate {str(r)[:40]!r} is not a number in [0, 1)")
        check_state_dict(sd, f"EMA {r}")
    resume = not state.get("export")
    if resume:
        check_state_dict(state.get("model"), "model")
        if "target" not in state:
            raise CMError("it has no target entry (θ⁻'s state dict, or None)")
        check_state_dict(state["target"], "target", optional=True)
    held = min(sum(v.numel() for v in sd.values()) for sd in ema.values())
    if weight_bound(cfg.net) > 100 * held + 10 ** 6:  # every shape: load_weights, strict, before use
        raise CMError(f"its config declares a network of up to {weight_bound(cfg.net):,} weights, its EMA "
                      f"weights hold {held:,}: the config is not the one of these weights")
    check_int(state.get("step"), "step", 0, cfg.opt.steps if resume else 2 ** 62)
    check_accounting(state.get("accounting"))
    if not resume:
        official = state.get("official", {})
        if not isinstance(official, dict):
            raise CMError(f"its official entry is a {type(official).__name__}, not a dict")
        if "precond" in official:
            edm_pickle.check_precond(official["precond"])
        return
    check_opt_state(state.get("opt"))
    if not isinstance(state.get("scaler"), dict):
        raise CMError("its scaler state is not a dict")
    rng, data = state.get("rng"), state.get("data")
    if not isinstance(rng, dict) or not isinstance(rng.get("cpu"), list) or \
            not isinstance(rng.get("cuda"), list) or not 0 < len(rng["cpu"]) == len(rng["cuda"]) <= 1 << 16:
        raise CMError("its rng entry is not one CPU and one CUDA generator state list per process")
    for i, (c, g) in enumerate(zip(rng["cpu"], rng["cuda"])):
        check_rng(c, f"rng cpu[{i}]", torch.get_rng_state())
        if g is not None:
            check_rng(g, f"rng cuda[{i}]")
    if not isinstance(data, dict):
        raise CMError("its data entry is not a dict")
    check_int(data.get("start_step"), "data start_step", 0, 2 ** 62)
    check_int(data.get("world"), "data world", 1, 1 << 16)
    check_int(data.get("batch"), "data batch", 1, 1 << 24)


def ema_rates(state: dict) -> list[float]:
    return [float(r) for r in state["ema"]]


def model_from_state(state: dict, rate: float | None = None, path: str | os.PathLike = "",
                     denoiser: bool | None = None) -> tuple[ConsistencyFunction, RunConfig]:
    """f (or D for an edm run) with the EMA weights of `rate` (default: the run's ema.eval_rate), in eval
    mode."""
    cfg = config_of(state)
    rates = ema_rates(state)
    if rate is None:  # the rate the run evaluates; else the EMA stored as rate 0.0 (an import's one EMA)
        rate = cfg.ema.for_eval() if cfg.ema.for_eval() in rates or 0.0 not in rates else 0.0
        if rate not in rates:
            raise CMError(f"{path}: no EMA at the rate its config evaluates ({rate}; ema.rates "
                          f"{cfg.ema.rates}); it has {', '.join(map(str, rates))} (pick one with --ema)")
    key = next((r for r in state["ema"] if abs(float(r) - rate) < 1e-15), None)
    if key is None:
        raise CMError(f"{path}: no EMA at rate {rate}; it has {', '.join(map(str, rates))}")
    f = make_model(cfg, denoiser)
    load_weights(f, state["ema"][key], f"EMA {rate}", path)
    if "precond" in state.get("official", {}):  # an EDM pickle keeps its own preconditioning (VE, VP, EDM)
        f = edm_pickle.denoiser_from_state(state, f.net)
    check_outputs(f, cfg.cm, image_shape(cfg.net), f"{path}: its EMA {rate} weights",
                     cfg.net.num_classes if cfg.data.class_cond else 0)
    return f.eval().requires_grad_(False), cfg


def export(path: str | os.PathLike, emas: dict[float, nn.Module], cfg: RunConfig, step: int,
           accounting: dict | None = None) -> Path:
    """Write an export file: EMA weights + config only (a tenth of a resume file with Adam states), and
    the run's compute (cm.Accounting.summary) where given."""
    path = Path(path)
    d = export_dict(cfg, {r: unwrap(m).state_dict() for r, m in emas.items()}, step)
    save_checkpoint(path, d | ({"accounting": accounting} if accounting is not None else {}))
    return path
