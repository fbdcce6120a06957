"""EDM's released .pkl denoisers (NVlabs/edm) as full/ export dicts, read without running anything they carry.

    python -m full.sample --checkpoint edm-cifar10-32x32-uncond-ve.pkl --sampler heun --steps 18
    python -m full.train --preset cifar10-cd-lpips run.teacher=edm-cifar10-32x32-uncond-ve.pkl

An EDM snapshot is `pickle.dump(dict(ema=net, loss_fn=..., augment_pipe=..., dataset_kwargs=...))`. Every
network object in it is written by EDM's `torch_utils.persistence`: unpickling would call
`_reconstruct_persistent_obj(meta)`, which executes `meta["module_src"]` (the Python source of the module
that defined the class) and rebuilds the object from `meta["state"]` (its `__dict__`: `_init_kwargs`,
`_parameters`, `_buffers`, `_modules`, ...). Here a restricted unpickler resolves only these globals:
    torch._utils._rebuild_tensor_v2 / _rebuild_parameter(_with_state), torch.storage._load_from_bytes
        (the inner bytes are read by torch.load(weights_only=True)),
    collections.OrderedDict, builtins.set / frozenset, dnnlib.util.EasyDict (as a dict),
    torch.nn.modules.container.ModuleDict / ModuleList / Sequential (as inert records of their state),
    torch_utils.persistence._reconstruct_persistent_obj (as an inert record: class name + state; the
        source code is never compiled),
    numpy.dtype and numpy.core.multiarray.scalar / numpy._core.multiarray.scalar (numpy 1.x / 2.x): the
        numpy scalars in every real snapshot (SongUNet passes skip_scale=np.sqrt(0.5) into each block's
        init kwargs). Only real numeric dtypes (bool, int, uint, float); the value is rebuilt here from
        the record's bytes as a Python number, nothing the file names is called.
Any other global (os.system, builtins.exec, posix.system, numpy.load, numpy.frompyfunc, ...) stops the
read with one line, before it is called. The tensors are then pulled out of the record tree by module
path (`model.enc.32x32_conv.weight`).

Everything read is then checked as data before anything is built: the type of every field used, the
record tree's depth and cycles, the network's sizes (bounded before any name or module is made, and its
widths equal to those of the file's own tensors), every tensor's dtype and storage, finite weights and
preconditioning constants. A failure is one line (CMError).

Network. EDM's SongUNet in its NCSN++ and DDPM++ configurations is full/'s NCSNpp (networks.py) with these
names (R = resolution of level l of L, B blocks per level; a SongUNet block with attention holds both the
residual block and the attention that follows it: norm2 / qkv / proj):
    map_noise.freqs -> fourier.freqs         map_layer0 / map_layer1 -> emb0 / emb1
    enc.RxR_conv -> conv_in                  enc.RxR_block{i} -> down.l.blocks.i (+ down.l.attns.i)
    enc.RxR_down -> down.(l-1).downsample    enc.RxR_aux_residual -> down.(l-1).pyramid.conv
    dec.RxR_in0 / _in1 (l = L-1) -> mid.block0 + mid.attn / mid.block1
    dec.RxR_block{i} -> up.(L-1-l).blocks.i (block B: + up.(L-1-l).attn)
    dec.RxR_up -> up.(L-2-l).upsample        dec.RxR_aux_norm / _aux_conv -> norm_out / conv_out
    UNetBlock: norm0 conv0 affine->emb norm1 conv1 skip; norm2->attn.norm qkv->attn.qkv proj->attn.proj
The qkv channels are ordered (channel, three) in EDM (`reshape(N, C, 3, -1)`) and (three, channel) in full/,
so qkv rows are permuted. The FIR filters that EDM stores as buffers (`resample_filter`) are checked against
the configuration's filter and dropped; `map_augment` (augmentation labels, unused when sampling) is dropped.

Preconditioning [EDM Tab. 1, training/networks.py], kept exactly for the teacher (a CD teacher is any
denoiser D(x, σ); only the student uses CM's scalings):
    VEPrecond   D = x + σ F(x, ln(σ/2))
    VPPrecond   D = x - σ F(x / √(σ²+1), (M-1) σ⁻¹(σ)),  σ⁻¹(σ) = (√(β_min² + 2 β_d ln(1+σ²)) - β_min) / β_d
    EDMPrecond  D = c_skip x + c_out F(c_in x, ln(σ)/4) with σ_data (cm.boundary_scalings with ε = 0)
EDM's sampler clamps its σ range to the network's: [max(0.002, net.sigma_min), min(80, net.sigma_max)];
the imported config's cm.sigma_min / sigma_max are set that way (VE: 0.02 .. 80).
"""
from __future__ import annotations

import collections
import dataclasses
import io
import math
import pickle
from pathlib import Path

import torch
from torch import Tensor, nn

from cm import NOISE_CONDITIONING, CMError, append_dims, boundary_scalings
from full import dist
from full.config import export_dict
from full.networks import NCSNppConfig, fir_kernel
from full.presets import get_preset

PRECONDS = ("VEPrecond", "VPPrecond", "EDMPrecond")

# ----------------------------------------------------------------------------------------------
# The restricted unpickler


class Record:
    """An inert stand-in for a persistent object or a torch container: its class name and its state."""

    class_name = ""

    def __init__(self, class_name: str, state: dict | None = None):
        self.class_name, self.state = class_name, state or {}

    def __setstate__(self, state):  # BUILD after NEWOBJ (torch containers)
        self.state = state if isinstance(state, dict) else {}


def _container(name: str):
    # NEWOBJ makes it without calling __init__: the class name lives on the class, the state comes by BUILD
    return type(name, (Record,), {"class_name": name, "state": {},
                                  "__init__": lambda self: Record.__init__(self, name)})


# numpy's scalar records: numpy.dtype(name, align, copy) + BUILD(state), then scalar(dtype, bytes)
_NUMERIC = {f"{k}{n}" for k, sizes in (("i", (1, 2, 4, 8)), ("u", (1, 2, 4, 8)), ("f", (2, 4, 8)))
            for n in sizes} | {"b1"}


class _DType:
    """An inert stand-in for numpy.dtype(name, ...): a real numeric dtype name and its byte order."""

    def __init__(self, name, align=False, copy=True, *rest):
        if not isinstance(name, str) or name not in _NUMERIC or rest:
            raise CMError(f"refused: the pickle holds a numpy dtype {str(name)[:20]!r}, not a real numeric "
                          "one (nothing was run)")
        self.name, self.order = name, "="

    def __setstate__(self, state):  # numpy's dtype state: (3, byte order, None, None, None, -1, -1, 0)
        ok = isinstance(state, tuple) and len(state) == 8 and state[0] == 3 and state[1] in "<>|=" \
            and state[1] != "" and state[2:5] == (None, None, None) and state[5:] == (-1, -1, 0)
        if not ok:
            raise CMError("refused: a numpy dtype record with fields, a subarray or flags; only plain "
                          "numeric scalars are read (nothing was run)")
        self.order = state[1]

    def numpy(self):
        import numpy as np
        return np.dtype((self.order if self.order in "<>" else "=") + self.name)


def _numpy_scalar(dtype, data=None):
    """numpy.core.multiarray.scalar(dtype, bytes): the value, rebuilt from its bytes as a Python number."""
    import numpy as np
    if not isinstance(dtype, _DType) or not isinstance(data, bytes):
        raise CMError("refused: a numpy scalar record that is not a numeric dtype and its bytes "
                      "(nothing was run)")
    dt = dtype.numpy()
    if len(data) != dt.itemsize:
        raise CMError(f"refused: a numpy {dt} scalar record holds {len(data)} bytes, not {dt.itemsize}")
    return np.frombuffer(data, dtype=dt)[0].item()


class _EasyDict(dict):
    def __setstate__(self, state):
        pass


def _reconstruct_persistent_obj(meta) -> Record:
    """Stands in for persistence._reconstruct_persistent_obj: keeps the class name and state, runs nothing."""
    if not isinstance(meta, dict) or meta.get("type") != "class" or not isinstance(meta.get("state"), dict) \
            or not isinstance(meta.get("class_name"), str):
        raise pickle.UnpicklingError("a persistence record without type 'class', a class name and a state "
                                     "dict")
    return Record(meta["class_name"][:200], dict(meta["state"]))


def _storage_from_bytes(data: bytes):
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _parameter(data, *args):
    return data


ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _parameter,
    ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("dnnlib.util", "EasyDict"): _EasyDict,
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
    **{("torch.nn.modules.container", n): _container(n) for n in ("ModuleDict", "ModuleList", "Sequential")},
    ("numpy", "dtype"): _DType,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
}


class RestrictedUnpickler(pickle._Unpickler):
    """Python's unpickler whose globals are only ALLOWED (anything else raises before it is called), and
    whose BUILD (setting an object's state) only touches inert Records and dicts, never a class or
    function."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def load_build(self):
        target = self.stack[-2] if len(self.stack) > 1 else None
        if not isinstance(target, (Record, _EasyDict, _DType)):
            raise CMError(f"refused: the pickle sets the state of a {type(target).__name__}, not of a "
                          "module record (nothing was run)")
        super().load_build()

    dispatch[pickle.BUILD[0]] = load_build

    def find_class(self, module: str, name: str):
        if (module, name) not in ALLOWED:
            raise CMError(f"refused: the pickle names {module}.{name}, which is not a tensor, a plain "
                          "container or an EDM persistence record (nothing was run)")
        return ALLOWED[(module, name)]

    def persistent_load(self, pid):
        raise CMError("refused: the pickle uses persistent ids (not an EDM snapshot; nothing was run)")


def load_pickle(path: str | Path):
    """The pickle's object tree with Records in place of every persistent object (never executes code)."""
    with open(path, "rb") as fh:
        try:
            return RestrictedUnpickler(fh).load()
        except CMError as e:
            raise CMError(f"{path}: {e}") from None
        except Exception as e:  # truncated, corrupt, wrong opcodes
            raise CMError(f"cannot read {path} as an EDM pickle: {type(e).__name__}: "
                          f"{str(e).splitlines()[0][:100] if str(e) else ''}") from None


MAX_DEPTH = 64  # module nesting of a record tree (SongUNet's is 4: precond > model > enc > block > conv)


def _state(node: Record, what: str) -> dict:
    if not isinstance(node.state, dict):
        raise CMError(f"the {what} record's state is a {type(node.state).__name__}, not a dict")
    return node.state


def _group(state: dict, group: str, what: str) -> dict:
    """state[group] (`_parameters`, `_buffers`, `_modules`) as a dict with str keys; absent or None -> {}."""
    v = state.get(group)
    if v is None:
        return {}
    if not isinstance(v, dict) or not all(isinstance(k, str) for k in v):
        raise CMError(f"{what}.{group} is a {type(v).__name__}, not a dict of names")
    return v


def tensors(node: Record, prefix: str = "") -> dict[str, Tensor]:
    """Parameters and buffers of a Record tree by module path (None entries skipped), like state_dict().

    Walked without recursion; a tree deeper than MAX_DEPTH, or one that contains itself, -> CMError."""
    out, on_path, stack = {}, set(), [(node, prefix, 0, False)]
    while stack:
        rec, pre, depth, leaving = stack.pop()
        if leaving:
            on_path.discard(id(rec))
            continue
        what = pre[:-1] or "the network"
        if id(rec) in on_path:
            raise CMError(f"the module tree contains itself at {what} (a cyclic pickle)")
        if depth > MAX_DEPTH:
            raise CMError(f"the module tree is nested deeper than {MAX_DEPTH} levels at {what[:80]}...")
        st = _state(rec, what)
        for group in ("_parameters", "_buffers"):
            for k, v in _group(st, group, what).items():
                if v is not None and not isinstance(v, Tensor):
                    raise CMError(f"{pre}{k} is a {type(v).__name__}, not a tensor")
                if v is not None:
                    out[pre + k] = v
        on_path.add(id(rec))
        stack.append((rec, pre, depth, True))
        for k, child in reversed(list(_group(st, "_modules", what).items())):
            if child is not None and not isinstance(child, Record):
                raise CMError(f"{pre}{k} is a {type(child).__name__}, not a module record")
            if child is not None:
                stack.append((child, f"{pre}{k}.", depth + 1, False))
    return out


def check_tensor(name: str, v: Tensor) -> None:
    """A dense floating-point tensor whose strides fit its storage (no view larger than the bytes the
    file holds) and whose values are finite."""
    if not v.is_floating_point() or v.layout != torch.strided:
        raise CMError(f"{name} is a {v.dtype} {v.layout} tensor, not a dense floating-point one")
    if v.numel():
        end = v.storage_offset() + sum((n - 1) * abs(st) for n, st in zip(v.shape, v.stride())) + 1
        if min(v.stride(), default=1) < 1 or end * v.element_size() > v.untyped_storage().nbytes():
            raise CMError(f"{name}'s strides do not fit its storage (a tampered tensor record)")
    if not torch.isfinite(v).all():
        raise CMError(f"{name} holds NaN or infinite values")


def check_widths(found: dict[str, Tensor], cfg: NCSNppConfig, prefix: str = "") -> None:
    """The widths the settings declare (input, output, nf x channel_mult per level, noise features,
    classes) against the shapes of the file's own tensors, before anything is built: the network later
    built is then no larger than what the file holds (every other shape: checkpoints.load_weights)."""
    img, nf, mult = cfg.img_resolution, cfg.model_channels, cfg.channel_mult
    noise = nf if cfg.embedding == "positional" else 2 * nf
    want = {f"enc.{img}x{img}_conv.weight": (nf, cfg.in_channels, 3, 3),
            f"dec.{img}x{img}_aux_conv.weight": (cfg.out_channels, nf * mult[0], 3, 3),
            "map_layer0.weight": (4 * nf, noise)}
    for lv, m in enumerate(mult):
        r = img >> lv
        want[f"enc.{r}x{r}_block{cfg.num_blocks - 1}.conv1.weight"] = (nf * m, nf * m, 3, 3)
    if cfg.num_classes:
        want["map_label.weight"] = (noise, cfg.num_classes)
    for k, shape in want.items():
        v = found.get(prefix + k)
        if v is None:
            raise CMError(f"no tensor {prefix}{k} for this SongUNet configuration")
        if tuple(v.shape) != shape:
            raise CMError(f"{prefix}{k} has shape {list(v.shape)}, the SongUNet settings say {list(shape)}")


# ----------------------------------------------------------------------------------------------
# SongUNet <-> full/ NCSNpp names


# Bounds on the settings, checked before any name or module is made (EDM's largest SongUNet: 256 channels,
# mult (1, 2, 2, 2), 4 blocks; these leave room and keep a tampered file from building millions of modules).
BOUNDS = dict(img_resolution=(1, 4096), in_channels=(1, 64), out_channels=(1, 64), model_channels=(1, 4096),
              num_blocks=(1, 64), label_dim=(0, 100_000), augment_dim=(0, 1024), channel_mult_emb=(1, 64),
              channel_mult_noise=(1, 64))


def _int(v, name: str, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise CMError(f"SongUNet setting {name}={str(v)[:40]} is not an integer in [{lo}, {hi}]")
    return v


def _ints(v, name: str, lo: int, hi: int, most: int) -> tuple[int, ...]:
    if not isinstance(v, (list, tuple)) or len(v) > most:
        raise CMError(f"SongUNet setting {name} is not a list of at most {most} integers")
    return tuple(_int(x, f"{name}[{i}]", lo, hi) for i, x in enumerate(v))


def config_from_kwargs(kw: dict, dropout: float | None = None) -> NCSNppConfig:
    """NCSNppConfig from SongUNet's init kwargs (EDM defaults filled in); unsupported settings, a wrong type
    or a size out of BOUNDS -> CMError."""
    if not isinstance(kw, dict) or not all(isinstance(k, str) for k in kw):
        raise CMError(f"SongUNet's init kwargs are a {type(kw).__name__}, not a dict of settings")
    g = {"label_dim": 0, "augment_dim": 0, "model_channels": 128, "channel_mult": [1, 2, 2, 2],
         "channel_mult_emb": 4, "num_blocks": 4, "attn_resolutions": [16], "dropout": 0.10,
         "embedding_type": "positional", "channel_mult_noise": 1, "encoder_type": "standard",
         "decoder_type": "standard", "resample_filter": [1, 1], **kw}
    for k in ("img_resolution", "in_channels", "out_channels"):
        if k not in g:
            raise CMError(f"SongUNet's init kwargs have no {k}")
    n = {k: _int(g[k], k, *b) for k, b in BOUNDS.items()}
    mult = _ints(g["channel_mult"], "channel_mult", 1, 64, 12)
    attn = _ints(g["attn_resolutions"], "attn_resolutions", 1, 4096, 16)
    fir = _ints(g["resample_filter"], "resample_filter", -1000, 1000, 16)
    p = g["dropout"]
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
        raise CMError(f"SongUNet setting dropout={str(p)[:40]} is not a number in [0, 1]")
    for k in ("embedding_type", "encoder_type", "decoder_type"):
        if not isinstance(g[k], str):
            raise CMError(f"SongUNet setting {k} is a {type(g[k]).__name__}, not a name")
    emb_ok = (g["embedding_type"], n["channel_mult_noise"]) in (("fourier", 2), ("positional", 1))
    if n["channel_mult_emb"] != 4 or not emb_ok or g["encoder_type"] not in ("residual", "standard") \
            or g["decoder_type"] != "standard":
        raise CMError("this SongUNet configuration is neither NCSN++ nor DDPM++ (embedding "
                      f"{g['embedding_type'][:20]} x{n['channel_mult_noise']}, "
                      f"encoder {g['encoder_type'][:20]}, "
                      f"decoder {g['decoder_type'][:20]}, channel_mult_emb {n['channel_mult_emb']})")
    if not mult or sum(fir) == 0:
        raise CMError("SongUNet settings with no level (channel_mult) or a resample_filter summing to 0")
    try:
        return NCSNppConfig(
            img_resolution=n["img_resolution"], in_channels=n["in_channels"], out_channels=n["out_channels"],
            model_channels=n["model_channels"], channel_mult=mult, num_blocks=n["num_blocks"],
            attn_resolutions=attn, dropout=float(p if dropout is None else dropout), resample_filter=fir,
            num_classes=n["label_dim"], embedding=g["embedding_type"], encoder=g["encoder_type"],
            label_input=True)
    except (KeyError, AssertionError, TypeError, ValueError, CMError) as e:
        raise CMError(f"the SongUNet settings do not form an NCSN++ network: {type(e).__name__} {e}") \
            from None


def name_map(cfg: NCSNppConfig) -> list[tuple[str, str]]:
    """(EDM module prefix, full/ module prefix) pairs; attention parts of EDM blocks map separately."""
    L, B, img = len(cfg.channel_mult), cfg.num_blocks, cfg.img_resolution
    pairs = [("map_noise", "fourier"), ("map_layer0", "emb0"), ("map_layer1", "emb1"),
             (f"enc.{img}x{img}_conv", "conv_in")]
    if cfg.num_classes:
        pairs.append(("map_label", "label_emb"))
    attn = []

    def block(edm: str, ours: str, attn_to: str | None = None):
        for p in ("norm0", "conv0", "norm1", "conv1", "skip"):
            pairs.append((f"{edm}.{p}", f"{ours}.{p}"))
        pairs.append((f"{edm}.affine", f"{ours}.emb"))
        if attn_to:
            attn.append((edm, attn_to))

    for lv in range(L):
        r = f"{img >> lv}x{img >> lv}"
        if lv > 0:
            block(f"enc.{r}_down", f"down.{lv - 1}.downsample")
            if cfg.encoder == "residual":
                pairs.append((f"enc.{r}_aux_residual", f"down.{lv - 1}.pyramid.conv"))
        for i in range(B):
            has = (img >> lv) in cfg.attn_resolutions
            block(f"enc.{r}_block{i}", f"down.{lv}.blocks.{i}", f"down.{lv}.attns.{i}" if has else None)
    for lv in reversed(range(L)):
        r, k = f"{img >> lv}x{img >> lv}", L - 1 - lv
        if lv == L - 1:
            block(f"dec.{r}_in0", "mid.block0", "mid.attn")
            block(f"dec.{r}_in1", "mid.block1")
        else:
            block(f"dec.{r}_up", f"up.{k - 1}.upsample")
        for i in range(B + 1):
            has = i == B and (img >> lv) in cfg.attn_resolutions
            block(f"dec.{r}_block{i}", f"up.{k}.blocks.{i}", f"up.{k}.attn" if has else None)
    pairs += [(f"dec.{img}x{img}_aux_norm", "norm_out"), (f"dec.{img}x{img}_aux_conv", "conv_out")]
    pairs += [(f"{e}.{p}", f"{o}.{q}") for e, o in attn for p, q in (("norm2", "norm"), ("qkv", "qkv"),
                                                                     ("proj", "proj"))]
    return pairs


def _qkv(w: Tensor, to_full: bool) -> Tensor:
    """Permute qkv rows: EDM (channel, three) <-> full/ (three, channel), single head."""
    C = w.shape[0] // 3
    shape = (C, 3) if to_full else (3, C)
    return w.reshape(*shape, *w.shape[1:]).transpose(0, 1).reshape(w.shape).contiguous()


def from_edm(sd: dict[str, Tensor], cfg: NCSNppConfig, prefix: str = "") -> dict[str, Tensor]:
    """EDM SongUNet tensors (keys under `prefix`) -> full/ NCSNpp state dict; strict, FIR buffers checked."""
    sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    out, used = {}, set()
    for edm, ours in name_map(cfg):
        for leaf in ("weight", "bias", "freqs"):
            key = f"{edm}.{leaf}"
            if key in sd:
                v = sd[key]
                if edm.endswith(".qkv") and (v.ndim < 1 or v.shape[0] % 3):
                    raise CMError(f"{prefix}{key} has shape {list(v.shape)}, not 3 x channels rows")
                out[f"{ours}.{leaf}"] = _qkv(v, True) if edm.endswith(".qkv") else v
                used.add(key)
        if f"{edm}.resample_filter" in sd:
            used.add(f"{edm}.resample_filter")
            f, k = sd[f"{edm}.resample_filter"], len(cfg.resample_filter)
            if tuple(f.shape) != (1, 1, k, k) or \
                    not torch.allclose(f.reshape(k, k).float(), fir_kernel(cfg.resample_filter)):
                raise CMError(f"{prefix}{edm}.resample_filter is not the FIR filter {cfg.resample_filter}")
    extra = [k for k in sd if k not in used and not k.startswith("map_augment.")]
    if extra:
        raise CMError(f"unexpected tensor {prefix}{extra[0]} for this SongUNet configuration")
    return out


def to_edm(sd: dict[str, Tensor], cfg: NCSNppConfig, prefix: str = "") -> dict[str, Tensor]:
    """full/ NCSNpp state dict -> EDM SongUNet tensor names (with EDM's FIR filter buffers)."""
    out = {}
    fir = fir_kernel(cfg.resample_filter)[None, None]
    for edm, ours in name_map(cfg):
        for leaf in ("weight", "bias", "freqs"):
            v = sd.get(f"{ours}.{leaf}")
            if v is not None:
                out[f"{prefix}{edm}.{leaf}"] = _qkv(v, False) if edm.endswith(".qkv") else v
        resampled = ("_down" in edm or "_up" in edm) and edm.rsplit(".", 1)[-1] in ("conv0", "skip")
        if resampled or edm.endswith("_aux_residual"):
            out[f"{prefix}{edm}.resample_filter"] = fir.clone()
    return out


# ----------------------------------------------------------------------------------------------
# The teacher: EDM's own preconditioning around full/'s network


class EDMDenoiser(nn.Module):
    """D(x, σ) with the preconditioning class the pickle records (VEPrecond, VPPrecond or EDMPrecond)."""

    def __init__(self, net: nn.Module, precond: str, sigma_data: float = 0.5, beta_d: float = 19.9,
                 beta_min: float = 0.1, M: int = 1000):
        super().__init__()
        if precond not in PRECONDS:
            raise CMError(f"unsupported preconditioning {precond}; one of {', '.join(PRECONDS)}")
        self.net, self.precond = net, precond
        self.sigma_data, self.beta_d, self.beta_min, self.M = sigma_data, beta_d, beta_min, M

    def scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """c_skip, c_out, c_in, c_noise of EDM's training/networks.py for this class."""
        one = torch.ones_like(sigma)
        if self.precond == "VEPrecond":
            return one, sigma, one, (0.5 * sigma).log()
        if self.precond == "VPPrecond":
            b_min, b_d = self.beta_min, self.beta_d
            t = ((b_min ** 2 + 2 * b_d * (1 + sigma ** 2).log()).sqrt() - b_min) / b_d  # σ⁻¹(σ)
            return one, -sigma, 1 / (sigma ** 2 + 1).sqrt(), (self.M - 1) * t
        c_skip, c_out, c_in = boundary_scalings(sigma, self.sigma_data, 0.0)
        return c_skip, c_out, c_in, NOISE_CONDITIONING["edm"](sigma)

    def forward(self, x: Tensor, sigma: Tensor | float, class_labels: Tensor | None = None) -> Tensor:
        x = x if x.dtype == torch.float64 else x.float()
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(x.shape[0])
        c_skip, c_out, c_in, c_noise = self.scalings(sigma)
        F_x = self.net(append_dims(c_in, x.ndim) * x, c_noise, class_labels)
        return append_dims(c_skip, x.ndim) * x + append_dims(c_out, x.ndim) * F_x.to(x.dtype)


def precond_of(state: dict) -> dict:
    """The export dict's recorded preconditioning (class name and constants)."""
    return state["official"]["precond"]


def denoiser_from_state(state: dict, net: nn.Module) -> EDMDenoiser:
    p = precond_of(state)
    return EDMDenoiser(net, p["class"], p.get("sigma_data", 0.5), p.get("beta_d", 19.9),
                       p.get("beta_min", 0.1), p.get("M", 1000))


def _num(st: dict, key: str, default: float, lo: float, hi: float, what: str, lo_open: bool = False,
         inf_ok: bool = False) -> float:
    """A preconditioning constant: a finite real number (not NaN, not inf) in [lo, hi] ((lo, hi] when
    lo_open), else CMError. inf_ok lets +inf through where hi is inf and inf is what EDM itself stores
    (EDMPrecond's sigma_max, no upper bound); an int too large for a float is refused."""
    v = st.get(key, default)
    try:
        x = float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan
    except OverflowError:
        x = math.nan
    if not (lo <= x <= hi) or (lo_open and x == lo) or \
            not (math.isfinite(x) or (inf_ok and x == hi == math.inf)):
        finite = "" if inf_ok else "finite "
        raise CMError(f"{what}.{key}={str(v)[:40]} is not a {finite}number in "
                      f"{'(' if lo_open else '['}{lo:g}, {hi:g}]")
    return x


def check_precond(p) -> None:
    """The preconditioning an export dict records (precond_constants' first result, read back from a
    file): a known class and constants in the ranges precond_constants allows; else CMError."""
    if not isinstance(p, dict) or p.get("class") not in PRECONDS:
        raise CMError(f"its recorded preconditioning is not one of {', '.join(PRECONDS)}")
    _num(p, "sigma_data", 0.5, 0.0, 1e3, "precond", lo_open=True)
    _num(p, "beta_d", 19.9, 0.0, 100.0, "precond", lo_open=True)
    _num(p, "beta_min", 0.1, 0.0, 100.0, "precond")
    M = p.get("M", 1000)
    if isinstance(M, bool) or not isinstance(M, int) or not 1 < M <= 10 ** 6:
        raise CMError(f"precond.M={str(M)[:40]} is not an integer in [2, 1000000]")


def precond_constants(name: str, st: dict) -> tuple[dict, float, float]:
    """The recorded constants of the preconditioning class, checked, and the network's supported
    [sigma_min, sigma_max] as EDM's classes compute them."""
    inf = float("inf")
    c = {"class": name, "sigma_data": 0.5, "beta_d": 19.9, "beta_min": 0.1, "M": 1000}
    if name == "VEPrecond":
        lo = _num(st, "sigma_min", 0.02, 0.0, 1e6, name, lo_open=True)
        hi = _num(st, "sigma_max", 100.0, 0.0, 1e6, name, lo_open=True)
    elif name == "VPPrecond":
        b_d = _num(st, "beta_d", 19.9, 0.0, 100.0, name, lo_open=True)
        b_min = _num(st, "beta_min", 0.1, 0.0, 100.0, name)
        eps_t = _num(st, "epsilon_t", 1e-5, 0.0, 1.0, name, lo_open=True)
        M = st.get("M", 1000)
        if isinstance(M, bool) or not isinstance(M, int) or not 1 < M <= 10 ** 6:
            raise CMError(f"{name}.M={str(M)[:40]} is not an integer in [2, 1000000]")
        sig = lambda t: math.sqrt(math.expm1(0.5 * b_d * t ** 2 + b_min * t))  # noqa: E731
        lo, hi = sig(eps_t), sig(1.0)
        c.update(beta_d=b_d, beta_min=b_min, M=M)
    else:
        c["sigma_data"] = _num(st, "sigma_data", 0.5, 0.0, 1e3, name, lo_open=True)
        lo = _num(st, "sigma_min", 0.0, 0.0, 1e6, name)
        hi = _num(st, "sigma_max", inf, 0.0, inf, name, lo_open=True, inf_ok=True)  # EDM's default: inf
    if not max(0.002, lo) < min(80.0, hi):
        raise CMError(f"{name}'s sigma range {lo:g}..{hi:g} leaves nothing of EDM's sampling range 0.002..80")
    return c, lo, hi


def read_pickle(path: Path, obj, arch: str = "", kind: str = "") -> dict | None:
    """checkpoints.import_official's reader for EDM .pkl snapshots: an export dict; None if not a pickle.

    Every field used is checked as data first (types, depth, cycles, sizes, shapes, finite values): a
    tampered or foreign file is one line, and nothing is built before its sizes are known to be bounded."""
    if obj is not None:
        return None
    with open(path, "rb") as fh:
        head = fh.read(2)
    if head[:1] != b"\x80" or head[1:2] not in (b"\x02", b"\x03", b"\x04", b"\x05"):  # pickle protocol 2-5
        return None
    if kind not in ("", "edm"):
        raise CMError(f"{path}: an EDM pickle is a denoiser (kind edm), not {kind}")
    if arch:  # its network is pickled with it
        raise CMError(f"--arch applies to a guided-diffusion .pt; {path} is an EDM pickle, which names its "
                      "own network")
    data = load_pickle(path)
    try:
        return _export(path, data)
    except CMError as e:
        raise CMError(f"{path}: {e}") from None


def _export(path: Path, data) -> dict:
    ema = data.get("ema") if isinstance(data, dict) else None
    if not isinstance(ema, Record) or ema.class_name not in PRECONDS:
        found = ema.class_name if isinstance(ema, Record) else type(ema).__name__
        raise CMError(f"not an EDM snapshot with an 'ema' network of {', '.join(PRECONDS)} "
                      f"(found {found[:40]})")
    st = _state(ema, ema.class_name)
    model = _group(st, "_modules", ema.class_name).get("model")
    if not isinstance(model, Record) or model.class_name != "SongUNet":
        raise CMError(f"the denoiser's network is {getattr(model, 'class_name', type(model).__name__)[:40]}, "
                      "only SongUNet (NCSN++, DDPM++) is supported")
    net_cfg = config_from_kwargs(_state(model, "SongUNet").get("_init_kwargs"), dropout=0.0)
    precond, lo, hi = precond_constants(ema.class_name, st)
    found = tensors(ema)
    for k, v in found.items():
        check_tensor(k, v)
    check_widths(found, net_cfg, "model.")
    weights = from_edm(found, net_cfg, "model.")
    base = get_preset("cifar10-edm")
    res = net_cfg.img_resolution
    name = "cifar10" if (res, net_cfg.in_channels) == (32, 3) else base.data.name
    cfg = dataclasses.replace(
        base, net=net_cfg,
        cm=dataclasses.replace(base.cm, mode="edm", sigma_min=max(0.002, lo), sigma_max=min(80.0, hi)),
        data=dataclasses.replace(base.data, name=name, class_cond=bool(net_cfg.num_classes)),
        run=dataclasses.replace(base.run, grid_steps=18))
    dist.print0(f"{Path(path).name}: EDM pickle (read without running it); {ema.class_name} around SongUNet "
                f"({'NCSN++' if net_cfg.embedding == 'fourier' else 'DDPM++'}, {len(weights)} tensors), "
                f"kind edm (a denoiser D; Heun sigma range {cfg.cm.sigma_min:g}..{cfg.cm.sigma_max:g})")
    return export_dict(cfg, {0.0: {f"net.{k}": v for k, v in weights.items()}}, 0,
                       {"source": "edm-pickle", "arch": "ncsnpp", "kind": "edm", "precond": precond})
