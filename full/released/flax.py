"""The paper's CIFAR-10 JAX/Flax checkpoints (openai/consistency_models_cifar10) as full/ export dicts.

Read with the `msgpack` package alone: no JAX, no Flax, and nothing in the file is ever executed.

File format (flax `serialization.to_bytes`, read for facts). The file is one msgpack map: the state dict
of `mutils.State(step, lr, ema_rate, params, params_ema, model_state, opt_state, rng_state)` (the CT
runs with a target network save `StateWithTarget`, which adds `target_params`). A dataclass or dict is a
map keyed by field / key names, a list, tuple or namedtuple (optax states) a map keyed "0", "1", ...
Leaves are msgpack extension records:
    code 1  ndarray         data = msgpack [shape, dtype name, C-order bytes]
    code 2  native complex  data = msgpack [real, imag]
    code 3  numpy scalar    data = as code 1, shape ()
Only real numbers are read: arrays and scalars of bool, int, uint, float (and jax's bfloat16) dtypes,
msgpack ints, floats, strings and None. A complex leaf (code 2, a complex dtype), a datetime (a datetime64
dtype, msgpack's timestamp extension) or any other record is refused, as are a shape that does not match
the bytes, a tree nested deeper than MAX_DEPTH, and (when converted) NaN or infinite parameters, a
non-integer step or an EMA rate outside [0, 1): one line each (CMError).
An array over 2**30 bytes is split into {"__msgpack_chunked_array__": True, "shape": {"0": ..},
"chunks": {"0": flat part, ..}} (never at CIFAR-10 size, but read all the same).
`flax.training.checkpoints` names the files `<workdir>/checkpoints/checkpoint_<N>`.

Network. `params_ema` is what the official evaluation samples with (jcm/sampling.py passes
`state.params_ema` to every sampler), so that is what is converted. The auto-named linen modules of
jcm/models/ncsnpp.py are numbered per type in call order:
    GaussianFourierProjection_0/W    (nf,)           -> fourier.freqs (a buffer here)
    Dense_0, Dense_1                 embedding MLP   -> emb0, emb1
    Conv_0, ..., GroupNorm_0, Conv_1 in / out conv   -> conv_in, norm_out, conv_out
    ResnetBlockBigGANpp_<n>          encoder blocks, down blocks, the two middle blocks, decoder blocks,
                                     up blocks, in the order full/'s NCSNpp.forward runs them
        GroupNorm_0, Conv_0, Dense_0, GroupNorm_1, Conv_1, Conv_2 (1x1 skip)
                                     -> norm0, conv0, emb, norm1, conv1, skip
    AttnBlockpp_<m>                  GroupNorm_0, NIN_0/1/2 (q, k, v; stacked into qkv), NIN_3 -> proj
    Downsample_<d>/Conv2d_0          FIR + 3x3 stride-2 conv of the input pyramid -> down.<l>.pyramid.conv
Layouts: conv kernels HWIO -> OIHW, dense kernels (in, out) -> (out, in), NIN W (in, out) -> 1x1 conv
(out, in, 1, 1), GroupNorm scale/bias -> weight/bias.

Preconditioning (jcm/models/utils.py). The network sees c_in x = x / sqrt(t^2 + 0.25) and 0.25 ln t;
    EDM teacher (get_denoiser_fn)   c_skip = σd²/(t² + σd²),      c_out = t σd / sqrt(t² + σd²)
    CD / CT (get_distiller_fn)      c_skip = σd²/((t-ε)² + σd²),  c_out = (t-ε) σd / sqrt(t² + σd²)
with σd = 0.5, ε = t_min = 0.002: full/'s ConsistencyFunction with noise_cond "edm" and sigma_min 0 (an
edm run) or 0.002 (a cd / ct run), so the converted file is a cifar10-edm / -cd-* / -ct export.
"""
from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Collection
from pathlib import Path

import numpy as np
import torch

from cm import CMError
from full import dist
from full.config import export_dict
from full.networks import NCSNppConfig
from full.presets import get_preset

KINDS = ("edm", "cd", "ct")
_CKPT = re.compile(r"^checkpoint_(\d+)$")
_CHUNKED = "__msgpack_chunked_array__"
# The EDM teacher's EMA rate: a half-life of 0.5 Mimg at batch 512 (configs/cifar10_k_ve.py); the CM
# students use 0.9999.
TEACHER_EMA_RATE = math.exp(math.log(0.5) / (0.5e6 / 512))


# --------------------------------------------------------------------------------------------------------
# Reading the msgpack file
# --------------------------------------------------------------------------------------------------------


def find_checkpoint(path: str | Path) -> Path:
    """The checkpoint file: `path` itself, or the newest checkpoint_<N> in it or in its checkpoints/."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise CMError(f"no checkpoint at {path}")
    for d in (path, path / "checkpoints"):
        found = [(int(m.group(1)), p) for p in d.glob("checkpoint_*") if (m := _CKPT.match(p.name))] \
            if d.is_dir() else []
        if found:
            return max(found)[1]
    raise CMError(f"{path} is a folder without checkpoint_<N> files (nor a checkpoints/ folder with them): "
                  "pass a checkpoint file (a full/ ckpt-*.pt or export.pt, or a released file)")


def is_flax(path: str | Path) -> bool:
    """A Flax msgpack checkpoint file, or a folder with checkpoint_<N> files (or a checkpoints/ with them)."""
    path = Path(path)
    if path.is_dir():
        return any(path.glob("checkpoint_*")) or any((path / "checkpoints").glob("checkpoint_*"))
    if not path.is_file():
        return False
    with open(path, "rb") as fh:
        return looks_like_msgpack_map(fh.read(2))


def looks_like_msgpack_map(head: bytes) -> bool:
    """True when the first byte opens a msgpack map (fixmap 0x80-0x8f, map16 0xde, map32 0xdf) and the
    file is not a pickle (b'\\x80' + protocol 2-5) nor a zip (torch.save)."""
    if not head:
        return False
    b = head[0]
    pickle = b == 0x80 and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")
    return (0x80 <= b <= 0x8F or b in (0xDE, 0xDF)) and not pickle


MAX_DEPTH = 64  # nesting of the state tree (a released file's is 6: params_ema/ResnetBlockBigGANpp_0/...)
_REAL_KINDS = "biuf"  # bool, int, uint, float: what a parameter, a step or a rate can be


def _ndarray(data: bytes) -> np.ndarray:
    import msgpack
    rec = msgpack.unpackb(data, raw=True)
    if not (isinstance(rec, (list, tuple)) and len(rec) == 3 and isinstance(rec[1], bytes)
            and isinstance(rec[2], bytes)):
        raise ValueError("an array record is not [shape, dtype name, bytes]")
    shape, name, buf = rec
    if not isinstance(shape, (list, tuple)) or len(shape) > 16 or \
            not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
        raise ValueError(f"an array record's shape {str(shape)[:40]} is not a list of sizes")
    name = name.decode("ascii", "replace")
    if name == "bfloat16":  # jax's bfloat16: the top half of a float32
        dtype, itemsize = None, 2
    else:
        try:
            dtype = np.dtype(name)
        except TypeError:
            raise ValueError(f"array dtype {name[:20]!r} is not a numpy dtype") from None
        if dtype.kind not in _REAL_KINDS or dtype.fields is not None or dtype.subdtype is not None:
            raise ValueError(f"array dtype {name[:20]} is not a real number type (complex, datetime, text, "
                             "object and record arrays are refused)")
        itemsize = dtype.itemsize
    if math.prod(shape) * itemsize != len(buf):
        raise ValueError(f"an array record of shape {list(shape)} {name[:20]} holds {len(buf)} bytes")
    if dtype is None:
        raw = np.frombuffer(buf, dtype="<u2").astype(np.uint32) << 16
        return raw.view(np.float32).reshape(shape)
    return np.frombuffer(buf, dtype=dtype).reshape(shape).copy()


def _ext_hook(code: int, data: bytes):
    if code == 1:
        return _ndarray(data)
    if code == 2:
        raise ValueError("a complex number leaf (extension 2); only real numbers are read")
    if code == 3:
        return _ndarray(data)[()]
    raise ValueError(f"unknown msgpack extension type {code}")


def _check_tree(tree, where: str) -> None:
    """Only maps, lists and real leaves (numeric arrays, numbers, strings, None), at most MAX_DEPTH deep;
    walked without recursion."""
    stack = [(tree, where, 0)]
    while stack:
        node, at, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ValueError(f"the tree is nested deeper than {MAX_DEPTH} levels at {at[:80]}...")
        if isinstance(node, dict):
            stack += [(v, f"{at}/{k}", depth + 1) for k, v in node.items()]
        elif isinstance(node, (list, tuple)):
            stack += [(v, f"{at}/{i}", depth + 1) for i, v in enumerate(node)]
        elif not (node is None or isinstance(node, (bool, int, float, str, bytes, np.ndarray, np.generic))):
            raise ValueError(f"{at[:80]} is a {type(node).__name__}, not a real number (datetime, complex "
                             "and other records are refused)")


def _unchunk(tree):
    if isinstance(tree, dict):
        if tree.get(_CHUNKED) is True:
            shape = [tree["shape"][str(i)] for i in range(len(tree["shape"]))]
            parts = [tree["chunks"][str(i)] for i in range(len(tree["chunks"]))]
            return np.concatenate(parts).reshape(shape)
        return {k: _unchunk(v) for k, v in tree.items()}
    return tree


def read_flax(path: str | Path, keep: Collection[str] | None = None) -> dict:
    """A Flax msgpack checkpoint as a nested dict of numpy arrays and Python scalars.

    keep: the top-level entries to decode (None: all); the others are read past (streamed, never held in
    memory: a released CIFAR-10 file is ~0.9 GB, of which params_ema is a quarter) and given as None.
    A missing, truncated or foreign file -> a one-line CMError."""
    path = find_checkpoint(path)
    try:
        import msgpack
    except ImportError:
        raise CMError("reading Flax checkpoints needs the msgpack package (pip install msgpack)") from None
    with open(path, "rb") as fh:
        head = fh.read(4)
        if not looks_like_msgpack_map(head):
            raise CMError(f"{path} is not a Flax checkpoint (msgpack map); first bytes {head!r}")
        fh.seek(0)
        tree = {}
        try:
            unpacker = msgpack.Unpacker(fh, ext_hook=_ext_hook, raw=False, strict_map_key=False,
                                        max_buffer_size=2 ** 31 - 1)
            for _ in range(unpacker.read_map_header()):
                key = unpacker.unpack()
                if keep is None or key in keep:
                    value = unpacker.unpack()
                    _check_tree(value, str(key))
                    tree[key] = _unchunk(value)
                else:
                    unpacker.skip()
                    tree[key] = None
            for _ in unpacker:
                raise ValueError("extra data after the checkpoint's map")
        except Exception as e:  # truncated (OutOfData), extra bytes, bad records
            raise CMError(f"cannot read Flax checkpoint {path}: corrupt or truncated "
                          f"({type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''})") from None
    return tree


# --------------------------------------------------------------------------------------------------------
# JAX NCSN++ parameter tree -> full/ NCSNpp state dict
# --------------------------------------------------------------------------------------------------------


def _conv(leaf: np.ndarray) -> np.ndarray:        # HWIO -> OIHW
    return leaf.transpose(3, 2, 0, 1)


def _dense(leaf: np.ndarray) -> np.ndarray:       # (in, out) -> (out, in)
    return leaf.T


def _module_names(cfg) -> list[tuple[str, str, str]]:
    """(jax module path, torch prefix, module type) in the order the official NCSN++ creates them."""
    count: dict[str, int] = {}
    out = []

    def add(kind: str, prefix: str):
        n = count.get(kind, 0)
        count[kind] = n + 1
        out.append((f"{kind}_{n}", prefix, kind))

    add("GaussianFourierProjection", "fourier")
    add("Dense", "emb0")
    add("Dense", "emb1")
    add("Conv", "conv_in")
    res, levels = cfg.img_resolution, len(cfg.channel_mult)
    for lv in range(levels):
        for i in range(cfg.num_blocks):
            add("ResnetBlockBigGANpp", f"down.{lv}.blocks.{i}")
            if res in cfg.attn_resolutions:
                add("AttnBlockpp", f"down.{lv}.attns.{i}")
        if lv != levels - 1:
            add("ResnetBlockBigGANpp", f"down.{lv}.downsample")
            add("Downsample", f"down.{lv}.pyramid")
            res //= 2
    add("ResnetBlockBigGANpp", "mid.block0")
    add("AttnBlockpp", "mid.attn")
    add("ResnetBlockBigGANpp", "mid.block1")
    for j, lv in enumerate(reversed(range(levels))):
        for i in range(cfg.num_blocks + 1):
            add("ResnetBlockBigGANpp", f"up.{j}.blocks.{i}")
        if res in cfg.attn_resolutions:
            add("AttnBlockpp", f"up.{j}.attn")
        if lv != 0:
            add("ResnetBlockBigGANpp", f"up.{j}.upsample")
            res *= 2
    add("GroupNorm", "norm_out")
    add("Conv", "conv_out")
    return out


def _leaf(tree: dict, path: str, used: set) -> np.ndarray:
    node = tree
    for part in path.split("/"):
        if not isinstance(node, dict) or part not in node:
            raise CMError(f"the JAX parameter tree has no {path} (another network or config?)")
        node = node[part]
    if not isinstance(node, np.ndarray) or node.dtype.kind != "f":
        raise CMError(f"the JAX parameter {path} is not a floating-point array")
    if not np.isfinite(node).all():
        raise CMError(f"the JAX parameter {path} holds NaN or infinite values")
    used.add(path)
    return node


def convert_params(params: dict, cfg) -> dict[str, torch.Tensor]:
    """The official NCSN++ parameter tree (`params_ema`) as a state dict of full/'s NCSNpp(cfg).

    Every JAX leaf is used exactly once; a leaf left over, missing, of another rank, not a float array
    or not finite -> one-line CMError (other shapes: checkpoints.load_weights, strict, one line; the widths
    of infer_config are read off the file's own arrays, so what is built is no larger than the file)."""
    try:
        sd = _convert(params, cfg)
    except (ValueError, IndexError) as e:  # a leaf of another rank than its layer's
        raise CMError(f"the JAX parameter tree does not fit NCSN++ ({type(e).__name__}: "
                      f"{str(e).splitlines()[0][:80] if str(e) else ''})") from None
    return {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in sd.items()}


def _convert(params: dict, cfg) -> dict[str, np.ndarray]:
    used: set[str] = set()
    sd: dict[str, np.ndarray] = {}

    def get(p):
        return _leaf(params, p, used)

    for jax_name, pre, kind in _module_names(cfg):
        if kind == "GaussianFourierProjection":
            sd[f"{pre}.freqs"] = get(f"{jax_name}/W")
        elif kind == "Dense":
            sd[f"{pre}.weight"] = _dense(get(f"{jax_name}/kernel"))
            sd[f"{pre}.bias"] = get(f"{jax_name}/bias")
        elif kind == "Conv":
            sd[f"{pre}.weight"] = _conv(get(f"{jax_name}/kernel"))
            sd[f"{pre}.bias"] = get(f"{jax_name}/bias")
        elif kind == "GroupNorm":
            sd[f"{pre}.weight"], sd[f"{pre}.bias"] = get(f"{jax_name}/scale"), get(f"{jax_name}/bias")
        elif kind == "Downsample":
            sd[f"{pre}.conv.weight"] = _conv(get(f"{jax_name}/Conv2d_0/weight"))
            sd[f"{pre}.conv.bias"] = get(f"{jax_name}/Conv2d_0/bias")
        elif kind == "ResnetBlockBigGANpp":
            for j, t in (("GroupNorm_0", "norm0"), ("GroupNorm_1", "norm1")):
                sd[f"{pre}.{t}.weight"] = get(f"{jax_name}/{j}/scale")
                sd[f"{pre}.{t}.bias"] = get(f"{jax_name}/{j}/bias")
            sd[f"{pre}.emb.weight"] = _dense(get(f"{jax_name}/Dense_0/kernel"))
            sd[f"{pre}.emb.bias"] = get(f"{jax_name}/Dense_0/bias")
            convs = [("Conv_0", "conv0"), ("Conv_1", "conv1")]
            node = params.get(jax_name, {})
            if isinstance(node, dict) and "Conv_2" in node:
                convs.append(("Conv_2", "skip"))
            for j, t in convs:
                sd[f"{pre}.{t}.weight"] = _conv(get(f"{jax_name}/{j}/kernel"))
                sd[f"{pre}.{t}.bias"] = get(f"{jax_name}/{j}/bias")
        elif kind == "AttnBlockpp":
            sd[f"{pre}.norm.weight"] = get(f"{jax_name}/GroupNorm_0/scale")
            sd[f"{pre}.norm.bias"] = get(f"{jax_name}/GroupNorm_0/bias")
            qkv = [get(f"{jax_name}/NIN_{i}/W") for i in range(3)]
            sd[f"{pre}.qkv.weight"] = np.concatenate([w.T for w in qkv])[:, :, None, None]
            sd[f"{pre}.qkv.bias"] = np.concatenate([get(f"{jax_name}/NIN_{i}/b") for i in range(3)])
            sd[f"{pre}.proj.weight"] = get(f"{jax_name}/NIN_3/W").T[:, :, None, None]
            sd[f"{pre}.proj.bias"] = get(f"{jax_name}/NIN_3/b")
    left = sorted(set(flat_names(params)) - used)
    if left:
        raise CMError(f"the JAX parameter tree has {len(left)} tensor(s) this NCSN++ config does not use, "
                      f"e.g. {left[0]} (another network or config?)")
    return sd


def flat_names(tree: dict, prefix: str = "") -> list[str]:
    """'A/B/leaf' names of the leaves of a nested dict."""
    names = []
    for k, v in tree.items():
        name = f"{prefix}{k}"
        names += flat_names(v, name + "/") if isinstance(v, dict) else [name]
    return names


def infer_config(params: dict, img_resolution: int = 32, attn_resolutions: tuple[int, ...] = (16,)):
    """NCSNppConfig from the tree's shapes: nf, ch_mult and blocks per level are read off the tree; the
    resolution and attention placement (not visible in the weights) default to CIFAR-10's 32 / (16,)."""
    try:
        nf = int(params["Conv_0"]["kernel"].shape[-1])
        in_ch = int(params["Conv_0"]["kernel"].shape[-2])
        out_ch = int(params["Conv_1"]["kernel"].shape[-1])
        levels = sum(1 for k in params if k.startswith("Downsample_")) + 1
        blocks = sum(1 for k in params if k.startswith("ResnetBlockBigGANpp_"))
        # encoder L*nb + (L-1) down, middle 2, decoder L*(nb+1) + (L-1) up
        nb, rem = divmod(blocks - 2 * (levels - 1) - 2 - levels, 2 * levels)
        mult = []
        for lv in range(levels):  # the first block of each encoder level has that level's width
            n = lv * (nb + 1)
            mult.append(int(params[f"ResnetBlockBigGANpp_{n}"]["Conv_0"]["kernel"].shape[-1]) // nf)
    except (KeyError, TypeError, AttributeError, IndexError) as e:
        raise CMError(f"the parameter tree is not the official NCSN++ (missing {e})") from None
    if rem or nb < 1:
        raise CMError(f"the parameter tree's {blocks} residual blocks do not fit NCSN++ with {levels} levels")
    # bounded before anything is built (the official CIFAR-10 tree: nf 128, mult (2, 2, 2), 4 blocks)
    if not (1 <= nf <= 4096 and 1 <= in_ch <= 64 and 1 <= out_ch <= 64 and levels <= 12 and nb <= 64
            and all(1 <= m <= 64 for m in mult)):
        raise CMError(f"the parameter tree's NCSN++ sizes are out of range (nf {nf}, channels "
                      f"{in_ch}/{out_ch}, mult {mult[:12]}, {nb} blocks per level)")
    try:
        return NCSNppConfig(img_resolution=img_resolution, in_channels=in_ch, out_channels=out_ch,
                            model_channels=nf, channel_mult=tuple(mult), num_blocks=nb,
                            attn_resolutions=tuple(attn_resolutions), fourier_scale=16.0)
    except ValueError as e:
        raise CMError(f"the parameter tree does not form an NCSN++ network: {e}") from None


# --------------------------------------------------------------------------------------------------------
# Kind, config, export dict
# --------------------------------------------------------------------------------------------------------


def _path_word(path: str | Path, choices: tuple[str, ...]) -> str:
    """The first of `choices` that is a word of the file name or of a folder above it, the nearest name
    first (…/ct-runs/cd-lpips/checkpoints/checkpoint_80 says cd); '' if none (three folders are looked at)."""
    for part in reversed(Path(path).resolve().parts[-4:]):
        words = set(re.split(r"[^a-z0-9]+", part.lower()))
        found = [c for c in choices if c in words]
        if found:
            return found[0]
    return ""


def detect_kind(state: dict, path: str | Path) -> tuple[str, str]:
    """(kind, why). A target network -> ct; else the file / folder names (edm, ct, cd); else the EMA rate
    (the EDM teacher's half-life rate vs the students' 0.9999)."""
    if "target_params" in state:
        return "ct", "it has target_params (StateWithTarget, a CT run)"
    word = _path_word(path, KINDS)
    if word:
        return word, f"its path says {word}"
    rate = state.get("ema_rate")
    if isinstance(rate, (int, float, np.floating)) and abs(float(rate) - TEACHER_EMA_RATE) < 1e-9:
        return "edm", "its EMA rate is the EDM teacher's"
    return "cd", "default: a CM student (pass --kind to override)"


def _metric_from_path(path: str | Path) -> str:
    return _path_word(path, ("lpips", "l2", "l1")) or "lpips"


def run_config(kind: str, net, ema_rate: float, path: str | Path = ""):
    """The full/ RunConfig of a converted checkpoint: the cifar10 preset of its kind, with its network."""
    metric = _metric_from_path(path) if kind != "edm" else "lpips"
    preset = {"edm": "cifar10-edm", "ct": "cifar10-ct", "cd": f"cifar10-cd-{metric}"}[kind]
    cfg = get_preset(preset)
    cm = dataclasses.replace(cfg.cm, metric=metric) if kind != "edm" else cfg.cm
    # The JAX runs: t in [0.002, 80], σ_data 0.5, ρ 7, c_noise = ln(t)/4.
    cm = dataclasses.replace(cm, sigma_min=0.002, sigma_max=80.0, sigma_data=0.5, rho=7.0, noise_cond="edm")
    net = dataclasses.replace(net, dropout=cfg.net.dropout)
    ema = dataclasses.replace(cfg.ema, rates=(ema_rate,), eval_rate=ema_rate)
    return dataclasses.replace(cfg, net=net, cm=cm, ema=ema)


def import_flax(path: str | Path, kind: str = "", img_resolution: int = 32,
                attn_resolutions: tuple[int, ...] = (16,)) -> dict:
    """A released CIFAR-10 Flax checkpoint (file or folder) as a full/ export dict (in memory)."""
    file = find_checkpoint(path)
    state = read_flax(file, keep=("step", "ema_rate", "params_ema"))  # the rest is skipped
    params = state.get("params_ema")
    if isinstance(params, dict) and set(params) == {"params"}:  # a tree saved with its variables level
        params = params["params"]
    if not isinstance(params, dict) or not params:
        raise CMError(f"{file} is a msgpack file without params_ema: not a consistency_models_cifar10 State")
    if kind and kind not in KINDS:
        raise CMError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    why = "given"
    if not kind:
        kind, why = detect_kind(state, file)
    net = infer_config(params, img_resolution, attn_resolutions)
    step, rate = _number(state, "step", 0, file), _number(state, "ema_rate", 0.9999, file)
    if isinstance(step, float) or not 0 <= step < 2 ** 63:
        raise CMError(f"{file}: step {step} is not an integer >= 0")
    if not 0 <= rate < 1:
        raise CMError(f"{file}: ema_rate {rate} is not a number in [0, 1)")
    cfg = run_config(kind, net, float(rate), file)
    sd = {f"net.{k}": v for k, v in convert_params(params, net).items()}  # ConsistencyFunction.net
    return export_dict(cfg, {float(rate): sd}, step,
                       {"format": "flax-msgpack", "source": str(file), "kind": kind, "kind_from": why,
                        "params": "params_ema"})


def _number(state: dict, key: str, default, file) -> int | float:
    """A real, finite number of the state (a msgpack number or a numpy scalar record); absent -> default."""
    v = state.get(key, default)
    if isinstance(v, np.ndarray) and v.shape == ():
        v = v[()]
    if isinstance(v, np.generic) and v.dtype.kind in "iuf":
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise CMError(f"{file}: {key} is {str(v)[:40]!r}, not a finite real number")
    return v


def read_checkpoint(path: Path, obj, arch: str = "", kind: str = "") -> dict | None:
    """checkpoints.import_official's reader: an export dict for a Flax msgpack file, else None."""
    if obj is not None or not is_flax(path):
        return None
    if arch and arch not in ("ncsnpp", "cifar10"):
        raise CMError(f"{path} is a CIFAR-10 NCSN++ Flax checkpoint; --arch {arch} does not apply")
    state = import_flax(path, kind)
    info = state["official"]
    dist.print0(f"{Path(path).name}: Flax checkpoint of openai/consistency_models_cifar10, params_ema, kind "
                f"{info['kind']} ({info['kind_from']}) -> preset {state['config']['preset']}")
    return state
