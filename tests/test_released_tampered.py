"""Tampered EDM pickles and Flax files: every field of the wrong type, missing, NaN, absurdly large, cyclic
or nested thousands deep is one line `error: ...` (full.convert and full.sample), never a traceback, a hang
or a silent wrong result; and two hypothesis properties over random mutations of such files: a one-line
CMError or a correct load (finite outputs), never another exception.

The EDM files are the real-contents snapshots of test_edm_snapshots.py; the Flax file is the fixture the
official JAX code wrote (tests/fixtures/jax_ncsnpp), edited with msgpack alone.
"""
from __future__ import annotations

import pickle
import sys
from pathlib import Path

import msgpack
import numpy as np
import pytest
import test_edm_snapshots as snaps
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_released import TINY, song_kwargs, song_unet_tensors
from test_released_flax import CKPT, ext_array, raw_tree, write

import full.convert
import full.sample
from cm import CMError
from full import checkpoints
from full.released import edm_pickle

persistence = snaps.persistence  # the stand-in torch_utils.persistence (a fixture)


def one_line_refusal(capsys, *argv: str, module=full.convert) -> str:
    """Run a command's main in this process: it must exit 1 with one line `error: ...` on stderr."""
    with pytest.raises(SystemExit) as e:
        module.main(list(argv))
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.count("\n") == 1 and err.startswith("error: "), err
    assert "Traceback" not in err
    return err


def fresh_snapshot(precond: str = "VEPrecond") -> dict:
    ddpmpp = precond != "VEPrecond"
    return snaps.snapshot(song_unet_tensors(**TINY, ddpmpp=ddpmpp), song_kwargs(**TINY, ddpmpp=ddpmpp),
                          precond, snaps.CONSTS[precond])


def model(snap):
    return snap["ema"].state["_modules"]["model"]


def module(snap, *path):
    """A record of the SongUNet tree by names: module(snap, 'enc', '8x8_block0', 'conv0')."""
    node = model(snap)
    for p in path:
        mods = node.__dict__["_modules"] if isinstance(node, torch.nn.ModuleDict) else node.state["_modules"]
        node = mods[p]
    return node


def kwargs(snap):
    return model(snap).state["_init_kwargs"]


def conv0(snap):
    return module(snap, "enc", "8x8_block0", "conv0").state["_parameters"]


def deep_chain(snap, depth=3000):
    """ModuleDicts nested `depth` deep under enc (pickled with a raised recursion limit)."""
    top = node = torch.nn.ModuleDict()
    for _ in range(depth):
        child = torch.nn.ModuleDict()
        node.__dict__["_modules"]["x"] = child
        node = child
    module(snap, "enc").__dict__["_modules"]["deep"] = top


def self_loop(snap):
    enc = module(snap, "enc")
    enc.__dict__["_modules"]["again"] = enc


def huge_view(snap):
    w = conv0(snap)["weight"]
    conv0(snap)["weight"] = torch.zeros(1).as_strided(w.shape, [0] * w.ndim)  # every element one float


TAMPER = {
    "data-not-a-dict": lambda s: [s],
    "no-ema": lambda s: s.pop("ema"),
    "ema-a-dict": lambda s: s.update(ema={"model": 1}),
    "modules-a-list": lambda s: s["ema"].state.update(_modules=[1, 2]),
    "no-model": lambda s: s["ema"].state.update(_modules={}),
    "init-kwargs-a-list": lambda s: model(s).state.update(_init_kwargs=[1, 2]),
    "init-kwargs-missing": lambda s: model(s).state.pop("_init_kwargs"),
    "num-blocks-a-str": lambda s: kwargs(s).update(num_blocks="1"),
    "num-blocks-a-float": lambda s: kwargs(s).update(num_blocks=1.5),
    "channel-mult-a-str": lambda s: kwargs(s).update(channel_mult="abc"),
    "num-blocks-1e7": lambda s: kwargs(s).update(num_blocks=10 ** 7),
    "model-channels-2**20": lambda s: kwargs(s).update(model_channels=2 ** 20),
    "model-channels-4096": lambda s: kwargs(s).update(model_channels=4096),  # in bounds, not the file's
    "img-resolution-2**40": lambda s: kwargs(s).update(img_resolution=2 ** 40),
    "channel-mult-1e6-levels": lambda s: kwargs(s).update(channel_mult=[1] * 10 ** 6),
    "embedding-a-tensor": lambda s: kwargs(s).update(embedding_type=torch.ones(3)),
    "tensor-a-str": lambda s: conv0(s).update(weight="w"),
    "tensor-of-ints": lambda s: conv0(s).update(weight=conv0(s)["weight"].long()),
    "tensor-of-complex": lambda s: conv0(s).update(weight=conv0(s)["weight"].to(torch.complex64)),
    "tensor-wrong-shape": lambda s: conv0(s).update(weight=conv0(s)["weight"][:, :, :2]),
    "tensor-missing": lambda s: conv0(s).pop("weight"),
    "qkv-rows": lambda s: module(s, "dec", "4x4_in0", "qkv").state["_parameters"].update(
        weight=torch.zeros(95, 32, 1, 1)),
    "fir-1d": lambda s: module(s, "enc", "4x4_down", "conv0").state["_buffers"].update(
        resample_filter=torch.ones(4)),
    "nan-weight": lambda s: conv0(s)["weight"].view(-1).__setitem__(0, float("nan")),
    "inf-weight": lambda s: conv0(s)["weight"].view(-1).__setitem__(3, float("inf")),
    "huge-stride-0-view": huge_view,
    "sigma-min-a-str": lambda s: s["ema"].state.update(sigma_min="0.02"),
    "sigma-max-nan": lambda s: s["ema"].state.update(sigma_max=float("nan")),
    "sigma-max-below-min": lambda s: s["ema"].state.update(sigma_max=0.01),
    "module-dict-contains-itself": self_loop,
    "3000-levels-deep": deep_chain,
}


@pytest.mark.parametrize("case", sorted(TAMPER))
def test_tampered_edm_pickle_is_one_line(persistence, tmp_path, capsys, monkeypatch, case):
    snap = fresh_snapshot()
    out = TAMPER[case](snap)
    snap = out if case == "data-not-a-dict" else snap
    path = tmp_path / "edm-cifar10-32x32-uncond-ve.pkl"
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(20_000)  # only to write the deep file
    try:
        path.write_bytes(pickle.dumps(snap, protocol=4))
    finally:
        sys.setrecursionlimit(old)
    # nothing of the network is built or named before the sizes are checked
    monkeypatch.setattr(edm_pickle, "name_map", fail_if_large(edm_pickle.name_map))
    one_line_refusal(capsys, str(path), "--out", str(tmp_path / "x.pt"))
    assert not (tmp_path / "x.pt").exists() and not persistence.exists()
    one_line_refusal(capsys, "--checkpoint", str(path), "--sampler", "heun", "--out", str(tmp_path / "s"),
                     module=full.sample)


def fail_if_large(fn):
    def guarded(cfg):
        assert cfg.num_blocks <= 64 and cfg.model_channels <= 4096 and len(cfg.channel_mult) <= 12
        return fn(cfg)
    return guarded


@pytest.mark.parametrize("precond, field", [("EDMPrecond", "sigma_data"), ("VPPrecond", "beta_d"),
                                            ("VPPrecond", "beta_min"), ("VEPrecond", "sigma_min")])
def test_nan_preconditioning_constants_are_refused(persistence, tmp_path, capsys, precond, field):
    snap = fresh_snapshot(precond)
    snap["ema"].state[field] = float("nan")
    path = tmp_path / "t.pkl"
    path.write_bytes(pickle.dumps(snap, protocol=4))
    assert field in one_line_refusal(capsys, str(path), "--out", str(tmp_path / "x.pt"))


# -- Flax ---------------------------------------------------------------------------------------------------


def flax_tree() -> dict:
    return raw_tree(CKPT)


def ext_of(a) -> msgpack.ExtType:
    return ext_array(np.asarray(a))


def set_leaf(name: str, value):
    def edit(tree):
        node = tree["params_ema"]
        *path, last = name.split("/")
        for p in path:
            node = node[p]
        node[last] = value(node[last]) if callable(value) else value
    return edit


def decode(ext: msgpack.ExtType) -> np.ndarray:
    shape, dtype, buf = msgpack.unpackb(ext.data, raw=False)
    return np.frombuffer(buf, dtype=dtype).reshape(shape).copy()


def deep_map(depth: int):
    node = {"x": 1}
    for _ in range(depth):
        node = {"x": node}
    return node


KERNEL = "Conv_0/kernel"
DEEP = msgpack.ExtType(99, b"a placeholder for 3000 nested maps")
FLAX_TAMPER = {
    "step-a-str": lambda t: t.update(step="abc"),
    "step-negative": lambda t: t.update(step=-5),
    "step-a-float": lambda t: t.update(step=1.5),
    "step-a-timestamp": lambda t: t.update(step=msgpack.Timestamp(1700000000)),
    "step-complex": lambda t: t.update(step=msgpack.ExtType(2, msgpack.packb([1.0, 2.0]))),
    "ema-rate-nan": lambda t: t.update(ema_rate=float("nan")),
    "ema-rate-a-str": lambda t: t.update(ema_rate="x"),
    "ema-rate-1.5": lambda t: t.update(ema_rate=1.5),
    "params-a-list": lambda t: t.update(params_ema=[1, 2]),
    "kernel-an-int": set_leaf(KERNEL, 7),
    "kernel-complex": set_leaf(KERNEL, lambda e: ext_of(decode(e).astype(np.complex64))),
    "kernel-datetime": set_leaf(KERNEL, lambda e: ext_of(decode(e).astype(np.int64).astype("M8[s]"))),
    "kernel-timestamp": set_leaf(KERNEL, msgpack.Timestamp(0)),
    "kernel-complex-leaf": set_leaf(KERNEL, msgpack.ExtType(2, msgpack.packb([1.0, 2.0]))),
    "kernel-nan": set_leaf(KERNEL, lambda e: ext_of(np.where(np.arange(decode(e).size).reshape(
        decode(e).shape) == 0, np.nan, decode(e)).astype(np.float32))),
    "kernel-inf": set_leaf(KERNEL, lambda e: ext_of(np.full_like(decode(e), np.inf))),
    "kernel-wrong-rank": set_leaf(KERNEL, lambda e: ext_of(decode(e).reshape(-1))),
    "kernel-lying-header": set_leaf(KERNEL, msgpack.ExtType(1, msgpack.packb(
        [[3, 3, 3, 10 ** 9], "float32", b"\0" * 16], use_bin_type=True))),
    "kernel-nf-5000": set_leaf(KERNEL, ext_of(np.zeros((3, 3, 0, 5000), np.float32))),
    "kernel-object-dtype": set_leaf(KERNEL, msgpack.ExtType(1, msgpack.packb(
        [[2], "object", b"\0" * 16], use_bin_type=True))),
    "100-levels-deep": set_leaf("Dense_0", deep_map(100)),
    "3000-levels-deep": set_leaf("Dense_0", DEEP),  # spliced in as bytes (msgpack cannot write it)
}


@pytest.mark.parametrize("case", sorted(FLAX_TAMPER))
def test_tampered_flax_file_is_one_line(tmp_path, capsys, case):
    tree = flax_tree()
    FLAX_TAMPER[case](tree)
    path = write(tmp_path / "cd-lpips" / "checkpoint_3", tree)
    path.write_bytes(path.read_bytes().replace(msgpack.packb(DEEP), b"\x81\xa1x" * 3000 + b"\x01"))
    one_line_refusal(capsys, str(path), "--out", str(tmp_path / "x.pt"))
    assert not (tmp_path / "x.pt").exists()
    one_line_refusal(capsys, "--checkpoint", str(path), "--out", str(tmp_path / "s"), module=full.sample)


def test_complex_and_datetime_arrays_are_not_read_as_numbers(tmp_path):
    from full.released import flax
    for a in (np.array([1 + 2j], np.complex64), np.array(["2024-01-01"], "M8[D]"), np.array([1], "m8[s]")):
        with pytest.raises(CMError, match="not a real number|not a plain|real number type"):
            flax.read_flax(write(tmp_path / "checkpoint_1", {"w": ext_of(a)}))


# -- the properties -----------------------------------------------------------------------------------------


def slots(root) -> list[tuple[object, object]]:
    """(container, key) of every dict entry and list item reachable from `root` (records and ModuleDicts
    included), without repeats."""
    out, seen, stack = [], set(), [root]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, snaps.Persistent):
            node = node.state
        elif isinstance(node, torch.nn.ModuleDict):
            node = node.__dict__["_modules"]
        if isinstance(node, dict):
            for k, v in node.items():
                out.append((node, k))
                stack.append(v)
        elif isinstance(node, list):
            out += [(node, i) for i in range(len(node))]
            stack += node
    return out


REPLACEMENTS = ["x", None, -1, 0, 10 ** 9, 1.5, float("nan"), float("inf"), [1], {}, (1, 2),
                np.float64(0.5)]


def mutate(value, how: int, pick):
    """The value removed (None returned as the marker 'remove'), retyped, NaN'd or enlarged."""
    if how == 0:
        return "remove"
    if how == 1:
        return pick(REPLACEMENTS)
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel():
        if how == 2:
            v = value.clone()
            v.view(-1)[pick(range(v.numel()))] = pick([float("nan"), float("inf")])
            return v
        return torch.cat([value, value]) if value.ndim else value * 1e30
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return pick(REPLACEMENTS)
    return value * pick([10 ** 6, -1, float("nan")]) if how == 2 else value * 10 ** 9


def loads_correctly(path: Path, x: torch.Tensor, t: torch.Tensor) -> None:
    """Either one-line CMError or a model whose outputs are finite."""
    try:
        state = checkpoints.load(path)
        f, _ = checkpoints.model_from_state(state, path=path)
    except CMError as e:
        assert "\n" not in str(e)
        return
    with torch.no_grad():
        assert torch.isfinite(f(x, t)).all()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), precond=st.sampled_from(["VEPrecond", "VPPrecond", "EDMPrecond"]))
def test_mutated_edm_pickles_load_or_refuse_in_one_line(persistence, tmp_path, data, precond):
    snap = fresh_snapshot(precond)
    where = slots(snap)
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        container, key = data.draw(st.sampled_from(where), label="slot")
        how = data.draw(st.integers(0, 3), label="how")
        if isinstance(container, dict) and key not in container:
            continue  # removed by an earlier mutation
        new = mutate(container[key], how, lambda xs: data.draw(st.sampled_from(list(xs))))
        if isinstance(new, str) and new == "remove":
            if isinstance(container, dict):
                container.pop(key, None)
            continue
        container[key] = new
    path = tmp_path / "m.pkl"
    try:
        path.write_bytes(pickle.dumps(snap, protocol=4))
    except (pickle.PicklingError, TypeError, RecursionError, AttributeError):
        return  # not a file anyone could write
    loads_correctly(path, torch.randn(2, 1, 8, 8), torch.tensor([0.5, 20.0]))
    assert not persistence.exists()


def flax_slots(tree) -> list[tuple[object, object]]:
    out, stack = [], [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for k, v in node.items():
                out.append((node, k))
                stack.append(v)
    return out


def flax_mutation(ext, how: int, pick):
    arr = decode(ext) if isinstance(ext, msgpack.ExtType) and ext.code == 1 else None
    if how == 1 or arr is None or arr.dtype.kind != "f" or not arr.size:
        return pick(["x", None, -1, 10 ** 9, 1.5, float("nan"), [1], {}, msgpack.Timestamp(5),
                     msgpack.ExtType(2, msgpack.packb([1.0, 2.0])), msgpack.ExtType(9, b"x"),
                     ext_of(np.ones(3, np.complex64)), ext_of(np.ones(2, "M8[s]"))])
    if how == 2:
        arr.reshape(-1)[pick(range(arr.size))] = pick([np.nan, np.inf, -np.inf])
        return ext_of(arr)
    return ext_of(np.concatenate([arr, arr]) if arr.ndim else arr * 1e30)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_flax_files_load_or_refuse_in_one_line(tmp_path, data):
    tree = flax_tree()
    tree.pop("opt_state"), tree.pop("params")  # read past in any case: keep the examples quick
    where = flax_slots(tree)
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        container, key = data.draw(st.sampled_from(where), label="slot")
        how = data.draw(st.integers(0, 3), label="how")
        if how == 0:
            container.pop(key, None)
        elif key in container:
            container[key] = flax_mutation(container[key], how, lambda xs: data.draw(st.sampled_from(xs)))
    path = write(tmp_path / "cd" / "checkpoint_3", tree)
    loads_correctly(path, torch.randn(2, 3, 32, 32), torch.tensor([0.5, 20.0]))
