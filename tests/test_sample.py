"""python -m full.sample: grid + npz (uint8 NHWC), per-sample seeds (batch-size independence), ts."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import cm
import full.sample
from full import checkpoints
from full.model import make_model
from full.presets import resolve

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}




def gen(f, cfg, *args, **kwargs):
    """cm.generate for a full/ config: its math section and its class count."""
    k = cfg.net.num_classes if cfg.data.class_cond else 0
    return cm.generate(f, cfg.cm, *args, num_classes=k, **kwargs)

def _export(path: Path, preset: str) -> Path:
    """An export file with random (non-zero) weights: sampling needs no training to be tested."""
    cfg = resolve(preset)
    torch.manual_seed(0)
    f = make_model(cfg)
    with torch.no_grad():
        for p in f.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return checkpoints.export(path, {cfg.ema.rates[0]: f}, cfg, step=0)


@pytest.fixture(scope="module")
def adm_export(tmp_path_factory):
    return _export(tmp_path_factory.mktemp("adm") / "export.pt", "tiny-ct-adm")


def test_cli_writes_grid_and_npz(adm_export, tmp_path):
    p = subprocess.run([sys.executable, "-m", "full.sample", "--checkpoint", str(adm_export), "--num", "7",
                        "--ts", "0,11,17", "--grid-steps", "18", "--batch", "3", "--out", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV)
    assert p.returncode == 0, p.stderr[-2000:]
    assert (tmp_path / "samples.png").is_file()
    with np.load(tmp_path / "samples.npz") as z:
        x, y = z["arr_0"], z["arr_1"]
    assert x.dtype == np.uint8 and x.shape == (7, 8, 8, 1)  # NHWC
    assert y.shape == (7,) and y.dtype == np.int64 and 0 <= y.min() and y.max() < 10
    # the file holds exactly what an in-process generation with the same seeds gives
    f, cfg = checkpoints.model_from_state(checkpoints.load(adm_export))
    want, labels = gen(f, cfg, (1, 8, 8), range(7), cm.ts_to_sigmas([0, 11, 17], 18), seed=0)
    np.testing.assert_array_equal(x, full.sample.to_uint8(want))
    np.testing.assert_array_equal(y, labels.numpy())


@pytest.mark.parametrize("levels", [[80.0], [80.0, 3.0, 0.5]])
def test_samples_do_not_depend_on_batch_size(adm_export, levels):
    f, cfg = checkpoints.model_from_state(checkpoints.load(adm_export))
    a, ya = gen(f, cfg, (1, 8, 8), range(10), levels, seed=5, batch=3)
    b, yb = gen(f, cfg, (1, 8, 8), range(10), levels, seed=5, batch=5)
    assert torch.equal(ya, yb)
    np.testing.assert_array_equal(full.sample.to_uint8(a), full.sample.to_uint8(b))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    c, _ = gen(f, cfg, (1, 8, 8), range(4, 10), levels, seed=5, batch=4)  # "rank 1"
    torch.testing.assert_close(a[4:], c, rtol=0, atol=1e-5)


def test_ts_convention(adm_export):
    _, cfg = checkpoints.model_from_state(checkpoints.load(adm_export))
    levels = full.sample.levels_from_args("0,11,17", "", 18, cfg)
    # index 0 is T, index 11 of 18 is (80^(1/7) + 11/17 (0.002^(1/7) - 80^(1/7)))^7, 17 = ε an end marker
    assert levels == pytest.approx([80.0, 0.5853481231945422], rel=1e-12)
    assert full.sample.levels_from_args("0,17", "", 18, cfg) == [80.0]
    assert full.sample.levels_from_args("", "", 18, cfg) == [80.0]
    assert full.sample.levels_from_args("", "80,2.5", 18, cfg) == [80.0, 2.5]
    with pytest.raises(cm.CMError):
        full.sample.levels_from_args("11,0", "", 18, cfg)


def test_one_level_is_the_onestep_sampler(adm_export):
    f, cfg = checkpoints.model_from_state(checkpoints.load(adm_export))
    x, y = gen(f, cfg, (1, 8, 8), range(3), [80.0], seed=1)
    g = [torch.Generator().manual_seed(1 + i) for i in range(3)]
    labels = torch.cat([torch.randint(10, (1,), generator=gi) for gi in g])
    z = torch.stack([torch.randn(1, 8, 8, generator=gi) for gi in g])  # label first, then z, per sample
    assert torch.equal(y, labels)
    one = cm.sample_onestep(lambda v, t: f(v, t, labels), z)
    torch.testing.assert_close(x, one.clamp(-1, 1), rtol=0, atol=1e-6)


def test_two_steps_equal_the_official_sampler(tmp_path):
    """generate() with per-sample seeds against the official sampler re-written in test_cm_math, on an
    ADM whose outputs leave [-1, 1] (so the per-step clamp matters), for the CD and CT ts of the scripts."""
    from test_cm_math import official_multistep
    cfg = resolve("tiny-ct-adm")
    torch.manual_seed(1)
    f = make_model(cfg).eval()
    with torch.no_grad():
        for p in f.parameters():
            p.copy_(torch.randn_like(p) / max(p[0].numel(), 1) ** 0.5)
    for ts, steps in (((0, 11, 17), 18), ((0, 106, 200), 201), ((0, 5, 12, 17), 18)):
        levels = cm.ts_to_sigmas(ts, steps)
        x, y = gen(f, cfg, (1, 8, 8), range(3), levels, seed=4)
        z, extra, labels = cm.per_sample_noise(range(3), (1, 8, 8), len(levels), 4, 10)
        fy = lambda v, t: f(v, t, labels)  # noqa: E731
        assert fy(80 * z, 80.0).abs().max() > 1.5
        ref = official_multistep(fy, 80 * z, ts, extra + [torch.zeros_like(z)], steps)
        torch.testing.assert_close(x, ref, rtol=0, atol=1e-5)
        raw, _ = gen(f, cfg, (1, 8, 8), range(3), levels, seed=4, clip_denoised=False)
        assert (raw.clamp(-1, 1) - x).abs().max() > 1e-2  # the option turns the per-step clamp off


def test_uint8_truncates_as_the_official_code():
    x = torch.tensor([-1.5, -1.0, -0.999, 0.0, 0.5, 0.999, 1.0, 1.5]).reshape(1, 1, 1, 8)
    # (v + 1) 127.5 = 0, 0, 0.1275, 127.5, 191.25, 254.87, 255, 318.75 -> clamp, truncate
    assert full.sample.to_uint8(x).ravel().tolist() == [0, 0, 0, 127, 191, 254, 255, 255]


def test_edit_branch(tmp_path, capsys):
    path = _export(tmp_path / "export.pt", "tiny-ct")
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=np.random.default_rng(0).integers(0, 256, (2, 8, 8, 1), dtype=np.uint8))
    full.sample.main(["--checkpoint", str(path), "--edit", "denoise", "--sigmas", "0.5",
                      "--reference", str(ref), "--out", str(tmp_path)])
    with np.load(tmp_path / "edit-denoise.npz") as z:
        assert z["arr_0"].shape == (2, 8, 8, 1) and z["arr_0"].dtype == np.uint8
    assert (tmp_path / "edit-denoise.png").is_file()


def test_bad_checkpoint_is_one_line_error(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    with pytest.raises(SystemExit) as e:
        full.sample.main(["--checkpoint", str(bad), "--num", "2"])
    assert e.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "corrupt" in err[0]


@pytest.mark.parametrize("extra, message", [
    (["--class-labels", "10"], "--class-labels must lie in [0, 9]"),
    (["--edit", "inpaint", "--reference", "no/such.png", "--mask", "no/such.png"], "no reference at"),
])
def test_cli_bad_input_is_one_line(adm_export, tmp_path, extra, message):
    p = subprocess.run([sys.executable, "-m", "full.sample", "--checkpoint", str(adm_export), "--num", "2",
                        "--out", str(tmp_path), *extra], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env=ENV)
    assert p.returncode != 0 and message in p.stderr and p.stderr.strip().count("\n") == 0, p.stderr


def test_mask_and_reference_checks(tmp_path):
    from PIL import Image

    from full.sample import load_mask, load_reference
    with pytest.raises(cm.CMError, match="no mask at"):
        load_mask(str(tmp_path / "none.png"), (1, 8, 8))
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(cm.CMError, match="cannot read image"):
        load_mask(str(tmp_path / "bad.png"), (1, 8, 8))
    np.savez(tmp_path / "ref.npz", np.zeros((2, 16, 16, 3), dtype=np.uint8))
    with pytest.raises(cm.CMError, match="its images are"):
        load_reference(str(tmp_path / "ref.npz"), (1, 8, 8))
    Image.new("L", (8, 8), 255).save(tmp_path / "ok.png")
    assert load_mask(str(tmp_path / "ok.png"), (1, 8, 8)).sum() == 64
