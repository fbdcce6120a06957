"""Released official checkpoints (full/released/guided_diffusion.py, edm_pickle.py), on files written in
their layouts.

CM's .pt files: raw guided-diffusion state dicts of scaled-down ADM configurations. EDM's .pkl files: pickles
written the way EDM's torch_utils.persistence writes them (a reconstruction record with the module's source,
class name and state, holding a module tree) for scaled-down SongUNet-shaped networks whose tensor names are
spelled out below from SongUNet's constructor. No real file can be downloaded here.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import os
import pickle
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import full.sample
import full.train
from cm import CMError
from full import checkpoints
from full.networks import ADMConfig, ADMUNet, NCSNpp
from full.presets import resolve
from full.released import edm_pickle
from full.released import guided_diffusion as official

# ----------------------------------------------------------------------------------------------
# CM's released .pt files (guided-diffusion state dicts), scaled down


def tiny_cond() -> ADMConfig:  # ImageNet-64's settings at 8x8, 1 channel, 10 classes (= tiny-ct-adm's net)
    return dataclasses.replace(ADMConfig.tiny(8, num_classes=10), in_channels=1, out_channels=1,
                               num_head_channels=16)


def tiny_uncond() -> ADMConfig:  # LSUN-256's settings (no classes, no scale-shift norm) at 8x8
    return ADMConfig(image_size=8, in_channels=1, out_channels=1, model_channels=32, channel_mult=(1, 1, 2),
                     num_res_blocks=1, attention_resolutions=(4,), num_head_channels=32, num_classes=0,
                     use_scale_shift_norm=False)


@pytest.fixture
def tiny_archs(monkeypatch):
    monkeypatch.setattr(official, "ARCHS", {"imagenet64": (tiny_cond, "tiny-ct-adm"),
                                            "lsun256": (tiny_uncond, "tiny-ct-adm")})


def random_state_dict(cfg: ADMConfig, seed: int = 0, conv1d_attention: bool = False) -> dict:
    """Random weights under guided-diffusion's names; attention qkv/proj_out as Conv1d (O, I, 1) if asked."""
    torch.manual_seed(seed)
    sd = {k: torch.randn_like(v) * 0.2 for k, v in ADMUNet(cfg).state_dict().items()}
    if conv1d_attention:
        sd = {k: v[..., 0] if k.endswith(("qkv.weight", "proj_out.weight")) else v for k, v in sd.items()}
    return sd


def test_official_key_names():
    sd = ADMUNet(tiny_cond()).state_dict()
    for k in ("time_embed.0.weight", "time_embed.2.weight", "label_emb.weight", "input_blocks.0.0.weight",
              "input_blocks.1.0.in_layers.0.weight", "input_blocks.1.0.emb_layers.1.weight",
              "input_blocks.1.0.out_layers.3.weight", "input_blocks.3.1.qkv.weight",
              "middle_block.1.proj_out.weight", "output_blocks.0.0.skip_connection.weight", "out.2.weight"):
        assert k in sd, k


def reference_attention(x, norm, qkv_w, qkv_b, proj_w, proj_b, heads):
    """CM's QKVFlashAttention written plainly: channels of qkv are (three, heads, head_dim)."""
    B, C, H, W = x.shape
    h = F.group_norm(x, 32, norm.weight, norm.bias, norm.eps).reshape(B, C, H * W)
    qkv = torch.einsum("oc,bct->bot", qkv_w.reshape(3 * C, C), h) + qkv_b[None, :, None]
    q, k, v = qkv.reshape(B, 3, heads, C // heads, H * W).unbind(1)           # (B, heads, D, T)
    w = torch.softmax(torch.einsum("bhdt,bhds->bhts", q, k) / math.sqrt(C // heads), dim=-1)
    a = torch.einsum("bhts,bhds->bhdt", w, v).reshape(B, C, H * W)
    out = torch.einsum("oc,bct->bot", proj_w.reshape(C, C), a) + proj_b[None, :, None]
    return x + out.reshape(B, C, H, W)


@pytest.mark.parametrize("conv1d", [False, True])
def test_state_dict_loads_strictly_and_attention_matches_reference(tiny_archs, tmp_path, conv1d):
    sd = random_state_dict(tiny_cond(), conv1d_attention=conv1d)
    path = tmp_path / "cd_imagenet64_l2.pt"
    torch.save(sd, path)
    state = checkpoints.load(path)
    f, cfg = checkpoints.model_from_state(state, path=path)
    attn = f.net.middle_block[1]
    x = torch.randn(2, 64, 2, 2)
    want = reference_attention(x, attn.norm, sd["middle_block.1.qkv.weight"], sd["middle_block.1.qkv.bias"],
                               sd["middle_block.1.proj_out.weight"], sd["middle_block.1.proj_out.bias"],
                               heads=64 // 16)
    torch.testing.assert_close(attn(x), want, rtol=1e-5, atol=1e-5)


def test_loaded_model_equals_hand_built(tiny_archs, tmp_path):
    sd = random_state_dict(tiny_cond())
    torch.save(sd, tmp_path / "cd_imagenet64_lpips.pt")
    f, cfg = checkpoints.model_from_state(checkpoints.load(tmp_path / "cd_imagenet64_lpips.pt"))
    assert cfg.cm.mode == "cd" and cfg.run.ts == (0, 22, 39) and cfg.run.grid_steps == 40
    net = ADMUNet(tiny_cond()).eval()
    net.load_state_dict(sd)
    x, y = torch.randn(3, 1, 8, 8), torch.tensor([1, 4, 9])
    t = torch.tensor([0.002, 1.3, 80.0])
    sd_, eps = 0.5, 0.002  # CM's boundary-condition scalings [CM App. C], ADM's c_noise
    c_skip = sd_ ** 2 / ((t - eps) ** 2 + sd_ ** 2)
    c_out = sd_ * (t - eps) / (sd_ ** 2 + t ** 2).sqrt()
    c_in = 1 / (t ** 2 + sd_ ** 2).sqrt()
    want = c_skip[:, None, None, None] * x + c_out[:, None, None, None] * net(
        c_in[:, None, None, None] * x, 1000 * 0.25 * torch.log(t + 1e-44), y)
    with torch.no_grad():
        torch.testing.assert_close(f(x, t, y), want, rtol=1e-5, atol=1e-5)
    # The EDM teacher: the same network with eps = 0 (EDM's denoiser)
    torch.save(sd, tmp_path / "edm_imagenet64_ema.pt")
    D, tcfg = checkpoints.model_from_state(checkpoints.load(tmp_path / "edm_imagenet64_ema.pt"))
    assert tcfg.cm.mode == "edm" and tcfg.run.grid_steps == 40
    c_skip, c_out = sd_ ** 2 / (t ** 2 + sd_ ** 2), sd_ * t / (sd_ ** 2 + t ** 2).sqrt()
    want = c_skip[:, None, None, None] * x + c_out[:, None, None, None] * net(
        c_in[:, None, None, None] * x, 1000 * 0.25 * torch.log(t + 1e-44), y)
    with torch.no_grad():
        torch.testing.assert_close(D(x, t, y), want, rtol=1e-5, atol=1e-5)


def test_real_architectures_inferred_from_keys_and_shapes():
    for name, make in (("imagenet64", ADMConfig.imagenet64), ("lsun256", ADMConfig.lsun256)):
        with torch.device("meta"):  # full size, nothing allocated
            sd = ADMUNet(make()).state_dict()
        assert official.infer_arch(sd) == name
        sd.pop("out.2.bias")
        with pytest.raises(CMError, match=f"closest {name}: missing key out.2.bias"):
            official.infer_arch(sd)
    with torch.device("meta"):
        sd = ADMUNet(ADMConfig.imagenet64()).state_dict()
    sd["label_emb.weight"] = torch.empty(10, 768, device="meta")
    with pytest.raises(CMError, match=r"label_emb.weight has shape \[10, 768\], expected \[1000, 768\]"):
        official.infer_arch(sd)
    sd["label_emb.weight"], sd["extra.weight"] = torch.empty(1000, 768, device="meta"), sd["out.2.bias"]
    with pytest.raises(CMError, match="unexpected key extra.weight"):
        official.infer_arch(sd, "imagenet64")


@given(st.sampled_from(["edm", "cd", "ct"]), st.sampled_from(["imagenet64_ema", "bedroom256_l2", "cat256"]))
def test_kind_from_name_and_override(prefix, rest):
    assert official.infer_kind(Path(f"/x/{prefix}_{rest}.pt")) == prefix
    other = {"edm": "cd", "cd": "ct", "ct": "edm"}[prefix]
    assert official.infer_kind(Path(f"/x/{prefix}_{rest}.pt"), other) == other


def test_unknown_name_and_unknown_network_are_one_line(tiny_archs, tmp_path, capsys):
    torch.save(random_state_dict(tiny_cond()), tmp_path / "model.pt")
    with pytest.raises(CMError, match="--kind"):
        checkpoints.load(tmp_path / "model.pt")
    assert checkpoints.load(tmp_path / "model.pt", kind="ct")["official"]["kind"] == "ct"
    sd = random_state_dict(tiny_cond())
    sd["input_blocks.1.0.in_layers.2.weight"] = sd["input_blocks.1.0.in_layers.2.weight"][:, :-1]
    torch.save(sd, tmp_path / "ct_imagenet64.pt")
    with pytest.raises(SystemExit) as e:
        full.sample.main(["--checkpoint", str(tmp_path / "ct_imagenet64.pt"), "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1 and "\n" not in err and "input_blocks.1.0.in_layers.2.weight has shape" in err
    # --arch forces the other architecture: its first mismatch is named
    torch.save(random_state_dict(tiny_cond()), tmp_path / "cd_x.pt")
    with pytest.raises(CMError, match="does not fit the lsun256 architecture"):
        checkpoints.load(tmp_path / "cd_x.pt", arch="lsun256")


@pytest.mark.parametrize("name, cfg, args", [
    ("cd_imagenet64_l2.pt", tiny_cond, ["--class-labels", "3", "--num-samples", "4"]),
    ("cd_imagenet64_lpips.pt", tiny_cond, ["--ts", "0,22,39", "--grid-steps", "40", "--num-samples", "4"]),
    ("ct_bedroom256.pt", tiny_uncond, ["--ts", "0,67,150", "--grid-steps", "151", "--num-samples", "4"]),
    ("edm_imagenet64_ema.pt", tiny_cond, ["--sampler", "heun", "--steps", "6", "--num-samples", "2"]),
])
def test_sample_commands_write_grids(tiny_archs, tmp_path, capsys, name, cfg, args):
    torch.save(random_state_dict(cfg()), tmp_path / name)
    full.sample.main(["--checkpoint", str(tmp_path / name), "--out", str(tmp_path / "out"), *args])
    out = capsys.readouterr().out
    line = next(li for li in out.splitlines() if li.startswith(name))
    assert "guided-diffusion state dict" in line and f"kind {name.split('_')[0]}" in line, out
    assert (tmp_path / "out" / "samples.png").stat().st_size > 0
    import numpy as np
    imgs = np.load(tmp_path / "out" / "samples.npz")["arr_0"]
    assert imgs.shape[1:] == (8, 8, 1)


def test_edm_release_is_cd_teacher_and_ct_init(tiny_archs, tmp_path):
    sd = random_state_dict(tiny_cond())
    torch.save(sd, tmp_path / "edm_imagenet64_ema.pt")
    common = [f"run.teacher={str(tmp_path / 'edm_imagenet64_ema.pt')!r}", "opt.steps=1", "opt.batch=4",
              "run.sample_every=0", "run.sample_num=2"]
    for mode in ("cd", "ct"):
        cfg = resolve("tiny-ct-adm", ["net.num_head_channels=16", f"cm.mode={mode!r}",
                                      f"run.out={str(tmp_path / mode)!r}", *common])
        tr = full.train.Trainer(cfg, torch.device("cpu"), full.train.load_teacher(cfg, torch.device("cpu")))
        for k, v in tr.model.net.state_dict().items():  # θ starts from the released weights
            assert torch.equal(v, sd[k]), k
        assert full.train.train(cfg)["step"] == 1


# ----------------------------------------------------------------------------------------------
# EDM's .pkl files, written the way torch_utils.persistence writes them


def song_unet_tensors(img, cin, nf, mult, B, attn_res, ddpmpp=False, augment_dim=9, seed=0,
                      label_dim=0) -> dict:
    """Tensor names and shapes of EDM's SongUNet (NCSN++ or DDPM++), spelled out from its constructor."""
    g = torch.Generator().manual_seed(seed)
    filt = torch.tensor([1., 1.]) if ddpmpp else torch.tensor([1., 3., 3., 1.])
    fir = (torch.outer(filt, filt) / filt.sum() ** 2)[None, None]
    T = {}

    def rnd(*shape):
        return torch.randn(*shape, generator=g) * 0.2

    def conv(n, i, o, k, resample=False):
        T[f"{n}.weight"], T[f"{n}.bias"] = rnd(o, i, k, k), rnd(o)
        if resample:
            T[f"{n}.resample_filter"] = fir.clone()

    def lin(n, i, o):
        T[f"{n}.weight"], T[f"{n}.bias"] = rnd(o, i), rnd(o)

    def gn(n, c):
        T[f"{n}.weight"], T[f"{n}.bias"] = 1 + rnd(c), rnd(c)

    def block(n, i, o, up=False, down=False, attn=False):
        gn(f"{n}.norm0", i), conv(f"{n}.conv0", i, o, 3, up or down), lin(f"{n}.affine", 4 * nf, o)
        gn(f"{n}.norm1", o), conv(f"{n}.conv1", o, o, 3)
        if o != i or up or down:
            conv(f"{n}.skip", i, o, 1, up or down)
        if attn:
            gn(f"{n}.norm2", o), conv(f"{n}.qkv", o, 3 * o, 1), conv(f"{n}.proj", o, o, 1)

    noise = nf if ddpmpp else 2 * nf
    if not ddpmpp:
        T["map_noise.freqs"] = rnd(nf) * 80
    if augment_dim:
        T["map_augment.weight"] = rnd(noise, augment_dim)
    if label_dim:
        lin("map_label", label_dim, noise)
    lin("map_layer0", noise, 4 * nf), lin("map_layer1", 4 * nf, 4 * nf)
    cout, caux, skips = cin, cin, []
    for lv, m in enumerate(mult):
        r = img >> lv
        if lv == 0:
            conv(f"enc.{r}x{r}_conv", cout, nf, 3)
            cout = nf
        else:
            block(f"enc.{r}x{r}_down", cout, cout, down=True)
            if not ddpmpp:
                conv(f"enc.{r}x{r}_aux_residual", caux, cout, 3, resample=True)
                caux = cout
        skips.append(cout)
        for i in range(B):
            block(f"enc.{r}x{r}_block{i}", cout, nf * m, attn=r in attn_res)
            cout = nf * m
            skips.append(cout)
    for lv, m in reversed(list(enumerate(mult))):
        r = img >> lv
        if lv == len(mult) - 1:
            block(f"dec.{r}x{r}_in0", cout, cout, attn=True)
            block(f"dec.{r}x{r}_in1", cout, cout)
        else:
            block(f"dec.{r}x{r}_up", cout, cout, up=True)
        for i in range(B + 1):
            block(f"dec.{r}x{r}_block{i}", cout + skips.pop(), nf * m, attn=i == B and r in attn_res)
            cout = nf * m
    gn(f"dec.{img}x{img}_aux_norm", cout), conv(f"dec.{img}x{img}_aux_conv", cout, cin, 3)
    return T


def song_kwargs(img, cin, nf, mult, B, attn_res, ddpmpp=False, label_dim=0) -> dict:
    return dict(img_resolution=img, in_channels=cin, out_channels=cin, label_dim=label_dim, augment_dim=9,
                model_channels=nf, channel_mult=list(mult), num_blocks=B, attn_resolutions=list(attn_res),
                dropout=0.13, embedding_type="positional" if ddpmpp else "fourier",
                channel_mult_noise=1 if ddpmpp else 2, encoder_type="standard" if ddpmpp else "residual",
                decoder_type="standard", resample_filter=[1, 1] if ddpmpp else [1, 3, 3, 1])


SRC = "import os\nopen(os.environ['CM_TEST_MARKER'], 'w').write('the pickled source ran')\n"


class Persistent:
    """Pickles as EDM's persistence does: _reconstruct_persistent_obj(meta) with source, class, state."""

    def __init__(self, class_name, state):
        self.class_name, self.state = class_name, state

    def __reduce__(self):
        meta = dict(type="class", version=6, module_src=SRC, class_name=self.class_name, state=self.state)
        return sys.modules["torch_utils.persistence"]._reconstruct_persistent_obj, (meta,)


def module_state(params=None, buffers=None, modules=None, **extra):
    """An nn.Module's __dict__ as pickled: training flag, parameters, buffers, submodules, hooks."""
    return dict(training=False, _parameters=collections.OrderedDict(params or {}),
                _buffers=collections.OrderedDict(buffers or {}), _non_persistent_buffers_set=set(),
                _backward_hooks=collections.OrderedDict(), _forward_hooks=collections.OrderedDict(),
                _modules=collections.OrderedDict(modules or {}), **extra)


def tree(flat: dict, kwargs: dict):
    """A SongUNet module tree from flat names: enc/dec are torch ModuleDicts, the rest persistent classes."""
    nested: dict = {}
    for name, t in flat.items():
        *mods, leaf = name.split(".")
        node = nested
        for m in mods:
            node = node.setdefault(m, {})
        node[leaf] = t

    def build(name, d):
        params = {k: torch.nn.Parameter(v, requires_grad=True) for k, v in d.items()
                  if isinstance(v, torch.Tensor) and k not in ("freqs", "resample_filter")}
        buffers = {k: v for k, v in d.items() if k in ("freqs", "resample_filter")}
        subs = {k: build(k, v) for k, v in d.items() if isinstance(v, dict)}
        if name in ("enc", "dec"):
            md = torch.nn.ModuleDict()
            md.__dict__["_modules"] = collections.OrderedDict(subs)
            return md
        return Persistent("UNetBlock" if "block" in name else "Conv2d", module_state(params, buffers, subs))

    mods = {k: build(k, v) for k, v in nested.items() if isinstance(v, dict)}
    buffers = {k: v for k, v in nested.items() if isinstance(v, torch.Tensor)}
    return Persistent("SongUNet", module_state(None, buffers, mods, _init_args=(), _init_kwargs=kwargs))


@pytest.fixture
def persistence(monkeypatch, tmp_path):
    """A stand-in torch_utils.persistence module for writing (reading never imports it)."""
    pkg, mod = types.ModuleType("torch_utils"), types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):  # what EDM would do: run the source. Never called here.
        exec(meta["module_src"], {})

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    mod._reconstruct_persistent_obj, pkg.persistence = _reconstruct_persistent_obj, mod
    monkeypatch.setitem(sys.modules, "torch_utils", pkg)
    monkeypatch.setitem(sys.modules, "torch_utils.persistence", mod)
    marker = tmp_path / "payload-ran"
    monkeypatch.setenv("CM_TEST_MARKER", str(marker))
    return marker


TINY = dict(img=8, cin=1, nf=16, mult=(1, 2), B=1, attn_res=(4,))


def write_edm_pickle(path, precond="VEPrecond", ddpmpp=False, extra=None, label_dim=0, **consts) -> dict:
    flat = song_unet_tensors(**TINY, ddpmpp=ddpmpp, label_dim=label_dim)
    net = tree(flat, song_kwargs(**TINY, ddpmpp=ddpmpp, label_dim=label_dim))
    ema = Persistent(precond, module_state(None, None, {"model": net}, img_resolution=8, img_channels=1,
                                           label_dim=label_dim, use_fp16=False, **consts,
                                           _init_kwargs=dict(img_resolution=8, img_channels=1)))
    data = dict(ema=ema, loss_fn=Persistent("VELoss", dict(sigma_min=0.02, sigma_max=100)),
                augment_pipe=Persistent("AugmentPipe", dict(p=0.12, xflip=1e8)),
                dataset_kwargs=dict(path="datasets/cifar10-32x32.zip", xflip=False), **(extra or {}))
    with open(path, "wb") as fh:
        pickle.dump(data, fh)
    return flat


def test_pickle_tensors_come_out_by_module_path(persistence, tmp_path):
    flat = write_edm_pickle(tmp_path / "a.pkl", sigma_min=0.02, sigma_max=100)
    data = edm_pickle.load_pickle(tmp_path / "a.pkl")
    got = edm_pickle.tensors(data["ema"])
    assert set(got) == {f"model.{k}" for k in flat}
    assert all(torch.equal(got[f"model.{k}"], v) for k, v in flat.items())
    assert data["ema"].class_name == "VEPrecond" and not persistence.exists()
    # FIR buffers: conv0 and skip of the one down and the one up block, and the one aux_residual conv
    assert sum(k.endswith("resample_filter") for k in got) == 5


@pytest.mark.parametrize("ddpmpp", [False, True])
def test_edm_names_load_strictly_and_round_trip_bit_identical(ddpmpp):
    cfg = edm_pickle.config_from_kwargs(song_kwargs(**TINY, ddpmpp=ddpmpp), dropout=0.0)
    flat = song_unet_tensors(**TINY, ddpmpp=ddpmpp)
    ours = edm_pickle.from_edm(flat, cfg)
    net = NCSNpp(cfg)
    net.load_state_dict(ours)  # strict: every EDM tensor has a place and every parameter is filled
    torch.manual_seed(1)
    sd = {k: torch.randn_like(v) for k, v in NCSNpp(cfg).state_dict().items()}
    back = edm_pickle.from_edm(edm_pickle.to_edm(sd, cfg), cfg)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    assert set(edm_pickle.to_edm(sd, cfg)) == set(flat) - {"map_augment.weight"}


def test_attention_and_embeddings_match_edm_formulas():
    """EDM's block attention (qkv as (channel, three)) and noise features written plainly."""
    cfg = edm_pickle.config_from_kwargs(song_kwargs(**TINY), dropout=0.0)
    flat = song_unet_tensors(**TINY)
    net = NCSNpp(cfg).eval()
    net.load_state_dict(edm_pickle.from_edm(flat, cfg))
    x = torch.randn(2, 32, 4, 4)
    n = "dec.4x4_in0"
    h = F.group_norm(x, 8, flat[f"{n}.norm2.weight"], flat[f"{n}.norm2.bias"], 1e-6)
    qkv = F.conv2d(h, flat[f"{n}.qkv.weight"], flat[f"{n}.qkv.bias"])
    q, k, v = qkv.reshape(2, 32, 3, 16).unbind(2)                             # EDM: (C, three)
    w = torch.einsum("ncq,nck->nqk", q, k / math.sqrt(32)).softmax(dim=2)
    a = torch.einsum("nqk,nck->ncq", w, v).reshape(2, 32, 4, 4)
    want = (F.conv2d(a, flat[f"{n}.proj.weight"], flat[f"{n}.proj.bias"]) + x) * math.sqrt(0.5)
    torch.testing.assert_close(net.mid["attn"](x), want, rtol=1e-5, atol=1e-5)
    c = torch.tensor([-1.0, 0.3])
    xf = torch.outer(c, 2 * math.pi * flat["map_noise.freqs"])                # EDM: [cos, sin], swapped
    torch.testing.assert_close(net.fourier(c), torch.cat([xf.sin(), xf.cos()], 1))
    pos = NCSNpp(edm_pickle.config_from_kwargs(song_kwargs(**TINY, ddpmpp=True), dropout=0.0)).fourier
    fr = (1 / 10000) ** (torch.arange(8) / 7)                                 # endpoint=True
    xp = torch.outer(c, fr)
    torch.testing.assert_close(pos(c), torch.cat([xp.sin(), xp.cos()], 1))


@pytest.mark.parametrize("precond, consts", [
    ("VEPrecond", dict(sigma_min=0.02, sigma_max=100)),
    ("VPPrecond", dict(beta_d=19.9, beta_min=0.1, M=1000, epsilon_t=1e-5)),
    ("EDMPrecond", dict(sigma_min=0, sigma_max=float("inf"), sigma_data=0.5)),
])
def test_teacher_keeps_its_preconditioning(persistence, tmp_path, precond, consts):
    flat = write_edm_pickle(tmp_path / "t.pkl", precond, **consts)
    state = checkpoints.load(tmp_path / "t.pkl")
    D, cfg = checkpoints.model_from_state(state, path=tmp_path / "t.pkl", denoiser=True)
    net = NCSNpp(cfg.net).eval()
    net.load_state_dict(edm_pickle.from_edm(flat, cfg.net))
    x, s = torch.randn(3, 1, 8, 8), torch.tensor([0.02, 1.0, 80.0])
    b = s[:, None, None, None]
    if precond == "VEPrecond":       # EDM Tab. 1, training/networks.py
        want = x + b * net(x, torch.log(0.5 * s))
        assert cfg.cm.sigma_min == 0.02 and cfg.cm.sigma_max == 80
    elif precond == "VPPrecond":
        t = ((0.1 ** 2 + 2 * 19.9 * torch.log(1 + s ** 2)).sqrt() - 0.1) / 19.9
        want = x - b * net(x / (b ** 2 + 1).sqrt(), 999 * t)
    else:
        want = 0.25 / (b ** 2 + 0.25) * x + b * 0.5 / (b ** 2 + 0.25).sqrt() * net(
            x / (b ** 2 + 0.25).sqrt(), torch.log(s) / 4)
    with torch.no_grad():
        torch.testing.assert_close(D(x, s), want, rtol=1e-4, atol=1e-3)
    assert not persistence.exists()


@pytest.mark.parametrize("payload", ["os.system", "builtins.exec", "protocol2", "hidden"])
def test_malicious_pickle_is_refused_and_never_runs(persistence, tmp_path, capsys, payload):
    marker = persistence
    cmd = f"touch {marker}"

    class Evil:
        def __reduce__(self):
            if payload == "builtins.exec":
                return exec, (f"open({str(marker)!r}, 'w').write('x')",)
            return os.system, (cmd,)

    path = tmp_path / "evil.pkl"
    if payload == "hidden":  # a valid-looking snapshot with the payload deep inside
        write_edm_pickle(path, sigma_min=0.02, sigma_max=100, extra={"more": [1, {"x": Evil()}]})
    else:  # protocol 2 names the global with the GLOBAL opcode ("cposix\nsystem"), 4 with STACK_GLOBAL
        path.write_bytes(pickle.dumps({"ema": Evil()}, protocol=2 if payload == "protocol2" else 4))
    with pytest.raises(SystemExit) as e:
        full.sample.main(["--checkpoint", str(path), "--sampler", "heun", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    name = "builtins.exec" if payload == "builtins.exec" else "posix.system"
    assert e.value.code == 1 and "\n" not in err and f"refused: the pickle names {name}" in err, err
    assert not marker.exists()


def test_edm_pickle_sample_and_cd_train_commands(persistence, tmp_path, capsys):
    write_edm_pickle(tmp_path / "edm-cifar10-32x32-uncond-ve.pkl", sigma_min=0.02, sigma_max=100)
    pkl = str(tmp_path / "edm-cifar10-32x32-uncond-ve.pkl")
    full.sample.main(["--checkpoint", pkl, "--sampler", "heun", "--steps", "4", "--num-samples", "2",
                      "--out", str(tmp_path / "s")])
    assert "VEPrecond around SongUNet (NCSN++" in capsys.readouterr().out
    assert (tmp_path / "s" / "samples.png").stat().st_size > 0
    # cifar10-cd-lpips with the pickle as teacher, scaled to the stand-in file (digits 8x8, l2 not LPIPS:
    # the VGG weights cannot be downloaded here)
    small = ["data.name='digits'", "data.root=''", "data.num_workers=0", "net.img_resolution=8",
             "net.in_channels=1", "net.out_channels=1", "net.model_channels=16", "net.channel_mult=(1,2)",
             "net.num_blocks=1", "net.attn_resolutions=(4,)", "cm.metric='l2'", "opt.batch=4", "opt.steps=2",
             "run.sample_num=2", f"run.out={str(tmp_path / 'cd')!r}"]
    full.train.main(["--preset", "cifar10-cd-lpips", f"run.teacher={pkl!r}", *small])
    assert checkpoints.latest(tmp_path / "cd").name == "ckpt-0000002.pt"
    assert "is a denoiser" in _err(capsys, lambda: full.sample.main(
        ["--checkpoint", pkl, "--kind", "cd", "--out", str(tmp_path)]))


def _err(capsys, fn) -> str:
    with pytest.raises(SystemExit):
        fn()
    return capsys.readouterr().err


def test_source_in_record_never_runs(persistence, tmp_path):
    write_edm_pickle(tmp_path / "a.pkl", sigma_min=0.02, sigma_max=100)
    assert b"the pickled source ran" in (tmp_path / "a.pkl").read_bytes()
    checkpoints.load(tmp_path / "a.pkl")
    assert not persistence.exists()


def test_class_conditional_vp_pickle(persistence, tmp_path, capsys):
    """cond-vp: DDPM++ with EDM's label input, noise features + map_label(one-hot · √K) before map_layer0."""
    flat = write_edm_pickle(tmp_path / "edm-cifar10-32x32-cond-vp.pkl", "VPPrecond", ddpmpp=True,
                            label_dim=10, beta_d=19.9, beta_min=0.1, M=1000, epsilon_t=1e-5)
    D, cfg = checkpoints.model_from_state(checkpoints.load(tmp_path / "edm-cifar10-32x32-cond-vp.pkl"))
    seen = []
    D.net.emb0.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    y, c = torch.tensor([3, 7]), torch.tensor([0.5, 2.0])
    D(torch.randn(2, 1, 8, 8), c, y)
    t = ((0.1 ** 2 + 2 * 19.9 * torch.log(1 + c ** 2)).sqrt() - 0.1) / 19.9 * 999
    fr = torch.outer(t, (1 / 10000) ** (torch.arange(8) / 7))
    want = torch.cat([fr.sin(), fr.cos()], 1) + F.one_hot(y, 10).float() * math.sqrt(10) \
        @ flat["map_label.weight"].T + flat["map_label.bias"]
    torch.testing.assert_close(seen[0], want, rtol=1e-5, atol=1e-5)
    full.sample.main(["--checkpoint", str(tmp_path / "edm-cifar10-32x32-cond-vp.pkl"), "--steps", "3",
                      "--class-labels", "3", "--num-samples", "2", "--out", str(tmp_path / "s")])
    assert "DDPM++" in capsys.readouterr().out and (tmp_path / "s" / "samples.png").is_file()


def test_pickle_cannot_set_state_of_allowed_functions(persistence, tmp_path, capsys):
    """BUILD on an allowed global (here a tensor-rebuild function) is refused: no attribute is ever set."""
    name = b"torch._utils\n_rebuild_parameter\n"
    blob = b"\x80\x02c" + name + b"}X\x04\x00\x00\x00evilK\x01sb."  # GLOBAL, {'evil': 1}, BUILD
    (tmp_path / "b.pkl").write_bytes(blob)
    with pytest.raises(CMError, match="refused: the pickle sets the state of a function"):
        checkpoints.load(tmp_path / "b.pkl")
    assert "evil" not in vars(edm_pickle.ALLOWED[("torch._utils", "_rebuild_parameter")])


def test_malicious_pickle_from_the_command_line(tmp_path):
    """A real `python -m full.sample` process: exit status 1, one line, no traceback, payload never run."""
    import subprocess

    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    (tmp_path / "edm-cifar10-32x32-uncond-ve.pkl").write_bytes(pickle.dumps({"ema": Evil()}, protocol=4))
    p = subprocess.run([sys.executable, "-m", "full.sample", "--checkpoint",
                        str(tmp_path / "edm-cifar10-32x32-uncond-ve.pkl"), "--sampler", "heun"],
                       capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "refused: the pickle names posix.system" in p.stderr and "Traceback" not in p.stderr
    assert not marker.exists()
