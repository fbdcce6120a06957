"""iCT and ECT (cm.py section 6b) and the digits feature distance: closed forms and properties.

Expected values come from the papers' formulas written out here independently (math.erf, powers of
two, EDM's weighting), never from the functions under test."""
import copy
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import cm

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


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ict", "ect"])
def test_ict_ect_train_end_to_end_with_shared_dropout(mode, tmp_path):
    tiny = dict(dataset="toy", channels=32, batch_size=32, log_every=5, ckpt_every=10, device="cpu",
                dropout=0.1, steps=8, teacher_steps=6, stage_steps=3)
    rows = cm.train(cm.config(mode=mode, out=str(tmp_path), **tiny))
    assert all(np.isfinite(v) for v in rows.values())
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert state["target"] is None  # μ = 0: θ⁻ is θ under stop-grad, no copy is kept
    assert all((tmp_path / cm.grid_name(how, 8)).is_file() for how in ("1-step", "2-step"))


@pytest.mark.slow
def test_ict_ablations_run_and_ect_starts_at_the_teacher(tmp_path):
    tiny = dict(dataset="toy", channels=32, batch_size=32, ckpt_every=10, device="cpu")
    rows = cm.train(
        cm.config(mode="ict", steps=3, ablate="weight,lognormal,doubling", out=str(tmp_path / "a"), **tiny)
    )
    assert all(np.isfinite(v) for v in rows.values())
    cm.train(cm.config(mode="edm", steps=3, out=str(tmp_path / "edm"), **tiny))
    teacher = tmp_path / "edm" / "ckpt.pt"
    cm.train(
        cm.config(mode="ect", steps=1, teacher=str(teacher), lr=1e-30, out=str(tmp_path / "ect"), **tiny)
    )
    t, e = torch.load(teacher, weights_only=True), torch.load(tmp_path / "ect" / "ckpt.pt", weights_only=True)
    # ECT tunes EDM's denoiser itself: θ starts at the teacher's EMA weights (a 1e-30 step leaves them there)
    assert all(torch.allclose(e["model"][k], v, atol=1e-20) for k, v in t["ema"].items())


def test_shared_dropout_replays_the_mask():
    drop = torch.nn.Dropout(0.5).train()
    share = cm.SharedDropout(torch.device("cpu"))
    a, b = share.wrap(drop), share.wrap(drop)
    x = torch.ones(1000)
    assert torch.equal(a(x), b(x))


@pytest.mark.parametrize("bad", [dict(ablate="ema"), dict(stage_steps=-1), dict(q=1.0), dict(mid_t=-1.0)])
def test_bad_recipe_flags_are_one_line_errors(bad):
    with pytest.raises(cm.CMError):
        cm.config(mode="ict", dataset="toy", **bad)


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


# --- full/: the cifar10-ict / cifar10-ect presets and the tiny runs through full.train -------------

def test_cifar10_presets_carry_the_papers_values():
    from full.presets import resolve
    ict, ect = resolve("cifar10-ict"), resolve("cifar10-ect")
    assert (ict.cm.mode, ict.cm.s0, ict.cm.s1, ict.cm.mu) == ("ict", 10, 1280, 0.0)
    assert ict.cm.metric == "pseudo_huber"
    assert (ict.cm.P_mean, ict.cm.P_std, ict.net.dropout, ict.net.fourier_scale) == (-1.1, 2.0, 0.3, 0.02)
    assert (ict.opt.lr, ict.opt.batch, ict.run.sigmas) == (1e-4, 1024, (80.0, 0.821))
    assert (ect.cm.mode, ect.cm.metric, ect.cm.q, ect.cm.stage_steps, ect.net.dropout) == \
        ("ect", "l2_norm", 2.0, 25_000, 0.2)
    assert (ect.opt.lr, ect.opt.batch, ect.opt.steps, ect.run.sigmas) == (1e-4, 128, 200_000, (80.0, 0.821))
    assert ict.data.random_flip and not ect.data.random_flip  # run_ecm.sh: --augment 0, --xflip off


@pytest.mark.slow
def test_full_train_ict_and_ect(tmp_path):
    import full.train
    from full import checkpoints
    from full.presets import resolve
    full.train.train(resolve("tiny-edm", [f"run.out={str(tmp_path / 'edm')!r}", "opt.steps=4"]), "cpu")
    teacher = tmp_path / "edm" / "export.pt"
    for mode in ("ict", "ect"):
        out = tmp_path / mode
        cfg = resolve(f"tiny-{mode}", [f"run.out={str(out)!r}", "opt.steps=4", "run.ckpt_every=4",
                                       f"run.teacher={str(teacher)!r}", "cm.stage_steps=2"])
        full.train.train(cfg, "cpu")
        state = checkpoints.load(out / "ckpt-0000004.pt")
        assert state["target"] is None  # μ = 0: θ⁻ is θ under stop-grad, no copy kept
        assert (out / "grid-2step-0000004.png").is_file()
    assert [cm.schedule(cfg.cm, k, 4).stage for k in (0, 1, 2, 5)] == [1, 1, 2, 3]  # ECT's stage a


def test_digits_classifier_leaves_the_callers_rng_alone():
    """Loading the cached classifier (or training it) draws no number from the global RNG, so a run's
    report, which loads it, does not shift anything drawn after it."""
    cm.digits_classifier(verbose=False)  # cached from here on
    torch.manual_seed(3)
    a = torch.rand(4)
    torch.manual_seed(3)
    cm.digits_classifier(verbose=False)
    assert torch.equal(torch.rand(4), a)
