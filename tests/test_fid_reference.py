"""The in-training FID reference (run.fid_every) is built from the training set's raw uint8 pixels.

A folder of PNGs holding every value 0..255 is the dataset; its raw pixels are known, so the reference
images must equal them exactly. Converting the [-1, 1] training floats back instead is off by one for
v = 1..63 (float32 (v / 127.5 - 1 + 1) * 127.5 lands just below v and truncates): the old path.
"""
import numpy as np
import torch
from PIL import Image

from cm import CMError
from full import evaluate
from full.data import make_dataset
from full.files import to_uint8


def _folder(tmp_path) -> np.ndarray:
    """Two 16x16 RGB PNGs: every value 0..255 once per channel, and its reverse."""
    v = np.arange(256, dtype=np.uint8).reshape(16, 16)
    imgs = [np.stack([v, v.T, 255 - v], -1), np.stack([255 - v, v, v.T], -1)]
    for i, a in enumerate(imgs):
        Image.fromarray(a).save(tmp_path / f"{i}.png")
    return np.stack(imgs)


def test_reference_images_are_the_raw_pixels(tmp_path):
    raw = _folder(tmp_path)
    ds = make_dataset("folder", tmp_path, 16)
    np.testing.assert_array_equal(evaluate.training_images(ds), raw)


def test_the_scaled_floats_converted_back_are_off(tmp_path):
    """The old path (to_uint8 of the training floats) differs from the raw pixels exactly at 1..63."""
    raw = _folder(tmp_path)
    ds = make_dataset("folder", tmp_path, 16)
    old = to_uint8(torch.stack([ds[i][0] for i in range(len(ds))]))
    off = np.unique(raw[old != raw])
    v = np.arange(256, dtype=np.float32)
    expected = np.nonzero(((v / np.float32(127.5) - 1) + 1) * np.float32(127.5) < v)[0]  # numpy, not torch
    np.testing.assert_array_equal(off, expected)
    assert off.min() == 1 and len(off) > 50
    np.testing.assert_array_equal(old[old != raw], raw[old != raw] - 1)


def test_fid_during_training_builds_its_reference_from_the_raw_pixels(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    raw = _folder(tmp_path / "data")
    ds = make_dataset("folder", tmp_path / "data", 16)
    seen = []

    def capture(images, extractor, batch_size=250):
        seen.append(np.asarray(images))
        raise CMError("stop here")

    monkeypatch.setattr(evaluate, "make_extractor", lambda device=None, weights_path=None: object())
    monkeypatch.setattr(evaluate, "make_reference", capture)
    out = tmp_path / "run"
    out.mkdir()
    assert evaluate.fid_during_training(None, None, (3, 16, 16), ds, out, {}, "cpu") is None
    np.testing.assert_array_equal(seen[0], raw)
