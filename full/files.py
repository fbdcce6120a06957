"""Pixels and image files: uint8 <-> [-1, 1], and the one reader of each image file kind (PNG/JPEG/WebP
through PIL, .npz/.npy arrays), each failure a one-line CMError naming the file. Used by full/data.py
(training sets), full/evaluate.py (FID inputs) and full/sample.py (editing references and masks)."""
from __future__ import annotations

import os
import stat
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from cm import CMError, uint8_to_unit

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")

MAX_PIXELS = 2**28  # one image's width x height, read from its header before any pixel is decoded
MAX_NPY_BYTES = 2**33  # an array's declared byte size (8 GiB: elements x itemsize), read from its .npy header

__all__ = ["IMAGE_EXTENSIONS", "MAX_NPY_BYTES", "MAX_PIXELS", "as_nhwc_uint8", "check_npy_header",
           "find_images", "hwc_to_unit", "npz_member", "open_image", "open_npz", "read_npy",
           "read_npz_images", "regular_file", "to_uint8", "uint8_to_unit"]


def regular_file(path: str | os.PathLike, what: str = "file") -> Path:
    """`path` if it is a regular file (after links); a FIFO, device, socket or folder is refused unopened,
    since opening a FIFO blocks until someone writes to it."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError as e:
        raise CMError(f"cannot read {what} {path} ({type(e).__name__}: {e.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise CMError(f"{what} {path} is not a regular file")
    return path


def find_images(root: str | os.PathLike) -> list[Path]:
    """All files under `root` (recursive, sorted) whose suffix is in IMAGE_EXTENSIONS. Linked folders are
    followed once each: a folder whose real path was already walked (a link loop such as `ln -s . again`,
    or two links to one folder) is skipped, so no image is counted twice."""
    root = Path(root)
    found, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames.sort()
        found += [Path(dirpath) / f for f in filenames if f.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(found)


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
    if len(x) and 0 in x.shape[1:3]:
        raise CMError(f"{name}: images of size {x.shape[1]}x{x.shape[2]} (shape {x.shape}) hold no pixels")
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    return x


def read_npz_images(path: str | os.PathLike) -> np.ndarray:
    """The uint8 images of an .npz (`arr_0`, as samples.npz and guided-diffusion write them, else `images`)
    or an .npy, as they are stored; an object array (a pickle) is refused unread."""
    path = regular_file(path, "array file")
    key = None
    if path.suffix == ".npy":
        arr = read_npy(path)
    else:
        with open_npz(path) as f:
            keys = list(f.keys())
            key = next((k for k in ("arr_0", "images") if k in keys), None)
            if key is None and {"mu", "sigma"} <= set(keys):
                raise CMError(f"{path} holds reference statistics (mu, sigma), not images")
            if key is None:
                raise CMError(f"{path}: no 'arr_0' or 'images' array (keys: {keys})")
            arr = npz_member(f, key, path)
    if arr.dtype != np.uint8:  # a cast would wrap 256 to 0 and read floats in [-1, 1] as black
        raise CMError(
            f"{path}{f'[{key}]' if key else ''} must hold uint8 images in [0, 255], got {arr.dtype}"
        )
    return arr


# The one reader of .npy data, whether a file of its own or a member of an .npz: every array's header is
# read first and its declared size bounded before numpy allocates anything.

_READ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError,
                RuntimeError, NotImplementedError)  # zipfile: an encrypted member, an unknown compression


def _npy_name(path: Path, key: str | None) -> str:
    return f"{path}[{key}]" if key is not None else str(path)


def check_npy_header(fh, path: Path, key: str | None = None, stored: int | None = None,
                     kinds: str | None = None, limit: int | None = None) -> tuple[tuple, np.dtype]:
    """(shape, dtype) of the .npy stream `fh` from its header alone, before numpy allocates the array.

    Refused in one line naming the file (and the npz member `key`): an object dtype, or one holding
    objects (a pickle); a dtype kind outside `kinds` (numpy kind letters, e.g. "u", "fiu"); a declared
    byte size (elements x itemsize) over `limit` (default MAX_NPY_BYTES), or over the `stored` bytes that
    follow the header."""
    name, limit = _npy_name(path, key), MAX_NPY_BYTES if limit is None else limit
    version = np.lib.format.read_magic(fh)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = read(fh)
    if dtype.hasobject:
        raise CMError(f"{name} holds Python objects (a pickle, dtype {dtype}); refused unread")
    if kinds is not None and dtype.kind not in kinds:
        raise CMError(f"{name} holds {dtype} values, not {_KIND_NAMES.get(kinds, kinds)}")
    n = int(np.prod(shape, dtype=object)) if shape else 1
    nbytes = n * dtype.itemsize
    if nbytes > limit:
        raise CMError(f"{name} declares an array of shape {shape} and dtype {dtype} ({nbytes} bytes), over "
                      f"the limit of {limit} bytes")
    if stored is not None and nbytes > stored - fh.tell():
        raise CMError(f"{name} declares an array of shape {shape} and dtype {dtype} ({nbytes} bytes) but "
                      f"holds {max(stored - fh.tell(), 0)} bytes of data (truncated or lying header)")
    return tuple(shape), dtype


_KIND_NAMES = {"u": "unsigned integers", "fiu": "real numbers", "iu": "integers"}


def open_npz(path: str | os.PathLike, what: str = "array file"):
    """An .npz opened for `npz_member` (use as a context manager); not a zip archive (an empty file, an
    .npy, anything else): one line naming the file."""
    path = regular_file(path, what)
    try:
        if not zipfile.is_zipfile(path):
            raise CMError(f"cannot read {what} {path}: not an .npz (zip) archive")
        return np.load(path, allow_pickle=False)
    except CMError:  # a RuntimeError itself: its own line
        raise
    except _READ_ERRORS as e:
        raise CMError(f"cannot read {what} {path} as .npz ({type(e).__name__}: {str(e)[:100]})") from None


def npz_member(f, key: str, path: Path, kinds: str | None = None, shape: Callable | None = None,
               limit: int | None = None) -> np.ndarray:
    """The array `key` of the open .npz `f`, loaded only after check_npy_header passed on its header
    (and `shape(declared_shape)`, if given, which returns a reason to refuse it or None)."""
    member = f"{key}.npy"
    try:
        info = f.zip.getinfo(member)
        with f.zip.open(info) as fh:
            declared, _ = check_npy_header(fh, path, key, info.file_size, kinds, limit)
        why = shape(declared) if shape is not None else None
        if why:
            raise CMError(f"{_npy_name(path, key)}: shape {declared} {why}")
        return f[key]
    except CMError:  # a RuntimeError itself: its own line
        raise
    except _READ_ERRORS as e:
        raise CMError(f"cannot read {_npy_name(path, key)} ({type(e).__name__}: {str(e)[:100]})") from None


def read_npy(path: str | os.PathLike, kinds: str | None = None, limit: int | None = None,
             mmap: bool = False) -> np.ndarray:
    """The array of an .npy file, loaded (or memory-mapped, where `limit` does not apply) only after
    check_npy_header passed on its header."""
    path = regular_file(path, "array file")
    try:
        with open(path, "rb") as fh:
            check_npy_header(fh, path, None, os.fstat(fh.fileno()).st_size, kinds,
                             limit if not mmap else 2**62)
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except CMError:
        raise
    except _READ_ERRORS as e:
        raise CMError(f"cannot read {path} as .npy ({type(e).__name__}: {str(e)[:100]})") from None


def open_image(path: str | os.PathLike, mode: str = "RGB"):
    """A PIL image, loaded and converted to `mode` ('RGB', 'L'); unreadable or truncated: one line.

    Regular files only; the size in the header is checked (1..MAX_PIXELS pixels) before decoding. Grey,
    palette, RGBA (alpha dropped) and CMYK images are converted to `mode`; 16-bit images (PIL modes I;16,
    I) are scaled 65535 -> 255 first, not clipped (clipping reads them as white)."""
    from PIL import Image

    path = regular_file(path, "image")
    try:
        with Image.open(path) as img:
            w, h = img.size
            if not (0 < w * h <= MAX_PIXELS):
                raise CMError(f"image {path} is {w}x{h} pixels: outside 1..{MAX_PIXELS}")
            if img.mode.startswith("I;16") or img.mode == "I":
                arr = np.asarray(img, dtype=np.int64)  # (H, W)
                img = Image.fromarray(np.clip((arr * 255 + 32767) // 65535, 0, 255).astype(np.uint8), "L")
            return img.convert(mode)
    except (Image.DecompressionBombError, ValueError, SyntaxError) as e:
        raise CMError(f"cannot read image {path} ({type(e).__name__}: {str(e)[:100]})") from None
    except OSError as e:  # PIL's UnidentifiedImageError is an OSError; truncated files raise OSError on load
        raise CMError(f"cannot read image {path} ({type(e).__name__}: {str(e)[:100]})") from None
