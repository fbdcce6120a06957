"""Continuous-time consistency models (cm.py section 5b): TrigFlow, the JVP, the sCT/sCD objective.

Expected values come from closed forms: Gaussian data N(0, σd² I) keeps every x_t ~ N(0, σd² I), so its
PF-ODE velocity is 0, its flow map is the identity and the exact TrigFlow network is
F*(x, t) = -tan(t/2) x / σd (from cos(t) x - sin(t) σd F* = x); and a network linear in x and t has a
tangent that is written out by hand in numpy below.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import given
from hypothesis import strategies as st

import cm

SD = 0.5


class Exact(nn.Module):
    """F(x/σd, c_noise = t) = F* + θ x (x the network's input x_t/σd): θ = 0 is Gaussian data's exact
    consistency network; θ is the one parameter whose gradient the tests read."""

    def __init__(self, theta: float = 0.0):
        super().__init__()
        self.theta = nn.Parameter(torch.tensor(float(theta)))

    def forward(self, x, c_noise, labels=None):
        return (-torch.tan(c_noise / 2).reshape(-1, *[1] * (x.ndim - 1)) + self.theta) * x


def gaussian_teacher(x_sigma, sigma):
    """E[x_0 | x_σ] for x_0 ~ N(0, σd² I): σd² / (σ² + σd²) x_σ."""
    s = sigma.reshape(-1, *[1] * (x_sigma.ndim - 1))
    return SD ** 2 / (s ** 2 + SD ** 2) * x_sigma


def perturbed(net: nn.Module, seed: int = 0, scale: float = 0.1) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for p in net.parameters():
        p.data.add_(scale * torch.randn(p.shape, generator=g))
    return net


# ==== TrigFlow: the boundary and the exact conversion from EDM ====

@given(st.integers(0, 10_000), st.floats(-1e3, 1e3), st.floats(1e-3, 1e6))
def test_boundary_f_of_x_at_zero_is_x_for_any_network(seed, shift, out_scale):
    """f(x, 0) = cos(0) x - sin(0) σd F = x exactly, whatever the network outputs (a huge one here)."""
    torch.manual_seed(seed)
    net = perturbed(cm.MLP(2, 16), seed, 1.0)
    wrapped = lambda x, c, y=None: out_scale * net(x, c, y)  # noqa: E731
    f = cm.TrigFlow(wrapped, SD, "trig")
    x = torch.randn(16, 2) + shift
    assert torch.equal(f(x, 0.0), x)
    F, _ = f(x, torch.zeros(16), trig=True)
    t0 = torch.zeros(16, 1)
    assert torch.equal(t0.cos() * x - t0.sin() * SD * F, x)


@given(st.integers(0, 10_000), st.floats(0.003, 80.0), st.sampled_from(["edm", "adm"]))
def test_edm_denoiser_and_its_trigflow_form_give_the_same_x0(seed, sigma, noise_cond):
    """The same network read as EDM's denoiser D (ε = 0 scalings of [EDM Tab. 1]) and as TrigFlow with
    EDM's c_noise (F_trig = -F_EDM) gives one x_0 estimate at matching noise: D(x_σ, σ) = f(x_t, t) with
    t = arctan(σ/σd), x_t = x_σ σd / √(σ² + σd²)."""
    torch.manual_seed(seed)
    net = perturbed(cm.MLP(2, 32), seed)
    D = cm.ConsistencyFunction(net, SD, 0.0, noise_cond).double()
    f = cm.TrigFlow(net, SD, noise_cond).double()
    x_sigma = torch.randn(8, 2, dtype=torch.float64) * math.sqrt(sigma ** 2 + SD ** 2)
    want = D(x_sigma, sigma)
    torch.testing.assert_close(f(x_sigma, sigma), want, rtol=1e-10, atol=1e-10)  # the sampler view
    t = torch.full((8,), math.atan(sigma / SD), dtype=torch.float64)
    x_t = x_sigma * SD / math.sqrt(sigma ** 2 + SD ** 2)
    F, _ = f(x_t, t, trig=True)  # the training view in TrigFlow time
    torch.testing.assert_close(torch.cos(t)[:, None] * x_t - torch.sin(t)[:, None] * SD * F, want,
                               rtol=1e-10, atol=1e-10)


@given(st.integers(0, 10_000), st.floats(0.01, 1.55))
def test_trig_velocity_is_the_pf_ode_of_the_denoiser(seed, t):
    """dx_t/dt of an EDM denoiser in TrigFlow time equals the chain rule through x_t = cos(t) x_σ(σ(t)):
    dx_σ/dσ = (x_σ - D) / σ [EDM Eq. 3], dσ/dt = σd / cos² t, so dx_t/dt = -sin t x_σ + cos t
    (x_σ - D)/σ · σd / cos² t. Gaussian data: the velocity is 0."""
    torch.manual_seed(seed)
    net = perturbed(cm.MLP(2, 32), seed)
    D = cm.ConsistencyFunction(net, SD, 0.0).double()
    x_t = torch.randn(8, 2, dtype=torch.float64) * SD
    tt = torch.full((8,), t, dtype=torch.float64)
    sigma = SD * math.tan(t)
    x_sigma = x_t / math.cos(t)
    dsigma_dt = SD / math.cos(t) ** 2
    want = -math.sin(t) * x_sigma + math.cos(t) * (x_sigma - D(x_sigma, sigma)) / sigma * dsigma_dt
    torch.testing.assert_close(cm.trig_velocity(D, x_t, tt, SD), want, rtol=1e-8, atol=1e-10)
    zero = cm.trig_velocity(gaussian_teacher, x_t, tt, SD)
    assert zero.abs().max() < 1e-12


# ==== the JVP against central differences, on every network ====

def _networks():
    from full.networks import ADMConfig, NCSNppConfig, build_network
    torch.manual_seed(0)
    return {"mlp": (perturbed(cm.MLP(2, 32)), (2,)),
            "unet": (perturbed(cm.UNet(1, 16, (1, 2), blocks=1, resolution=8)), (1, 8, 8)),
            "ncsnpp": (perturbed(build_network(NCSNppConfig.tiny(8)), 1, 0.02), (3, 8, 8)),
            "adm": (perturbed(build_network(ADMConfig.tiny(8, num_classes=0)), 2, 0.02), (3, 8, 8))}


@pytest.mark.parametrize("name", ["mlp", "unet", "ncsnpp", "adm"])
def test_jvp_equals_central_differences_on_every_network(name):
    """dF/dt = ∂F/∂x · v + ∂F/∂t by torch.func.jvp equals a central difference of the same network along
    (v, 1), both in float64 (attention and normalisation layers included); cm's float32 'fd' fallback
    equals the exact JVP to its O(h²) and round-off error."""
    net, shape = _networks()[name]
    f = cm.TrigFlow(net.eval(), SD, "edm")
    torch.manual_seed(1)
    x, v = torch.randn(3, *shape) * SD, torch.randn(3, *shape)
    t = torch.tensor([0.3, 0.9, 1.4])
    F = lambda a, b: f(a, b, trig=True)[0]  # noqa: E731
    F0, dF = cm.trig_jvp(F, x, t, v, "exact")
    _, dF_fd = cm.trig_jvp(F, x, t, v, "fd")
    f.double()
    _, dF64 = cm.trig_jvp(F, x.double(), t.double(), v.double(), "exact")
    h = 1e-6
    with torch.no_grad():
        want = (F(x.double() + h * v.double(), t.double() + h)
                - F(x.double() - h * v.double(), t.double() - h)) / (2 * h)
    f.float()
    scale = want.abs().max().item()
    assert scale > 1e-3  # not a vanishing derivative
    assert (dF64 - want).abs().max().item() < 1e-6 * scale, name
    assert (dF.double() - want).abs().max().item() < 1e-2 * scale, name  # float32 round-off only
    torch.testing.assert_close(F0, F(x, t))
    assert (dF_fd - dF).abs().max().item() < 1e-2 * scale, name


def test_jvp_runs_through_attention_on_cpu():
    """The NCSN++ and ADM attention blocks support forward-mode AD on the CPU (no fallback needed)."""
    nets = _networks()
    for name in ("ncsnpp", "adm"):
        net, shape = nets[name]
        assert any("attn" in n.lower() or "attention" in type(m).__name__.lower()
                   for n, m in net.named_modules()), name
        f = cm.TrigFlow(net, SD, "edm")
        x = torch.randn(2, *shape)
        _, dF = cm.trig_jvp(lambda a, b: f(a, b, trig=True)[0], x, torch.tensor([0.5, 1.0]), x, "exact")
        assert torch.isfinite(dF).all()


@pytest.mark.parametrize("name", ["unet", "ncsnpp", "adm"])
def test_jvp_under_bf16_autocast_is_the_float32_jvp(name):
    """--precision bf16 runs the trained forward under autocast, but the JVP (forward-mode AD, which
    autocast's casts break on the CPU) stays in float32: inside an enclosing bf16 autocast it gives the
    float32 values exactly."""
    net, shape = _networks()[name]
    f = cm.TrigFlow(net.eval(), SD, "edm")
    torch.manual_seed(2)
    x, v, t = torch.randn(2, *shape) * SD, torch.randn(2, *shape), torch.tensor([0.4, 1.2])
    F = lambda a, b: f(a, b, trig=True)[0]  # noqa: E731
    want = cm.trig_jvp(F, x, t, v, "exact")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = cm.trig_jvp(F, x, t, v, "exact")
    for a, b in zip(got, want):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["sct", "scd"])
def test_sct_and_scd_train_under_bf16(tmp_path, mode):
    cfg = cm.config("toy", mode, steps=3, channels=16, batch_size=16, precision="bf16", report=False,
                    sample_every=3, device="cpu", out=str(tmp_path / mode),
                    **(dict(teacher_steps=2) if mode == "scd" else {}))
    cm.train(cfg)
    state = cm.load_checkpoint(tmp_path / mode / "ckpt.pt")
    assert state["step"] == 3


# ==== the objective: Gaussian data's exact network is a fixed point, a perturbation is pulled back ====

def _grad_theta(mode: str, theta: float, n: int = 4096, r: float = 1.0, seed: int = 0):
    torch.manual_seed(seed)
    f = cm.TrigFlow(Exact(theta), SD, "trig")
    x0 = SD * torch.randn(n, 3)
    t = cm.trig_time_proposal(n, -1.0, 1.4, SD).clamp(0.01, 1.56)
    z = SD * torch.randn(n, 3)
    loss = cm.scm_step(f, f, x0, t, z, SD, r, 0.1, "exact",
                       teacher=gaussian_teacher if mode == "scd" else None)
    (g,) = torch.autograd.grad(loss, f.net.theta)
    return float(g), float(loss.detach())


def test_gaussian_data_stays_gaussian_in_trigflow_time():
    """x_t = cos(t) x_0 + sin(t) z with x_0, z ~ N(0, σd² I): mean 0 and std σd at every t."""
    g = torch.Generator().manual_seed(0)
    x0, z = SD * torch.randn(200_000, generator=g), SD * torch.randn(200_000, generator=g)
    for t in (0.1, 0.7, 1.5):
        x_t = math.cos(t) * x0 + math.sin(t) * z
        assert abs(x_t.mean()) < 0.005 and abs(x_t.std() - SD) < 0.005


@pytest.mark.parametrize("mode", ["scd", "sct"])
def test_exact_network_is_a_fixed_point_and_a_perturbation_is_pulled_back(mode):
    """At F* the θ-gradient vanishes (sCD: exactly, the teacher's velocity is 0; sCT: in expectation, its
    tangent is odd in the noise); at F* + θ x gradient descent moves θ back towards 0."""
    g0, _ = _grad_theta(mode, 0.0)
    assert abs(g0) < (1e-6 if mode == "scd" else 0.03)
    for theta in (0.3, -0.3):
        g, _ = _grad_theta(mode, theta)
        assert np.sign(g) == np.sign(theta) and abs(g) > 10 * abs(g0), (mode, theta, g)


def test_scd_teacher_velocity_at_gaussian_data_is_zero_and_the_tangent_vanishes():
    """With dx_t/dt = 0 and F = F*: g = -cos² t σd F* - cos t sin t (x_t + σd ∂_t F*) = 0 per sample."""
    n = 64
    x_t = SD * torch.randn(n, 2)
    t = torch.linspace(0.05, 1.5, n)
    F = cm.TrigFlow(Exact(0.0), SD, "trig")
    Fm, dF = cm.trig_jvp(lambda a, b: F(a, b, trig=True)[0], x_t, t, torch.zeros_like(x_t), "exact")
    g = cm.scm_tangent(Fm, dF, x_t, torch.zeros_like(x_t), t, SD, 1.0, 0.1)
    assert g.abs().max() < 1e-6


# ==== the loss on a network linear in x and t equals the value derived by hand ====

class Linear(nn.Module):
    def __init__(self, a: float, b: float):
        super().__init__()
        self.a, self.b = (nn.Parameter(torch.tensor(v, dtype=torch.float64)) for v in (a, b))

    def forward(self, x, c_noise, labels=None):  # F(u, t) = a u + b t, u = x_t / σd
        return self.a * x + self.b * c_noise.reshape(-1, *[1] * (x.ndim - 1))


@given(st.floats(-2, 2), st.floats(-2, 2), st.floats(0.0, 1.0), st.floats(0.01, 1.0), st.integers(0, 999))
def test_loss_of_a_linear_network_equals_the_hand_computed_value(a, b, r, c, seed):
    """F(x_t, t) = a x_t/σd + b t: dF/dt = a v/σd + b with v = cos t z - sin t x_0; then
    g = -cos² t (σd F - v) - r cos t sin t (x_t + σd dF/dt), ĝ = g / (‖g‖ + c), and with w = 0 (the
    zero-initialised weight) the loss is mean ‖ĝ‖² / D. Computed here in numpy, float64."""
    rng = np.random.default_rng(seed)
    n, d = 5, 4
    x0, z = rng.normal(size=(n, d)) * SD, rng.normal(size=(n, d)) * SD
    t = rng.uniform(0.05, 1.5, size=n)
    ct, st_ = np.cos(t)[:, None], np.sin(t)[:, None]
    x_t, v = ct * x0 + st_ * z, ct * z - st_ * x0
    F = a * x_t / SD + b * t[:, None]
    dF = a * v / SD + b
    g = -ct ** 2 * (SD * F - v) - r * ct * st_ * (x_t + SD * dF)
    g = g / (np.linalg.norm(g, axis=1, keepdims=True) + c)
    want = np.mean(np.sum(g ** 2, axis=1) / d)
    f = cm.TrigFlow(Linear(a, b), SD, "trig").double()
    got = cm.scm_step(f, f, torch.from_numpy(x0), torch.from_numpy(t), torch.from_numpy(z), SD, r, c, "exact")
    assert float(got.detach()) == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_adaptive_weight_minimum_is_minus_log_of_the_loss():
    """scm_loss over w alone is smallest at w = -ln L, L = ‖F_θ - F⁻ - g‖²/D per sample: the weight
    divides each time's loss by its own size (closed form of min_w e^w L - w)."""
    gen = torch.Generator().manual_seed(0)
    F_theta, F_minus, g = (torch.randn(4, 6, generator=gen) for _ in range(3))
    F_theta = F_theta * torch.tensor([0.1, 0.5, 1.0, 4.0])[:, None]
    L = (F_theta - F_minus - g).pow(2).mean(1)
    w = torch.zeros(4, requires_grad=True)
    opt = torch.optim.SGD([w], lr=0.2)
    for _ in range(3000):
        opt.zero_grad()
        cm.scm_loss(F_theta, F_minus, g, w).backward()
        opt.step()
    torch.testing.assert_close(w.detach(), -L.log(), atol=2e-3, rtol=0)


# ==== time proposal, warm-up, configuration and the sampler interface ====

def test_time_proposal_is_lognormal_in_edm_sigma():
    """σd tan t = e^τ with τ ~ N(P_mean, P_std²)."""
    t = cm.trig_time_proposal(100_000, -1.0, 1.4, SD, torch.Generator().manual_seed(0))
    tau = (SD * t.double().tan()).log()
    assert abs(tau.mean() + 1.0) < 0.02 and abs(tau.std() - 1.4) < 0.02
    assert 0 < t.min() and t.max() < math.pi / 2


@given(st.integers(0, 10 ** 6), st.integers(0, 20_000))
def test_tangent_warmup_rises_linearly_to_one(k, warmup):
    """r(k) = min(1, k / W) (W = 0: r = 1 from the start); sCM has no grid, no μ, no stage."""
    c = cm.CMConfig(mode="sct", noise_cond="trig", tangent_warmup=warmup)
    s = cm.schedule(c, k, 10 ** 6)
    assert s.r == (min(1.0, k / warmup) if warmup else 1.0)
    assert (s.N, s.mu, s.stage) == (0, 0.0, 0)


def test_config_refuses_trig_conditioning_outside_sct_and_bad_stabilisers():
    for bad in (dict(mode="scd", noise_cond="trig"), dict(mode="ct", noise_cond="trig"),
                dict(mode="sct", tangent_c=0.0), dict(mode="sct", tangent_warmup=-1),
                dict(mode="sct", jvp="x")):
        with pytest.raises(cm.CMError):
            cm.CMConfig(**bad).check()
    assert cm.config("toy", "sct").cm.noise_cond == "trig" and cm.config("toy", "scd").cm.noise_cond == "edm"


def test_gaussian_flow_map_samples_through_the_existing_sampler():
    """TrigFlow with F* is Gaussian data's identity flow map: cm.generate's one step from T gives
    x = cos(t_T) T z exactly (t_T = arctan(T/σd)), which is ~ N(0, σd² I) like the data; two steps keep
    it Gaussian too (each step maps x_τ to cos(t_τ) x_τ)."""
    f = cm.TrigFlow(Exact(0.0), SD, "trig")
    c = cm.CMConfig(mode="sct", noise_cond="trig")
    x, _ = cm.generate(f, c, (2,), range(4000), [80.0], seed=3, clip_denoised=False)
    z, _, _ = cm.per_sample_noise(range(4000), (2,), 1, 3)
    torch.testing.assert_close(x, math.cos(math.atan(80 / SD)) * 80 * z, rtol=1e-5, atol=1e-6)
    x2, _ = cm.generate(f, c, (2,), range(4000), [80.0, 1.0], seed=3, clip_denoised=False)
    assert abs(x2.std() - SD) < 0.02


@pytest.mark.parametrize("dataset", ["toy", "digits"])
@pytest.mark.parametrize("mode", ["sct", "scd", "ict"])
@given(t=st.floats(0.0, 1.5))
def test_time_features_of_trigflow_time_have_frequencies_at_most_one(dataset, mode, t):
    """The sinusoidal features of c_noise are cos(s ω c), sin(s ω c) with ω = 1 down to 1e-4, so their
    largest slope in c is s ω_max = s, reached by the first sin feature at c = 0. sCT feeds c_noise = t and
    must keep s ω ≤ 1 (large frequencies make dF/dt, inside the sCT tangent, blow up [sCM Sec. 4.1]); sCD
    differentiates through its network's ln(σ)/4 the same way and takes s = 1 too. The 2023 modes' ln(σ)/4
    spans only [-1.6, 1.1] and takes s = 100."""
    cfg = cm.config(dataset, mode)
    shape = (2,) if dataset == "toy" else (1, 8, 8)
    emb = cm.make_net(cfg, shape).emb
    dim = emb.mlp[0].in_features
    c = torch.tensor([t], dtype=torch.float64)
    _, slope = torch.func.jvp(lambda u: cm.timestep_embedding(u, dim, emb.scale), (c,), (torch.ones_like(c),))
    bound = 1.0 if mode in ("sct", "scd") else 100.0
    assert slope.abs().max().item() <= bound * (1 + 1e-9)
    assert math.isclose(slope[0, dim // 2].item(), bound * math.cos(bound * t), abs_tol=1e-9)


TINY_RUN = dict(channels=32, batch_size=16, log_every=1, ckpt_every=1, report=False,
                device="cpu")


def stored_scale(path) -> float:
    return torch.load(path, weights_only=True)["config"]["time_scale"]


def test_scd_student_takes_its_teachers_time_scale(tmp_path):
    """The student starts from the teacher's weights, so it must embed time as the teacher does: a teacher
    trained for scd gets scd's scale 1; a --teacher of scale 100 (any edm run) gives a student of scale 100,
    whatever the scd default."""
    cm.train(cm.config("toy", "scd", steps=1, teacher_steps=2, out=str(tmp_path / "a"), **TINY_RUN))
    a = tmp_path / "a"
    assert stored_scale(a / "teacher" / "ckpt.pt") == stored_scale(a / "ckpt.pt") == 1
    cm.train(cm.config("toy", "edm", steps=2, out=str(tmp_path / "edm"), **TINY_RUN))
    teacher = tmp_path / "edm" / "ckpt.pt"
    assert stored_scale(teacher) == 100
    cm.train(cm.config("toy", "scd", steps=1, teacher=str(teacher), out=str(tmp_path / "b"), **TINY_RUN))
    assert stored_scale(tmp_path / "b" / "ckpt.pt") == 100
    model, _ = cm.model_from_checkpoint(torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True))
    assert model.net.emb.scale == 100


def test_a_trig_checkpoint_without_its_time_scale_is_refused(tmp_path):
    """sct files once embedded TrigFlow's t at scale 100 and later at 1, with no field to tell: such a file
    is refused, not loaded at a guess; the ln(σ)/4 modes have always used 100 and load as before."""
    for mode in ("sct", "edm"):
        cm.train(cm.config("toy", mode, steps=1, out=str(tmp_path / mode), **TINY_RUN))
        state = torch.load(tmp_path / mode / "ckpt.pt", weights_only=True)
        del state["config"]["time_scale"]
        if mode == "sct":
            with pytest.raises(cm.CMError, match="no time_scale"):
                cm.config_of(state)
        else:
            assert cm.config_of(state).time_scale == 100


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), 1e5])
def test_time_scale_is_range_checked(bad):
    with pytest.raises(cm.CMError, match="time-scale"):
        cm.config("toy", "sct", time_scale=bad)
