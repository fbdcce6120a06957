"""cifar10-ect-vp: ECT's CIFAR-10 run as locuslab/ect runs it (run_ecm.sh, ct_train.py, training/networks.py
ECMPrecond, training/ct_training_loop.py generator_fn, metrics/metric_utils.py), and the sampling options it
sets (run.eval_sigma_min, run.renoise_sigma_min, run.clamp_mid, run.uint8).

The expected values are re-derived here from those files' formulas, written out in this test: ECMPrecond in
eval mode is D(x, σ) = c_skip x + c_out F(c_in x, ln(σ)/4) with c_skip = σd² / ((σ - 0.003)² + σd²),
c_out = (σ - 0.003) σd / √(σ² + σd²), c_in = 1 / √(σd² + σ²); generator_fn is x = D(80 z, 80),
x = D(x + 0.821 z', 0.821), never clamped; the uint8 of its FID is (x·127.5 + 128).clamp(0, 255) truncated.
"""
from __future__ import annotations

import numpy as np
import pytest
import test_released
import torch
from test_edm_snapshots import write_snapshot

import full.train
from cm import generate
from full import checkpoints
from full.files import to_uint8
from full.model import for_sampling, make_model
from full.networks import NCSNppConfig
from full.presets import resolve
from full.released import edm_pickle

persistence = test_released.persistence  # the stand-in torch_utils.persistence (a fixture)


def test_preset_has_locuslab_ects_constants():
    cfg = resolve("cifar10-ect-vp")
    # ct_train.py --arch ddpmpp: SongUNet, positional embedding, standard encoder, channel_mult_noise 1,
    # resample_filter [1,1], model_channels 128, channel_mult [2,2,2]; SongUNet's defaults num_blocks 4,
    # attn_resolutions [16]; run_ecm.sh --dropout=0.2
    n = cfg.net
    assert (n.embedding, n.encoder, n.resample_filter, n.model_channels, n.channel_mult) == \
        ("positional", "standard", (1, 1), 128, (2, 2, 2))
    assert (n.num_blocks, n.attn_resolutions, n.dropout, n.num_classes) == (4, (16,), 0.2, 0)
    # ECMPrecond: c_noise = sigma.log() / 4, sigma_data 0.5, sigma_min = 0.003 in eval mode
    assert cfg.cm.noise_cond == "edm" and cfg.cm.sigma_data == 0.5 and cfg.run.eval_sigma_min == 0.003
    # run_ecm.sh: --batch=128 --lr=0.0001 --optim=RAdam --duration=25.6 (Mimg) --tick=12.8 --double=250
    assert (cfg.opt.optimizer, cfg.opt.lr, cfg.opt.batch) == ("radam", 1e-4, 128)
    assert cfg.opt.steps == round(25.6e6 / 128) and cfg.cm.stage_steps == round(250 * 12.8e3 / 128)
    # ct_train.py: --mean -1.1, --std 2.0, -q 2.0, -c 0.0, --ema_beta 0.9999, --xflip False; --augment=0.0
    assert (cfg.cm.P_mean, cfg.cm.P_std, cfg.cm.q, cfg.cm.metric) == (-1.1, 2.0, 2.0, "l2_norm")
    assert cfg.ema.for_eval() == 0.9999 and cfg.data.random_flip is False
    # generator_fn: t_max 80, --mid_t 0.821, no clamp, x + t_next z; metric_utils: x·127.5 + 128
    assert cfg.run.sigmas == (80.0, 0.821) and cfg.cm.sigma_max == 80.0
    assert (cfg.run.clamp_mid, cfg.run.renoise_sigma_min, cfg.run.uint8) == (False, 0.0, "round")
    # training: ECMPrecond in train mode has c_skip = σd² / (σ² + σd²): ε = 0, the denoiser wrapper
    assert make_model(cfg).sigma_min == 0.0


def test_cifar10_ect_is_the_one_teacher_variant():
    a, b = resolve("cifar10-ect"), resolve("cifar10-ect-vp")
    assert a.net == NCSNppConfig.cifar10(dropout=0.2) and b.net == NCSNppConfig.ddpmpp_cifar10(dropout=0.2)
    assert (a.run.eval_sigma_min, a.run.renoise_sigma_min, a.run.clamp_mid, a.run.uint8) == \
        (-1.0, -1.0, True, "truncate")
    assert (a.cm, a.opt, a.ema, a.data) == (b.cm, b.opt, b.ema, b.data)


def ect_generator(F, z, z2, sigma_data=0.5, eps=0.003, both=False):
    """locuslab/ect's generator_fn around ECMPrecond in eval mode, rewritten from its formulas: D runs in
    float32 (ECMPrecond casts x and σ to float32), the chain in float64, x + t_next z between the steps."""
    def D(x, s):
        x, s = x.float(), torch.tensor(s, dtype=torch.float32)
        c_skip = sigma_data ** 2 / ((s - eps) ** 2 + sigma_data ** 2)
        c_out = (s - eps) * sigma_data / (s ** 2 + sigma_data ** 2).sqrt()
        c_in = 1 / (sigma_data ** 2 + s ** 2).sqrt()
        return (c_skip * x + c_out * F(c_in * x, (s.log() / 4).expand(x.shape[0]), None)).double()
    mid = D(z.double() * 80.0, 80.0)
    x = D(mid + 0.821 * z2.double(), 0.821)
    return (x, mid) if both else x


def ect_uint8(x):
    """metrics/metric_utils.py: (img * 127.5 + 128).clamp(0, 255).to(torch.uint8), NHWC, in numpy."""
    y = np.clip(x.double().numpy() * 127.5 + 128, 0, 255)
    return np.floor(y).astype(np.uint8).transpose(0, 2, 3, 1)


def small(tmp_path, *extra):
    return ["data.name='digits'", "data.root=''", "data.num_workers=0", "net.img_resolution=8",
            "net.in_channels=1", "net.out_channels=1", "net.model_channels=16", "net.channel_mult=(1,2)",
            "net.num_blocks=1", "net.attn_resolutions=(4,)", "opt.batch=4", "opt.steps=2",
            "run.sample_num=2", "run.ckpt_every=2", f"run.out={str(tmp_path / 'ect')!r}", *extra]


def test_two_step_samples_equal_ects_sampler(tmp_path):
    """The preset's sampling path (for_sampling, cm.generate with run.clamp_mid, to_uint8 with run.uint8)
    against ect_generator on the same network and noise; the network's output is scaled up so that the
    unclamped intermediate image leaves [-1, 1] (a clamp would show)."""
    cfg = resolve("cifar10-ect-vp", small(tmp_path)[:10])
    torch.manual_seed(0)
    f = make_model(cfg).eval()
    with torch.no_grad():
        for p in f.parameters():
            p.add_(0.3 * torch.randn_like(p))
    F = f.net
    shape, idx, seed = (1, 8, 8), range(3), 5
    fs, cs = for_sampling(cfg, f)
    x, _ = generate(fs, cs, shape, idx, list(cfg.run.sigmas), seed, clip_denoised=cfg.run.clamp_mid)
    # the same per-sample noise as cm.generate draws it: z then z' from seed + i
    gens = [torch.Generator().manual_seed(seed + i) for i in idx]
    z = torch.stack([torch.randn(*shape, generator=g) for g in gens])
    z2 = torch.stack([torch.randn(*shape, generator=g) for g in gens])
    with torch.no_grad():
        want, mid = ect_generator(F, z, z2, both=True)
    torch.testing.assert_close(x.double(), want, rtol=1e-5, atol=1e-5)  # a deep net amplifies ulps
    assert want.abs().max() > 1.5 and mid.abs().max() > 1.5  # a clamp anywhere would show
    # uint8: equal except where x·127.5 + 128 lies within float32 round-off of an integer
    got8, want8 = to_uint8(x, cfg.run.uint8), ect_uint8(want)
    y = want.numpy().transpose(0, 2, 3, 1) * 127.5 + 128
    edge = np.abs(y - np.round(y)) < 1e-4
    np.testing.assert_array_equal(got8[~edge], want8[~edge])
    assert f.sigma_min == 0.0 and fs.sigma_min == 0.003  # training wrapper untouched


class ZeroNet(torch.nn.Module):
    """F = 0, so D(x, σ) = c_skip(σ) x exactly: the two-step chain is a closed form to float32 round-off."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, c_noise, class_labels=None):
        return x * self.w


def test_two_step_renoises_with_t_next_z_as_ect():
    """x = c(0.821) (c(80) 80 z + 0.821 z') with c(σ) = σd² / ((σ - 0.003)² + σd²); √(0.821² - ε²) instead
    of 0.821 would move it by about 1e-6, far above float32 round-off here."""
    from cm import ConsistencyFunction
    cfg = resolve("cifar10-ect-vp")
    f = ConsistencyFunction(ZeroNet(), 0.5, 0.0, "edm")
    fs, cs = for_sampling(cfg, f)
    shape, idx, seed = (1, 8, 8), range(4), 11
    x, _ = generate(fs, cs, shape, idx, list(cfg.run.sigmas), seed, clip_denoised=cfg.run.clamp_mid)
    gens = [torch.Generator().manual_seed(seed + i) for i in idx]
    z = torch.stack([torch.randn(*shape, generator=g) for g in gens]).double()
    z2 = torch.stack([torch.randn(*shape, generator=g) for g in gens]).double()

    def c(s):
        return 0.25 / ((s - 0.003) ** 2 + 0.25)
    want = c(0.821) * (c(80.0) * 80.0 * z + 0.821 * z2)
    torch.testing.assert_close(x.double(), want, rtol=0, atol=1e-7)


def test_round_and_truncate_against_the_formulas():
    v = torch.linspace(-1.2, 1.2, 2001).reshape(1, 1, 1, -1)
    r = np.floor(np.clip(v.double().numpy() * 127.5 + 128, 0, 255)).astype(np.uint8).transpose(0, 2, 3, 1)
    t = np.floor(np.clip((v.double().numpy() + 1) * 127.5, 0, 255)).astype(np.uint8).transpose(0, 2, 3, 1)
    assert np.abs(to_uint8(v, "round").astype(int) - r).max() <= 1
    assert (to_uint8(v, "round") != r).mean() < 0.01 and (to_uint8(v) != t).mean() < 0.01
    assert (to_uint8(v, "round").astype(int) - to_uint8(v).astype(int)).max() == 1  # rounding is above


def test_vp_pickle_starts_the_run(persistence, tmp_path):
    """EDM's VP snapshot (DDPM++, numpy scalars, augment pipe, loss) as run.teacher: θ starts from its
    SongUNet weights (ECT's copy of data['ema'] into ECMPrecond) and a few steps train on the CPU."""
    pkl = tmp_path / "edm-cifar10-32x32-uncond-vp.pkl"
    flat = write_snapshot(pkl, "VPPrecond")
    args = [f"run.teacher={str(pkl)!r}", *small(tmp_path)]
    cfg = resolve("cifar10-ect-vp", args)
    teacher = full.train.load_teacher(cfg, torch.device("cpu"))
    tr = full.train.Trainer(cfg, torch.device("cpu"), teacher)
    assert tr.model.sigma_min == 0.0  # ECMPrecond's train-mode scalings
    start = tr.model.net.state_dict()
    expected = edm_pickle.from_edm(flat, checkpoints.config_of(checkpoints.load(pkl)).net)
    assert expected and all(torch.equal(start[k], v) for k, v in expected.items())
    full.train.main(["--preset", "cifar10-ect-vp", *args])
    assert checkpoints.latest(tmp_path / "ect").name == "ckpt-0000002.pt"
    assert not persistence.exists()


def test_full_sample_of_an_ect_vp_export_samples_as_ect(tmp_path):
    """full.sample reads the run's sampling settings from the export: its samples.npz is ect_uint8 of
    ect_generator on the same weights and per-sample noise (up to float32 round-off at a level boundary)."""
    import full.sample
    cfg = resolve("cifar10-ect-vp", small(tmp_path)[:10])
    torch.manual_seed(1)
    f = make_model(cfg)
    with torch.no_grad():
        for p in f.parameters():
            p.add_(0.3 * torch.randn_like(p))
    path = checkpoints.export(tmp_path / "export.pt", {cfg.ema.for_eval(): f}, cfg, step=0)
    full.sample.main(["--checkpoint", str(path), "--sigmas", "80,0.821", "--num-samples", "3", "--seed", "7",
                      "--out", str(tmp_path / "s")])
    with np.load(tmp_path / "s" / "samples.npz") as d:
        got = d["arr_0"]
    gens = [torch.Generator().manual_seed(7 + i) for i in range(3)]
    z = torch.stack([torch.randn(1, 8, 8, generator=g) for g in gens])
    z2 = torch.stack([torch.randn(1, 8, 8, generator=g) for g in gens])
    with torch.no_grad():
        want = ect_generator(f.eval().net, z, z2)
    assert want.abs().max() > 1.5
    y = want.numpy().transpose(0, 2, 3, 1) * 127.5 + 128
    ok = np.abs(y - np.round(y)) > 1e-3  # away from a level boundary the two must agree exactly
    np.testing.assert_array_equal(got[ok], ect_uint8(want)[ok])
    assert ok.mean() > 0.9


def test_bad_sampling_settings_are_one_line_errors():
    from cm import CMError
    for bad in ("run.uint8='nearest'", "run.eval_sigma_min=-0.5", "run.renoise_sigma_min=80.0"):
        with pytest.raises(CMError, match="run\\."):
            resolve("cifar10-ect-vp", [bad])


def test_in_training_fid_scores_ects_one_step_uint8(tmp_path, monkeypatch):
    """run.fid_every's samples: one step of the sampling wrapper, rounded to uint8 (at T = 80, ε = 0.003
    moves a sample by far less than a uint8 level; the two-step tests above resolve ε)."""
    from full import evaluate
    cfg = resolve("cifar10-ect-vp", small(tmp_path)[:10] + ["run.fid_samples=3"])
    torch.manual_seed(2)
    f = make_model(cfg).eval()
    with torch.no_grad():
        for p in f.parameters():
            p.add_(0.3 * torch.randn_like(p))
    seen = []
    monkeypatch.setattr(evaluate, "make_extractor", lambda device=None, weights_path=None: object())
    monkeypatch.setattr(evaluate, "load_stats", lambda path: (None, None, None))
    monkeypatch.setattr(evaluate, "evaluate",
                        lambda images, mu, sigma, ex: seen.append(images) or {"fid": 1.0})
    out = tmp_path / "run"
    out.mkdir()
    (out / "fid_ref.npz").write_bytes(b"")  # the cached reference (load_stats is replaced)
    assert evaluate.fid_during_training(f, cfg, (1, 8, 8), None, out, {}, "cpu") == 1.0
    gens = [torch.Generator().manual_seed(cfg.run.seed + 2 + i) for i in range(3)]
    z = torch.stack([torch.randn(1, 8, 8, generator=g) for g in gens])
    with torch.no_grad():
        want = ect_generator(f.net, z, z, both=True)[1]  # the first step, D(80 z, 80)
    y = want.numpy().transpose(0, 2, 3, 1) * 127.5 + 128
    ok = np.abs(y - np.round(y)) > 1e-3
    np.testing.assert_array_equal(seen[0][ok], ect_uint8(want)[ok])
    assert ok.mean() > 0.9 and want.abs().max() > 1.5
