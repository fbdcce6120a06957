"""ADM consistency models as diffusers pipeline folders, and full/ exports as .safetensors files.

    python -m full.convert cd_imagenet64_l2.pt --to diffusers --out cd_imagenet64_l2      # a folder
    python -m full.sample --checkpoint diffusers-cd_imagenet64_l2 --class-labels 145      # read back
    python -m full.convert runs/x/export.pt --to safetensors --out x.safetensors

Folder layout (that of the converted CM models on the Hugging Face Hub, e.g.
openai/diffusers-cd_imagenet64_l2; `ConsistencyModelPipeline.from_pretrained(folder)` loads it):
    model_index.json                           the pipeline's two components
    unet/config.json                           UNet2DModel's settings (the ADM architecture)
    unet/diffusion_pytorch_model.safetensors   the network's weights in diffusers' names
    scheduler/scheduler_config.json            CMStochasticIterativeScheduler: ε, T, σ_data, ρ, grid size N
The folder is written with json and safetensors only (diffusers itself is never imported), and read the same
way; safetensors holds tensors and a JSON header, so nothing in a file is executed.

Why the scheduler reproduces this project's sampling. CMStochasticIterativeScheduler computes, at a level σ
of its Karras grid (EDM Eq. 5 with σ_min = ε, σ_max = T, ρ; N = num_train_timesteps points):
    c_in = 1 / √(σ² + σd²)                       (scale_model_input)
    t = 1000 · 0.25 · ln(σ + 1e-44)              (sigma_to_t: the UNet's time input)
    c_skip = σd² / ((σ - ε)² + σd²),  c_out = σd (σ - ε) / √(σ² + σd²)   (boundary-condition scalings)
    x ← clamp(c_skip x + c_out F, -1, 1) + √(σ'² - ε²) z   (clip_denoised; σ' the next level, ε at the end)
i.e. cm.boundary_scalings with noise_cond "adm" and cm.sample_multistep with clip_denoised (run.clamp_mid);
diffusers' `timesteps` [i_k, ..., i_1] (descending) are the official `ts` [i_1, ..., i_k, N - 1] of
cm.ts_to_sigmas, and timesteps=[0] (or num_inference_steps=1) is sample_onestep. The UNet's sinusoidal
embedding (flip_sin_to_cos, freq_shift 0) is networks.timestep_embedding. So only consistency models f with
these scalings are written: an EDM teacher (ε = 0, Heun), TrigFlow (sCT/sCD) or EDM's ln(σ)/4 conditioning
has no CMStochasticIterativeScheduler equivalent and is refused with one line, as are an ADM with
channel_mult[0] != 1 (UNet2DModel embeds time at block_out_channels[0] channels, ADM at model_channels) or
resblock_updown False, and runs that sample with another ε (run.eval_sigma_min, run.renoise_sigma_min).
Two-step levels given as numbers (run.sigmas) are not stored: the scheduler takes indices of its grid.

Name mapping (facts from diffusers' scripts/convert_consistency_to_diffusers.py, which maps CM's UNetModel
onto UNet2DModel): input_blocks / output_blocks -> down_blocks.L / up_blocks.L (resnets, attentions,
downsamplers, upsamplers), middle_block -> mid_block, time_embed -> time_embedding, label_emb ->
class_embedding, out -> conv_norm_out / conv_out; the res block's in_layers / emb_layers / out_layers /
skip_connection -> norm1, conv1 / time_emb_proj / norm2, conv2 / conv_shortcut; attention's qkv
(channels ordered three, heads, head_dim) -> to_q, to_k, to_v (1x1 convolutions as Linear weights),
proj_out -> to_out.0.
A network with legacy_qkv_order (heads, three, head_dim) is permuted on the way out; a folder always reads
back with the (three, heads, head_dim) order.

Reading a folder back. The ADM architecture comes from unet/config.json (every setting that changes the
function is checked against ADM's), ε, T, σd, ρ, N and the clamp from the scheduler. The folder
does not say CD or CT nor the two-step `ts`: the kind is `--kind`, else the folder name (`cd_...`, `ct_...`,
an optional `diffusers-` prefix; default cd), the ts are the launch script's for a released name
(guided_diffusion.OFFICIAL_TS), else the preset's when its grid size is N, else (0, N - 1) (one step). The
other sections (data, optimiser) are those of the ImageNet-64 (or, for an unconditional 256-pixel net,
LSUN-256) CD preset. The weights are stored under EMA key 0.0, as the released .pt files.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import struct
from pathlib import Path

import torch
from torch import Tensor

from cm import FORMAT, PATH_ERRNOS, RECIPES, CMError, ConsistencyFunction, atomic_write, json_value
from full import dist
from full.config import RunConfig, config_from_dict, export_dict
from full.networks import ADMConfig, build_network
from full.presets import get_preset
from full.released.guided_diffusion import OFFICIAL_TS

PIPELINE, UNET, SCHEDULER = "ConsistencyModelPipeline", "UNet2DModel", "CMStochasticIterativeScheduler"
WEIGHTS = "diffusion_pytorch_model.safetensors"

# Renames inside a block: the res block's and attention's sub-modules (qkv is split, see to_diffusers).
RES = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
       "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
ATTN = {"norm": "group_norm", "proj_out": "to_out.0"}
QKV = ("to_q", "to_k", "to_v")
# Attention names of older diffusers files (its deprecated AttentionBlock), read as today's.
OLD_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _safetensors():
    """The safetensors package (an optional dependency: only these folders and files need it)."""
    try:
        import safetensors
        import safetensors.torch
    except ImportError:
        raise CMError("diffusers folders and .safetensors files need the safetensors package "
                      "(pip install safetensors)") from None
    return safetensors


# --------------------------------------------------------------------------------------------------------
# Architecture: ADMConfig <-> unet/config.json


def _attn_levels(net: ADMConfig) -> list[bool]:
    """Per level: has attention (networks.ADMUNet: downsample rate 2^level in image_size // resolutions)."""
    ds = {net.image_size // r for r in net.attention_resolutions}
    return [2 ** level in ds for level in range(len(net.channel_mult))]


def unet_config(net) -> dict:
    """UNet2DModel's config.json for an ADM config; a one-line CMError for what UNet2DModel cannot express."""
    if not isinstance(net, ADMConfig):
        raise CMError(f"diffusers' UNet2DModel holds ADM networks; this checkpoint's is {type(net).__name__}")
    if net.channel_mult[0] != 1:
        raise CMError(f"net.channel_mult[0] = {net.channel_mult[0]}: UNet2DModel embeds time at "
                      "block_out_channels[0] channels, ADM at model_channels (only channel_mult[0] = 1 "
                      "converts)")
    if not net.resblock_updown:
        raise CMError("net.resblock_updown = False (convolution resampling) is not written as a diffusers "
                      "folder")
    attn = _attn_levels(net)
    return {
        "_class_name": UNET, "sample_size": net.image_size, "in_channels": net.in_channels,
        "out_channels": net.out_channels, "center_input_sample": False, "time_embedding_type": "positional",
        "time_embedding_dim": None, "freq_shift": 0, "flip_sin_to_cos": True,
        "down_block_types": ["AttnDownBlock2D" if a else "ResnetDownsampleBlock2D" for a in attn],
        "mid_block_type": "UNetMidBlock2D",
        "up_block_types": ["AttnUpBlock2D" if a else "ResnetUpsampleBlock2D" for a in reversed(attn)],
        "block_out_channels": [m * net.model_channels for m in net.channel_mult],
        "layers_per_block": net.num_res_blocks, "mid_block_scale_factor": 1, "downsample_padding": 1,
        "downsample_type": "resnet", "upsample_type": "resnet", "dropout": net.dropout, "act_fn": "silu",
        "attention_head_dim": net.num_head_channels, "norm_num_groups": 32, "attn_norm_num_groups": 32,
        "norm_eps": 1e-5, "resnet_time_scale_shift": "scale_shift" if net.use_scale_shift_norm else "default",
        "add_attention": True, "class_embed_type": None, "num_class_embeds": net.num_classes or None,
        "num_train_timesteps": None,
    }


# UNet2DModel's defaults (its __init__ signature) for the settings that change the function, and the value
# ADM needs; a key absent from a config.json takes the default.
_FIXED = {"center_input_sample": (False, False), "time_embedding_type": ("positional", "positional"),
          "freq_shift": (0, 0), "flip_sin_to_cos": (True, True), "mid_block_type": ("UNetMidBlock2D",) * 2,
          "mid_block_scale_factor": (1, 1), "downsample_type": ("conv", "resnet"),
          "upsample_type": ("conv", "resnet"), "act_fn": ("silu", "silu"), "norm_num_groups": (32, 32),
          "norm_eps": (1e-5, 1e-5), "add_attention": (True, True), "class_embed_type": (None, None)}


def adm_config(d: dict, where: str = "") -> ADMConfig:
    """The ADMConfig of a UNet2DModel config.json; a one-line CMError for any setting ADM does not have."""
    def bad(msg: str):
        return CMError(f"{where}: {msg}")
    if not isinstance(d, dict) or d.get("_class_name") != UNET:
        raise bad(f"not a {UNET} config")
    for k, (default, need) in _FIXED.items():
        if d.get(k, default) != need:
            raise bad(f"{k} = {d.get(k, default)!r} has no ADM counterpart (ADM: {need!r})")
    shift = d.get("resnet_time_scale_shift", "default")
    if shift not in ("default", "scale_shift"):
        raise bad(f"resnet_time_scale_shift = {shift!r} has no ADM counterpart")
    if d.get("attn_norm_num_groups") not in (32,) + ((None,) if shift == "default" else ()):
        raise bad(f"attn_norm_num_groups = {d.get('attn_norm_num_groups')!r}: ADM's attention uses 32 groups")
    try:
        chans = [int(c) for c in d["block_out_channels"]]
        down, up = list(d["down_block_types"]), list(d["up_block_types"])
        size, heads = d["sample_size"], d.get("attention_head_dim", 8)
        mc = chans[0]
        if not (isinstance(size, int) and isinstance(heads, int) and mc > 0):
            raise ValueError("sample_size and attention_head_dim must be integers")
        attn = [t == "AttnDownBlock2D" for t in down]
        levels = ("AttnDownBlock2D", "ResnetDownsampleBlock2D")
        if any(t not in levels for t in down) or len(down) != len(chans):
            raise ValueError(f"down_block_types {down} are not ADM levels of {chans} channels")
        if up != ["AttnUpBlock2D" if a else "ResnetUpsampleBlock2D" for a in reversed(attn)]:
            raise ValueError(f"up_block_types {up} do not mirror down_block_types {down}")
        if any(c % mc for c in chans):
            raise ValueError(f"block_out_channels {chans} are not multiples of the first")
        if d.get("time_embedding_dim") not in (None, 4 * mc):
            raise ValueError(f"time_embedding_dim = {d['time_embedding_dim']} (ADM: 4 x {mc})")
        net = ADMConfig(
            image_size=size, in_channels=int(d.get("in_channels", 3)),
            out_channels=int(d.get("out_channels", 3)),
            model_channels=mc, channel_mult=tuple(c // mc for c in chans),
            num_res_blocks=int(d.get("layers_per_block", 2)),
            attention_resolutions=tuple(size // 2 ** level for level, a in enumerate(attn) if a),
            num_head_channels=heads, dropout=float(d.get("dropout", 0.0)),
            num_classes=int(d.get("num_class_embeds") or 0), use_scale_shift_norm=shift == "scale_shift",
            resblock_updown=True, legacy_qkv_order=False)
    except (KeyError, TypeError, ValueError) as e:
        raise bad(f"cannot read the architecture ({type(e).__name__}: {e})") from None
    if unet_config(net)["down_block_types"] != down:  # attention at a level that no resolution maps back to
        raise bad(f"down_block_types {down} do not fit image size {size}")
    return net


# --------------------------------------------------------------------------------------------------------
# Weights: ADMUNet's names <-> UNet2DModel's


def _blocks(net: ADMConfig) -> dict[str, tuple[str, str]]:
    """ADMUNet module path -> (UNet2DModel module path, kind: plain | res | attn)."""
    L, n, attn = len(net.channel_mult), net.num_res_blocks, _attn_levels(net)
    b = {"time_embed.0": ("time_embedding.linear_1", "plain"),
         "time_embed.2": ("time_embedding.linear_2", "plain"),
         "label_emb": ("class_embedding", "plain"), "input_blocks.0.0": ("conv_in", "plain"),
         "out.0": ("conv_norm_out", "plain"), "out.2": ("conv_out", "plain"),
         "middle_block.0": ("mid_block.resnets.0", "res"),
         "middle_block.1": ("mid_block.attentions.0", "attn"),
         "middle_block.2": ("mid_block.resnets.1", "res")}
    k = 1
    for level in range(L):
        for j in range(n):
            b[f"input_blocks.{k}.0"] = (f"down_blocks.{level}.resnets.{j}", "res")
            if attn[level]:
                b[f"input_blocks.{k}.1"] = (f"down_blocks.{level}.attentions.{j}", "attn")
            k += 1
        if level != L - 1:
            b[f"input_blocks.{k}.0"] = (f"down_blocks.{level}.downsamplers.0", "res")
            k += 1
    k = 0
    for i, level in enumerate(reversed(range(L))):
        for j in range(n + 1):
            b[f"output_blocks.{k}.0"] = (f"up_blocks.{i}.resnets.{j}", "res")
            if attn[level]:
                b[f"output_blocks.{k}.1"] = (f"up_blocks.{i}.attentions.{j}", "attn")
            k += 1
        if level:
            b[f"output_blocks.{k - 1}.{2 if attn[level] else 1}"] = (f"up_blocks.{i}.upsamplers.0", "res")
    return b


def _expected(net: ADMConfig) -> dict[str, torch.Size]:
    with torch.device("meta"):  # names and shapes only, nothing allocated
        return {k: v.shape for k, v in build_network(net).state_dict().items()}


def key_map(net: ADMConfig) -> dict[str, str | tuple[str, str, str]]:
    """ADMUNet tensor name -> UNet2DModel tensor name (qkv: the three names of q, k, v), every tensor."""
    blocks, out = _blocks(net), {}
    for key in _expected(net):
        parts = key.split(".")
        prefix = next((".".join(parts[:i]) for i in (3, 2, 1) if ".".join(parts[:i]) in blocks), None)
        if prefix is None:
            raise CMError(f"internal: no diffusers name for ADM tensor {key}")
        theirs, kind = blocks[prefix]
        sub, leaf = ".".join(parts[len(prefix.split(".")):-1]), parts[-1]
        if kind == "plain":
            out[key] = f"{theirs}.{leaf}"
        elif kind == "attn" and sub == "qkv":
            out[key] = tuple(f"{theirs}.{q}.{leaf}" for q in QKV)
        else:
            table = RES if kind == "res" else ATTN
            if sub not in table:
                raise CMError(f"internal: no diffusers name for ADM tensor {key}")
            out[key] = f"{theirs}.{table[sub]}.{leaf}"
    return out


def _qkv_order(w: Tensor, heads: int, legacy_to_new: bool) -> Tensor:
    """Permute qkv's output channels between (heads, three, dim) (legacy) and (three, heads, dim)."""
    rest = w.shape[1:]
    a, b = (heads, 3) if legacy_to_new else (3, heads)
    return w.reshape(a, b, w.shape[0] // (3 * heads), *rest).transpose(0, 1).reshape(w.shape)


def to_diffusers(sd: dict[str, Tensor], net: ADMConfig) -> dict[str, Tensor]:
    """ADMUNet's state dict in UNet2DModel's names and shapes (contiguous copies, as safetensors wants)."""
    out = {}
    for key, theirs in key_map(net).items():
        v = sd[key].detach()
        if isinstance(theirs, tuple):  # qkv -> to_q, to_k, to_v as Linear weights (C, C) / biases (C,)
            if net.legacy_qkv_order:
                v = _qkv_order(v, v.shape[0] // (3 * net.num_head_channels), legacy_to_new=True)
            for name, part in zip(theirs, v.chunk(3, dim=0)):
                out[name] = part.reshape(part.shape[:2] if part.ndim > 1 else part.shape).clone()
        elif key.endswith("proj_out.weight"):  # 1x1 conv -> Linear
            out[theirs] = v.reshape(v.shape[:2]).clone()
        else:
            out[theirs] = v.clone().contiguous()
    return out


def _new_name(key: str) -> str:
    parts = key.split(".")
    if len(parts) >= 2 and "attentions" in parts and parts[-2] in OLD_ATTN:
        parts[-2] = OLD_ATTN[parts[-2]]
    return ".".join(parts)


def from_diffusers(theirs: dict[str, Tensor], net: ADMConfig, where: str = "") -> dict[str, Tensor]:
    """UNet2DModel's tensors as ADMUNet's state dict (qkv order three, heads, dim); one-line CMError for a
    missing or unexpected tensor or a wrong shape."""
    kmap, shapes = key_map(net), _expected(net)
    theirs = {_new_name(k): v for k, v in theirs.items()}
    want = {n for t in kmap.values() for n in (t if isinstance(t, tuple) else (t,))}
    for miss, what in ((sorted(want - set(theirs)), "missing"), (sorted(set(theirs) - want), "unexpected")):
        if miss:
            raise CMError(f"{where}: {what} tensor {miss[0]} for the UNet2DModel of unet/config.json "
                          f"({len(miss)} in all)")
    sd = {}
    for key, t in kmap.items():
        try:
            v = torch.cat([theirs[n] for n in t], dim=0) if isinstance(t, tuple) else theirs[t]
        except RuntimeError:
            v = theirs[t[0]].new_empty(0)  # q, k, v of different shapes: reported below
        if v.numel() != math.prod(shapes[key]) or (v.shape != shapes[key] and v.shape != shapes[key][:2]):
            raise CMError(f"{where}: {t if isinstance(t, str) else t[0]} has shape {list(v.shape)}, the "
                          f"config needs {list(shapes[key])}")
        sd[key] = v.reshape(shapes[key])
    return sd


# --------------------------------------------------------------------------------------------------------
# Files


def _write_json(path: Path, obj: dict) -> None:
    text = json.dumps(obj, indent=2, sort_keys=False) + "\n"
    atomic_write(path, lambda fh: fh.write(text.encode()))


def _read_json(path: Path) -> dict:
    try:
        d = json_value(path.read_text())
    except FileNotFoundError:
        raise CMError(f"{path.parent}: no {path.name}") from None
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError too
        raise CMError(f"{path}: not readable JSON ({type(e).__name__}: {e})") from None
    if not isinstance(d, dict):
        raise CMError(f"{path}: a JSON object was expected")
    return d


def _save_tensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> None:
    """safetensors' save_file into atomic_write's temporary file (the one open as fh, so that its fsync
    covers what save_file wrote): a failed write (a full disk) is one line and leaves no file behind."""
    save_file = _safetensors().torch.save_file
    tensors = {k: v.contiguous() for k, v in tensors.items()}

    def write(fh):
        try:
            save_file(tensors, fh.name, metadata=metadata)
        except Exception as e:  # SafetensorError "... I/O error: File too large (os error 27)"
            if found := re.search(r"os error (\d+)", str(e)):
                raise OSError(int(found[1]), os.strerror(int(found[1]))) from None
            raise RuntimeError(str(e) or type(e).__name__) from None
    atomic_write(path, write)


def _load_tensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    safetensors = _safetensors()
    try:
        with safetensors.safe_open(str(path), framework="pt") as fh:
            return {k: fh.get_tensor(k) for k in fh.keys()}, (fh.metadata() or {})
    except FileNotFoundError:
        raise CMError(f"no file {path}") from None
    except Exception as e:  # safetensors' own error type varies by version
        raise CMError(f"{path}: not a readable safetensors file ({type(e).__name__}: "
                      f"{str(e).splitlines()[0][:120] if str(e) else ''})") from None


def _sampling_config(cfg: RunConfig, where: str) -> None:
    """Refuse what CMStochasticIterativeScheduler cannot reproduce (module docstring)."""
    c, r = cfg.cm, cfg.run
    recipe = RECIPES[c.mode]
    if recipe.trigflow or recipe.denoiser:
        raise CMError(f"{where}: cm.mode={c.mode} is not a consistency model f with CM's boundary scalings "
                      "(ConsistencyModelPipeline samples only those)")
    if c.noise_cond != "adm":
        raise CMError(f"{where}: cm.noise_cond={c.noise_cond}: the diffusers scheduler feeds the UNet "
                      "1000 * 0.25 ln(sigma + 1e-44) (noise_cond adm)")
    for name in ("eval_sigma_min", "renoise_sigma_min"):
        v = getattr(r, name)
        if v not in (-1, c.sigma_min):
            raise CMError(f"{where}: run.{name}={v}: the diffusers scheduler uses cm.sigma_min={c.sigma_min} "
                          "for both the boundary and the re-noising")


def write_folder(f, cfg: RunConfig, out: str | os.PathLike) -> Path:
    """A consistency model f (checkpoints.model_from_state: one EMA's weights) of the run `cfg` as a
    ConsistencyModelPipeline folder."""
    out = Path(out)
    _sampling_config(cfg, str(out))
    if not isinstance(f, ConsistencyFunction):
        raise CMError(f"{out}: this model keeps its own preconditioning; only CM's f converts")
    unet = unet_config(cfg.net)
    tensors = to_diffusers({k: v for k, v in f.net.state_dict().items()}, cfg.net)
    c = cfg.cm
    sched = {"_class_name": SCHEDULER, "num_train_timesteps": cfg.run.grid_steps, "sigma_min": c.sigma_min,
             "sigma_max": c.sigma_max, "sigma_data": c.sigma_data, "s_noise": 1.0, "rho": c.rho,
             "clip_denoised": bool(cfg.run.clamp_mid)}
    if out.exists() and not out.is_dir():
        raise CMError(f"{out} exists and is not a folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    # The folder is written beside `out` under a temporary name and renamed into place once complete, so a
    # failed write (a full disk) or an interrupt leaves no partial folder and an earlier folder unchanged.
    tmp, old = (out.with_name(f".{out.name}.{os.getpid()}.{what}") for what in ("tmp", "old"))
    try:
        for sub in ("unet", "scheduler"):
            (tmp / sub).mkdir(parents=True)
        _save_tensors(tmp / "unet" / WEIGHTS, tensors, {"format": "pt"})
        _write_json(tmp / "unet" / "config.json", unet)
        _write_json(tmp / "scheduler" / "scheduler_config.json", sched)
        _write_json(tmp / "model_index.json", {"_class_name": PIPELINE, "scheduler": ["diffusers", SCHEDULER],
                                               "unet": ["diffusers", UNET]})
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
    except BaseException as e:
        if old.exists() and not out.exists():
            os.replace(old, out)
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno not in PATH_ERRNOS:
            raise CMError(f"cannot write {out}: {e.strerror or e}") from None
        raise
    shutil.rmtree(old, ignore_errors=True)
    return out


def is_folder(path: str | os.PathLike) -> bool:
    return Path(path).is_dir() and (Path(path) / "model_index.json").is_file()


# CMStochasticIterativeScheduler's defaults for the numbers this project reads.
_SCHEDULER_DEFAULTS = (("sigma_min", 0.002), ("sigma_max", 80.0), ("sigma_data", 0.5), ("rho", 7.0))


def _kind(path: Path, kind: str) -> tuple[str, str]:
    if kind:
        if kind not in ("cd", "ct"):
            raise CMError(f"{path}: a diffusers consistency-model folder is cd or ct, not {kind!r}")
        return kind, "given"
    prefix = path.name.lower().removeprefix("diffusers-").split("_")[0]
    return (prefix, "from the folder name") if prefix in ("cd", "ct") else ("cd", "default")


def read_folder(path: str | os.PathLike, kind: str = "") -> dict:
    """A ConsistencyModelPipeline folder (UNet2DModel + CMStochasticIterativeScheduler, safetensors weights)
    as a full/ export dict (module docstring); every problem is a one-line CMError."""
    path = Path(path)
    index = _read_json(path / "model_index.json")
    names = (index.get("unet"), index.get("scheduler"))
    if [n[-1:] if isinstance(n, list) else n for n in names] != [[UNET], [SCHEDULER]]:
        raise CMError(f"{path}: model_index.json names unet {index.get('unet')} and scheduler "
                      f"{index.get('scheduler')}; this reads {UNET} + {SCHEDULER} (ConsistencyModelPipeline)")
    net = adm_config(_read_json(path / "unet" / "config.json"), str(path / "unet" / "config.json"))
    sched = _read_json(path / "scheduler" / "scheduler_config.json")
    if sched.get("_class_name") != SCHEDULER:
        raise CMError(f"{path}: scheduler_config.json is a {sched.get('_class_name')}, not {SCHEDULER}")
    if sched.get("s_noise", 1.0) != 1.0:
        raise CMError(f"{path}: s_noise = {sched['s_noise']}: this project re-noises with s_noise 1")
    weights = path / "unet" / WEIGHTS
    if not weights.is_file() and (path / "unet" / WEIGHTS.replace(".safe", ".fp16.safe")).is_file():
        weights = path / "unet" / WEIGHTS.replace(".safe", ".fp16.safe")  # the half-precision variant only
    if not weights.is_file():
        found = sorted(p.name for p in (path / "unet").glob("diffusion_pytorch_model*"))
        raise CMError(f"{path}: no unet/{WEIGHTS} (found: {', '.join(found) or 'nothing'}; only safetensors "
                      "weights are read, a .bin is a pickle)")
    tensors, _ = _load_tensors(weights)
    sd = from_diffusers({k: v.float() if v.is_floating_point() else v for k, v in tensors.items()},
                        net, str(weights))
    mode, how = _kind(path, kind)
    name = path.name.removeprefix("diffusers-")
    arch = "lsun256" if net.image_size == 256 and not net.num_classes else "imagenet64"
    cfg = get_preset(f"{arch}-cd-lpips")
    try:
        N = int(sched.get("num_train_timesteps", 40))
        ts = (OFFICIAL_TS[name][0] if OFFICIAL_TS.get(name, (0, 0))[1] == N else
              cfg.run.ts if cfg.run.grid_steps == N else (0, N - 1))
        c = dataclasses.replace(cfg.cm, mode=mode, noise_cond="adm",
                                **{k: float(sched.get(k, d)) for k, d in _SCHEDULER_DEFAULTS})
        clamp = bool(sched.get("clip_denoised", True))
        run = dataclasses.replace(cfg.run, ts=tuple(ts), grid_steps=N, clamp_mid=clamp, eval_sigma_min=-1.0,
                                  renoise_sigma_min=-1.0)
        data = dataclasses.replace(cfg.data, class_cond=bool(net.num_classes))
        cfg = dataclasses.replace(cfg, net=net, cm=c, run=run, data=data)
    except (TypeError, ValueError, CMError) as e:
        raise CMError(f"{path}: the scheduler settings do not make a valid run ({e})") from None
    dist.print0(f"{path.name}: diffusers {PIPELINE} folder; ADM {net.image_size}px, {net.model_channels} "
                f"channels, {net.num_classes or 'no'} classes; kind {mode} ({how}); "
                f"ts {','.join(map(str, ts))} of {N}")
    return export_dict(cfg, {0.0: {f"net.{k}": v for k, v in sd.items()}}, 0,
                       {"source": "diffusers", "kind": mode, "kind_from": how, "clamp": clamp})


# --------------------------------------------------------------------------------------------------------
# full/ exports as .safetensors: tensors "ema.<i>.<name>", the rest as JSON in the header's metadata

_META = "full_export"


def write_safetensors(state: dict, out: str | os.PathLike) -> Path:
    """A full/ export dict as one .safetensors file (read back by read_safetensors / checkpoints.load)."""
    out = Path(out)
    rates = list(state["ema"])
    tensors = {f"ema.{i}.{k}": v.detach().clone()
               for i, r in enumerate(rates) for k, v in state["ema"][r].items()}
    head = {"rates": [float(r) for r in rates], "config": state["config"], "step": int(state["step"]),
            "format": state.get("format", FORMAT)}
    if "official" in state:
        head["official"] = state["official"]
    try:
        meta = json.dumps(head)
    except TypeError as e:
        raise CMError(f"{out}: this export holds more than tensors and JSON values ({e}); write it as .pt") \
            from None
    _save_tensors(out, tensors, {_META: meta})
    return out


def is_safetensors(head: bytes, size: int) -> bool:
    """The file's first 16 bytes: a little-endian u64 header length, then the JSON header's '{'."""
    return len(head) >= 9 and head[8:9] == b"{" and 0 < struct.unpack("<Q", head[:8])[0] <= size - 8


def read_safetensors(path: str | os.PathLike) -> dict:
    """A .safetensors export written by write_safetensors, as the export dict; one-line CMError otherwise."""
    path = Path(path)
    tensors, meta = _load_tensors(path)
    if _META not in meta:
        raise CMError(f"{path}: a safetensors file without a full/ export header (a diffusers UNet's "
                      "weights? give --checkpoint the pipeline folder that holds model_index.json)")
    try:
        head = json_value(meta[_META])
        rates = [float(r) for r in head["rates"]]
        ema: dict[float, dict] = {r: {} for r in rates}
        for k, v in tensors.items():
            _, i, name = k.split(".", 2)
            ema[rates[int(i)]][name] = v
        cfg = config_from_dict(head["config"])
        return export_dict(cfg, ema, int(head["step"]), head.get("official"))
    except (KeyError, ValueError, IndexError, TypeError) as e:  # json_value: a ValueError
        raise CMError(f"{path}: a damaged full/ export header ({type(e).__name__}: {e})") from None
