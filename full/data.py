"""Datasets and a resumable distributed loader for the paper-scale trainer.

Every dataset yields `(image, label)`: image a float32 tensor (C, H, W) in [-1, 1] (uint8 v -> v / 127.5 - 1,
so 0 -> -1 and 255 -> 1 exactly), label a Python int (0 when the dataset is used unconditionally).

    name         source                                                      native size   classes
    cifar10      torchvision.datasets.CIFAR10 (the real loader, md5-checked)  3 x 32 x 32      10
    imagenet64   downsampled ImageNet npz batches [Chrabaszcz et al. 2017]    3 x 64 x 64    1000
    folder       a directory of images (LSUN exports, custom data)           3 x r x r     subfolders
    digits       sklearn's 8x8 digits, embedded, no download                 1 x 8 x 8        10

Flips. Both official code bases train with random horizontal flips: the CIFAR-10 JAX code
(openai/consistency_models_cifar10, configs/default_cifar10_configs.py) sets `data.random_flip = True`
and applies `RandomHorizontalFlip(p=0.5)` to the training set; the PyTorch code (ImageNet-64, LSUN-256)
calls guided-diffusion's `load_data` from scripts/cm_train.py without a `random_flip` argument, whose
default there is `random_flip=True`. `make_dataset(..., random_flip=False)` is our default so a dataset
used for evaluation is never flipped by accident; the presets turn it on for the paper runs.

Resume. `make_loader` draws each epoch's order from `DistributedSampler(shuffle=True, seed, drop_last=True)`
with `set_epoch(epoch)`, and each flip from a generator seeded by (seed, epoch) and indexed by the dataset
index. Both are pure functions of (seed, epoch, index), so a loader started at global step s skips to
epoch s // batches_per_epoch and position s % batches_per_epoch through the sampler's index list (no image
is loaded to skip) and yields bit-identical batches to a run that never stopped.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from cm import CMError, atomic_write, load_cifar10
from full.files import (
    IMAGE_EXTENSIONS,
    find_images,
    hwc_to_unit,
    npz_member,
    open_image,
    open_npz,
    read_npy,
    to_uint8,
    uint8_to_unit,
)

_FLIP_STREAM = 0xF11F  # separates the flip stream from any other use of (seed, epoch)


def center_crop_resize(img, resolution: int):
    """Center-crop a PIL image to a square on its short side, then resize to (resolution, resolution).

    Resize is `Image.resize(..., BICUBIC, reducing_gap=2.0)`: Pillow first shrinks by an integer factor
    with a box filter (`Image.reduce`) while at least 2x too large, then finishes with bicubic. This is
    the same recipe as ADM / guided-diffusion's `center_crop_arr` (BOX halvings, then BICUBIC), which the
    official CM PyTorch code uses for ImageNet-64 and LSUN, and avoids the aliasing of a one-shot bicubic
    downscale. ADM resizes before cropping; cropping first differs by at most a sub-pixel crop offset.
    """
    from PIL import Image

    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    img = img.crop((left, top, left + s, top + s))
    if s != resolution:
        img = img.resize((resolution, resolution), Image.BICUBIC, reducing_gap=2.0)
    return img


# --------------------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------------------

class ImageDataset(Dataset):
    """Base class: `(image, label)` pairs plus the metadata the trainer needs.

    Attributes: `resolution` (H = W), `channels`, `num_classes` (0 when unconditional), `class_cond`,
    `random_flip` (read by `make_loader`; flips are applied there, not here, so they can be resumed).
    """

    resolution: int
    channels: int = 3
    num_classes: int = 0
    class_cond: bool = False
    random_flip: bool = False

    def label(self, y: int) -> int:
        """The class id when class-conditional, else 0."""
        return int(y) if self.class_cond else 0

    def uint8_image(self, index: int) -> np.ndarray:
        """Image `index` as its raw uint8 pixels (H, W, C), before the [-1, 1] scaling: what an FID
        reference is built from. Datasets with no uint8 source (digits) convert their floats as samples
        are converted."""
        return to_uint8(self[index][0][None])[0]

    def uint8_images(self) -> np.ndarray:
        """All images as uint8 (N, H, W, C) (see uint8_image)."""
        return np.stack([self.uint8_image(i) for i in range(len(self))])


class CIFAR10Dataset(ImageDataset):
    """CIFAR-10 via `torchvision.datasets.CIFAR10` (pickled batches in `<root>/cifar-10-batches-py/`)."""

    def __init__(self, root: str | os.PathLike, train: bool = True, class_cond: bool = False,
                 download: bool = False):
        self.raw = load_cifar10(root, train=train, download=download)
        self.data = self.raw.data  # (N, 32, 32, 3) uint8, as torchvision stores it
        self.targets = list(self.raw.targets)
        self.resolution, self.channels, self.class_cond = 32, 3, class_cond
        self.num_classes = 10 if class_cond else 0

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return hwc_to_unit(self.data[index]), self.label(self.targets[index])

    def uint8_image(self, index: int) -> np.ndarray:
        return self.data[index]

    def uint8_images(self) -> np.ndarray:
        return self.data


def folder_classes(root: Path, paths: Sequence[Path]) -> list[str] | None:
    """Sorted first-level subfolder names when every image sits inside one, else None (no class structure)."""
    parts = [p.relative_to(root).parts for p in paths]
    if not parts or any(len(q) < 2 for q in parts):
        return None
    return sorted({q[0] for q in parts})


class ImageFolderDataset(ImageDataset):
    """A directory of png/jpg/jpeg/webp images (recursive), center-cropped and resized, converted to RGB.

    Classes: when every image sits in a first-level subfolder (`root/<class>/.../x.png`), the sorted
    subfolder names give class ids 0..K-1 (used only when `class_cond`). `class_cond` with images
    directly in `root` is an error.
    """

    def __init__(self, root: str | os.PathLike, resolution: int, class_cond: bool = False):
        self.root = Path(root)
        if not self.root.is_dir():
            raise CMError(f"image folder {self.root} does not exist")
        self.paths = find_images(self.root)
        if not self.paths:
            raise CMError(f"no {'/'.join(IMAGE_EXTENSIONS)} images found under {self.root}")
        self.classes = folder_classes(self.root, self.paths)
        if class_cond and self.classes is None:
            raise CMError(f"class_cond needs every image of {self.root} inside a class subfolder")
        ids = {c: i for i, c in enumerate(self.classes or [])}
        self.targets = [ids[p.relative_to(self.root).parts[0]] if ids else 0 for p in self.paths]
        self.resolution, self.channels, self.class_cond = int(resolution), 3, class_cond
        self.num_classes = len(self.classes) if class_cond else 0

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return hwc_to_unit(self.uint8_image(index)), self.label(self.targets[index])

    def uint8_image(self, index: int) -> np.ndarray:
        img = center_crop_resize(open_image(self.paths[index], "RGB"), self.resolution)
        return np.array(img, dtype=np.uint8)  # (H, W, 3)


def imagenet64_files(root: str | os.PathLike, train: bool = True) -> list[Path]:
    """`train_data_batch_1.npz` .. `_10.npz` (those present, in numeric order), or `val_data.npz`."""
    root = Path(root)
    if train:
        files = [root / f"train_data_batch_{i}.npz" for i in range(1, 11)]
        files = [f for f in files if f.is_file()]
    else:
        files = [f for f in [root / "val_data.npz"] if f.is_file()]
    if not files:
        want = "train_data_batch_{1..10}.npz" if train else "val_data.npz"
        raise CMError(f"downsampled ImageNet not found: put {want} (Imagenet64x64 from image-net.org, "
                           f"Chrabaszcz et al. 2017) in {root}/")
    return files


def load_imagenet64_arrays(files: Sequence[Path]) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate npz batches into `data` uint8 (N, 3 * r * r) and 0-based `labels` int64 (N,).

    The files store labels 1..1000; we subtract 1. Memory peaks at the total plus one batch, because the
    output is preallocated (labels are read first; reading one npz member leaves the others on disk).
    """
    def read(f: Path, key: str, dtype) -> np.ndarray:
        with open_npz(f, "downsampled-ImageNet npz") as z:  # headers checked, object arrays refused unread
            if key not in z:
                raise CMError(f"cannot read {key!r} of {f} as a downsampled-ImageNet npz (no such array)")
            x = npz_member(z, key, f, "iu" if key == "labels" else "u")
        return np.asarray(x, dtype=dtype)

    labels = [read(f, "labels", np.int64).reshape(-1) for f in files]
    n = sum(len(y) for y in labels)
    data, start = None, 0
    for f, y in zip(files, labels):
        x = read(f, "data", np.uint8)
        if data is None:
            data = np.empty((n, x.shape[1]), dtype=np.uint8)
        if x.shape != (len(y), data.shape[1]):
            raise CMError(f"{f}: data has shape {x.shape}, expected ({len(y)}, {data.shape[1]})")
        data[start:start + len(y)] = x
        start += len(y)
    y = np.concatenate(labels) - 1
    if y.size and (y.min() < 0 or y.max() > 999):
        raise CMError(f"labels outside 1..1000 in {files[0].parent} (expected the 1-based npz format)")
    return data, y


def imagenet64_to_npy(root: str | os.PathLike, train: bool = True) -> tuple[Path, Path]:
    """Write `<split>_data.npy` / `<split>_labels.npy` next to the npz batches, once (run on one rank).

    `ImageNet64Dataset` memory-maps these when present, so DDP ranks share the page cache instead of
    each holding ~15.7 GB. Files are written under a temporary name and renamed, so readers never see
    a partial file.
    """
    root, split = Path(root), "train" if train else "val"
    data, labels = load_imagenet64_arrays(imagenet64_files(root, train))
    out = (root / f"{split}_data.npy", root / f"{split}_labels.npy")
    for path, arr in zip(out, (data, labels)):
        atomic_write(path, lambda fh: np.save(fh, arr))
    return out


class ImageNet64Dataset(ImageDataset):
    """Downsampled ImageNet [Chrabaszcz et al. 2017, "Imagenet64x64"]: npz batches with `data` uint8
    (N, 3 * 64 * 64), stored as planes (R, G, B), each row-major, so one row reshapes to (3, 64, 64);
    `labels` 1..1000 become 0..999. Uses memory-mapped `<split>_data.npy` from `imagenet64_to_npy`
    when present, else concatenates the npz batches in memory. The 32x32 variant of the format works too.
    """

    def __init__(self, root: str | os.PathLike, train: bool = True, class_cond: bool = False):
        split = Path(root) / ("train" if train else "val")
        npy = (Path(f"{split}_data.npy"), Path(f"{split}_labels.npy"))
        if npy[0].is_file() and npy[1].is_file():
            self.data, self.targets = read_npy(npy[0], "u", mmap=True), read_npy(npy[1], "iu")
        else:
            self.data, self.targets = load_imagenet64_arrays(imagenet64_files(root, train))
        side = int(round((self.data.shape[1] / 3) ** 0.5))
        if 3 * side * side != self.data.shape[1]:
            raise CMError(f"ImageNet rows have {self.data.shape[1]} values, not 3 * r * r")
        self.resolution, self.channels, self.class_cond = side, 3, class_cond
        self.num_classes = 1000 if class_cond else 0

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x = self.data[index].reshape(3, self.resolution, self.resolution)  # (C, H, W) planes
        return uint8_to_unit(x), self.label(self.targets[index])

    def uint8_image(self, index: int) -> np.ndarray:
        planes = self.data[index].reshape(3, self.resolution, self.resolution)
        return np.ascontiguousarray(planes.transpose(1, 2, 0))


class DigitsDataset(ImageDataset):
    """sklearn's 8x8 handwritten digits (1797 images, values 0..16 -> v / 8 - 1 in [-1, 1]), one channel.

    Embedded in scikit-learn, so it needs no download: the offline default and CPU tests use it. A
    `resolution` other than 8 resizes with `torch.nn.functional.interpolate` ("bilinear" or "nearest").
    """

    def __init__(self, resolution: int | None = None, class_cond: bool = False,
                 interpolation: str = "bilinear"):
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.as_tensor(digits.images, dtype=torch.float32)[:, None] / 8.0 - 1.0  # (N, 1, 8, 8)
        r = 8 if resolution is None else int(resolution)
        if r != 8:
            if interpolation not in ("bilinear", "nearest"):
                raise CMError(f"digits interpolation: 'bilinear' or 'nearest', not {interpolation!r}")
            extra = {"align_corners": False} if interpolation == "bilinear" else {}
            x = torch.nn.functional.interpolate(x, size=(r, r), mode=interpolation, **extra).clamp(-1, 1)
        self.images, self.targets = x.contiguous(), [int(t) for t in digits.target]
        self.resolution, self.channels, self.class_cond = r, 1, class_cond
        self.num_classes = 10 if class_cond else 0

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index].clone(), self.label(self.targets[index])


# --------------------------------------------------------------------------------------------------------
# Factory
# --------------------------------------------------------------------------------------------------------

def _check_native(name: str, ds: ImageDataset, resolution: int | None) -> ImageDataset:
    """Refuse a resolution that the stored files do not have (no silent rescaling of benchmark data)."""
    if resolution is not None and int(resolution) != ds.resolution:
        raise CMError(f"{name} images are {ds.resolution}x{ds.resolution}; resolution={resolution} "
                           "is not supported (use 'folder' for other sizes)")
    return ds


def _build_cifar10(root, resolution, class_cond, train, download) -> ImageDataset:
    return _check_native("cifar10", CIFAR10Dataset(_need_root("cifar10", root), train, class_cond, download),
                         resolution)


def _build_imagenet64(root, resolution, class_cond, train, download) -> ImageDataset:
    return _check_native("imagenet64", ImageNet64Dataset(_need_root("imagenet64", root), train, class_cond),
                         resolution)


def _build_folder(root, resolution, class_cond, train, download) -> ImageDataset:
    if resolution is None:
        raise CMError("the 'folder' dataset needs a resolution")
    return ImageFolderDataset(_need_root("folder", root), resolution, class_cond)


def _build_digits(root, resolution, class_cond, train, download) -> ImageDataset:
    return DigitsDataset(resolution, class_cond)


def _need_root(name: str, root) -> str | os.PathLike:
    if root is None:
        raise CMError(f"the '{name}' dataset needs a root directory")
    return root


DATASETS: dict[str, Callable[..., ImageDataset]] = {
    "cifar10": _build_cifar10,
    "imagenet64": _build_imagenet64,
    "folder": _build_folder,
    "digits": _build_digits,
}


def make_dataset(name: str, root: str | os.PathLike | None = None, resolution: int | None = None, *,
                 class_cond: bool = False, random_flip: bool = False, train: bool = True,
                 download: bool = False) -> ImageDataset:
    """Build a dataset by name (one of DATASETS). `resolution=None` keeps the native size (not for 'folder').

    `random_flip` marks the dataset for horizontal flips, applied reproducibly by `make_loader`.
    `train` picks the split (cifar10, imagenet64); `download` lets torchvision fetch CIFAR-10.
    """
    if name not in DATASETS:
        raise CMError(f"unknown dataset {name!r}; valid names: {', '.join(sorted(DATASETS))}")
    ds = DATASETS[name](root, resolution, class_cond, train, download)
    ds.random_flip = bool(random_flip)
    return ds


# --------------------------------------------------------------------------------------------------------
# Resumable distributed loader
# --------------------------------------------------------------------------------------------------------

def flip_mask(seed: int, epoch: int, n: int) -> np.ndarray:
    """Bool (n,): whether dataset index i is flipped in `epoch`, a pure function of (seed, epoch, i)."""
    rng = np.random.default_rng([int(seed), int(epoch), _FLIP_STREAM])
    return rng.integers(0, 2, size=n, dtype=np.uint8).astype(bool)


def batches_per_epoch(num_items: int, batch_size: int, world_size: int) -> int:
    """Full per-rank batches in one epoch: floor(floor(N / world) / batch) (both remainders dropped)."""
    return (num_items // world_size) // batch_size


class ResumableBatchSampler:
    """Endless batches of `(index, flip)` keys, epoch after epoch, starting at global step `start_step`.

    Epoch e is `DistributedSampler.set_epoch(e)`'s index order for this rank, cut into full batches; a
    start inside an epoch slices the index list, so nothing is loaded to skip ahead.
    """

    def __init__(self, sampler: DistributedSampler, batch_size: int, seed: int, random_flip: bool,
                 start_step: int = 0):
        self.sampler, self.batch_size, self.seed = sampler, int(batch_size), int(seed)
        self.random_flip, self.start_step = bool(random_flip), int(start_step)
        self.batches_per_epoch = len(sampler) // self.batch_size
        if self.batches_per_epoch < 1:
            raise CMError(f"{len(sampler)} samples per rank cannot fill one batch of {batch_size}")
        if self.start_step < 0:
            raise CMError(f"start_step must be >= 0, got {start_step}")

    def epoch_keys(self, epoch: int) -> list[tuple[int, bool]]:
        """This rank's `(index, flip)` keys for `epoch`, truncated to full batches."""
        self.sampler.set_epoch(epoch)
        indices = list(self.sampler)[: self.batches_per_epoch * self.batch_size]
        n = len(self.sampler.dataset)
        flips = flip_mask(self.seed, epoch, n) if self.random_flip else np.zeros(n, dtype=bool)
        return [(int(i), bool(flips[i])) for i in indices]

    def __iter__(self) -> Iterator[list[tuple[int, bool]]]:
        epoch, pos = divmod(self.start_step, self.batches_per_epoch)
        while True:
            keys, b = self.epoch_keys(epoch), self.batch_size
            for k in range(pos, self.batches_per_epoch):
                yield keys[k * b:(k + 1) * b]
            epoch, pos = epoch + 1, 0


class FlipKeyed(Dataset):
    """Item `(index, flip)` is `dataset[index]`, its image mirrored along W when `flip`."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, bool]):
        index, flip = key
        image, label = self.dataset[index]
        return (image.flip(-1) if flip else image), label


def make_loader(dataset: Dataset, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                num_workers: int = 0, start_step: int = 0,
                random_flip: bool | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless iterator of `(images (B, C, H, W), labels (B,))` for this rank; `batch_size` is per rank.

    Order: `DistributedSampler(shuffle=True, seed=seed, drop_last=True)` with `set_epoch(epoch)`, so ranks
    see disjoint indices of the same permutation. `start_step` (global steps already done) resumes at
    epoch start_step // batches_per_epoch, batch start_step % batches_per_epoch, bit-identically,
    flips included. `random_flip=None` uses `dataset.random_flip` (False if the dataset has none).
    Exact resume needs the same dataset, seed, per-rank batch size and world size as the first run.
    Nothing random happens in workers, so `num_workers` does not change the stream.
    """
    if random_flip is None:
        random_flip = bool(getattr(dataset, "random_flip", False))
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                 drop_last=True)
    batches = ResumableBatchSampler(sampler, batch_size, seed, random_flip, start_step)
    loader = DataLoader(FlipKeyed(dataset), batch_sampler=batches, num_workers=num_workers,
                        pin_memory=torch.cuda.is_available(), persistent_workers=num_workers > 0)
    return iter(loader)
