"""Image folders and hostile image files: `cm.py --dataset DIR` trains, and every reader of images (cm.py's
folder loader, full/'s folder dataset, full.evaluate's inputs) gives a correct read or one CMError for a
FIFO, a link loop, a 16-bit PNG, a decompression bomb, a lying npz header, a truncated or empty file."""
import contextlib
import os
import signal
import struct
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import cm
from full import evaluate as ev
from full.data import ImageFolderDataset


@contextlib.contextmanager
def deadline(seconds: int = 10):
    """Fail instead of hanging: SIGALRM interrupts a blocking open() in the main thread."""
    class Hung(BaseException):  # not an OSError, so no reader can turn it into a one-line refusal
        pass

    def fire(*_):
        raise Hung(f"still blocked after {seconds} s")
    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _good(folder, n=4):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def _png_header_only(path, w, h):
    """A PNG whose IHDR declares w x h but whose data is a few bytes: a bomb if decoded."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 8))
                     + chunk(b"IEND", b""))


def _readers(folder):
    """Every reader of a folder, each returning the images it read (uint8 or [-1, 1])."""
    return [lambda: cm.load_image_folder(folder, 16),
            lambda: [x for x, _ in ImageFolderDataset(folder, 16)],
            lambda: np.concatenate(list(ev.iter_images(folder)[1]))]


KINDS = ["fifo", "loop", "sixteen", "bomb", "truncated", "empty"]


@pytest.mark.parametrize("reader", [0, 1, 2])
@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=2, deadline=None)
@given(n=st.integers(1, 4))
def test_hostile_file_in_a_folder_is_one_line_or_a_correct_read(tmp_path_factory, kind, reader, n):
    folder = tmp_path_factory.mktemp("imgs")
    _good(folder, n)
    bad = folder / "x.png"
    if kind == "fifo":
        os.mkfifo(bad)
    elif kind == "loop":
        (folder / "again").symlink_to(".")
    elif kind == "sixteen":
        Image.fromarray(np.full((16, 16), 40000, np.uint16)).save(bad)
    elif kind == "bomb":
        _png_header_only(bad, 2**16, 2**16)
    elif kind == "truncated":
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(bad)
        bad.write_bytes(bad.read_bytes()[:40])
    else:
        bad.write_bytes(b"")
    with deadline(10):
        try:
            got = _readers(folder)[reader]()
        except cm.CMError as e:
            assert kind in ("fifo", "bomb", "truncated", "empty") and "x.png" in str(e) and "\n" not in str(e)
            return
    assert kind in ("loop", "sixteen"), kind
    assert len(got) == (n if kind == "loop" else n + 1)  # a loop adds nothing
    if kind == "sixteen":  # 40000/65535 of full scale: round(40000 * 255 / 65535) = 156, not white
        x16 = np.asarray(got[n], dtype=np.float64)  # sorted: 0..(n-1).png, then x.png
        want = 156.0 if reader == 2 else 156 / 127.5 - 1
        assert np.allclose(x16, want, atol=1e-5)


def test_lying_npz_header_and_empty_images_are_one_line(tmp_path):
    big = tmp_path / "big.npy"
    with open(big, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False,
                                                 "shape": (10**7, 256, 256, 3)})
    np.savez(tmp_path / "zero.npz", np.zeros((5, 0, 0, 3), np.uint8))
    for path, words in [(big, "declares"), (tmp_path / "zero.npz", "no pixels")]:
        with deadline(10), pytest.raises(cm.CMError, match=words):
            ev.load_images(path)


def test_cm_trains_on_a_folder_of_mixed_images(tmp_path):
    """Grey, RGB, RGBA and non-square images in nested folders: converted, cropped, 3 ict steps at 16x16."""
    _good(tmp_path / "imgs" / "a")
    Image.fromarray(np.zeros((20, 30), np.uint8)).save(tmp_path / "imgs" / "grey.png")
    Image.fromarray(np.zeros((30, 20, 4), np.uint8)).save(tmp_path / "imgs" / "rgba.webp")
    x = cm.load_image_folder(tmp_path / "imgs", 16)
    assert x.shape == (6, 3, 16, 16) and x.min() >= -1 and x.max() <= 1
    out = tmp_path / "run"
    cm.main(["--dataset", str(tmp_path / "imgs"), "--resolution", "16", "--mode", "ict", "--steps", "3",
             "--batch-size", "4", "--channels", "8", "--out", str(out), "--no-report"])
    assert (out / "ckpt.pt").is_file()
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(cm.CMError, match="no .png"):
        cm.load_image_folder(tmp_path / "empty", 16)
