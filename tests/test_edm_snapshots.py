"""EDM snapshots with the contents NVlabs/edm's training loop really writes (full/released/edm_pickle.py).

EDM's loop pickles `dict(ema=net, loss_fn=loss_fn, augment_pipe=augment_pipe, dataset_kwargs=...)` with its
torch_utils.persistence: every network module, the loss and the augmentation pipe are persistence records
(source, class name, state = the object's __dict__). SongUNet hands numpy scalars to every block
(skip_scale=np.sqrt(0.5), the attention init weight np.sqrt(0.2)), which the blocks keep in their init
kwargs and their state, so a real snapshot names numpy's scalar and dtype globals (numpy.core.multiarray in
files of numpy 1.x, numpy._core.multiarray with numpy 2.x). The snapshots here are written that way, the
module layout spelled out from EDM's classes (test_released.py gives the tensor names).
"""
from __future__ import annotations

import collections
import io
import math
import pickle
import sys
import types

import numpy as np
import pytest
import test_released
import torch
from test_released import TINY, Persistent, song_kwargs, song_unet_tensors

import full.sample
import full.train
from cm import CMError
from full import checkpoints
from full.released import edm_pickle

persistence = test_released.persistence  # the stand-in torch_utils.persistence (a fixture)

HOOKS = ("_backward_hooks", "_backward_pre_hooks", "_forward_hooks", "_forward_hooks_with_kwargs",
         "_forward_hooks_always_called", "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs",
         "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
         "_load_state_dict_post_hooks")


def module_dict(params=None, buffers=None, modules=None, init_kwargs=None, **attrs) -> dict:
    """A persistent nn.Module's __dict__ as torch 2.x pickles it, with persistence's init args."""
    d = dict(training=False, _parameters=collections.OrderedDict(params or {}),
             _buffers=collections.OrderedDict(buffers or {}), _non_persistent_buffers_set=set(),
             _modules=collections.OrderedDict(modules or {}), _is_full_backward_hook=None, **attrs)
    d.update({h: collections.OrderedDict() for h in HOOKS})
    if init_kwargs is not None:
        d.update(_init_args=(), _init_kwargs=init_kwargs)
    return d


def leaf_class(name: str) -> str:
    if name.startswith("norm"):
        return "GroupNorm"
    if name in ("affine", "map_layer0", "map_layer1", "map_label", "map_augment"):
        return "Linear"
    return {"map_noise": "FourierEmbedding"}.get(name, "Conv2d")


def snapshot(flat: dict, kwargs: dict, precond: str, consts: dict, augment: bool = True) -> dict:
    """The training loop's snapshot dict around SongUNet tensors `flat` (names as test_released spells)."""
    nested: dict = {}
    for name, t in flat.items():
        *mods, leaf = name.split(".")
        node = nested
        for m in mods:
            node = node.setdefault(m, {})
        node[leaf] = t
    block_kwargs = dict(emb_channels=4 * kwargs["model_channels"], num_heads=1, dropout=kwargs["dropout"],
                        skip_scale=np.sqrt(0.5), eps=1e-6, resample_filter=kwargs["resample_filter"],
                        resample_proj=True, adaptive_scale=False,
                        init=dict(init_mode="xavier_uniform"),
                        init_zero=dict(init_mode="xavier_uniform", init_weight=1e-5),
                        init_attn=dict(init_mode="xavier_uniform", init_weight=np.sqrt(0.2)))

    def build(name, d):
        params = {k: torch.nn.Parameter(v, requires_grad=False) for k, v in d.items()
                  if isinstance(v, torch.Tensor) and k not in ("freqs", "resample_filter")}
        buffers = {k: d.get(k) for k in ("resample_filter",) if leaf_class(name) == "Conv2d"}
        if "freqs" in d:
            buffers["freqs"] = d["freqs"]
        subs = {k: build(k, v) for k, v in d.items() if isinstance(v, dict)}
        if name in ("enc", "dec"):
            md = torch.nn.ModuleDict()
            md.__dict__["_modules"] = collections.OrderedDict(subs)
            return md
        if "block" in name or name.endswith(("_in0", "_in1", "_up", "_down")):
            return Persistent("UNetBlock", module_dict(params, buffers, subs, dict(block_kwargs),
                                                       skip_scale=np.sqrt(0.5), dropout=kwargs["dropout"]))
        return Persistent(leaf_class(name), module_dict(params, buffers, subs,
                                                        dict(init_mode="xavier_uniform")))

    mods = {k: build(k, v) for k, v in nested.items() if isinstance(v, dict)}
    net = Persistent("SongUNet", module_dict(None, None, mods, dict(kwargs), label_dropout=0, map_label=None))
    interface = dict(img_resolution=kwargs["img_resolution"], img_channels=kwargs["in_channels"], label_dim=0,
                     use_fp16=False)
    model_kw = {k: v for k, v in kwargs.items()
                if k not in ("img_resolution", "in_channels", "out_channels", "label_dim")}
    ema = Persistent(precond, module_dict(None, None, {"model": net},
                                          dict(**interface, model_type="SongUNet", **model_kw),
                                          **interface, **consts))
    loss = {"VPPrecond": ("VPLoss", dict(beta_d=19.9, beta_min=0.1, epsilon_t=1e-5)),
            "VEPrecond": ("VELoss", dict(sigma_min=0.02, sigma_max=100)),
            "EDMPrecond": ("EDMLoss", dict(P_mean=-1.2, P_std=1.2, sigma_data=0.5))}[precond]
    aug = dict(p=0.12, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)
    return dict(ema=ema, loss_fn=Persistent(loss[0], dict(**loss[1], _init_args=(), _init_kwargs={})),
                augment_pipe=Persistent("AugmentPipe", dict({k: float(v) for k, v in aug.items()},
                                                            _init_args=(), _init_kwargs=aug))
                if augment else None,
                dataset_kwargs=dict(class_name="training.dataset.ImageFolderDataset",
                                    path="datasets/cifar10-32x32.zip", use_labels=False, xflip=False,
                                    cache=True, resolution=kwargs["img_resolution"], max_size=50000))


CONSTS = {"VEPrecond": dict(sigma_min=0.02, sigma_max=100),
          "VPPrecond": dict(beta_d=19.9, beta_min=0.1, M=1000, epsilon_t=1e-5, sigma_min=0.0009765625,
                            sigma_max=152.16697692871094),
          "EDMPrecond": dict(sigma_min=0, sigma_max=float("inf"), sigma_data=0.5)}


def _numpy1_scalar(dtype, data):  # pickled under numpy 1.x's name; never called
    raise AssertionError("the reader called a global of the file")


_numpy1_scalar.__module__, _numpy1_scalar.__qualname__ = "numpy.core.multiarray", "scalar"


@pytest.fixture
def numpy1(monkeypatch):
    """numpy.core.multiarray.scalar as a name to pickle numpy scalars under (numpy 1.x's module path)."""
    mod = types.ModuleType("numpy.core.multiarray")
    mod.scalar = _numpy1_scalar
    monkeypatch.setitem(sys.modules, "numpy.core.multiarray", mod)


class SnapshotPickler(pickle.Pickler):
    """pickle.dump as EDM calls it; numpy scalars under numpy 1.x's or 2.x's module path."""

    def __init__(self, fh, numpy_path: str):
        super().__init__(fh, protocol=4)
        self.scalar = _numpy1_scalar if numpy_path == "numpy.core" else np._core.multiarray.scalar

    def reducer_override(self, obj):
        if isinstance(obj, np.generic):
            return self.scalar, (obj.dtype, obj.tobytes())
        return NotImplemented


def write_snapshot(path, precond="VEPrecond", ddpmpp=None, numpy_path="numpy._core", data=None, **kw) -> dict:
    """A snapshot file as EDM's training loop writes it; returns the SongUNet tensors."""
    ddpmpp = precond != "VEPrecond" if ddpmpp is None else ddpmpp
    flat = song_unet_tensors(**TINY, ddpmpp=ddpmpp)
    data = data or snapshot(flat, song_kwargs(**TINY, ddpmpp=ddpmpp), precond, CONSTS[precond], **kw)
    buf = io.BytesIO()
    SnapshotPickler(buf, numpy_path).dump(data)
    path.write_bytes(buf.getvalue())
    return flat


@pytest.mark.parametrize("numpy_path", ["numpy.core", "numpy._core"])
@pytest.mark.parametrize("precond", ["VEPrecond", "VPPrecond", "EDMPrecond"])
def test_snapshots_with_edm_contents_load(persistence, numpy1, tmp_path, precond, numpy_path):
    path = tmp_path / "network-snapshot-200000.pkl"
    flat = write_snapshot(path, precond, numpy_path=numpy_path, augment=precond != "EDMPrecond")
    raw = path.read_bytes()
    assert f"{numpy_path}.multiarray".encode() in raw and b"scalar" in raw and b"numpy" in raw
    tree = edm_pickle.load_pickle(path)
    block = tree["ema"].state["_modules"]["model"].state["_modules"]["enc"].state["_modules"]["8x8_block0"]
    # the numpy scalars come back as the numbers they hold, bit for bit
    assert block.state["skip_scale"] == np.sqrt(0.5) and type(block.state["skip_scale"]) is float
    assert block.state["_init_kwargs"]["init_attn"]["init_weight"] == np.sqrt(0.2)
    assert tree["loss_fn"].class_name.endswith("Loss") and tree["dataset_kwargs"]["max_size"] == 50000
    assert (tree["augment_pipe"] is None) == (precond == "EDMPrecond")
    state = checkpoints.load(path)
    assert state["official"]["precond"]["class"] == precond
    got = {k[len("net."):]: v for k, v in next(iter(state["ema"].values())).items()}
    assert got.keys() == edm_pickle.from_edm(flat, state_cfg(state)).keys()
    assert all(torch.equal(v, edm_pickle.from_edm(flat, state_cfg(state))[k]) for k, v in got.items())
    assert not persistence.exists()


def state_cfg(state):
    return checkpoints.config_of(state).net


def test_snapshot_samples_with_heun_and_teaches_cd(persistence, tmp_path, capsys):
    pkl = tmp_path / "edm-cifar10-32x32-uncond-ve.pkl"
    write_snapshot(pkl, "VEPrecond")
    full.sample.main(["--checkpoint", str(pkl), "--sampler", "heun", "--steps", "18", "--num-samples", "2",
                      "--out", str(tmp_path / "s")])
    assert (tmp_path / "s" / "samples.png").stat().st_size > 0
    small = ["data.name='digits'", "data.root=''", "data.num_workers=0", "net.img_resolution=8",
             "net.in_channels=1", "net.out_channels=1", "net.model_channels=16", "net.channel_mult=(1,2)",
             "net.num_blocks=1", "net.attn_resolutions=(4,)", "cm.metric='l2'", "opt.batch=4", "opt.steps=1",
             "run.sample_num=2", f"run.out={str(tmp_path / 'cd')!r}"]
    full.train.main(["--preset", "cifar10-cd-lpips", f"run.teacher={str(pkl)!r}", *small])
    assert checkpoints.latest(tmp_path / "cd").name == "ckpt-0000001.pt"
    assert not persistence.exists()


class Call:
    """Pickles as a call of `fn(*args)` (what a hostile file can name)."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


@pytest.mark.parametrize("payload", ["numpy.load", "numpy.frompyfunc", "numpy.savetxt", "ndarray",
                                     "object-scalar", "record-dtype", "wrong-bytes"])
def test_numpy_globals_other_than_scalar_and_dtype_are_refused(persistence, tmp_path, capsys, payload):
    marker = persistence
    npy = tmp_path / "evil.npy"
    np.save(npy, np.array([Call(open, str(marker), "w")], dtype=object), allow_pickle=True)
    scalar = np._core.multiarray.scalar
    evil = {"numpy.load": Call(np.load, str(npy), None, True),
            "numpy.frompyfunc": Call(np.frompyfunc, print, 1, 1),
            "numpy.savetxt": Call(np.savetxt, str(marker), [1.0]),
            "ndarray": np.array([1.0, 2.0]),
            "object-scalar": Call(scalar, np.dtype("O"), Call(open, str(marker), "w")),
            "record-dtype": Call(scalar, np.dtype([("a", "<f4")]), b"\0" * 4),
            "wrong-bytes": Call(scalar, np.dtype("f8"), b"\0" * 3)}[payload]
    path = tmp_path / "edm.pkl"
    snap = snapshot(song_unet_tensors(**TINY), song_kwargs(**TINY), "VEPrecond", CONSTS["VEPrecond"])
    snap["dataset_kwargs"]["extra"] = [1, {"x": evil}]  # a valid snapshot with the payload deep inside
    path.write_bytes(pickle.dumps(snap, protocol=4))
    with pytest.raises(SystemExit) as e:
        full.sample.main(["--checkpoint", str(path), "--sampler", "heun", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1 and "\n" not in err and err.startswith("error:") and "refused" in err, err
    assert not marker.exists()
    with pytest.raises(CMError):
        checkpoints.load(path)


@pytest.mark.parametrize("dtype", ["i1", "u2", "<i4", ">i8", "f2", "<f4", ">f8", "?"])
def test_every_real_numeric_scalar_comes_back_exactly(persistence, tmp_path, dtype):
    v = np.array([-3.25 if dtype[-2:] in ("f2", "f4", "f8") else (1 if dtype == "?" else 7)], dtype)[0]
    path = tmp_path / "s.pkl"
    buf = io.BytesIO()
    SnapshotPickler(buf, "numpy._core").dump({"v": v, "w": [v, {"k": v}]})
    path.write_bytes(buf.getvalue())
    got = edm_pickle.load_pickle(path)
    assert got["v"] == v.item() and type(got["v"]) is type(v.item()) and got["w"][1]["k"] == v.item()
    assert not math.isnan(got["v"])
