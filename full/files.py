"""Pixels and image files: uint8 <-> [-1, 1], and the one reader of each image file kind (PNG/JPEG/WebP
through PIL, .npz/.npy arrays), each failure a one-line CMError naming the file. Used by full/data.py
(training sets), full/evaluate.py (FID inputs) and full/sample.py (editing references and masks)."""
from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import torch

from cm import CMError, uint8_to_unit

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")

__all__ = ["IMAGE_EXTENSIONS", "as_nhwc_uint8", "hwc_to_unit", "open_image", "read_npz_images", "to_uint8",
           "uint8_to_unit"]


def to_uint8(x: torch.Tensor, how: str = "truncate") -> np.ndarray:
    """[-1, 1] (B, C, H, W) -> uint8 (B, H, W, C).

    truncate: (v + 1) 127.5 clamped to [0, 255], then truncated, as both CM codebases write the samples
    their FIDs were measured on (every value lands up to one level lower than rounding would put it).
    round: v 127.5 + 128 clamped to [0, 255], then truncated, i.e. (v + 1) 127.5 rounded half up, as
    locuslab/ect (metrics/metric_utils.py) and EDM convert the samples of their FIDs."""
    if how not in ("truncate", "round"):
        raise CMError(f"uint8 conversion {how!r}: truncate or round")
    y = (x.float() + 1) * 127.5 if how == "truncate" else x.float() * 127.5 + 128
    return y.clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def hwc_to_unit(x: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, C) array -> float32 (C, H, W) tensor in [-1, 1]."""
    return uint8_to_unit(np.ascontiguousarray(np.asarray(x).transpose(2, 0, 1)))


def as_nhwc_uint8(images: np.ndarray, name: str = "images") -> np.ndarray:
    """Check uint8, return (N, H, W, 3): NHWC as is, NCHW transposed, 1 channel or (N, H, W) made RGB."""
    x = np.asarray(images)
    if x.dtype != np.uint8:
        raise CMError(f"{name}: expected uint8 images in [0, 255], got dtype {x.dtype}")
    if x.ndim == 3:  # (N, H, W) grayscale
        x = x[..., None]
    if x.ndim != 4:
        raise CMError(f"{name}: expected (N, H, W, C) or (N, C, H, W) images, got shape {x.shape}")
    # NCHW only when the last axis cannot be channels: NHWC wins a tie (guided-diffusion writes NHWC)
    if x.shape[-1] not in (1, 3) and x.shape[1] in (1, 3):
        x = x.transpose(0, 2, 3, 1)
    if x.shape[-1] not in (1, 3):
        raise CMError(f"{name}: expected 1 or 3 channels (NHWC or NCHW), got shape {x.shape}")
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    return x


def read_npz_images(path: str | os.PathLike) -> np.ndarray:
    """The uint8 images of an .npz (`arr_0`, as samples.npz and guided-diffusion write them, else `images`)
    or an .npy, as they are stored; an object array (a pickle) is refused unread."""
    path = Path(path)
    key = None
    try:
        if path.suffix == ".npy":
            arr = np.load(path, allow_pickle=False)
        else:
            with np.load(path, allow_pickle=False) as f:
                keys = list(f.keys())
                key = next((k for k in ("arr_0", "images") if k in keys), None)
                if key is None and {"mu", "sigma"} <= set(keys):
                    raise CMError(f"{path} holds reference statistics (mu, sigma), not images")
                if key is None:
                    raise CMError(f"{path}: no 'arr_0' or 'images' array (keys: {keys})")
                arr = f[key]
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise CMError(f"cannot read {path} as .npz/.npy ({type(e).__name__}: {str(e)[:100]})") from None
    if arr.dtype != np.uint8:  # a cast would wrap 256 to 0 and read floats in [-1, 1] as black
        raise CMError(
            f"{path}{f'[{key}]' if key else ''} must hold uint8 images in [0, 255], got {arr.dtype}"
        )
    return arr


def open_image(path: str | os.PathLike, mode: str = "RGB"):
    """A PIL image, loaded and converted to `mode` ('RGB', 'L'); unreadable or truncated: one line."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.convert(mode)
    except OSError as e:  # PIL's UnidentifiedImageError is an OSError; truncated files raise OSError on load
        raise CMError(f"cannot read image {path} ({type(e).__name__}: {str(e)[:100]})") from None
