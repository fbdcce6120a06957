"""FID and Inception Score of samples against reference statistics: `python -m full.evaluate`.

Protocol of the CM paper's experiments (the official repository scores with guided-diffusion's TF
evaluator): 50k samples, CIFAR-10 scored against the 50k *training* images, features from the
TensorFlow Inception graph `2015-12-05` that published FIDs use (here its PyTorch port,
"pt_inception-2015-12-05").

    FID = |μ₁ - μ₂|² + tr(Σ₁ + Σ₂ - 2 (Σ₁ Σ₂)^½)   μ, Σ of 2048-d pool3 features  [Heusel et al. 2017]
    IS  = exp(E_x KL(p(y|x) ‖ p(y)))              mean ± std over 10 splits      [Salimans et al. 2016]

Why torch-fidelity and not clean-fid: torch-fidelity's `FeatureExtractorInceptionV3` is the TF
Inception re-implemented op for op, with its weights converted from the TF graph and TF1's bilinear
resize to 299x299 reproduced, so its features match TF FID; and one forward pass yields both the
2048-d pool3 features (FID) and the 1008-way logits without bias ("logits_unbiased", what the
original IS code uses), in-process, on a torch device we choose. clean-fid deliberately uses a
different (antialiased PIL) resize, so its "clean" FIDs differ from published ones, and it needs a
second model for IS.

Reference statistics are an `.npz` with `mu` (D,), `sigma` (D, D) and `n`; files from pytorch-fid
or guided-diffusion's reference batches (which also hold `mu`, `sigma`) load too, as long as they
were made with the same Inception. Inputs are a folder of PNG/JPG/WEBP images (searched recursively,
sorted) or an `.npz` whose `images` key or first array (`arr_0`, as guided-diffusion and
`full.sample` write it) is uint8 NHWC (NCHW is detected and transposed). Prefer PNG or npz: JPEG
compression alone moves FID.

Usage:
    python -m full.evaluate samples.npz --ref cifar10_train_stats.npz
    python -m full.evaluate --make-ref cifar10 --data-dir data --out cifar10_train_stats.npz
    python -m full.evaluate --make-ref path/to/images_or.npz --out ref.npz

Offline machines: the Inception weights (~92 MB) are downloaded once into the torch hub cache
(`<torch hub dir>/checkpoints/`); place the file there by hand, or pass `--inception-weights PATH`.

References:
    [CM]  Song, Dhariwal, Chen, Sutskever. Consistency Models. arXiv 2303.01469.
    Heusel et al. GANs Trained by a Two Time-Scale Update Rule ... (FID). arXiv 1706.08500.
    Salimans et al. Improved Techniques for Training GANs (IS). arXiv 1606.03498.
    Obukhov et al. torch-fidelity, https://github.com/toshas/torch-fidelity.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from scipy import linalg

from cm import (
    CMError,
    atomic_write,
    exit_on,
    finite_samples,
    generate,
    interrupts_as_errors,
    load_cifar10,
    not_the_input,
    pick_device,
    read_hub_weights,
    read_tensors,
)
from full.config import CLIParser
from full.data import find_images
from full.files import (
    IMAGE_EXTENSIONS,
    as_nhwc_uint8,
    npz_member,
    open_image,
    open_npz,
    read_npz_images,
    to_uint8,
)
from full.model import for_sampling

PAPER_NUM_SAMPLES = 50_000  # [CM Sec. 6]: FID/IS of 50k samples

# An extractor maps a uint8 (B, 3, H, W) batch to (pool features (B, D), logits (B, K)).
Extractor = Callable[[torch.Tensor], "tuple[torch.Tensor, torch.Tensor]"]


# ----------------------------------------------------------------------------------------------------
# Metrics (pure functions of arrays)


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean μ (D,) and unbiased covariance Σ (D, D) of features (N, D), in float64."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise CMError(f"features must be (N, D), got shape {x.shape}")
    if x.shape[0] < 2:
        raise CMError(f"need at least 2 samples for a covariance, got {x.shape[0]}")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Fréchet distance of N(μ₁, Σ₁) and N(μ₂, Σ₂): |μ₁ - μ₂|² + tr(Σ₁ + Σ₂ - 2 (Σ₁ Σ₂)^½), in float64.

    If the product Σ₁Σ₂ is singular and sqrtm returns non-finite values, ε·I is added to both
    covariances (the pytorch-fid / TTUR fallback). Tiny imaginary parts from numerical error are
    dropped; large ones mean the inputs are not covariances and raise CMError.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise CMError(
            f"mismatched statistics: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}"
        )
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(d) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        imag = np.abs(np.diagonal(covmean).imag).max()
        if imag > 1e-3 * max(1.0, np.abs(np.trace(covmean.real))):
            raise CMError(f"sqrt(sigma1 sigma2) has a large imaginary part ({imag:.3g}); "
                                  "are both sigmas symmetric positive semi-definite?")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def inception_score(logits_or_probs, splits: int = 10, probs: bool | None = None) -> tuple[float, float]:
    """IS = exp(mean_x KL(p(y|x) ‖ p(y))) per split, p(y) the split's mean; (mean, std) over splits.

    Input (N, K): logits, or class probabilities when `probs` is True; None detects probabilities as
    non-negative rows summing to 1. Splits are consecutive chunks [i N/s, (i+1) N/s), unshuffled,
    as in the original IS code and guided-diffusion's evaluator.
    """
    x = np.asarray(logits_or_probs, dtype=np.float64)
    if x.ndim != 2:
        raise CMError(f"logits must be (N, K), got shape {x.shape}")
    n = x.shape[0]
    if not 1 <= splits <= n:
        raise CMError(f"need 1 <= splits <= number of samples, got splits={splits}, n={n}")
    if probs is None:
        probs = bool((x >= 0).all() and np.allclose(x.sum(axis=1), 1.0, atol=1e-4))
    if probs:
        p = x / x.sum(axis=1, keepdims=True)
        with np.errstate(divide="ignore"):
            log_p = np.log(p)
    else:
        log_p = x - x.max(axis=1, keepdims=True)
        log_p = log_p - np.log(np.exp(log_p).sum(axis=1, keepdims=True))
        p = np.exp(log_p)
    scores = []
    for i in range(splits):
        lo, hi = i * n // splits, (i + 1) * n // splits
        p_i, log_p_i = p[lo:hi], log_p[lo:hi]
        with np.errstate(divide="ignore", invalid="ignore"):  # log 0 = -inf is masked: 0 log 0 = 0
            log_q = np.log(p_i.mean(axis=0, keepdims=True))  # (1, K) marginal p(y) of the split
            kl = np.where(p_i > 0, p_i * (log_p_i - log_q), 0.0).sum(axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


# ----------------------------------------------------------------------------------------------------
# Images in: folders, .npz, CIFAR-10


def _npz_images(path: Path) -> np.ndarray:
    return as_nhwc_uint8(read_npz_images(path), str(path))


def _read_image(path: Path) -> np.ndarray:
    return np.asarray(open_image(path, "RGB"), dtype=np.uint8)  # (H, W, 3)


def iter_images(path, batch_size: int = 250) -> tuple[int, Iterator[np.ndarray]]:
    """(count, iterator of uint8 (B, H, W, 3) batches) for a folder or .npz/.npy; inputs are checked now.

    Folders are read lazily, one batch at a time, so sets larger than memory work.
    """
    path = Path(path)
    if not path.exists():
        raise CMError(f"samples not found: {path}")
    if path.is_dir():
        files = find_images(path)  # the same discovery as training (full.data)
        if not files:
            raise CMError(f"no {'/'.join(IMAGE_EXTENSIONS)} images under {path}")
        shape = _read_image(files[0]).shape

        def folder_batches() -> Iterator[np.ndarray]:
            for i in range(0, len(files), batch_size):
                batch = [_read_image(p) for p in files[i : i + batch_size]]
                for p, im in zip(files[i : i + batch_size], batch):
                    if im.shape != shape:
                        raise CMError(f"{p} is {im.shape} but {files[0]} is {shape}: sizes differ")
                yield np.stack(batch)

        return len(files), folder_batches()
    arr = _npz_images(path)
    return len(arr), (arr[i : i + batch_size] for i in range(0, len(arr), batch_size))


def load_images(path) -> np.ndarray:
    """All images of a folder or .npz/.npy as one uint8 (N, H, W, 3) array."""
    n, batches = iter_images(path)
    return np.concatenate(list(batches)) if n else np.zeros((0, 0, 0, 3), np.uint8)


def cifar10_train_images(data_dir, download: bool = False) -> np.ndarray:
    """The 50k CIFAR-10 training images, uint8 (50000, 32, 32, 3), via torchvision (CM's FID reference)."""
    ds = load_cifar10(data_dir, train=True, download=download)  # its error says where the files go
    return as_nhwc_uint8(np.asarray(ds.data), "CIFAR-10")


def iter_reference_images(source: str, data_dir="data", download: bool = False, batch_size: int = 250):
    """(count, batches) of a reference set: 'cifar10' (torchvision train split) or a folder/.npz path."""
    if source.lower() == "cifar10":
        arr = cifar10_train_images(data_dir, download)
        return len(arr), (arr[i : i + batch_size] for i in range(0, len(arr), batch_size))
    return iter_images(source, batch_size)


# ----------------------------------------------------------------------------------------------------
# Features: any extractor, the TF-Inception one by default


def inception_weights_cache_path() -> Path:
    """Where torch-fidelity's `load_state_dict_from_url` looks for (and downloads) the Inception weights."""
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(URL_INCEPTION_V3)


def load_inception_weights(weights_path=None) -> dict:
    """The Inception state dict, read with `weights_only=True` so no file can run code when unpickled.

    torch-fidelity and torch.hub would unpickle both `--inception-weights` and the hub cache with
    `weights_only=False`; here the file is read first, and the network is then given the tensors."""
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    if weights_path is not None:
        path = Path(weights_path)
        if not path.is_file():
            raise CMError(f"cannot load Inception weights {path}: no such file")
        return read_tensors(path, "Inception")
    try:  # the cache file's hash is checked on every use, not only on download
        return read_hub_weights(URL_INCEPTION_V3, "Inception")
    except CMError as e:
        raise CMError(f"{e}, or pass --inception-weights PATH") from None


class InceptionExtractor:
    """TF-Inception (pt_inception-2015-12-05), torch-fidelity: uint8 (B, 3, H, W) -> (B, 2048), (B, 1008).

    Resizing to 299x299 happens inside, with TF1's bilinear kernel, as the TF FID code does.
    """

    def __init__(self, device: torch.device | str | None = None, weights_path=None):
        import torch_fidelity.feature_extractor_inceptionv3 as tfi

        self.device = pick_device(device or "")
        state = load_inception_weights(weights_path)
        real_loader = tfi.load_state_dict_from_url
        tfi.load_state_dict_from_url = lambda *args, **kwargs: state  # hand over the tensors read above
        try:
            net = tfi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"])
        except RuntimeError as e:  # load_state_dict: missing or unexpected keys, other shapes
            raise CMError(f"Inception weights {weights_path or inception_weights_cache_path()} "
                                  f"do not fit torch-fidelity's Inception "
                                  f"({str(e).splitlines()[0][:100]})") from None
        finally:
            tfi.load_state_dict_from_url = real_loader
        self.net = net.to(self.device)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features, logits = self.net(x.to(self.device))
        return features, logits


def make_extractor(device=None, weights_path=None) -> Extractor:
    """The default feature extractor of the CLI (tests replace this factory with a stand-in)."""
    return InceptionExtractor(device, weights_path)


def extract(images, extractor: Extractor, batch_size: int = 250) -> tuple[np.ndarray, np.ndarray]:
    """Run `extractor` over uint8 NHWC images (an array, or an iterable of array batches).

    Returns float32 features (N, D) and logits (N, K).
    """
    batches: Iterable[np.ndarray] = [images] if isinstance(images, np.ndarray) else images
    feats, logits = [], []
    for batch in batches:
        batch = as_nhwc_uint8(batch)
        for i in range(0, len(batch), batch_size):
            chunk = batch[i : i + batch_size].transpose(0, 3, 1, 2)  # (B, 3, H, W)
            x = torch.from_numpy(np.ascontiguousarray(chunk))
            f, l = extractor(x)
            if f.ndim != 2 or l.ndim != 2 or len(f) != len(x) or len(l) != len(x):
                raise CMError(
                    f"extractor returned {tuple(f.shape)}, {tuple(l.shape)} for a batch of {len(x)}")
            feats.append(f.detach().float().cpu().numpy())
            logits.append(l.detach().float().cpu().numpy())
    if not feats:
        raise CMError("no images to evaluate")
    return np.concatenate(feats), np.concatenate(logits)


# ----------------------------------------------------------------------------------------------------
# Reference statistics files and the two pipelines


def save_stats(path, mu: np.ndarray, sigma: np.ndarray, n: int) -> None:
    """Write {mu, sigma, n} to an .npz atomically (tmp file + os.replace)."""
    path = Path(path)
    if path.is_dir():
        raise CMError(f"--out {path} is a folder; give a file name such as {path / 'ref.npz'}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CMError(f"cannot write {path}: {e.strerror or e}") from None
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    atomic_write(path, lambda f: np.savez(f, mu=mu, sigma=sigma, n=np.int64(n)))


def load_stats(path) -> tuple[np.ndarray, np.ndarray, int | None]:
    """(mu, sigma, n) from a reference .npz; n is None if the file does not record it (pytorch-fid's).

    Every member read is checked by its .npy header before it is loaded (full.files.npz_member): mu real
    numbers of shape (d,), sigma real numbers of shape (d, d) with the same d, n a scalar integer >= 2;
    each failure one line naming the file and the member."""
    path = Path(path)
    if not path.exists():
        raise CMError(f"reference statistics not found: {path} (make them with --make-ref)")
    what = "reference statistics"
    with open_npz(path, what) as f:
        missing = [k for k in ("mu", "sigma") if k not in f]
        if missing:
            raise CMError(f"reference file {path} lacks {missing} (keys: {list(f.keys())}); "
                          "make one with --make-ref")
        mu = npz_member(f, "mu", path, "fiu", lambda s: None if len(s) == 1 and s[0] >= 1 else "is not (d,)")
        d = len(mu)
        sigma = npz_member(f, "sigma", path, "fiu",
                           lambda s: None if s == (d, d) else f"is not ({d}, {d}), the size of mu")
        n = None
        if "n" in f:
            n = int(npz_member(f, "n", path, "iu", lambda s: None if s == () else "is not a scalar"))
            if n < 2:
                raise CMError(f"{path}[n]: {n} images; reference statistics need at least 2")
    mu, sigma = mu.astype(np.float64), sigma.astype(np.float64)
    check_stats(mu, sigma, f"reference file {path}")
    return mu, sigma, n


def check_stats(mu: np.ndarray, sigma: np.ndarray, what: str) -> None:
    """mu (D,) and sigma (D, D) finite, sigma symmetric with a non-negative diagonal (a covariance);
    otherwise FID would be NaN or sqrtm would spin for minutes."""
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise CMError(f"{what}: bad shapes mu {mu.shape}, sigma {sigma.shape}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise CMError(f"{what}: mu or sigma holds NaN or inf")
    scale = max(1.0, float(np.abs(sigma).max(initial=0.0)))
    if not np.allclose(sigma, sigma.T, rtol=0, atol=1e-6 * scale) or (np.diagonal(sigma) < 0).any():
        raise CMError(f"{what}: sigma is not a covariance (not symmetric, or a negative variance)")
    lowest = float(np.linalg.eigvalsh((sigma + sigma.T) / 2).min(initial=0.0))
    if lowest < -1e-6 * scale:  # a covariance is positive semi-definite; otherwise FID can come out < 0
        raise CMError(f"{what}: sigma is not a covariance (an eigenvalue of {lowest:.3g} < 0)")


def evaluate(images, ref_mu: np.ndarray, ref_sigma: np.ndarray, extractor: Extractor,
             batch_size: int = 250, splits: int = 10) -> dict:
    """FID against (ref_mu, ref_sigma) and IS of `images` (array or iterable of NHWC uint8 batches)."""
    features, logits = extract(images, extractor, batch_size)
    n = len(features)
    if n < 2:
        raise CMError(f"need at least 2 samples, got {n}")
    mu, sigma = feature_stats(features)
    if mu.shape != ref_mu.shape:
        raise CMError(f"sample features are {mu.shape[0]}-d but the reference is {ref_mu.shape[0]}-d")
    is_mean, is_std = inception_score(logits, splits=min(splits, n), probs=False)
    fid = frechet_distance(mu, sigma, ref_mu, ref_sigma)
    return {"fid": fid, "is_mean": is_mean, "is_std": is_std, "n": n}


def make_reference(images, extractor: Extractor, batch_size: int = 250) -> dict:
    """{mu, sigma, n} of the pool features of `images` (array or iterable of NHWC uint8 batches)."""
    features, _ = extract(images, extractor, batch_size)
    mu, sigma = feature_stats(features)
    return {"mu": mu, "sigma": sigma, "n": len(features)}


# ----------------------------------------------------------------------------------------------------
# CLI


def _parser() -> argparse.ArgumentParser:
    p = CLIParser(
        prog="python -m full.evaluate",
        description="FID and Inception Score (TF-Inception, torch-fidelity) against reference statistics.",
    )
    p.add_argument("samples", nargs="?",
                   help="folder of PNG/JPG/WEBP images, or .npz of uint8 NHWC images (arr_0 or images)")
    p.add_argument("--ref", help="reference statistics .npz (mu, sigma, n) to compute FID against")
    p.add_argument("--make-ref", metavar="SOURCE", help="compute reference statistics of 'cifar10' "
                   "(train split) or of a folder/.npz of images, and write them to --out")
    p.add_argument("--out", help="output .npz for --make-ref")
    p.add_argument("--data-dir", default=None,
                   help="torchvision root holding cifar-10-batches-py (default: data)")
    p.add_argument("--download", action="store_true",
                   help="let torchvision download CIFAR-10 into --data-dir")
    p.add_argument("--batch-size", type=int, default=250, help="images per Inception forward pass")
    p.add_argument("--splits", type=int, default=None, help="IS splits (default 10)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--inception-weights", default=None, help="local copy of torch-fidelity's Inception "
                   "weights (default: the torch hub cache, downloading if needed)")
    return p


def main(argv=None) -> dict:
    """CLI entry point; returns the printed numbers as a dict. User errors exit with one line and status 1."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.make_ref is not None:
        if args.out is None or args.samples is not None or args.ref is not None:
            parser.error("--make-ref SOURCE takes --out REF.npz and no samples/--ref")
    elif args.samples is None or args.ref is None:
        parser.error("give SAMPLES --ref REF.npz, or --make-ref SOURCE --out REF.npz")
    if args.make_ref != "cifar10" and (args.data_dir is not None or args.download):  # ignored otherwise
        parser.error("--data-dir and --download belong to --make-ref cifar10")
    if args.make_ref is None and args.out is not None:
        parser.error("--out is the file --make-ref writes; FID and IS of samples are printed")
    if args.make_ref is not None and args.splits is not None:
        parser.error("--splits is the Inception Score's, of samples; --make-ref computes no score")
    args.data_dir = "data" if args.data_dir is None else args.data_dir
    args.splits = 10 if args.splits is None else args.splits
    try:
        with interrupts_as_errors(note=""):  # Ctrl-C and a path the file system cannot resolve: one line
            pick_device(args.device or "")  # a bad --device fails before any work
            if args.batch_size < 1 or args.splits < 1:
                raise CMError(f"need --batch-size >= 1 and --splits >= 1 (got {args.batch_size}, "
                                      f"{args.splits})")
            if args.make_ref is not None and Path(args.out).is_dir():
                raise CMError(f"--out {args.out} is a folder; give a file name such as "
                                      f"{Path(args.out) / 'ref.npz'}")
            if args.make_ref is not None:
                if args.make_ref != "cifar10":
                    not_the_input(args.out, args.make_ref)
                n, batches = iter_reference_images(args.make_ref, args.data_dir, args.download,
                                                   args.batch_size)
                if n < 2:
                    raise CMError(f"need at least 2 reference images, got {n}")
                extractor = make_extractor(args.device, args.inception_weights)
                stats = make_reference(batches, extractor, args.batch_size)
                save_stats(args.out, stats["mu"], stats["sigma"], stats["n"])
                print(f"wrote {args.out}: mu {stats['mu'].shape}, sigma {stats['sigma'].shape}, "
                      f"n={stats['n']}")
                return {"n": stats["n"], "out": args.out}
            ref_mu, ref_sigma, ref_n = load_stats(args.ref)
            n, batches = iter_images(args.samples, args.batch_size)
            if n < 2:
                raise CMError(f"need at least 2 samples, got {n}")
            result = evaluate(batches, ref_mu, ref_sigma, make_extractor(args.device, args.inception_weights),
                              args.batch_size, args.splits)
            ref_note = f", reference n={ref_n}" if ref_n is not None else ""
            print(f"FID: {result['fid']:.4f}")  # inside: a closed pipe or full device on stdout is one line
            print(f"IS: {result['is_mean']:.4f} ± {result['is_std']:.4f}  (n={result['n']}{ref_note})")
    except CMError as e:
        exit_on(e)
    if result["n"] < PAPER_NUM_SAMPLES:
        print(f"note: {result['n']} samples; published FIDs use {PAPER_NUM_SAMPLES} "
              "(FID is biased upward with fewer)", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()


# ----------------------------------------------------------------------------------------------------
# FID during training (full.train's run.fid_every)


def training_images(ds) -> np.ndarray:
    """The training set as uint8 (N, H, W, C) from its raw pixels (ImageDataset.uint8_images), never the
    [-1, 1] floats converted back: (v / 127.5 - 1 + 1) * 127.5 falls just below v in float32 for v = 1..63,
    and truncation would turn those into v - 1."""
    return np.asarray(ds.uint8_images(), dtype=np.uint8)


def fid_during_training(f, cfg, shape, ds, out: Path, cache: dict, device) -> float | None:
    """FID of cfg.run.fid_samples one-step samples of f against the training set; the reference
    statistics are computed once per run folder (fid_ref.npz). Where FID cannot run (offline, no
    torch-fidelity): one note, None, and no more FIDs this run; training goes on."""
    if cache.get("off"):
        return None
    try:
        if "ref" not in cache:
            cache["extractor"] = make_extractor(device)
            ref = out / "fid_ref.npz"
            if not ref.is_file():
                st = make_reference(training_images(ds), cache["extractor"])
                save_stats(ref, st["mu"], st["sigma"], st["n"])
            cache["ref"] = load_stats(ref)[:2]
        k = cfg.net.num_classes if cfg.data.class_cond else 0
        fs, cs = for_sampling(cfg, f)
        x, _ = generate(fs, cs, shape, range(cfg.run.fid_samples), [cfg.cm.sigma_max], cfg.run.seed + 2,
                        num_classes=k, clip_denoised=cfg.run.clamp_mid)
        x = finite_samples(x, "the EMA's one-step samples")
        return evaluate(to_uint8(x, cfg.run.uint8), *cache["ref"], cache["extractor"])["fid"]
    except (ImportError, CMError, OSError, RuntimeError) as e:
        cache["off"] = True
        print(f"note: FID is off for this run: {str(e).splitlines()[0][:300]}", file=sys.stderr)
        return None
