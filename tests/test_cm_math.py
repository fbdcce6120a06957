"""Property tests of cm.py's math against the paper [CM Sec. 4-5, App. C; EDM Tab. 1] and closed forms."""
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import cm

EPS, T, SD = 0.002, 80.0, 0.5


# --- exact functions for Gaussian data N(0, σd² I): the PF ODE keeps x_t / √(σd² + t²) constant ---

def exact_denoiser(x, sigma):
    """E[x_0 | x_t] = x_t σd² / (σd² + t²)."""
    s = cm.append_dims(torch.as_tensor(sigma, dtype=x.dtype).expand(x.shape[0]), x.ndim)
    return x * SD ** 2 / (SD ** 2 + s ** 2)


def exact_f(x, sigma):
    """f*(x, t) = x √(σd² + ε²) / √(σd² + t²)."""
    s = cm.append_dims(torch.as_tensor(sigma, dtype=x.dtype).expand(x.shape[0]), x.ndim)
    return x * math.sqrt(SD ** 2 + EPS ** 2) / (SD ** 2 + s ** 2).sqrt()


def random_model(kind: str, seed: int, scale: float = 1.0):
    torch.manual_seed(seed)
    net = cm.MLP(3, 32, depth=2) if kind == "mlp" else cm.UNet(1, 8, (1, 2), blocks=1, resolution=8)
    with torch.no_grad():
        for p in net.parameters():  # random weights everywhere, the output layer included
            p.normal_(0, scale / math.sqrt(max(p[0].numel(), 1)))
    return cm.ConsistencyFunction(net, SD, EPS)


# --- 2. noise levels ---

@given(N=st.integers(2, 2000), rho=st.floats(0.1, 20.0),
       smin=st.floats(1e-4, 1.0), ratio=st.floats(1.01, 1e4))
def test_grid_increasing_with_exact_ends(N, rho, smin, ratio):
    s = cm.karras_sigmas(N, smin, smin * ratio, rho)
    assert s.shape == (N,)
    assert s[0].item() == smin and s[-1].item() == smin * ratio
    assert (s[1:] > s[:-1]).all()


def test_grid_matches_formula_and_rejects_small_N():
    s = cm.karras_sigmas(18)
    i = 5  # t_6 in the paper's 1-based numbering
    expected = (EPS ** (1 / 7) + i / 17 * (T ** (1 / 7) - EPS ** (1 / 7))) ** 7
    assert s[i].item() == pytest.approx(expected, rel=1e-12)
    for bad in (1, 0, -3):
        with pytest.raises(ValueError, match="N >= 2"):
            cm.karras_sigmas(bad)


@given(K=st.integers(1, 10_000), s0=st.integers(2, 20), extra=st.integers(0, 1300),
       mu0=st.floats(0.5, 0.999))
def test_curriculum_monotone_with_stated_ends(K, s0, extra, mu0):
    s1 = s0 + extra
    ks = list(range(0, K + 1, max(K // 200, 1))) + [K]
    Ns = [cm.ct_num_steps(k, K, s0, s1) for k in ks]
    assert Ns[0] == s0 and Ns[-1] == s1 + 1
    assert all(a <= b for a, b in zip(Ns, Ns[1:]))
    for rule, mu_start in (("paper", mu0), ("code", mu0 ** (s0 / (s0 - 1)))):
        mus = [cm.ct_target_rate(k, K, s0, s1, mu0, rule) for k in ks]
        assert mus[0] == pytest.approx(mu_start)  # paper: μ(0) = μ0; official code: μ0^(s0/(s0-1))
        assert all(0 < m < 1 for m in mus) and all(a <= b for a, b in zip(mus, mus[1:]))


def test_curriculum_interior_values():
    """CIFAR-10 CT (s0 2, s1 150, K 800k), by hand: N(k) = ⌈√(k/K (151² - 4) + 4) - 1⌉ + 1, e.g.
    N(100k) = ⌈√2853.625 - 1⌉ + 1 = ⌈52.42⌉ + 1 = 54; μ(k) = 0.9^(2/(N-1)) (code) or 0.9^(2/N) (paper)."""
    K = 800_000
    assert [cm.ct_num_steps(k, K, 2, 150) for k in (0, 1, 100_000, 400_000, K - 1, K)] == [2, 3, 54, 107,
                                                                                           151, 151]
    assert cm.ct_target_rate(100_000, K, 2, 150, 0.9) == pytest.approx(0.9960320247854624, rel=1e-12)
    paper = cm.ct_target_rate(100_000, K, 2, 150, 0.9, "paper")
    assert paper == pytest.approx(0.9961053625291011, rel=1e-12)
    assert cm.ct_target_rate(0, K, 2, 150, 0.9) == pytest.approx(0.81, rel=1e-12)  # the official μ(0)
    with pytest.raises(ValueError, match="mu rule"):
        cm.ct_target_rate(0, K, 2, 150, 0.9, "other")


def test_ts_convention():
    # (80^(1/7) + i/17 (0.002^(1/7) - 80^(1/7)))^7 counted from T: index 11 = 0.58534812..., 8 = 3.25682151...
    assert cm.ts_to_sigmas([0, 11, 17], 18) == pytest.approx([T, 0.5853481231945422], rel=1e-12)
    assert cm.ts_to_sigmas([0, 8, 17], 18) == pytest.approx([T, 3.256821519765537], rel=1e-12)
    assert len(cm.ts_to_sigmas([0, 11, 17], 18)) == 2  # index 17 = ε is only the end marker
    for bad in ([3, 1], [0, 18], [], [0, 0, 5]):
        with pytest.raises(ValueError):
            cm.ts_to_sigmas(bad, 18)


# --- 3. parameterization ---

@given(seed=st.integers(0, 2 ** 16), batch=st.integers(1, 6), scale=st.floats(0.1, 10.0),
       xscale=st.floats(1e-3, 1e3), kind=st.sampled_from(["mlp", "unet"]))
def test_boundary_condition_exact(seed, batch, scale, xscale, kind):
    f = random_model(kind, seed, scale)
    g = torch.Generator().manual_seed(seed)
    x = xscale * torch.randn((batch, 3) if kind == "mlp" else (batch, 1, 8, 8), generator=g)
    assert torch.equal(f(x, EPS), x)
    # ... and the network does matter away from the boundary
    assert not torch.equal(f(x, 1.0), x)


@settings(max_examples=10)
@given(seed=st.integers(0, 2 ** 16))
def test_boundary_condition_under_bf16_autocast(seed):
    f = random_model("unet", seed)
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    with torch.autocast("cpu", torch.bfloat16):
        y = f(x, EPS)
    assert y.dtype == torch.float32 and torch.equal(y, x)


def test_scalings_at_one_by_hand():
    """t = 1, ε = 0.002, σd = 0.5: c_skip = 0.25 / (0.998² + 0.25) = 0.25 / 1.246004,
    c_out = 0.5 · 0.998 / √1.25, c_in = 1 / √1.25; at t = ε: (1, 0, 1/√(0.25 + 0.002²))."""
    c_skip, c_out, c_in = cm.boundary_scalings(torch.tensor(1.0, dtype=torch.float64), SD, EPS)
    assert (c_skip.item(), c_out.item(), c_in.item()) == pytest.approx(
        (0.2006414104609616, 0.446319168308958, 0.8944271909999159), rel=1e-12)
    c_skip, c_out, c_in = cm.boundary_scalings(torch.tensor(EPS, dtype=torch.float64), SD, EPS)
    assert (c_skip.item(), c_out.item()) == (1.0, 0.0)
    assert c_in.item() == pytest.approx(1.9999840001919975, rel=1e-12)


@given(t=st.floats(1e-3, 1e3), sd=st.floats(0.1, 2.0))
def test_scalings_edm_limit(t, sd):
    # with ε = 0 the scalings are EDM's denoiser's [EDM Tab. 1]
    c_skip, c_out, c_in = cm.boundary_scalings(torch.tensor(t, dtype=torch.float64), sd, 0.0)
    assert c_skip.item() == pytest.approx(sd ** 2 / (t ** 2 + sd ** 2), rel=1e-12)
    assert c_out.item() == pytest.approx(t * sd / math.sqrt(t ** 2 + sd ** 2), rel=1e-12)
    assert c_in.item() == pytest.approx(1 / math.sqrt(t ** 2 + sd ** 2), rel=1e-12)


# --- 5/6. ODE steps and losses against the closed-form Gaussian solutions ---

def test_cd_loss_with_exact_functions_is_heun_error_and_shrinks_with_N():
    g = torch.Generator().manual_seed(0)
    x = SD * torch.randn(4000, 2, generator=g).double()
    z = torch.randn(x.shape, generator=g).double()
    losses = []
    for N in (10, 20, 40, 80):
        sig = cm.karras_sigmas(N).double()
        n = torch.randint(0, N - 1, (len(x),), generator=g)
        loss = cm.cd_loss(exact_f, exact_f, exact_denoiser, x, sig, cm.l2, n=n, z=z)
        losses.append(loss.item())
    assert losses[0] < 1e-3  # tiny next to the data variance 0.25
    assert all(a > b for a, b in zip(losses, losses[1:]))


def test_ct_is_cd_with_the_data_point_as_denoiser():
    # [CM Thm. 2 / Alg. 3]: replacing D by x_0, a Heun (or Euler) step from x_0 + t' z lands on x_0 + t z
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 1, 8, 8, generator=g).double()
    z = torch.randn(x.shape, generator=g).double()
    sig = cm.karras_sigmas(30).double()
    n = torch.randint(0, 29, (64,), generator=g)
    f = random_model("unet", 3).double()
    ct = cm.ct_loss(f, f, x, sig, cm.l2, n=n, z=z)
    cd = cm.cd_loss(f, f, lambda x_t, s: x, x, sig, cm.l2, n=n, z=z)
    assert ct.item() == pytest.approx(cd.item(), rel=1e-9)


def test_ct_loss_matches_its_definition():
    g = torch.Generator().manual_seed(2)
    x, z = torch.randn(16, 2, generator=g).double(), torch.randn(16, 2, generator=g).double()
    sig = cm.karras_sigmas(12).double()
    n = torch.randint(0, 11, (16,), generator=g)
    t, t1 = sig[n][:, None], sig[n + 1][:, None]
    by_hand = ((exact_f(x + t1 * z, sig[n + 1]) - exact_f(x + t * z, sig[n])) ** 2).mean(1).mean()
    loss = cm.ct_loss(exact_f, exact_f, x, sig, cm.l2, n=n, z=z)
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-12)


def test_heun_step_solves_the_gaussian_ode():
    # exact solution: x(t') = x(t) √(σd² + t'²) / √(σd² + t²); Heun is 2nd order -> error falls ~ h³ per step
    x = torch.randn(100, 2, dtype=torch.float64)
    errs = []
    for h in (0.4, 0.2, 0.1):
        t, t1 = torch.full((100,), 1.0, dtype=torch.float64), torch.full((100,), 1.0 - h, dtype=torch.float64)
        exact = x * math.sqrt(SD ** 2 + (1 - h) ** 2) / math.sqrt(SD ** 2 + 1)
        errs.append((cm.heun_step(exact_denoiser, x, t, t1) - exact).abs().max().item())
    assert errs[0] / errs[1] > 6 and errs[1] / errs[2] > 6


def test_no_gradient_reaches_the_target_and_loss_vanishes_when_they_agree():
    f = random_model("mlp", 0)
    target = copy.deepcopy(f)  # deliberately left with requires_grad=True
    x = torch.randn(32, 3)
    loss = cm.ct_loss(f, target, x, cm.karras_sigmas(10), cm.l2)
    loss.backward()
    assert all(p.grad is None for p in target.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in f.parameters())
    # when online and target are the true consistency function and the ODE step is exact, the loss is 0
    exact_step = lambda x_t, s: x_t * SD ** 2 / (SD ** 2 + cm.append_dims(s, x_t.ndim) ** 2)
    sig = cm.karras_sigmas(2000).double()  # Heun error -> 0
    xd = SD * torch.randn(256, 2, dtype=torch.float64)
    assert cm.cd_loss(exact_f, exact_f, exact_step, xd, sig, cm.l2).item() < 1e-12


@given(seed=st.integers(0, 1000))
def test_edm_loss_of_exact_denoiser_is_its_noise_floor(seed):
    # the exact denoiser has loss λ·E‖E[x|x_t] - x‖² = λ·σd²t²/(σd²+t²) = 1 per dimension at every t
    g = torch.Generator().manual_seed(seed)
    x = SD * torch.randn(20000, 2, generator=g, dtype=torch.float64)
    sigma = torch.full((20000,), math.exp(torch.randn(1, generator=g).item()), dtype=torch.float64)
    z = torch.randn(x.shape, generator=g, dtype=torch.float64)
    loss = cm.edm_loss(exact_denoiser, x, sigma=sigma, z=z)
    assert loss.item() == pytest.approx(1.0, rel=0.05)


# --- 7. samplers ---

def test_samplers_give_the_data_variance():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(200_000, 1, generator=g, dtype=torch.float64)
    one = cm.sample_onestep(exact_f, z, T)
    # Gaussian data is unbounded: no clamp to the image range [-1, 1] here
    multi = cm.sample_multistep(exact_f, z, [T, 5.0, 0.5, 0.05], EPS, generator=g, clip_denoised=False)
    for x in (one, multi):
        assert x.var().item() == pytest.approx(SD ** 2 + EPS ** 2, rel=0.01)
        assert abs(x.mean().item()) < 0.01
    # the multistep chain really re-noises: its samples are not the one-step ones
    assert not torch.allclose(one, multi)


@settings(max_examples=8)
@given(seed=st.integers(0, 2 ** 16))
def test_multistep_with_one_level_is_onestep_and_seeds_reproduce(seed):
    f = random_model("unet", seed)
    z = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(cm.sample_multistep(f, z, [T], EPS, clip_denoised=False), cm.sample_onestep(f, z, T))
    assert torch.equal(cm.sample_multistep(f, z, [T], EPS), cm.sample_onestep(f, z, T).clamp(-1, 1))
    a = cm.sample_multistep(f, z, [T, 2.0], EPS, generator=torch.Generator().manual_seed(seed))
    b = cm.sample_multistep(f, z, [T, 2.0], EPS, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(a, b)


def official_multistep(distiller, x, ts, noises, steps, t_min=EPS, t_max=T, rho=7.0, clip_denoised=True):
    """openai/consistency_models' `karras_sample(sampler="multistep")`, written again here from its
    description: x starts at T z; for each pair (ts[i], ts[i+1]) of indices into a `steps`-point Karras
    grid counted from T, x0 = D(x, t_i), clamped to [-1, 1] when clip_denoised (its default), then
    x = x0 + z_i √(t_{i+1}² - t_min²) with t_{i+1} clipped into [t_min, t_max]; the end is clamped again."""
    lo, hi = t_min ** (1 / rho), t_max ** (1 / rho)
    level = lambda i: (hi + i / (steps - 1) * (lo - hi)) ** rho
    for i in range(len(ts) - 1):
        x0 = distiller(x, level(ts[i]) * torch.ones(x.shape[0]))
        x0 = x0.clamp(-1.0, 1.0) if clip_denoised else x0
        t_next = min(max(level(ts[i + 1]), t_min), t_max)
        x = x0 + noises[i] * math.sqrt(t_next ** 2 - t_min ** 2)
    return x.clamp(-1.0, 1.0)


@pytest.mark.parametrize("ts", [(0, 11, 17), (0, 8, 17), (0, 4, 9, 17), (0, 17)])
def test_multistep_equals_the_official_sampler(ts):
    f = random_model("unet", 3, scale=3.0)
    g = torch.Generator().manual_seed(len(ts))
    z = torch.randn(4, 1, 8, 8, generator=g)
    noises = [torch.randn(4, 1, 8, 8, generator=g) for _ in ts[1:]]  # the official draws one at ε too
    assert f(T * z, T).abs().max() > 1.5  # the clamp has work to do
    ours = cm.sample_multistep(f, z, cm.ts_to_sigmas(ts, 18), EPS, noises=noises)
    torch.testing.assert_close(ours, official_multistep(f, T * z, ts, noises, 18), rtol=0, atol=1e-5)
    unclamped = cm.sample_multistep(f, z, cm.ts_to_sigmas(ts, 18), EPS, noises=noises, clip_denoised=False)
    reference = official_multistep(f, T * z, ts, noises, 18, clip_denoised=False)
    torch.testing.assert_close(unclamped.clamp(-1, 1), reference, rtol=0, atol=1e-5)
    if len(ts) > 2:  # clamping before re-noising changes every multistep result
        assert (unclamped.clamp(-1, 1) - ours).abs().max() > 1e-2


def test_heun_sampler_with_exact_denoiser_lands_on_the_data_law():
    z = torch.randn(100_000, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    target = z.var().item() * SD ** 2
    errs = [abs(cm.sample_heun(exact_denoiser, z, N=N).var().item() - target) for N in (18, 40, 100)]
    assert errs[0] > errs[1] > errs[2] and errs[2] < 0.005  # discretisation error only, shrinking with N


# --- 8. EMA / target ---

@given(mu=st.floats(0.0, 0.999))
def test_ema_update(mu):
    a, b = random_model("mlp", 0), random_model("mlp", 1)
    expected = [mu * pa + (1 - mu) * pb for pa, pb in zip(a.parameters(), b.parameters())]
    cm.ema_update(a, b, mu)
    for e, p in zip(expected, a.parameters()):
        torch.testing.assert_close(p, e)


# --- metrics ---

@given(seed=st.integers(0, 1000))
def test_metrics_are_distances(seed):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    for d in (cm.l2, cm.l1, cm.pseudo_huber):
        assert torch.equal(d(x, x), torch.zeros(4))
        torch.testing.assert_close(d(x, y), d(y, x))
        assert (d(x, y) > 0).all()


def test_metric_constants_by_hand():
    """l2 and l1 average over the pixels (not sum); pseudo-Huber sums, with c = 0.00054 √d [iCT Sec. 3.3]:
    for CIFAR-10's d = 3·32·32 = 3072, c = 0.00054 · 55.4256... = 0.0299298..., and one pixel off by 1
    gives √(1 + c²) - c = 0.9705180..."""
    x, y = torch.zeros(2, 3, 32, 32, dtype=torch.float64), torch.zeros(2, 3, 32, 32, dtype=torch.float64)
    y[:, 1, 5, 7] = 1.0
    assert cm.pseudo_huber(x, y).tolist() == pytest.approx([0.9705179593839816] * 2, rel=1e-12)
    assert cm.pseudo_huber(x, x).tolist() == [0.0, 0.0]
    assert cm.l2(x, x + 2).tolist() == [4.0, 4.0] and cm.l1(x, x - 2).tolist() == [2.0, 2.0]
    assert cm.l2(x, y).tolist() == pytest.approx([1 / 3072] * 2, rel=1e-12)


@pytest.fixture(scope="module")
def piq_lpips():
    """cm.PiqLPIPS on a random VGG with random non-negative calibration weights (built once: ~7 s)."""
    torch.manual_seed(0)
    ours = cm.PiqLPIPS(pretrained_backbone=False)
    with torch.no_grad():
        for lin in ours.net.lins:
            lin.model[-1].weight.uniform_(0, 1)
    return ours


def test_lpips_offline_with_random_backbone(piq_lpips):
    lp = cm.LPIPS(pretrained_backbone=False)
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1, torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    with torch.no_grad():
        assert lp(x, x).abs().max() < 1e-6
        torch.testing.assert_close(lp(x, y), lp(y, x))
        assert (lp(x, y) > 0).all()
        assert lp(x[:, :1], y[:, :1]).shape == (2,)  # grey images are repeated to RGB
        # the same weights with max pooling (the `lpips` package) are another metric than piq's
        lp.net.load_state_dict(piq_lpips.net.state_dict())
        assert (lp(x, y) - piq_lpips(x, y)).abs().max() > 1e-3 * lp(x, y).abs().max()


def _piq_lpips(ours: cm.LPIPS):
    """piq's LPIPS(replace_pooling=True, reduction='none') built offline on our network's weights: piq's
    LPIPS class only downloads its weights and passes them to ContentLoss, which does all the work."""
    from collections import OrderedDict

    import piq
    layers = OrderedDict()
    for block in ours.net.net.children():  # lpips keeps torchvision's vgg16.features indices as names
        for name, layer in block.named_children():
            layers[name] = nn.MaxPool2d(2, 2) if isinstance(layer, nn.AvgPool2d) else copy.deepcopy(layer)
    vgg = nn.Sequential(layers)
    assert list(vgg._modules) == [str(i) for i in range(30)]
    weights = [lin.model[-1].weight.detach().clone() for lin in ours.net.lins]  # (1, C, 1, 1) each
    return piq.ContentLoss(vgg, layers=("3", "8", "15", "22", "29"), weights=weights, replace_pooling=True,
                           reduction="none", normalize_features=True)


@pytest.mark.parametrize("size", [32, 256])
def test_piq_lpips_equals_piq_on_the_same_weights(size, piq_lpips):
    """cm.PiqLPIPS == piq on (x + 1)/2, resized to 224 below 256 pixels (the official ImageNet/LSUN loss)."""
    ours, reference = piq_lpips, _piq_lpips(piq_lpips)
    g = torch.Generator().manual_seed(size)
    n = 2 if size < 256 else 1
    x, y = (torch.rand(n, 3, size, size, generator=g) * 2 - 1 for _ in range(2))
    resize = (lambda v: F.interpolate(v, size=224, mode="bilinear")) if size < 256 else (lambda v: v)
    with torch.no_grad():
        got, want = ours(x, y), reference(resize((x + 1) / 2), resize((y + 1) / 2))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_energy_distance_separates_laws():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(800, 2, generator=g), torch.randn(800, 2, generator=g)
    assert abs(cm.energy_distance(a, b)) < 0.02
    assert cm.energy_distance(a, b + 0.5) > 0.1


# ==== iCT and ECT [iCT, ECT] ====

# --- pseudo-Huber [iCT Sec. 3.3] ---------------------------------------------------------------

@given(st.integers(1, 64), st.integers(0, 10_000))
def test_pseudo_huber_limits(d, seed):
    """√(‖δ‖² + c²) - c -> ‖δ‖²/(2c) for ‖δ‖ ≪ c and -> ‖δ‖ - c for ‖δ‖ ≫ c, c = 0.00054·√d."""
    g = torch.Generator().manual_seed(seed)
    x, u = (torch.randn(3, d, generator=g, dtype=torch.float64) for _ in range(2))
    u = u / u.norm(dim=1, keepdim=True)
    c = 0.00054 * math.sqrt(d)
    small, large = 1e-3 * c, 1e4 * c
    got_small = cm.pseudo_huber(x + small * u, x)
    assert torch.allclose(got_small, torch.full((3,), small ** 2 / (2 * c), dtype=torch.float64), rtol=1e-5)
    got_large = cm.pseudo_huber(x + large * u, x)
    assert torch.allclose(got_large, torch.full((3,), large - c, dtype=torch.float64), rtol=1e-7)
    assert torch.allclose(cm.l2_norm(x + large * u, x), torch.full((3,), large, dtype=torch.float64))


# --- lognormal index distribution [iCT Sec. 3.5] ------------------------------------------------

@given(st.integers(2, 1281), st.floats(-2.0, 1.0), st.floats(0.5, 3.0))
def test_lognormal_index_probs_are_the_erf_formula(N, P_mean, P_std):
    sigmas = cm.karras_sigmas(N)
    p = cm.lognormal_index_probs(sigmas, P_mean, P_std)
    assert p.shape == (N - 1,) and (p >= 0).all()
    assert float(p.sum()) == pytest.approx(1.0, abs=1e-12)
    Phi = [math.erf((math.log(s) - P_mean) / (math.sqrt(2) * P_std)) for s in sigmas.tolist()]
    raw = [b - a for a, b in zip(Phi[:-1], Phi[1:])]
    expected = torch.tensor(raw, dtype=torch.float64) / sum(raw)
    assert torch.allclose(p, expected, rtol=1e-9, atol=1e-15)


@given(st.integers(2, 200), st.floats(1e-3, 10.0), st.floats(1.0, 100.0), st.floats(-50.0, 50.0),
       st.floats(0.01, 5.0))
def test_lognormal_index_probs_are_the_normal_masses_far_in_the_tails(N, lo, span, P_mean, P_std):
    """Levels far from P_mean (where erf rounds to ±1 and float64's masses underflow): still the normal
    masses Φ(u_{n+1}) - Φ(u_n), normalised, here from 60-digit arithmetic (mpmath) instead of float64."""
    import mpmath
    sigmas = cm.karras_sigmas(N, lo, lo * (1 + span))
    p = cm.lognormal_index_probs(sigmas, P_mean, P_std)
    assert torch.isfinite(p).all() and (p >= 0).all() and float(p.sum()) == pytest.approx(1.0, abs=1e-12)
    with mpmath.workdps(60):
        u = [(mpmath.log(s) - P_mean) / P_std for s in sigmas.double().tolist()]
        # above P_mean as 1 - Φ(-u), since Φ(u) rounds to 1 there even at 60 digits
        raw = [mpmath.ncdf(b) - mpmath.ncdf(a) if b <= 0 else mpmath.ncdf(-a) - mpmath.ncdf(-b)
               for a, b in zip(u[:-1], u[1:])]
        expected = torch.tensor([float(m / sum(raw)) for m in raw], dtype=torch.float64)
    assert torch.allclose(p, expected, rtol=1e-6, atol=1e-12)


def test_lognormal_index_draws_follow_the_probabilities():
    sigmas = cm.karras_sigmas(11)
    p = cm.lognormal_index_probs(sigmas)
    torch.manual_seed(0)
    n, _ = cm._draw(torch.zeros(20_000, 2), 11, None, None, p)
    freq = torch.bincount(n, minlength=10).double() / len(n)
    assert torch.allclose(freq, p, atol=0.015)


# --- doubling curriculum [iCT Sec. 3.4] -----------------------------------------------------------

@given(st.integers(0, 5), st.integers(0, 8), st.integers(1, 50))
def test_doubling_curriculum_boundaries(log_s0, doublings, per_stage):
    """s1 = s0·2^m: K' = ⌊K/(m+1)⌋; N = s0·2^j + 1 on [jK', (j+1)K'), capped at s1 + 1."""
    s0 = 2 ** log_s0 + 1  # not a power of two, so ⌊s1/s0⌋ = 2^m needs s1 = s0·2^m exactly
    s1 = s0 * 2 ** doublings
    K = per_stage * (doublings + 1) + per_stage // 2  # not a multiple, so the floor matters
    Kp = K // (doublings + 1)
    for j in range(doublings + 1):
        assert cm.ict_num_steps(j * Kp, K, s0, s1) == s0 * 2 ** j + 1
        assert cm.ict_num_steps((j + 1) * Kp - 1, K, s0, s1) == s0 * 2 ** j + 1
    assert cm.ict_num_steps(K, K, s0, s1) == s1 + 1
    assert cm.ict_num_steps(10 * K, K, s0, s1) == s1 + 1


@pytest.mark.parametrize("s0, s1, K", [(10, 150, 1000), (10, 200, 4000), (3, 50, 777)])
def test_doubling_curriculum_reaches_s1_when_the_ratio_is_not_a_power_of_two(s0, s1, K):
    """K' = ⌊K / (log₂⌊s1/s0⌋ + 1)⌋ with the log unfloored: s0 = 10, s1 = 150, K = 1000 give
    K' = ⌊1000 / 4.907⌋ = 203, so N = 10·2^4 capped at 150, + 1 = 151 from k = 4K' = 812 on."""
    Kp = math.floor(K / (math.log2(s1 // s0) + 1))
    stages = math.ceil(math.log2(s1 / s0))  # doublings until s0·2^j >= s1
    assert cm.ict_num_steps(stages * Kp - 1, K, s0, s1) == s0 * 2 ** (stages - 1) + 1 < s1 + 1
    assert cm.ict_num_steps(stages * Kp, K, s0, s1) == s1 + 1
    assert cm.ict_num_steps(K - 1, K, s0, s1) == s1 + 1


def test_doubling_curriculum_paper_values():
    """CIFAR-10, K = 400k, s0 = 10, s1 = 1280: K' = ⌊400000/8⌋ = 50000, N = 11, 21, ..., 1281."""
    assert [cm.ict_num_steps(k, 400_000) for k in (0, 49_999, 50_000, 100_000, 349_999, 350_000)] == \
        [11, 11, 21, 41, 641, 1281]


def test_gap_weight_is_inverse_step():
    t = torch.tensor([0.1, 1.0])
    assert torch.allclose(cm.gap_weight(t, t + torch.tensor([0.5, 0.25])), torch.tensor([2.0, 4.0]))


# --- ECT's r(t) [ECT Sec. 3; locuslab/ect training/loss.py] ---------------------------------------

@given(st.floats(1e-3, 200.0), st.integers(0, 12), st.floats(1.5, 4.0))
def test_ect_r_is_below_t_and_the_gap_shrinks_by_stage(t, stage, q):
    t_ = torch.tensor([t], dtype=torch.float64)
    r, r_next = cm.ect_r(t_, stage, q), cm.ect_r(t_, stage + 1, q)
    assert 0 <= r.item() < t
    assert t - r_next.item() <= t - r.item()
    # the closed form: t - r = t·min(1, q^(-a)·(1 + 8 σ(-t)))
    gap = t * min(1.0, q ** -stage * (1 + 8 / (1 + math.exp(t))))
    assert t - r.item() == pytest.approx(gap, rel=1e-9, abs=1e-12)


def test_ect_first_stage_is_the_diffusion_objective():
    t = torch.logspace(-3, 2, 50, dtype=torch.float64)
    assert (cm.ect_r(t, 0) == 0).all()


def test_ect_stage_zero_equals_edm_loss_up_to_weighting():
    """At stage 0 (r = 0) the target is x, so with d = mean squared error ECT's loss is
    mean(‖D(x + t z, t) - x‖²)/t, and EDM's is λ(t)·the same with λ = (t² + σd²)/(t σd)²."""
    torch.manual_seed(0)
    D = cm.ConsistencyFunction(cm.MLP(2, 32, depth=2), 0.5, 0.0).double()
    x, z = torch.randn(16, 2, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64)
    for t0 in (0.01, 0.7, 30.0):
        t = torch.full((16,), t0, dtype=torch.float64)
        ect = cm.ect_loss(D, D, x, 0, cm.l2, t=t, z=z)
        edm = cm.edm_loss(D, x, sigma=t, z=z, sigma_data=0.5)
        lam_edm = (t0 ** 2 + 0.25) / (t0 * 0.5) ** 2
        assert (ect * t0).item() == pytest.approx((edm / lam_edm).item(), rel=1e-12)


def test_consistency_loss_target_at_r_zero_is_the_data():
    torch.manual_seed(0)
    D = cm.ConsistencyFunction(cm.MLP(2, 16, depth=1), 0.5, 0.0).double()
    x, z = torch.randn(8, 2, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    t, r = torch.full((8,), 2.0, dtype=torch.float64), torch.zeros(8, dtype=torch.float64)
    got = cm.consistency_loss(D, lambda *a: torch.full_like(x, float("nan")), x, t, r, z, cm.l2)
    assert got.item() == pytest.approx(cm.l2(D(x + 2 * z, 2.0), x).mean().item(), rel=1e-12)


# --- μ = 0: θ⁻ is θ under stop-gradient [iCT Sec. 3.2] ---------------------------------------------

def test_mu_zero_target_equals_online_and_gets_no_gradient():
    torch.manual_seed(0)
    model = cm.ConsistencyFunction(cm.MLP(2, 32, depth=2))
    target = copy.deepcopy(model).requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    cm.ema_update(target, model, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(target.state_dict().values(), model.state_dict().values()))
    target.requires_grad_(True)  # even a target that could take gradients receives none
    sigmas = cm.karras_sigmas(11)
    x = torch.randn(32, 2)
    loss = cm.ct_loss(model, target, x, sigmas, cm.pseudo_huber, weight=cm.gap_weight,
                      index_probs=cm.lognormal_index_probs(sigmas))
    loss.backward()
    assert all(p.grad is None for p in target.parameters())
    assert all(p.grad is not None for p in model.parameters())



def test_shared_dropout_replays_the_mask():
    drop = torch.nn.Dropout(0.5).train()
    share = cm.SharedDropout(torch.device("cpu"))
    a, b = share.wrap(drop), share.wrap(drop)
    x = torch.ones(1000)
    assert torch.equal(a(x), b(x))


# --- the digits feature distance ------------------------------------------------------------------

class _Identity(torch.nn.Module):
    def features(self, x):
        return x.flatten(1)


def test_feature_distance_closed_forms():
    """With identity features: a shift δ gives |δ|², a scale s gives tr(Σ)(1 - s)² (exactly, up to sqrtm)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 1, 2, 2, generator=g, dtype=torch.float64)
    delta = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=torch.float64).reshape(1, 1, 2, 2)
    net = _Identity()
    assert cm.digits_feature_distance(x, x + delta, net) == pytest.approx(5.25, rel=1e-6)
    cov = np.cov(x.flatten(1).numpy(), rowvar=False)
    assert cm.digits_feature_distance(x, 0.5 * x, net) == pytest.approx(
        np.trace(cov) * 0.25 + float((0.5 * x.flatten(1).mean(0)).pow(2).sum()), rel=1e-6)
    assert cm.digits_feature_distance(x, x, net) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.slow
def test_feature_distance_ranks_degraded_digits_worse(tmp_path, monkeypatch):
    monkeypatch.setenv("CM_CACHE", str(tmp_path))
    net = cm.digits_classifier(verbose=False)
    assert (tmp_path / "digits_classifier_s0_e30.pt").is_file()
    x = cm.load_digits()
    p = torch.randperm(len(x), generator=torch.Generator().manual_seed(1))
    a, b = x[p[:800]], x[p[800:1600]]
    floor = cm.digits_feature_distance(a, b, net)
    z = torch.randn(b.shape, generator=torch.Generator().manual_seed(2))
    noised = [cm.digits_feature_distance(a, (b + s * z).clamp(-1, 1), net) for s in (0.1, 0.3)]
    pad = torch.nn.functional.pad(b, (1,) * 4, mode="replicate")
    blurred = cm.digits_feature_distance(a, torch.nn.functional.avg_pool2d(pad, 3, 1), net)
    assert floor < noised[0] < noised[1] and 2 * floor < blurred


def test_digits_classifier_leaves_the_callers_rng_alone():
    """Loading the cached classifier (or training it) draws no number from the global RNG, so a run's
    report, which loads it, does not shift anything drawn after it."""
    cm.digits_classifier(verbose=False)  # cached from here on
    torch.manual_seed(3)
    a = torch.rand(4)
    torch.manual_seed(3)
    cm.digits_classifier(verbose=False)
    assert torch.equal(torch.rand(4), a)


# ==== the one recipe dispatch (cm.RECIPES) ====

@given(st.integers(1, 5000), st.floats(0.0, 1.0), st.integers(2, 12), st.integers(0, 200),
       st.integers(1, 999))
def test_schedule_is_each_recipes_closed_form(K, frac, s0, extra, stage_steps):
    """cm.schedule gives, per mode, the closed forms written out here again: CT's N(k) = ⌈√(k/K((s1+1)² -
    s0²) + s0²) - 1⌉ + 1 and μ(k) = exp(s0 ln μ0 / (N(k) - 1)); iCT's N = min(s0 2^⌊k/K'⌋, s1) + 1; ECT's
    stage 1 + ⌊k / stage_steps⌋; CD's fixed (N, μ); EDM's nothing."""
    k, s1 = int(frac * K), s0 + extra
    c = dict(s0=s0, s1=s1, mu0=0.9, N=18, mu=0.3, stage_steps=stage_steps)
    N_ct = math.ceil(math.sqrt(k / K * ((s1 + 1) ** 2 - s0 ** 2) + s0 ** 2) - 1) + 1
    s = cm.schedule(cm.CMConfig(mode="ct", mu_rule="code", **c), k, K)
    assert s.N == N_ct and s.mu == pytest.approx(math.exp(s0 * math.log(0.9) / (N_ct - 1)))
    K_ = max(math.floor(K / (math.log2(s1 // s0) + 1)), 1)
    assert cm.schedule(cm.CMConfig(mode="ict", **c), k, K).N == min(s0 * 2 ** min(k // K_, 62), s1) + 1
    assert cm.schedule(cm.CMConfig(mode="ect", **c), k, K)[:3] == (0, 0.3, 1 + k // stage_steps)
    assert cm.schedule(cm.CMConfig(mode="cd", **c), k, K)[:3] == (18, 0.3, 0)
    assert cm.schedule(cm.CMConfig(mode="edm", **c), k, K) == (0, 0.0, 0, 1.0)
    for mode in ("sct", "scd"):  # sCM: no grid, μ or stage, the tangent warm-up r = min(1, k / W)
        got = cm.schedule(cm.CMConfig(mode=mode, tangent_warmup=stage_steps, **c), k, K)
        assert got == (0, 0.0, 0, min(1.0, k / stage_steps))


def test_recipe_loss_is_the_recipes_own_loss_on_the_same_draws():
    """recipe_loss dispatches to ct_loss / cd_loss / ct_loss with iCT's pieces / ect_loss / edm_loss."""
    torch.manual_seed(0)
    net = cm.MLP(2, 16)
    for p in net.parameters():
        p.data.add_(0.1 * torch.randn_like(p))
    f, D = cm.ConsistencyFunction(net), cm.ConsistencyFunction(net, sigma_min=0.0)
    x, z = torch.randn(8, 2), torch.randn(8, 2)
    n, t = torch.randint(0, 9, (8,)), torch.rand(8) * 3 + 0.1
    sig = cm.karras_sigmas(10)
    s = cm.Schedule(10, 0.0, 2)
    want = {"ct": cm.ct_loss(f, f, x, sig, cm.l2, n=n, z=z),
            "cd": cm.cd_loss(f, f, D, x, sig, cm.l2, n=n, z=z),
            "ict": cm.ct_loss(f, f, x, sig, cm.l2, n=n, z=z, weight=cm.gap_weight,
                              index_probs=cm.lognormal_index_probs(sig)),
            "ect": cm.ect_loss(D, f, x, 2, cm.l2, t=t, z=z),
            "edm": cm.edm_loss(D, x, sigma=t, z=z)}
    g = cm.TrigFlow(net, 0.5, "trig")  # sCM: TrigFlow time t in (0, π/2), noise σd z
    tt = torch.rand(8) * 1.5 + 0.01
    want["sct"] = cm.scm_step(g, g, x, tt, 0.5 * z, 0.5, 1.0, 0.1, "exact")
    want["scd"] = cm.scm_step(g, g, x, tt, 0.5 * z, 0.5, 1.0, 0.1, "exact", teacher=D)
    assert set(want) == set(cm.RECIPES)
    for mode, loss in want.items():
        scm = mode in ("sct", "scd")
        model = D if mode in ("edm", "ect") else g if scm else f
        c = cm.CMConfig(mode=mode, **({"noise_cond": "trig"} if mode == "sct" else {}))
        got = cm.recipe_loss(c, s, model, g if scm else f, D, x, z, cm.l2, n=n, t=tt if scm else t)
        assert torch.equal(got, loss), mode
