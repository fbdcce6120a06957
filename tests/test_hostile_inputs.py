"""Hostile inputs of full.evaluate and full.sample: .npy headers that declare more bytes than they hold
(wide dtypes, records, objects), reference statistics whose members are of another dtype, shape or size,
16-bit edit references, stale temporary files of a killed full.sample, flags that belong to another
mode, and EDM pickles with a non-finite sigma. Each is one line (status 1) or a correct result."""
import math
import os
import subprocess
import sys
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from test_released import persistence, write_edm_pickle  # noqa: F401 (persistence is a fixture)
from test_reliability import assert_one_line, export, run_main

import cm
from full import checkpoints, files
from full import evaluate as ev
from full.sample import load_reference

BOUND = files.MAX_NPY_BYTES


def write_header(fh, descr, shape, data: bytes = b"") -> None:
    """An .npy stream: its header declaring `descr` x `shape`, then `data` (a few bytes, or none)."""
    np.lib.format.write_array_header_1_0(fh, {"descr": descr, "fortran_order": False, "shape": shape})
    fh.write(data)


def lying_npz(path: Path, descr, shape, key="arr_0", **others) -> Path:
    """An .npz whose member `key` declares descr x shape over 64 bytes of data; `others` stored as is."""
    with zipfile.ZipFile(path, "w") as z:
        with z.open(f"{key}.npy", "w") as fh:
            write_header(fh, descr, shape, b"\0" * 64)
        for k, v in others.items():
            with z.open(f"{k}.npy", "w") as fh:
                np.lib.format.write_array(fh, np.asarray(v))
    return path


def lying_npy(path: Path, descr, shape) -> Path:
    with open(path, "wb") as fh:
        write_header(fh, descr, shape, b"\0" * 64)
    return path


# Wide dtypes, records and strings: the element count may lie within 2**33 while the bytes do not.
DTYPES = ["<f8", "<c16", "<i4", "<u2", "<f2", "|V100000", "<U16", [("a", "<f8"), ("b", "<i8")]]


@st.composite
def over_the_bound(draw):
    """(descr, shape) whose declared byte size, elements x itemsize, is over the bound."""
    descr = draw(st.sampled_from(DTYPES))
    itemsize = np.dtype(descr if isinstance(descr, str) else descr).itemsize
    rest = draw(st.lists(st.integers(1, 64), max_size=3))
    least = BOUND // (itemsize * math.prod(rest)) + 1  # one more leading row than fits
    lead = draw(st.integers(least, least * 8))
    return descr, (lead, *rest)


@settings(max_examples=30, deadline=None)
@given(case=over_the_bound(), npz=st.booleans())
def test_any_array_declaring_more_bytes_than_the_bound_is_refused_before_allocation(tmp_path_factory, case,
                                                                                   npz):
    descr, shape = case
    d = tmp_path_factory.mktemp("lie")
    path = lying_npz(d / "x.npz", descr, shape) if npz else lying_npy(d / "x.npy", descr, shape)
    tracemalloc.start()
    try:
        with pytest.raises(cm.CMError, match="declares") as e:
            files.read_npz_images(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**24, peak  # numpy traces its buffers: nothing near the declared size was allocated
    assert str(path) in str(e.value) and "bytes" in str(e.value) and "\n" not in str(e.value)


@settings(max_examples=15, deadline=None)
@given(descr=st.sampled_from(["<f8", "<c16", "|u1", "<i2", "|V3"]),
       shape=st.lists(st.integers(0, 5), max_size=3))
def test_an_array_within_the_bound_reads_back_exactly(tmp_path_factory, descr, shape):
    """The header check lets every honest array through, byte for byte (it bounds, it does not filter)."""
    d = tmp_path_factory.mktemp("ok")
    x = np.frombuffer(np.random.default_rng(0).bytes(np.dtype(descr).itemsize * math.prod(shape)),
                      dtype=descr).reshape(shape)
    np.save(d / "x.npy", x)
    np.savez(d / "x.npz", x=x)
    assert files.read_npy(d / "x.npy").tobytes() == x.tobytes()
    with files.open_npz(d / "x.npz") as f:
        got = files.npz_member(f, "x", d / "x.npz")
    assert got.dtype == x.dtype and got.shape == x.shape and got.tobytes() == x.tobytes()


@settings(max_examples=25, deadline=None)
@given(descr=st.sampled_from(["|u1", "<f8", "<c16", "|V7", [("a", "<f4"), ("b", "|u1")]]),
       shape=st.lists(st.integers(1, 40), min_size=1, max_size=3), npz=st.booleans())
def test_the_bound_is_on_bytes_not_elements(tmp_path_factory, monkeypatch, descr, shape, npz):
    """With the bound lowered to 4096 bytes, a complete, honest array is refused exactly when its elements
    x itemsize exceed it, whatever its element count."""
    monkeypatch.setattr(files, "MAX_NPY_BYTES", 4096)
    d = tmp_path_factory.mktemp("bound")
    x = np.zeros(shape, dtype=descr)
    path = d / ("x.npz" if npz else "x.npy")
    np.savez(path, x) if npz else np.save(path, x)
    if math.prod(shape) * np.dtype(descr).itemsize > 4096:
        with pytest.raises(cm.CMError, match="over the limit of 4096 bytes"):
            files.read_npy(path) if not npz else files.read_npz_images(path)
    else:
        if npz:
            with files.open_npz(path) as f:
                got = files.npz_member(f, "arr_0", path)
        else:
            got = files.read_npy(path)
        assert got.shape == tuple(shape) and got.dtype == x.dtype


def _patch_zip(path: Path, flag: int = 0, method: int | None = None) -> Path:
    """Set general-purpose `flag` bits (1: encrypted) or the compression `method` (98: PPMd, which
    zipfile cannot read) in every local and central header of the zip at `path`."""
    b = bytearray(path.read_bytes())
    for sig, at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):  # flags, then the method 2 bytes on
        i = b.find(sig)
        while i >= 0:
            b[i + at] |= flag
            if method is not None:
                b[i + at + 2:i + at + 4] = method.to_bytes(2, "little")
            i = b.find(sig, i + 4)
    path.write_bytes(bytes(b))
    return path


@pytest.mark.parametrize("flag, method", [(1, None), (0, 98)], ids=["encrypted", "ppmd"])
def test_an_npz_member_zipfile_cannot_open_is_one_line(tmp_path, flag, method):
    """zipfile raises RuntimeError (encrypted) or NotImplementedError (an unknown compression), not the
    errors of a corrupt file: each is a one-line refusal naming the file, for images and statistics."""
    imgs, ref = tmp_path / "imgs.npz", tmp_path / "ref.npz"
    np.savez(imgs, np.zeros((2, 8, 8, 3), np.uint8))
    np.savez(ref, mu=np.zeros(4), sigma=np.eye(4), n=np.int64(10))
    for p in (_patch_zip(imgs, flag, method), _patch_zip(ref, flag, method)):
        with pytest.raises(cm.CMError, match=str(p)):
            files.read_npz_images(p) if p == imgs else ev.load_stats(p)
    code, err = run_main("full.evaluate", [str(imgs), "--ref", str(ref), "--device", "cpu"])
    assert_one_line(code, err, "cannot read", str(tmp_path))  # the statistics, read first


def test_an_object_array_is_refused_unread(tmp_path):
    np.save(tmp_path / "o.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    np.savez(tmp_path / "o.npz", np.array([1, None], dtype=object))
    for p in (tmp_path / "o.npy", tmp_path / "o.npz"):
        with pytest.raises(cm.CMError, match="objects"):
            files.read_npz_images(p)


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("inputs")
    np.savez(d / "imgs.npz", np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8))
    np.savez(d / "ref.npz", mu=np.zeros(4), sigma=np.eye(4), n=np.int64(10))
    return dict(imgs=d / "imgs.npz", ref=d / "ref.npz")


def test_lying_inputs_of_full_evaluate_are_one_line(good, tmp_path):
    """The samples (.npz, .npy) and each member of --ref, declaring 64 GB to 7 TB: one line naming it."""
    ev_args = ["--device", "cpu", "--inception-weights", str(tmp_path / "unused.pth")]
    cases = [
        (lying_npz(tmp_path / "f8.npz", "<f8", (2**33,)), good["ref"], "f8.npz[arr_0]"),
        (lying_npz(tmp_path / "v.npz", "|V100000", (10**6,)), good["ref"], "v.npz[arr_0]"),
        (lying_npy(tmp_path / "f8.npy", "<f8", (2**33,)), good["ref"], "f8.npy"),
        (good["imgs"], lying_npz(tmp_path / "s.npz", "<f8", (10**6, 10**6), "sigma", mu=np.zeros(10**6)),
         "s.npz[sigma]"),
        (good["imgs"], lying_npz(tmp_path / "m.npz", "<f8", (2**33,), "mu", sigma=np.eye(2)), "m.npz[mu]"),
    ]
    for samples, ref, needle in cases:
        code, err = run_main("full.evaluate", [str(samples), "--ref", str(ref), *ev_args])
        assert_one_line(code, err, needle)


def _stats(path: Path, **members) -> Path:
    np.savez(path, **members)
    return path


def _empty(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def _npy_named_npz(path: Path) -> Path:
    with open(path, "wb") as fh:
        np.save(fh, np.zeros(3))
    return path


REFS = {  # a reference statistics file -> the words its refusal names
    "empty": (_empty, ["not an .npz"]),
    "npy": (_npy_named_npz, ["not an .npz"]),
    "n-str": (lambda p: _stats(p, mu=np.zeros(2), sigma=np.eye(2), n=np.array("8")), ["[n]", "integers"]),
    "n-2d": (lambda p: _stats(p, mu=np.zeros(2), sigma=np.eye(2), n=np.ones((2, 2), np.int64)),
             ["[n]", "scalar"]),
    "n-float": (lambda p: _stats(p, mu=np.zeros(2), sigma=np.eye(2), n=np.float64(8.5)), ["[n]", "integers"]),
    "n-1": (lambda p: _stats(p, mu=np.zeros(2), sigma=np.eye(2), n=np.int64(1)), ["[n]", "at least 2"]),
    "mu-2d": (lambda p: _stats(p, mu=np.zeros((2, 2)), sigma=np.eye(2)), ["[mu]", "(d,)"]),
    "mu-complex": (lambda p: _stats(p, mu=np.zeros(2, complex), sigma=np.eye(2)), ["[mu]", "complex128"]),
    "mu-str": (lambda p: _stats(p, mu=np.array(["a", "b"]), sigma=np.eye(2)), ["[mu]", "<U1"]),
    "sigma-d": (lambda p: _stats(p, mu=np.zeros(3), sigma=np.eye(2)), ["[sigma]", "(3, 3)"]),
    "sigma-1d": (lambda p: _stats(p, mu=np.zeros(2), sigma=np.ones(2)), ["[sigma]", "(2, 2)"]),
    "sigma-object": (lambda p: _stats(p, mu=np.zeros(2), sigma=np.array([None, 1], dtype=object)),
                     ["[sigma]", "objects"]),
    "no-sigma": (lambda p: _stats(p, mu=np.zeros(2)), ["lacks", "sigma"]),
}


@pytest.mark.parametrize("kind", sorted(REFS))
def test_every_member_of_the_reference_statistics_is_checked_before_use(good, tmp_path, kind):
    make, words = REFS[kind]
    ref = make(tmp_path / "ref.npz")
    code, err = run_main("full.evaluate", [str(good["imgs"]), "--ref", str(ref), "--device", "cpu",
                                           "--inception-weights", str(tmp_path / "unused.pth")])
    assert_one_line(code, err, str(ref), *words)


def test_honest_reference_statistics_load_as_written(tmp_path):
    rng = np.random.default_rng(1)
    a = rng.normal(size=(5, 3))
    sigma, mu = a.T @ a, rng.normal(size=3).astype(np.float32)  # float32 mu is read as float64
    np.savez(tmp_path / "r.npz", mu=mu, sigma=sigma, n=np.int32(7))
    got_mu, got_sigma, n = ev.load_stats(tmp_path / "r.npz")
    assert got_mu.dtype == np.float64 and np.array_equal(got_mu, mu.astype(np.float64))
    assert np.array_equal(got_sigma, sigma) and n == 7 and type(n) is int
    np.savez(tmp_path / "pytorch-fid.npz", mu=mu, sigma=sigma)  # pytorch-fid records no n
    assert ev.load_stats(tmp_path / "pytorch-fid.npz")[2] is None


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), shape=st.sampled_from([(1, 8, 8), (3, 8, 8), (3, 4, 4), (1, 16, 16)]))
def test_a_16_bit_reference_reads_as_its_8_bit_counterpart(tmp_path_factory, seed, shape):
    """A 16-bit PNG (PIL mode I;16) holding v * 257 is the 8-bit picture v at full 16-bit scale: as an edit
    reference it gives the same tensor, exactly (not clipped to white, not truncated to its low byte)."""
    d = tmp_path_factory.mktemp("i16")
    v = np.random.default_rng(seed).integers(0, 256, (8, 8)).astype(np.uint16)
    Image.fromarray(v * 257).save(d / "r16.png")
    Image.fromarray(v.astype(np.uint8)).save(d / "r8.png")
    with Image.open(d / "r16.png") as im:
        assert im.mode == "I;16"
    a, b = load_reference(str(d / "r16.png"), shape), load_reference(str(d / "r8.png"), shape)
    assert a.shape == (1, *shape) and torch.equal(a, b)
    if shape[1:] == (8, 8):  # no resize: the tensor is v / 127.5 - 1 itself
        assert torch.equal(b[0, 0], torch.from_numpy(v.astype(np.float32)) / 127.5 - 1)


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("exports")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8), dtype=np.uint8)).save(d / "ref.png")
    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(d / "mask.png")
    return dict(ct=export(d / "ct.pt", "tiny-ct"), edm=export(d / "edm.pt", "tiny-edm"), ref=d / "ref.png",
                mask=d / "mask.png")


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()  # reaped: no process has this pid now
    return p.pid


@pytest.mark.parametrize("edit", [False, True])
def test_full_sample_removes_the_temporaries_of_a_killed_run_and_keeps_a_live_ones(exports, tmp_path, edit):
    out = tmp_path / "s"
    out.mkdir()
    dead, live = _dead_pid(), os.getppid()  # not our own pid: this process writes .samples.npz.<pid>.tmp
    stale = [out / f".samples.npz.{dead}.tmp", out / f".edit-denoise.npz.{dead}.tmp"]
    kept = [out / f".samples.npz.{live}.tmp", out / "notes.tmp", out / "samples.npz.old"]
    for p in stale + kept:
        p.write_bytes(b"half written")
    argv = ["--checkpoint", str(exports["ct"]), "--device", "cpu", "--out", str(out)]
    argv += ["--edit", "denoise", "--sigmas", "0.5", "--reference", str(exports["ref"])] if edit else \
        ["--num-samples", "2"]
    code, err = run_main("full.sample", argv)
    assert code == 0, err
    assert not any(p.exists() for p in stale)
    assert all(p.read_bytes() == b"half written" for p in kept)  # a live writer's file, and files not ours
    assert (out / ("edit-denoise.npz" if edit else "samples.npz")).is_file()


MODE_CASES = [  # flags outside the mode they belong to -> the flag the one-line refusal names
    (["--reference", "REF"], "--reference"),
    (["--factor", "2"], "--factor"),
    (["--edit", "denoise", "--sigmas", "0.5", "--reference", "REF", "--factor", "2"], "--factor"),
    (["--mask", "MASK"], "--mask"),
    (["--edit", "denoise", "--sigmas", "0.5", "--reference", "REF", "--mask", "MASK"], "--mask"),
    (["--edit", "denoise", "--sigmas", "0.5", "--reference", "REF", "--sampler", "onestep"], "--sampler"),
    (["--edit", "denoise", "--sigmas", "0.5", "--reference", "REF", "--steps", "4"], "--steps"),
    (["--edit", "denoise", "--sigmas", "0.5", "--reference", "REF", "--class-labels", "1"], "--class-labels"),
    (["--edit", "superres", "--reference", "REF", "--grid-steps", "40"], "--grid-steps"),
    (["--grid-steps", "40"], "--grid-steps"),
    (["--sampler", "onestep", "--steps", "4"], "--steps"),
    (["--search-ts", "--steps", "4"], "--steps"),
    (["--search-ts", "--sampler", "heun"], "--sampler"),
    (["--ref", "stats.npz"], "--ref"),
    (["--edit", "superres", "--reference", "REF", "--factor", "0"], "--factor"),
    (["--edit", "superres", "--reference", "REF", "--factor", "1"], "--factor"),
    (["--edit", "superres", "--reference", "REF", "--factor", "-2"], "--factor"),
    (["--edit", "superres", "--reference", "REF", "--factor", "3"], "--factor 3 does not divide"),
    (["EDM", "--sampler", "heun", "--steps", "0"], "--steps"),
    (["EDM", "--sampler", "heun", "--steps", "-0"], "--steps"),
    (["EDM", "--steps", "1"], "--steps"),
    (["--steps", "4"], "--steps"),  # a consistency model has no Heun grid
    # a full/ file names its network and mode: both were ignored without a word
    (["--arch", "imagenet64"], "--arch (run.teacher_arch) applies to a released"),
    (["--kind", "cd"], "--kind (run.teacher_kind) applies to a released"),
]


@pytest.mark.parametrize("extra, needle", MODE_CASES)
def test_a_flag_outside_its_mode_or_range_is_one_line(exports, tmp_path, extra, needle):
    ck = exports["edm"] if extra[:1] == ["EDM"] else exports["ct"]
    names = {"REF": str(exports["ref"]), "MASK": str(exports["mask"])}
    extra = [names.get(a, a) for a in extra if a != "EDM"]
    out = tmp_path / "s"
    code, err = run_main("full.sample", ["--checkpoint", str(ck), "--device", "cpu", "--num-samples", "2",
                                         "--out", str(out), *extra])
    assert_one_line(code, err, needle)
    assert not out.exists() or not any(out.iterdir())  # refused before anything was written


def test_the_flags_in_their_modes_still_work(exports, tmp_path):
    """The counterparts of the refusals above: each flag where it belongs samples and writes its file."""
    for ck, extra, wrote in [
        ("ct", ["--edit", "superres", "--reference", str(exports["ref"]), "--factor", "4"],
         "edit-superres.npz"),
        ("ct", ["--edit", "inpaint", "--reference", str(exports["ref"]), "--mask", str(exports["mask"]),
                "--ts", "0,17", "--grid-steps", "18"], "edit-inpaint.npz"),
        ("edm", ["--sampler", "heun", "--steps", "2", "--num-samples", "2"], "samples.npz"),
        ("ct", ["--ts", "0,2", "--grid-steps", "3", "--num-samples", "2"], "samples.npz"),
    ]:
        out = tmp_path / wrote / ck
        code, err = run_main("full.sample", ["--checkpoint", str(exports[ck]), "--device", "cpu",
                                             "--out", str(out), *extra])
        assert code == 0, (extra, err)
        assert (out / wrote).is_file()


SIGMA_FIELDS = {"VEPrecond": ["sigma_min", "sigma_max"],
                "EDMPrecond": ["sigma_min", "sigma_max", "sigma_data"]}


@settings(max_examples=40, deadline=None)
@given(precond=st.sampled_from(sorted(SIGMA_FIELDS)), data=st.data(),
       bad=st.one_of(st.sampled_from([math.nan, math.inf, -math.inf, 10 ** 400, -(10 ** 400)]),
                     st.floats(max_value=-1e-300, allow_nan=False)))
def test_every_sigma_of_an_edm_preconditioning_is_finite_and_positive(precond, data, bad):
    """A noise level or data scale of NaN, +-inf, below zero or beyond a float is refused in one line naming
    it; the one exception is +inf for EDMPrecond's sigma_max, EDM's own default (no upper bound), whose
    sampling range is still clamped to 80."""
    from full.released import edm_pickle
    field = data.draw(st.sampled_from(SIGMA_FIELDS[precond]))
    if (precond, field, bad) == ("EDMPrecond", "sigma_max", math.inf):
        _, lo, hi = edm_pickle.precond_constants(precond, {field: bad})
        assert hi == math.inf and min(80.0, hi) == 80.0
        return
    with pytest.raises(cm.CMError, match=f"{precond}.{field}=") as e:
        edm_pickle.precond_constants(precond, {field: bad})
    assert "\n" not in str(e.value)


@pytest.mark.usefixtures("persistence")
def test_an_edm_pickle_refuses_arch(tmp_path):
    """An EDM pickle holds its network's class and arguments: an --arch given with it did nothing."""
    write_edm_pickle(tmp_path / "edm.pkl", "EDMPrecond", sigma_min=0, sigma_max=math.inf, sigma_data=0.5)
    with pytest.raises(cm.CMError, match="--arch applies to a guided-diffusion .pt"):
        checkpoints.load(tmp_path / "edm.pkl", arch="imagenet64")
    assert checkpoints.load(tmp_path / "edm.pkl")["config"]["cm"]["mode"] == "edm"


@pytest.mark.usefixtures("persistence")
def test_an_edm_pickle_with_an_infinite_ve_sigma_max_is_one_line(tmp_path):
    write_edm_pickle(tmp_path / "inf.pkl", "VEPrecond", sigma_min=0.02, sigma_max=math.inf)
    write_edm_pickle(tmp_path / "edm.pkl", "EDMPrecond", sigma_min=0, sigma_max=math.inf, sigma_data=0.5)
    argv = ["--sampler", "heun", "--steps", "2", "--num-samples", "2", "--device", "cpu"]
    code, err = run_main("full.sample", ["--checkpoint", str(tmp_path / "inf.pkl"), *argv,
                                         "--out", str(tmp_path / "s")])
    assert_one_line(code, err, "inf.pkl", "VEPrecond.sigma_max=inf")
    code, err = run_main("full.sample", ["--checkpoint", str(tmp_path / "edm.pkl"), *argv,
                                         "--out", str(tmp_path / "e")])
    assert code == 0, err
    assert np.load(tmp_path / "e" / "samples.npz")["arr_0"].shape == (2, 8, 8, 1)


def test_an_export_without_its_evaluated_ema_is_one_line(tmp_path):
    """An export whose EMA rates are not its config's ema.rates (the evaluated 0.99 replaced by 0.5, the
    checksum re-signed) is refused in one line naming the rate, not sampled from the stray EMA."""
    from full import checkpoints
    from full.model import make_model
    from full.presets import resolve
    cfg = resolve("tiny-ct")
    torch.manual_seed(0)
    path = checkpoints.export(tmp_path / "e.pt", {0.99: make_model(cfg), 0.999: make_model(cfg)}, cfg, step=0)
    state = torch.load(path, weights_only=True)
    state["ema"] = {0.5: state["ema"][0.99]}
    state.pop("sha256", None)
    state["sha256"] = cm.scan_tree(state)
    torch.save(state, tmp_path / "bad.pt")
    code, err = run_main("full.sample", ["--checkpoint", str(tmp_path / "bad.pt"), "--device", "cpu",
                                         "--num-samples", "2", "--out", str(tmp_path / "s")])
    assert_one_line(code, err, "0.5")
    code, err = run_main("full.sample", ["--checkpoint", str(path), "--device", "cpu", "--num-samples", "2",
                                         "--out", str(tmp_path / "ok")])
    assert code == 0, err
