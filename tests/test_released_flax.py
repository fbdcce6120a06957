"""The paper's CIFAR-10 Flax checkpoints in full/ (full/flax_ckpt.py, full/convert.py), with no JAX here.

The expected outputs in tests/fixtures/jax_ncsnpp/ were computed by the official JAX code itself (see the
README there); the full-size manifest lists the official CIFAR-10 parameter tree's names and shapes.
Files in the Flax format are written here with the msgpack package from the format's description, not with
the reader under test.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_data import skip_md5, write_cifar10  # noqa: F401  (skip_md5 is a fixture)

from cm import CMError
from full import checkpoints
from full.networks import NCSNpp, NCSNppConfig
from full.released import flax as flax_ckpt

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures" / "jax_ncsnpp"
CKPT = FIX / "checkpoints" / "checkpoint_3"


# -- an independent writer of the Flax msgpack format ------------------------------------------------------


def ext_array(a: np.ndarray, code: int = 1) -> msgpack.ExtType:
    a = np.asarray(a, order="C")  # (ascontiguousarray would make a 0-d array 1-d)
    return msgpack.ExtType(code, msgpack.packb([list(a.shape), a.dtype.name, a.tobytes()], use_bin_type=True))


def raw_tree(path: Path) -> dict:
    """The fixture's msgpack map with its extension records left as they are (for editing fields)."""
    return msgpack.unpackb(path.read_bytes(), ext_hook=lambda c, d: msgpack.ExtType(c, d), raw=False,
                           strict_map_key=False)


def write(path: Path, tree) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(msgpack.packb(tree, use_bin_type=True))
    return path


def nhwc(t: torch.Tensor) -> np.ndarray:
    return t.permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module")
def expected():
    with np.load(FIX / "expected.npz") as z:
        return {k: z[k] for k in z.files}


# -- 1. the conversion reproduces the official JAX outputs ---------------------------------------------------


def test_fixture_reproduces_the_jax_network_and_both_preconditionings(expected):
    x = torch.from_numpy(expected["x"]).permute(0, 3, 1, 2)   # JAX NHWC -> NCHW
    t = torch.from_numpy(expected["t"])
    scale = np.abs(expected["F"]).max()
    student, cfg = checkpoints.model_from_state(checkpoints.load(FIX))  # the folder: newest checkpoint_N
    assert cfg.cm.mode == "cd" and cfg.cm.sigma_min == 0.002
    teacher, tcfg = checkpoints.model_from_state(checkpoints.load(CKPT, kind="edm"))
    assert tcfg.cm.mode == "edm"
    with torch.no_grad():
        F = nhwc(student.net(x, 0.25 * torch.log(t)))
        f, D = nhwc(student(x, t)), nhwc(teacher(x, t))
    np.testing.assert_allclose(F, expected["F"], atol=2e-5 * scale, rtol=0)   # the raw network F
    np.testing.assert_allclose(f, expected["f"], atol=2e-5 * scale, rtol=0)   # get_distiller_fn
    np.testing.assert_allclose(D, expected["D"], atol=2e-5 * scale, rtol=0)   # get_denoiser_fn
    # the fixture's params and params_ema differ: sampling with `params` would be far off
    assert np.abs(expected["F_params"] - expected["F"]).max() > 100 * 2e-5 * scale


def test_teacher_heun_sampling_matches_the_official_heun_sampler(expected):
    """jcm.sampling.get_heun_sampler (18 levels from 80 to 0.002, Heun steps, an Euler step to 0)."""
    from cm import sample_heun
    D, cfg = checkpoints.model_from_state(checkpoints.load(CKPT, kind="edm"))
    z = torch.from_numpy(expected["heun_prior"]).permute(0, 3, 1, 2) / 80.0   # the prior is N(0, 80²)
    with torch.no_grad():
        x = sample_heun(D, z, cfg.run.grid_steps, cfg.cm.sigma_min, cfg.cm.sigma_max, cfg.cm.rho)
    np.testing.assert_allclose(nhwc(x), expected["heun"], atol=5e-5 * np.abs(expected["heun"]).max(), rtol=0)


# -- 2. the full-size tree maps one-to-one ------------------------------------------------------------------


def test_full_size_manifest_maps_one_to_one_onto_cifar10_ncsnpp():
    manifest = json.loads((FIX / "cifar10_manifest.json").read_text())
    assert sum(math.prod(s) for s in manifest.values()) == 56_395_523 + 128
    tree: dict = {}
    for name, shape in manifest.items():
        parts = name.split("/")
        assert parts[0] == "params"
        node = tree
        for p in parts[1:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = np.broadcast_to(np.float32(0), shape)   # shapes only, no memory per leaf
    cfg = flax_ckpt.infer_config(tree)
    assert cfg == NCSNppConfig.cifar10()
    sd = flax_ckpt.convert_params(tree, cfg)   # raises if any JAX leaf is left over
    with torch.device("meta"):
        net = NCSNpp(NCSNppConfig.cifar10())
    ref = net.state_dict()
    assert set(sd) == set(ref)
    assert all(sd[k].shape == ref[k].shape for k in ref)
    assert sum(p.numel() for p in net.parameters()) == 56_395_523
    assert sd["fourier.freqs"].numel() == 128 and "fourier.freqs" in dict(net.named_buffers())
    assert sum(v.numel() for v in sd.values()) == 56_395_523 + 128


def test_a_leaf_left_over_or_missing_is_one_line():
    tree = flax_ckpt.read_flax(CKPT)["params_ema"]
    cfg = flax_ckpt.infer_config(tree)
    extra = {**tree, "Conv_9": {"kernel": np.zeros((3, 3, 4, 4), np.float32)}}
    with pytest.raises(CMError, match="Conv_9"):
        flax_ckpt.convert_params(extra, cfg)
    missing = {k: v for k, v in tree.items() if k != "AttnBlockpp_3"}
    with pytest.raises(CMError, match="AttnBlockpp_3"):
        flax_ckpt.convert_params(missing, cfg)


# -- the reader ------------------------------------------------------------------------------------------


DTYPES = ["float32", "float64", "float16", "int32", "uint8", "int64", "bool"]


@settings(max_examples=25, deadline=None)
@given(shape=st.lists(st.integers(0, 4), max_size=3), dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 2 ** 31), scalar=st.floats(allow_nan=False, width=32))
def test_reader_returns_what_the_format_encodes(tmp_path_factory, shape, dtype, seed, scalar):
    a = (np.random.default_rng(seed).standard_normal(shape) * 50).astype(dtype)
    big = np.arange(10, dtype=np.float32)
    tree = {"a": {"b": ext_array(a)}, "s": ext_array(np.float32(scalar), code=3), "n": 7, "z": {},
        # a chunked array as flax writes one above 2**30 bytes
        "k": {"__msgpack_chunked_array__": True, "shape": {"0": 2, "1": 5},
              "chunks": {"0": ext_array(big[:6]), "1": ext_array(big[6:])}}}
    path = write(tmp_path_factory.mktemp("r") / "checkpoint_1", tree)
    out = flax_ckpt.read_flax(path)
    assert out["a"]["b"].dtype == np.dtype(dtype) and out["a"]["b"].shape == tuple(shape)
    np.testing.assert_array_equal(out["a"]["b"], a)
    assert out["s"] == np.float32(scalar) and out["n"] == 7  # complex leaves: test_released_tampered.py
    np.testing.assert_array_equal(out["k"], big.reshape(2, 5))
    assert out["z"] == {}


def test_bfloat16_arrays_are_read_as_float32(tmp_path):
    v = np.array([1.0, -2.5, 3.140625], np.float32)   # exactly representable in bfloat16
    bf = (v.view(np.uint32) >> 16).astype(np.uint16)
    rec = msgpack.ExtType(1, msgpack.packb([[3], "bfloat16", bf.tobytes()], use_bin_type=True))
    out = flax_ckpt.read_flax(write(tmp_path / "checkpoint_1", {"w": rec}))
    np.testing.assert_array_equal(out["w"], v)


@settings(max_examples=20, deadline=None)
@given(cut=st.floats(0.0, 0.999))
def test_truncated_files_give_one_line(tmp_path_factory, cut):
    data = CKPT.read_bytes()
    path = tmp_path_factory.mktemp("t") / "checkpoint_80"
    path.write_bytes(data[:max(1, int(cut * len(data)))])
    with pytest.raises(CMError) as e:
        checkpoints.load(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


@pytest.mark.parametrize("content", [
    b"\x88\x01\x02",                                       # a msgpack map header that never finishes
    msgpack.packb({"step": 1, "params": {}}),             # msgpack, but no params_ema
    msgpack.packb({"a": msgpack.ExtType(42, b"xx")}),     # an unknown extension type
    msgpack.packb({"a": msgpack.ExtType(1, msgpack.packb([[2], "object", b"\0" * 16]))}),
    msgpack.packb({"a": msgpack.ExtType(1, msgpack.packb([[3], "float32", b"\0" * 4]))}),  # too few bytes
])
def test_foreign_or_broken_msgpack_gives_one_line(tmp_path, content):
    path = tmp_path / "checkpoint_1"
    path.write_bytes(content)
    with pytest.raises(CMError) as e:
        checkpoints.load(path)
    assert "\n" not in str(e.value)


def test_skipped_entries_are_read_past_and_the_kept_ones_equal_a_full_read(tmp_path):
    full = flax_ckpt.read_flax(CKPT)
    part = flax_ckpt.read_flax(CKPT, keep=("params_ema", "step"))
    assert set(part) == set(full) and part["opt_state"] is None and part["params"] is None
    assert part["step"] == full["step"] == 1234
    names = flax_ckpt.flat_names(full["params_ema"])
    assert names == flax_ckpt.flat_names(part["params_ema"]) and len(names) > 100

    def leaf(tree, name):
        for k in name.split("/"):
            tree = tree[k]
        return tree
    assert all(np.array_equal(leaf(full["params_ema"], n), leaf(part["params_ema"], n)) for n in names)
    trailing = tmp_path / "checkpoint_1"
    trailing.write_bytes(CKPT.read_bytes() + b"\x01")
    with pytest.raises(CMError, match="extra data"):
        flax_ckpt.read_flax(trailing, keep=("step",))


def test_folder_without_checkpoints_and_missing_path(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(CMError, match="checkpoint_"):
        flax_ckpt.find_checkpoint(tmp_path)
    with pytest.raises(CMError, match="no checkpoint"):
        checkpoints.load(tmp_path / "nowhere")


def test_folder_picks_the_newest_checkpoint_numerically(tmp_path):
    d = tmp_path / "run" / "checkpoints"
    for n in (9, 80, 10):
        write(d / f"checkpoint_{n}", {"step": n})
    assert flax_ckpt.find_checkpoint(tmp_path / "run") == d / "checkpoint_80"
    assert flax_ckpt.find_checkpoint(d) == d / "checkpoint_80"


# -- kind ---------------------------------------------------------------------------------------------------


def test_kind_from_contents_path_and_override(tmp_path):
    tree = raw_tree(CKPT)
    assert checkpoints.load(CKPT)["official"]["kind"] == "cd"            # rate 0.9999, no name hint
    assert checkpoints.load(CKPT, kind="ct")["config"]["cm"]["mode"] == "ct"
    teacher = write(tmp_path / "a" / "checkpoint_1", {**tree, "ema_rate": flax_ckpt.TEACHER_EMA_RATE})
    assert checkpoints.load(teacher)["official"]["kind"] == "edm"
    ct = write(tmp_path / "b" / "checkpoint_1", {**tree, "target_params": tree["params"]})
    assert checkpoints.load(ct)["config"]["cm"]["mode"] == "ct"
    named = tmp_path / "edm_cifar10_ema"
    shutil.copy(CKPT, named)
    state = checkpoints.load(named)
    assert state["config"]["cm"]["mode"] == "edm" and state["config"]["preset"] == "cifar10-edm"
    l2 = tmp_path / "cd-l2" / "checkpoints" / "checkpoint_80"
    l2.parent.mkdir(parents=True)
    shutil.copy(CKPT, l2)
    assert checkpoints.load(l2.parent.parent)["config"]["preset"] == "cifar10-cd-l2"
    nearest = tmp_path / "ct-runs" / "cd-l1" / "checkpoints" / "checkpoint_80"   # the nearest name decides
    nearest.parent.mkdir(parents=True)
    shutil.copy(CKPT, nearest)
    assert checkpoints.load(nearest)["config"]["preset"] == "cifar10-cd-l1"
    nested = write(tmp_path / "c" / "checkpoint_1", {**tree, "params_ema": {"params": tree["params_ema"]}})
    assert checkpoints.load(nested)["config"]["net"]["model_channels"] == 4   # a tree with its "params" level
    with pytest.raises(CMError, match="kind"):
        checkpoints.load(CKPT, kind="gan")


# -- 3. the commands --------------------------------------------------------------------------------------


def run_cli(capsys, module: str, *args: str) -> tuple[int, str]:
    """`python -m module args` in this process: (exit status, stderr)."""
    import importlib
    main = importlib.import_module(module).main
    try:
        main(list(args))
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def test_convert_then_sample_and_sample_directly(tmp_path, expected, capsys):
    out = tmp_path / "cd_cifar10.pt"
    code, err = run_cli(capsys, "full.convert", str(CKPT), "--out", str(out))
    assert code == 0, err
    state = torch.load(out, weights_only=True)
    assert state["export"] and state["format"] == 1 and list(state["ema"]) == [0.9999]
    assert state["step"] == 1234 and state["official"]["params"] == "params_ema"
    f, _ = checkpoints.model_from_state(checkpoints.load(out))
    x, t = torch.from_numpy(expected["x"]).permute(0, 3, 1, 2), torch.from_numpy(expected["t"])
    with torch.no_grad():
        np.testing.assert_allclose(nhwc(f(x, t)), expected["f"], atol=1e-4, rtol=0)
    code, err = run_cli(capsys, "full.sample", "--checkpoint", str(CKPT), "--num-samples", "4", "--ts",
                        "0,11,17", "--grid-steps", "18", "--out", str(tmp_path / "s"))
    assert code == 0, err
    assert (tmp_path / "s" / "samples.png").stat().st_size > 0
    with np.load(tmp_path / "s" / "samples.npz") as z:
        assert z["arr_0"].shape == (4, 32, 32, 3)
    code, err = run_cli(capsys, "full.sample", "--checkpoint", str(FIX), "--kind", "edm",
                        "--num-samples", "2", "--out", str(tmp_path / "h"))   # the teacher: Heun
    assert code == 0, err
    assert (tmp_path / "h" / "samples.png").is_file()


def test_cli_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "checkpoint_80"
    bad.write_bytes(CKPT.read_bytes()[:1000])
    for args in (("full.convert", str(bad), "--out", str(tmp_path / "x.pt")),
                 ("full.sample", "--checkpoint", str(bad))):
        code, err = run_cli(capsys, *args)
        assert code == 1 and err.count("\n") == 1 and "truncated" in err, err
    assert not (tmp_path / "x.pt").exists()
    code, err = run_cli(capsys, "full.convert", str(CKPT), "--attn", "x", "--out", str(tmp_path / "x.pt"))
    assert code == 1 and err.count("\n") == 1 and "--attn" in err, err
    assert run_cli(capsys, "full.convert", str(CKPT), "--out", str(tmp_path / "y.pt"))[0] == 0
    for flag, v in (("--resolution", "3"), ("--attn", "8")):  # a full/ file's config fixes both
        code, err = run_cli(capsys, "full.convert", str(tmp_path / "y.pt"), flag, v, "--out",
                            str(tmp_path / "z.pt"))
        assert code == 1 and err.count("\n") == 1 and "Flax checkpoints only" in err, err
    assert not (tmp_path / "z.pt").exists()


def test_cd_training_with_a_flax_teacher(tmp_path, skip_md5):  # noqa: F811
    from full.train import main
    write_cifar10(tmp_path / "data", per_batch=4)
    teacher = tmp_path / "edm_cifar10_ema"
    shutil.copy(CKPT, teacher)
    main(["--preset", "cifar10-cd-lpips", f"run.teacher={teacher}", "cm.metric=l2",
          "net.model_channels=4", "net.channel_mult=1,2,2", "net.num_blocks=2",
          f"data.root={tmp_path / 'data'}",
          "opt.batch=4", "opt.steps=2", f"run.out={tmp_path / 'run'}", "run.sample_every=0",
          "run.sample_num=4", "run.ckpt_every=2", "data.num_workers=0"])
    assert (tmp_path / "run" / "export.pt").is_file()
    assert list((tmp_path / "run").glob("grid-*.png"))
