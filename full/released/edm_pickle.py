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
        source code is never compiled).
Any other global (os.system, builtins.exec, posix.system, ...) stops the read with one line, before it is
called. The tensors are then pulled out of the record tree by module path (`model.enc.32x32_conv.weight`).

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

    def __init__(self, class_name: str, state: dict | None = None):
        self.class_name, self.state = class_name, state or {}

    def __setstate__(self, state):  # BUILD after NEWOBJ (torch containers)
        self.state = state if isinstance(state, dict) else {}


def _container(name: str):
    return type(name, (Record,), {"__init__": lambda self: Record.__init__(self, name)})


class _EasyDict(dict):
    def __setstate__(self, state):
        pass


def _reconstruct_persistent_obj(meta) -> Record:
    """Stands in for persistence._reconstruct_persistent_obj: keeps the class name and state, runs nothing."""
    if not isinstance(meta, dict) or meta.get("type") != "class" or not isinstance(meta.get("state"), dict):
        raise pickle.UnpicklingError("a persistence record without type 'class' and a state dict")
    return Record(str(meta.get("class_name")), dict(meta["state"]))


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
}


class RestrictedUnpickler(pickle._Unpickler):
    """Python's unpickler whose globals are only ALLOWED (anything else raises before it is called), and
    whose BUILD (setting an object's state) only touches inert Records and dicts, never a class or
    function."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def load_build(self):
        target = self.stack[-2] if len(self.stack) > 1 else None
        if not isinstance(target, (Record, _EasyDict)):
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


def tensors(node: Record, prefix: str = "") -> dict[str, Tensor]:
    """Parameters and buffers of a Record tree by module path (None entries skipped), like state_dict()."""
    out = {}
    for group in ("_parameters", "_buffers"):
        for k, v in (node.state.get(group) or {}).items():
            if isinstance(v, Tensor):
                out[prefix + k] = v
    for k, child in (node.state.get("_modules") or {}).items():
        if isinstance(child, Record):
            out.update(tensors(child, f"{prefix}{k}."))
    return out


# ----------------------------------------------------------------------------------------------
# SongUNet <-> full/ NCSNpp names


def config_from_kwargs(kw: dict, dropout: float | None = None) -> NCSNppConfig:
    """NCSNppConfig from SongUNet's init kwargs (EDM defaults filled in); unsupported settings -> CMError."""
    g = {"label_dim": 0, "augment_dim": 0, "model_channels": 128, "channel_mult": [1, 2, 2, 2],
         "channel_mult_emb": 4, "num_blocks": 4, "attn_resolutions": [16], "dropout": 0.10,
         "embedding_type": "positional", "channel_mult_noise": 1, "encoder_type": "standard",
         "decoder_type": "standard", "resample_filter": [1, 1], **kw}
    emb_ok = (g["embedding_type"], g["channel_mult_noise"]) in (("fourier", 2), ("positional", 1))
    if g["channel_mult_emb"] != 4 or not emb_ok or g["encoder_type"] not in ("residual", "standard") \
            or g["decoder_type"] != "standard":
        raise CMError("this SongUNet configuration is neither NCSN++ nor DDPM++ (embedding "
                      f"{g['embedding_type']} x{g['channel_mult_noise']}, encoder {g['encoder_type']}, "
                      f"decoder {g['decoder_type']}, channel_mult_emb {g['channel_mult_emb']})")
    try:
        return NCSNppConfig(
            img_resolution=int(g["img_resolution"]), in_channels=int(g["in_channels"]),
            out_channels=int(g["out_channels"]), model_channels=int(g["model_channels"]),
            channel_mult=tuple(g["channel_mult"]), num_blocks=int(g["num_blocks"]),
            attn_resolutions=tuple(g["attn_resolutions"]),
            dropout=float(g["dropout"] if dropout is None else dropout),
            resample_filter=tuple(g["resample_filter"]), num_classes=int(g["label_dim"]),
            embedding=g["embedding_type"], encoder=g["encoder_type"], label_input=True)
    except (KeyError, AssertionError, TypeError, ValueError) as e:
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
                out[f"{ours}.{leaf}"] = _qkv(v, True) if edm.endswith(".qkv") else v
                used.add(key)
        if f"{edm}.resample_filter" in sd:
            used.add(f"{edm}.resample_filter")
            f = sd[f"{edm}.resample_filter"]
            if not torch.allclose(f.reshape(f.shape[-2:]).float(), fir_kernel(cfg.resample_filter)):
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


def _sigma_range(name: str, st: dict, kw: dict) -> tuple[float, float]:
    """The network's supported [sigma_min, sigma_max] as EDM's classes compute them."""
    if name == "VEPrecond":
        return float(st.get("sigma_min", kw.get("sigma_min", 0.02))), float(st.get("sigma_max",
                                                                                   kw.get("sigma_max", 100)))
    if name == "VPPrecond":
        b_d, b_min = float(st.get("beta_d", 19.9)), float(st.get("beta_min", 0.1))
        sig = lambda t: math.sqrt(math.exp(0.5 * b_d * t ** 2 + b_min * t) - 1)  # noqa: E731
        return sig(float(st.get("epsilon_t", 1e-5))), sig(1.0)
    return float(st.get("sigma_min", 0)), float(st.get("sigma_max", float("inf")))


def read_pickle(path: Path, obj, arch: str = "", kind: str = "") -> dict | None:
    """checkpoints.import_official's reader for EDM .pkl snapshots: an export dict; None if not a pickle."""
    if obj is not None:
        return None
    with open(path, "rb") as fh:
        head = fh.read(2)
    if head[:1] != b"\x80" or head[1:2] not in (b"\x02", b"\x03", b"\x04", b"\x05"):  # pickle protocol 2-5
        return None
    if kind not in ("", "edm"):
        raise CMError(f"{path}: an EDM pickle is a denoiser (kind edm), not {kind}")
    data = load_pickle(path)
    ema = data.get("ema") if isinstance(data, dict) else None
    if not isinstance(ema, Record) or ema.class_name not in PRECONDS:
        found = ema.class_name if isinstance(ema, Record) else type(ema).__name__
        raise CMError(f"{path}: not an EDM snapshot with an 'ema' network of {', '.join(PRECONDS)} "
                      f"(found {found})")
    model = (ema.state.get("_modules") or {}).get("model")
    if not isinstance(model, Record) or model.class_name != "SongUNet":
        raise CMError(f"{path}: the denoiser's network is "
                      f"{getattr(model, 'class_name', type(model).__name__)}, only SongUNet (NCSN++, DDPM++) "
                      "is supported")
    kw = dict(model.state.get("_init_kwargs") or {})
    try:
        net_cfg = config_from_kwargs(kw, dropout=0.0)
        weights = from_edm(tensors(ema), net_cfg, "model.")
    except CMError as e:
        raise CMError(f"{path}: {e}") from None
    st = ema.state
    lo, hi = _sigma_range(ema.class_name, st, dict(ema.state.get("_init_kwargs") or {}))
    precond = {"class": ema.class_name, "sigma_data": float(st.get("sigma_data", 0.5)),
               "beta_d": float(st.get("beta_d", 19.9)), "beta_min": float(st.get("beta_min", 0.1)),
               "M": int(st.get("M", 1000))}
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
