"""Tests of full/evaluate.py (FID / IS): closed forms, the pipeline with a stand-in extractor, errors.

The real TF-Inception weights cannot be downloaded here, so the pipeline runs with a fixed random
projection standing in for Inception, and the real torch-fidelity network runs once with random
weights saved to a file (wiring only: shapes, dtype, the --inception-weights path).
"""
import contextlib
import io
import pickle
import urllib.error

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import cm
from full import evaluate as ev

FAST = settings(max_examples=25, deadline=None)


# ----------------------------------------------------------------------------------------------------
# frechet_distance


def _random_cov(rng: np.random.Generator, d: int, rank: int | None = None) -> np.ndarray:
    a = rng.normal(size=(d, rank or d))
    return a @ a.T / (rank or d)


@FAST
@given(
    d=st.integers(1, 8),
    seed=st.integers(0, 2**31 - 1),
    scale=st.floats(1e-2, 1e2),
)
def test_fid_diagonal_closed_form(d, seed, scale):
    """Commuting (diagonal) covariances: FID = |μ₁-μ₂|² + Σ_i (s1 + s2 - 2 √(s1 s2))."""
    rng = np.random.default_rng(seed)
    mu1, mu2 = rng.normal(size=d) * scale, rng.normal(size=d) * scale
    s1, s2 = rng.uniform(0.01, 3, size=d) * scale**2, rng.uniform(0.01, 3, size=d) * scale**2
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    got = ev.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
    assert got == pytest.approx(expected, rel=1e-7, abs=1e-9 * scale**2)
    # A common rotation keeps the covariances commuting but makes them dense; FID is invariant.
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    rotated = ev.frechet_distance(q @ mu1, q @ np.diag(s1) @ q.T, q @ mu2, q @ np.diag(s2) @ q.T)
    assert rotated == pytest.approx(expected, rel=1e-6, abs=1e-8 * scale**2)


@FAST
@given(d=st.integers(1, 12), seed=st.integers(0, 2**31 - 1))
def test_fid_general_symmetric_nonnegative_zero_on_self(d, seed):
    rng = np.random.default_rng(seed)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = _random_cov(rng, d), _random_cov(rng, d)
    ab, ba = ev.frechet_distance(mu1, s1, mu2, s2), ev.frechet_distance(mu2, s2, mu1, s1)
    assert ab == pytest.approx(ba, rel=1e-7, abs=1e-9)
    assert ab >= -1e-9
    assert ev.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-8)
    # Oracle by another route: tr (Σ₁Σ₂)^½ = Σ √λ_i(Σ₁Σ₂), the eigenvalues being real and >= 0.
    eig = np.linalg.eigvals(s1 @ s2)
    tr_covmean = np.sqrt(eig.astype(complex)).real.sum()
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_covmean
    assert ab == pytest.approx(expected, rel=1e-6, abs=1e-8)


def test_fid_matches_torch_fidelity_formula():
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(300, 16)), rng.normal(size=(200, 16)) * 1.3 + 0.2
    (m1, s1), (m2, s2) = ev.feature_stats(x), ev.feature_stats(y)
    theirs = fid_statistics_to_metric({"mu": m1, "sigma": s1}, {"mu": m2, "sigma": s2}, verbose=False)
    ours = ev.frechet_distance(m1, s1, m2, s2)
    assert ours == pytest.approx(theirs["frechet_inception_distance"], rel=1e-8)


def test_fid_rank_deficient_covariances_are_finite():
    """Fewer samples than dimensions give singular Σ (the ε·I fallback's case); the result stays finite."""
    rng = np.random.default_rng(1)
    s1, s2 = _random_cov(rng, 10, rank=3), _random_cov(rng, 10, rank=4)
    fid = ev.frechet_distance(np.zeros(10), s1, np.ones(10), s2)
    assert np.isfinite(fid) and fid > 10 - 1e-6


def test_fid_rejects_non_covariances_and_bad_shapes():
    with pytest.raises(cm.CMError, match="imaginary"):
        ev.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), -np.eye(3))
    with pytest.raises(cm.CMError, match="mismatched"):
        ev.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_feature_stats():
    x = np.random.default_rng(2).normal(size=(50, 4)).astype(np.float32)
    mu, sigma = ev.feature_stats(x)
    assert mu.dtype == sigma.dtype == np.float64
    # the unbiased sample covariance written out: Σ_ij = Σ_n (x_ni - x̄_i)(x_nj - x̄_j) / (N - 1)
    xd = x.astype(np.float64)
    centred = xd - xd.sum(0) / len(xd)
    by_hand = np.array([[(centred[:, i] * centred[:, j]).sum() / (len(xd) - 1) for j in range(4)]
                        for i in range(4)])
    np.testing.assert_allclose(mu, xd.sum(0) / len(xd), rtol=1e-12)
    np.testing.assert_allclose(sigma, by_hand, rtol=1e-10)
    # a closed form: two points ±(1, 2) have mean 0 and covariance 2 (1, 2)(1, 2)ᵀ / (2 - 1)
    mu, sigma = ev.feature_stats(np.array([[1.0, 2.0], [-1.0, -2.0]], dtype=np.float32))
    np.testing.assert_array_equal(mu, [0, 0])
    np.testing.assert_allclose(sigma, [[2, 4], [4, 8]], rtol=1e-12)
    with pytest.raises(cm.CMError, match="at least 2"):
        ev.feature_stats(x[:1])


# ----------------------------------------------------------------------------------------------------
# inception_score


@pytest.mark.parametrize("as_logits", [True, False])
def test_is_uniform_predictions_is_one(as_logits):
    x = np.zeros((100, 1008)) if as_logits else np.full((100, 1008), 1 / 1008)
    mean, std = ev.inception_score(x, splits=10)
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)


@FAST
@given(k=st.integers(1, 50), per_split=st.integers(1, 5), splits=st.integers(1, 10))
def test_is_one_hot_over_k_classes_is_k(k, per_split, splits):
    labels = np.arange(k * per_split * splits) % k  # every split sees every class equally often
    probs = np.eye(60)[labels]
    mean, std = ev.inception_score(probs, splits=splits)
    assert mean == pytest.approx(k, rel=1e-10) and std == pytest.approx(0.0, abs=1e-9)
    # The same as near-one-hot logits.
    mean_logits, _ = ev.inception_score(80.0 * probs, splits=splits, probs=False)
    assert mean_logits == pytest.approx(k, rel=1e-6)


@FAST
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(10, 60), k=st.integers(2, 20))
def test_is_bounds_and_torch_fidelity_agreement(seed, n, k):
    from torch_fidelity.metric_isc import isc_features_to_metric

    logits = np.random.default_rng(seed).normal(size=(n, k)) * 3
    mean, std = ev.inception_score(logits, splits=5)
    assert 1 - 1e-9 <= mean <= k + 1e-9
    theirs = isc_features_to_metric(torch.from_numpy(logits), splits=5, shuffle=False)
    assert mean == pytest.approx(theirs["inception_score_mean"], rel=1e-9)
    assert std == pytest.approx(theirs["inception_score_std"], rel=1e-6, abs=1e-12)


# ----------------------------------------------------------------------------------------------------
# A stand-in for Inception: a fixed random projection of 8x8-downsampled pixels


class StandIn:
    """uint8 (B, 3, H, W) -> features (B, 12), logits (B, 10); deterministic, any image size."""

    def __init__(self, dim: int = 12, classes: int = 10):
        g = torch.Generator().manual_seed(0)
        self.w_feat = torch.randn(3 * 8 * 8, dim, generator=g) / 8
        self.w_logit = torch.randn(dim, classes, generator=g)
        self.calls = 0

    def __call__(self, x: torch.Tensor):
        assert x.dtype == torch.uint8 and x.ndim == 4 and x.shape[1] == 3
        self.calls += 1
        pooled = F.adaptive_avg_pool2d(x.float() / 255, 8).flatten(1)  # (B, 192)
        feats = pooled @ self.w_feat
        return feats, feats @ self.w_logit


def _images(n=64, size=16, seed=0, shift=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 200, size=(n, size, size, 3)) + shift
    return np.clip(x, 0, 255).astype(np.uint8)


def _write_folder(folder, images):
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"{i:05d}.png")
    return folder


def test_extract_batches_and_layouts():
    images = _images(n=10)
    stand_in = StandIn()
    f, l = ev.extract(images, stand_in, batch_size=4)
    assert f.shape == (10, 12) and l.shape == (10, 10) and stand_in.calls == 3
    # An iterable of batches gives the same features as one array.
    f2, _ = ev.extract([images[:3], images[3:]], StandIn(), batch_size=4)
    np.testing.assert_allclose(f, f2, rtol=1e-5, atol=1e-5)


def test_load_images_npz_nchw_folder_agree(tmp_path):
    images = _images(n=7)
    np.savez(tmp_path / "nhwc.npz", images)  # arr_0, as guided-diffusion writes it
    np.savez(tmp_path / "nchw.npz", images=images.transpose(0, 3, 1, 2))
    folder = _write_folder(tmp_path / "pngs", images)
    for src in ("nhwc.npz", "nchw.npz", "pngs"):
        np.testing.assert_array_equal(ev.load_images(tmp_path / src), images)
    assert folder.is_dir()
    gray = images[..., :1]
    np.savez(tmp_path / "gray.npz", gray)
    assert ev.load_images(tmp_path / "gray.npz").shape == (7, 16, 16, 3)


def test_pipeline_end_to_end_with_stand_in(tmp_path, monkeypatch, capsys):
    real, shifted = _images(n=80, seed=0), _images(n=80, seed=1, shift=50)
    np.savez(tmp_path / "real.npz", real)
    np.savez(tmp_path / "shifted.npz", shifted)
    _write_folder(tmp_path / "real_pngs", real)
    monkeypatch.setattr(ev, "make_extractor", lambda device=None, weights_path=None: StandIn())

    ref = tmp_path / "stats" / "ref.npz"
    ev.main(["--make-ref", str(tmp_path / "real.npz"), "--out", str(ref), "--batch-size", "32"])
    with np.load(ref) as f:
        assert set(f.keys()) == {"mu", "sigma", "n"} and int(f["n"]) == 80
        assert f["mu"].shape == (12,) and f["sigma"].shape == (12, 12)

    self_npz = ev.main([str(tmp_path / "real.npz"), "--ref", str(ref)])
    self_pngs = ev.main([str(tmp_path / "real_pngs"), "--ref", str(ref), "--batch-size", "7"])
    other = ev.main([str(tmp_path / "shifted.npz"), "--ref", str(ref)])
    assert abs(self_npz["fid"]) < 1e-6 and abs(self_pngs["fid"]) < 1e-6
    assert other["fid"] > 1.0
    assert self_npz["n"] == 80 and 1.0 <= self_npz["is_mean"] <= 10.0
    out = capsys.readouterr().out
    assert "FID:" in out and "IS:" in out and "±" in out

    # The library function gives the same numbers as the CLI.
    mu, sigma, n = ev.load_stats(ref)
    direct = ev.evaluate(shifted, mu, sigma, StandIn(), batch_size=16)
    assert direct["fid"] == pytest.approx(other["fid"], rel=1e-6)
    assert n == 80


def _write_cifar10(root, images, labels):
    """CIFAR-10's python format: pickled dicts with 'data' (N, 3072) uint8 rows in CHW order."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    chunks = np.array_split(np.arange(len(images)), 5)
    for i, idx in enumerate(chunks, 1):
        rows = images[idx].transpose(0, 3, 1, 2).reshape(len(idx), -1)
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump({"data": rows, "labels": labels[idx].tolist()}, f)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": rows[:1], "labels": [0]}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)


def test_make_ref_cifar10_via_torchvision(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar

    images = _images(n=40, size=32, seed=3)
    _write_cifar10(tmp_path / "data", images, np.arange(40) % 10)
    # The real files' md5 sums are checked; these small stand-ins pass only with the check disabled.
    monkeypatch.setattr(tv_cifar.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)
    monkeypatch.setattr(ev, "make_extractor", lambda device=None, weights_path=None: StandIn())
    np.testing.assert_array_equal(ev.cifar10_train_images(tmp_path / "data"), images)
    out = tmp_path / "cifar_ref.npz"
    ev.main(["--make-ref", "cifar10", "--data-dir", str(tmp_path / "data"), "--out", str(out)])
    mu, sigma, n = ev.load_stats(out)
    mu2, sigma2 = ev.feature_stats(ev.extract(images, StandIn())[0])
    assert n == 40
    np.testing.assert_allclose(mu, mu2, rtol=1e-6)
    np.testing.assert_allclose(sigma, sigma2, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------
# Errors: one line, non-zero exit, no traceback


def _exit_message(argv) -> str:
    err = io.StringIO()
    with pytest.raises(SystemExit) as info, contextlib.redirect_stderr(err):
        ev.main(argv)
    assert info.value.code not in (0, None)
    msg = err.getvalue().strip()
    assert msg.startswith("error: ") and "\n" not in msg
    return msg


def test_offline_missing_inception_weights(tmp_path, monkeypatch, capsys):
    """The real extractor with an empty hub cache and a failing download: one line naming file and URL."""
    import torch.hub

    def no_network(url, dst, *args, **kwargs):  # what this offline machine raises, without touching the net
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    np.savez(tmp_path / "s.npz", _images(n=4))
    ev.save_stats(tmp_path / "ref.npz", np.zeros(2048), np.eye(2048), 4)
    msg = _exit_message([str(tmp_path / "s.npz"), "--ref", str(tmp_path / "ref.npz"), "--device", "cpu"])
    assert "weights-inception-2015-12-05-6726825d.pth" in msg
    assert "https://github.com/toshas/torch-fidelity/releases/download/" in msg
    assert str(tmp_path / "torch_home" / "hub" / "checkpoints") in msg
    assert "--inception-weights" in msg
    assert capsys.readouterr().err == ""  # torch.hub's "Downloading: ..." line is swallowed
    msg = _exit_message(["--make-ref", str(tmp_path / "s.npz"), "--out", str(tmp_path / "r.npz")])
    assert "weights-inception" in msg and not (tmp_path / "r.npz").exists()
    msg = _exit_message([str(tmp_path / "s.npz"), "--ref", str(tmp_path / "ref.npz"),
                         "--inception-weights", str(tmp_path / "nope.pth")])
    assert "nope.pth" in msg


def test_real_inception_wiring_with_random_weights(tmp_path):
    """torch-fidelity's network (random weights from a file): uint8 batch -> (B, 2048), (B, 1008)."""
    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    with pytest.MonkeyPatch.context() as mp:  # build the architecture without fetching or loading weights
        mp.setattr(tfi, "load_state_dict_from_url", lambda *a, **k: {})
        mp.setattr(torch.nn.Module, "load_state_dict", lambda self, *a, **k: None)
        net = tfi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    weights = tmp_path / "random_inception.pth"
    torch.save(net.state_dict(), weights)
    extractor = ev.InceptionExtractor("cpu", weights)
    feats, logits = ev.extract(_images(n=2, size=32), extractor, batch_size=1)
    assert feats.shape == (2, 2048) and logits.shape == (2, 1008)
    assert np.isfinite(feats).all() and np.isfinite(logits).all()


def test_bad_inputs(tmp_path, monkeypatch):
    monkeypatch.setattr(ev, "make_extractor", lambda device=None, weights_path=None: StandIn())
    ref = tmp_path / "ref.npz"
    ev.save_stats(ref, np.zeros(12), np.eye(12), 10)

    assert "not found" in _exit_message([str(tmp_path / "missing.npz"), "--ref", str(ref)])
    assert "not found" in _exit_message([str(tmp_path / "missing_dir"), "--ref", str(ref)])

    np.savez(tmp_path / "float.npz", _images(n=4).astype(np.float32))
    assert "uint8" in _exit_message([str(tmp_path / "float.npz"), "--ref", str(ref)])
    np.savez(tmp_path / "shape.npz", np.zeros((4, 5, 5, 5), np.uint8))
    assert "channels" in _exit_message([str(tmp_path / "shape.npz"), "--ref", str(ref)])
    np.savez(tmp_path / "flat.npz", np.zeros((4, 12), np.uint8))
    assert "shape" in _exit_message([str(tmp_path / "flat.npz"), "--ref", str(ref)])
    np.savez(tmp_path / "keys.npz", foo=_images(n=4))
    assert "arr_0" in _exit_message([str(tmp_path / "keys.npz"), "--ref", str(ref)])
    (tmp_path / "garbage.npz").write_bytes(b"not a zip")
    assert "cannot read" in _exit_message([str(tmp_path / "garbage.npz"), "--ref", str(ref)])
    assert "statistics" in _exit_message([str(ref), "--ref", str(ref)])  # stats passed as samples

    np.savez(tmp_path / "one.npz", _images(n=1))
    assert "at least 2" in _exit_message([str(tmp_path / "one.npz"), "--ref", str(ref)])
    (tmp_path / "empty").mkdir()
    assert "no " in _exit_message([str(tmp_path / "empty"), "--ref", str(ref)])
    mixed = _write_folder(tmp_path / "mixed", _images(n=2))
    Image.fromarray(_images(n=1, size=8)[0]).save(mixed / "zz.png")
    assert "sizes differ" in _exit_message([str(mixed), "--ref", str(ref)])

    good = tmp_path / "good.npz"
    np.savez(good, _images(n=8))
    np.savez(tmp_path / "nokeys.npz", mu=np.zeros(12))
    msg = _exit_message([str(good), "--ref", str(tmp_path / "nokeys.npz")])
    assert "sigma" in msg and "--make-ref" in msg
    assert "not found" in _exit_message([str(good), "--ref", str(tmp_path / "none.npz")])
    ev.save_stats(tmp_path / "wide.npz", np.zeros(30), np.eye(30), 10)
    assert "30-d" in _exit_message([str(good), "--ref", str(tmp_path / "wide.npz")])

    assert "CIFAR-10 not found" in _exit_message(
        ["--make-ref", "cifar10", "--data-dir", str(tmp_path / "nodata"), "--out", str(tmp_path / "c.npz")])

    with pytest.raises(SystemExit) as info:  # usage errors: argparse's exit status 2
        ev.main([str(good)])
    assert info.value.code == 2


def test_import_has_no_side_effects():
    import subprocess
    import sys

    code = "import full.evaluate, sys; assert 'torch_fidelity' not in sys.modules; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"


@given(st.integers(2, 6), st.lists(st.floats(0.0, 5.0), min_size=6, max_size=6), st.floats(0.05, 1.0),
       st.integers(0, 2 ** 16))
def test_reference_statistics_must_be_a_covariance(d, eigenvalues, negative, seed):
    """sigma = Q diag(λ) Qᵀ with every λ >= 0 is a covariance and accepted; with one λ = -negative it is
    not positive semi-definite (FID could come out below 0) and refused, though it is symmetric and its
    diagonal, a mix of the λ, is mostly positive: [[1, 2], [2, 1]] has eigenvalues 3 and -1."""
    lam = np.array(eigenvalues[:d])
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    psd = (q * lam) @ q.T
    ev.check_stats(np.zeros(d), (psd + psd.T) / 2, "ref")
    lam[0] = -negative * max(1.0, lam.max())
    bad = (q * lam) @ q.T
    with pytest.raises(cm.CMError, match="not a covariance"):
        ev.check_stats(np.zeros(d), (bad + bad.T) / 2, "ref")
    with pytest.raises(cm.CMError, match="eigenvalue"):
        ev.check_stats(np.zeros(2), np.array([[1.0, 2.0], [2.0, 1.0]]), "ref")
