"""Tests of full/data.py on small files written in each dataset's real on-disk format (CPU, seconds)."""
import pickle
import struct
import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image
from torch.utils.data import Dataset

import cm
from full import data

# --------------------------------------------------------------------------------------------------------
# Helpers: the real CIFAR-10 pickle format
# --------------------------------------------------------------------------------------------------------

class Py2Str(bytes):
    """A Python 2 `str`, which the real CIFAR-10 pickles use for keys and names (BINSTRING opcodes)."""


class Py2Pickler(pickle._Pickler):
    """Protocol-2 pickler writing Py2Str as Python 2 pickled it: Python 3 reads these as `str` under
    `encoding="latin1"` (what torchvision uses) and as `bytes` under `encoding="bytes"`."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2str(self, obj):
        raw = bytes(obj)
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch[Py2Str] = save_py2str


def unit(v):
    """The float32 value that uint8 v must become."""
    return torch.tensor(float(v), dtype=torch.float32) / 127.5 - 1


def dump_py2(obj, path):
    with open(path, "wb") as f:
        Py2Pickler(f, protocol=2).dump(obj)


def write_cifar10(root, per_batch=2, seed=0):
    """Write data_batch_1..5, test_batch and batches.meta; return (train data (N, 3072), train labels)."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    all_x, all_y = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, 10, size=per_batch)]
        if name == "data_batch_1":  # image 0: R plane 255, G plane 0, B plane 128, one marked pixel
            x[0, :1024], x[0, 1024:2048], x[0, 2048:] = 255, 0, 128
            x[0, 1024 + 2 * 32 + 5] = 200  # G channel, row 2, column 5
        entry = {Py2Str(b"batch_label"): Py2Str(name.encode()), Py2Str(b"labels"): y, Py2Str(b"data"): x,
                 Py2Str(b"filenames"): [Py2Str(f"img_{i}.png".encode()) for i in range(per_batch)]}
        dump_py2(entry, folder / name)
        if name != "test_batch":
            all_x.append(x)
            all_y += y
    names = [Py2Str(n) for n in (b"airplane", b"automobile", b"bird", b"cat", b"deer",
                                  b"dog", b"frog", b"horse", b"ship", b"truck")]
    meta = {Py2Str(b"num_cases_per_batch"): per_batch, Py2Str(b"label_names"): names,
            Py2Str(b"num_vis"): 3072}
    dump_py2(meta, folder / "batches.meta")
    return np.concatenate(all_x), all_y


@pytest.fixture
def skip_md5(monkeypatch):
    """torchvision md5-checks the six batches even with download=False; our files are tiny, not the real ones.
    Only the check is replaced; the loading code that runs is torchvision's own."""
    import torchvision.datasets.cifar as tv_cifar
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args, **kwargs: True)


# --------------------------------------------------------------------------------------------------------
# Pixel conversion
# --------------------------------------------------------------------------------------------------------

@given(arrays(np.uint8, st.tuples(st.integers(1, 4), st.integers(1, 5), st.integers(1, 5))))
def test_uint8_to_unit_is_affine_onto_minus1_1(x):
    out = data.uint8_to_unit(x)
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert torch.equal(out, torch.from_numpy(x.astype(np.float32)) / 127.5 - 1)
    assert out.min() >= -1 and out.max() <= 1


def test_uint8_ends_are_exact():
    out = data.uint8_to_unit(np.array([0, 255], dtype=np.uint8))
    assert out.tolist() == [-1.0, 1.0]


# --------------------------------------------------------------------------------------------------------
# CIFAR-10
# --------------------------------------------------------------------------------------------------------

def test_fake_cifar_files_have_the_real_key_types(tmp_path):
    write_cifar10(tmp_path)
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        assert b"data" in pickle.load(f, encoding="bytes")
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        assert "data" in pickle.load(f, encoding="latin1")


def test_cifar10_loads_through_torchvision_with_exact_pixels(tmp_path, skip_md5):
    x, y = write_cifar10(tmp_path)
    ds = data.make_dataset("cifar10", tmp_path, 32, class_cond=True)
    assert len(ds) == 10 and ds.num_classes == 10 and ds.channels == 3
    image, label = ds[0]
    assert image.dtype == torch.float32 and image.shape == (3, 32, 32)
    assert torch.all(image[0] == 1.0) and torch.all(image[2] == unit(128))  # R = 255, B = 128
    assert image[1, 2, 5] == unit(200) and (image[1] > -1).sum() == 1  # G = 0 but at row 2, column 5
    for i in range(len(ds)):  # channel-first planes, row-major, batches in order
        image, label = ds[i]
        assert torch.equal(image, torch.from_numpy(x[i].reshape(3, 32, 32)).float() / 127.5 - 1)
        assert label == y[i]
    test = data.make_dataset("cifar10", tmp_path, train=False)
    assert len(test) == 2 and test[0][1] == 0  # unconditional -> label 0


def test_cifar10_missing_fails_fast_with_one_line(tmp_path):
    start = time.monotonic()
    with pytest.raises(cm.CMError) as err:
        data.make_dataset("cifar10", tmp_path / "nowhere")
    assert time.monotonic() - start < 5
    msg = str(err.value)
    assert "\n" not in msg and "cifar-10-batches-py" in msg and "download" in msg
    assert cm.CIFAR10_URL in msg


def test_cifar10_corrupt_dir_is_reported_as_dataset_error(tmp_path):
    (tmp_path / "cifar-10-batches-py").mkdir()  # present but empty: torchvision's integrity check fails
    with pytest.raises(cm.CMError, match="cifar-10-batches-py"):
        data.make_dataset("cifar10", tmp_path)


def test_cifar10_rejects_other_resolutions(tmp_path, skip_md5):
    write_cifar10(tmp_path)
    with pytest.raises(cm.CMError, match="32x32"):
        data.make_dataset("cifar10", tmp_path, 64)


# --------------------------------------------------------------------------------------------------------
# Image folder
# --------------------------------------------------------------------------------------------------------

def solid(size, color, mode="RGB"):
    return Image.new(mode, size, color)


def test_image_folder_with_class_subfolders(tmp_path):
    (tmp_path / "dog").mkdir()
    (tmp_path / "cat" / "nested").mkdir(parents=True)
    solid((20, 30), (255, 0, 0)).save(tmp_path / "dog" / "a.png")
    solid((9, 9), (0, 0, 255)).save(tmp_path / "cat" / "nested" / "b.PNG")
    solid((16, 16), 128, mode="L").save(tmp_path / "cat" / "c.jpg", quality=100)
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    ds = data.make_dataset("folder", tmp_path, 8, class_cond=True)
    assert len(ds) == 3 and ds.classes == ["cat", "dog"] and ds.num_classes == 2
    items = {p.name: ds[i] for i, p in enumerate(ds.paths)}
    for image, _ in items.values():
        assert image.shape == (3, 8, 8) and image.dtype == torch.float32
    assert items["a.png"][1] == 1 and items["b.PNG"][1] == 0 and items["c.jpg"][1] == 0
    red = items["a.png"][0]  # a solid colour survives crop + resize exactly
    assert torch.all(red[0] == 1) and torch.all(red[1:] == -1)
    gray = items["c.jpg"][0]  # grayscale -> RGB, three equal channels
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    unconditional = data.make_dataset("folder", tmp_path, 8)
    assert all(unconditional[i][1] == 0 for i in range(3)) and unconditional.num_classes == 0


def test_image_folder_center_crops_before_resizing(tmp_path):
    arr = np.zeros((20, 40, 3), dtype=np.uint8)  # (H, W): red | green (centre 20 columns) | blue
    arr[:, :10, 0], arr[:, 10:30, 1], arr[:, 30:, 2] = 255, 255, 255
    Image.fromarray(arr).save(tmp_path / "wide.png")
    for resolution in (20, 8):
        image, label = data.make_dataset("folder", tmp_path, resolution)[0]
        assert label == 0 and image.shape == (3, resolution, resolution)
        assert torch.all(image[1] == 1) and torch.all(image[0] == -1) and torch.all(image[2] == -1)


def test_image_folder_errors(tmp_path):
    solid((4, 4), (0, 0, 0)).save(tmp_path / "top.png")
    with pytest.raises(cm.CMError, match="class subfolder"):
        data.make_dataset("folder", tmp_path, 4, class_cond=True)
    with pytest.raises(cm.CMError, match="resolution"):
        data.make_dataset("folder", tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(cm.CMError, match="no .* images"):
        data.make_dataset("folder", tmp_path / "empty", 4)
    with pytest.raises(cm.CMError, match="does not exist"):
        data.make_dataset("folder", tmp_path / "missing", 4)


# --------------------------------------------------------------------------------------------------------
# ImageNet-64 (Chrabaszcz et al. 2017 npz batches)
# --------------------------------------------------------------------------------------------------------

def write_imagenet64(root, name, labels, seed):
    """One npz batch in the downloadable format: data uint8 (N, 12288) as R, G, B planes; labels 1..1000."""
    x = np.random.default_rng(seed).integers(0, 256, size=(len(labels), 3 * 64 * 64), dtype=np.uint8)
    np.savez(root / name, data=x, labels=list(labels), mean=np.zeros(3 * 64 * 64))
    return x


def test_imagenet64_reshape_channel_order_and_label_shift(tmp_path):
    x1 = write_imagenet64(tmp_path, "train_data_batch_1.npz", [1, 1000, 5], seed=1)
    x2 = write_imagenet64(tmp_path, "train_data_batch_2.npz", [7, 2], seed=2)
    x1[0, 2 * 4096 + 3 * 64 + 10] = 77  # B channel, row 3, column 10
    np.savez(tmp_path / "train_data_batch_1.npz", data=x1, labels=[1, 1000, 5])
    ds = data.make_dataset("imagenet64", tmp_path, 64, class_cond=True)
    assert len(ds) == 5 and ds.num_classes == 1000 and ds.resolution == 64
    assert ds[0][0][2, 3, 10] == unit(77)
    x = np.concatenate([x1, x2])
    for i, label in enumerate([0, 999, 4, 6, 1]):
        image, y = ds[i]
        assert y == label and image.shape == (3, 64, 64)
        assert torch.equal(image, torch.from_numpy(x[i].reshape(3, 64, 64)).float() / 127.5 - 1)
    assert data.make_dataset("imagenet64", tmp_path)[1][1] == 0  # unconditional


def test_imagenet64_npy_cache_matches_npz(tmp_path):
    write_imagenet64(tmp_path, "train_data_batch_1.npz", [3, 4], seed=3)
    write_imagenet64(tmp_path, "val_data.npz", [9], seed=4)
    before = data.make_dataset("imagenet64", tmp_path, class_cond=True)
    data.imagenet64_to_npy(tmp_path)
    after = data.make_dataset("imagenet64", tmp_path, class_cond=True)
    assert isinstance(after.data, np.memmap)
    for i in range(2):
        assert torch.equal(before[i][0], after[i][0]) and before[i][1] == after[i][1]
    val = data.make_dataset("imagenet64", tmp_path, train=False, class_cond=True)
    assert len(val) == 1 and val[0][1] == 8


def test_imagenet64_missing(tmp_path):
    with pytest.raises(cm.CMError, match="train_data_batch"):
        data.make_dataset("imagenet64", tmp_path)


# --------------------------------------------------------------------------------------------------------
# Digits and the factory
# --------------------------------------------------------------------------------------------------------

def test_digits_native_and_resized():
    ds = data.make_dataset("digits", class_cond=True)
    image, label = ds[0]
    assert len(ds) == 1797 and image.shape == (1, 8, 8) and label == 0 and ds.num_classes == 10
    allx = ds.images
    assert allx.min() == -1 and allx.max() == 1
    assert torch.equal(allx * 8 + 8, (allx * 8 + 8).round())  # values v / 8 - 1 for v in 0..16
    for r in (16, 32):
        big = data.make_dataset("digits", resolution=r)
        assert big[5][0].shape == (1, r, r) and big[5][1] == 0
        assert big.images.min() >= -1 and big.images.max() <= 1
    nearest = data.DigitsDataset(16, interpolation="nearest")
    assert torch.equal(nearest[3][0], ds[3][0].repeat_interleave(2, -1).repeat_interleave(2, -2))


def test_unknown_dataset_name_lists_valid_names():
    with pytest.raises(cm.CMError) as err:
        data.make_dataset("mnist", "/tmp")
    for name in ("cifar10", "folder", "imagenet64", "digits"):
        assert name in str(err.value)


# --------------------------------------------------------------------------------------------------------
# Loader: ranks, resume, epochs, flips
# --------------------------------------------------------------------------------------------------------

class IndexImages(Dataset):
    """Item i: a (1, 2, 3) image whose columns are i, i + 0.25, i + 0.5 (so a flip is visible); label i."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.tensor([0.0, 0.25, 0.5]).expand(1, 2, 3) + i, i


def take(iterator, k):
    return [next(iterator) for _ in range(k)]


def decode(images):
    """(index, flipped) per image of a batch of IndexImages."""
    return [(int(im[0, 0].min()), bool(im[0, 0, 0] > im[0, 0, -1])) for im in images]


def test_two_ranks_see_disjoint_indices_covering_the_epoch():
    ds, bs = IndexImages(23), 4
    bpe = data.batches_per_epoch(len(ds), bs, 2)
    assert bpe == 2  # 23 // 2 = 11 per rank -> 2 full batches
    seen = []
    for rank in (0, 1):
        labels = torch.cat([y for _, y in take(data.make_loader(ds, bs, rank, 2, seed=5), bpe)]).tolist()
        assert len(set(labels)) == bpe * bs
        seen.append(set(labels))
    assert not seen[0] & seen[1]
    samplers = [data.ResumableBatchSampler(
        torch.utils.data.DistributedSampler(ds, 2, r, shuffle=True, seed=5, drop_last=True), 11, 5, False)
        for r in (0, 1)]
    keys = [i for s in samplers for i, _ in s.epoch_keys(0)]
    assert len(keys) == 22 and len(set(keys)) == 22  # the epoch's permutation, split without overlap


def test_epochs_repeat_the_data_in_a_new_order():
    ds, bs = IndexImages(12), 4
    batches = take(data.make_loader(ds, bs, seed=0), 9)
    epochs = [torch.cat([y for _, y in batches[3 * e:3 * e + 3]]).tolist() for e in range(3)]
    assert all(sorted(e) == list(range(12)) for e in epochs)
    assert epochs[0] != epochs[1] or epochs[1] != epochs[2]
    again = take(data.make_loader(ds, bs, seed=0), 9)  # same seed -> same stream
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(4, 40), bs=st.integers(1, 5), world=st.integers(1, 3), data_=st.data())
def test_resume_gives_the_same_batches_flips_included(n, bs, world, data_):
    if (n // world) < bs:
        return
    rank = data_.draw(st.integers(0, world - 1))
    seed = data_.draw(st.integers(0, 2**31 - 1))
    bpe = data.batches_per_epoch(n, bs, world)
    total = 3 * bpe + 2
    start = data_.draw(st.integers(0, total - 1))
    ds = IndexImages(n)
    full = take(data.make_loader(ds, bs, rank, world, seed, random_flip=True), total)
    resumed = take(data.make_loader(ds, bs, rank, world, seed, start_step=start, random_flip=True),
                   total - start)
    for a, b in zip(full[start:], resumed):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_flips_are_random_per_epoch_and_follow_the_dataset_flag():
    ds = IndexImages(64)
    epochs = [decode(torch.cat([x for x, _ in take(data.make_loader(ds, 64, seed=3, random_flip=True), 2)]))]
    flips = [dict(e) for e in [epochs[0][:64], epochs[0][64:]]]
    for f in flips:
        assert 10 < sum(f.values()) < 54  # about half flipped
    assert flips[0] != flips[1]  # a new draw each epoch
    for e, f in enumerate(flips):  # flip of index i in epoch e is flip_mask(seed, e)[i]
        mask = data.flip_mask(3, e, 64)
        assert all(f[i] == bool(mask[i]) for i in range(64))
    plain = data.make_loader(ds, 64, seed=3)  # IndexImages has no random_flip attribute -> no flips
    assert not any(f for _, f in decode(next(plain)[0]))
    ds.random_flip = True  # the attribute set by make_dataset(..., random_flip=True) turns them on
    assert any(f for _, f in decode(next(data.make_loader(ds, 64, seed=3))[0]))


def test_loader_with_worker_process_matches_in_process():
    ds = data.make_dataset("digits", random_flip=True)
    a = take(data.make_loader(ds, 16, 1, 2, seed=9, num_workers=1, start_step=40), 3)
    b = take(data.make_loader(ds, 16, 1, 2, seed=9, num_workers=0, start_step=40), 3)
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b))


def test_loader_rejects_a_batch_larger_than_a_rank_share():
    with pytest.raises(cm.CMError, match="cannot fill one batch"):
        data.make_loader(IndexImages(10), 6, 0, 2)
