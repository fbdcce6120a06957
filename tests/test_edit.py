"""Zero-shot editing [CM Alg. 4, App. D]: what each edit keeps, bases, the exact Gaussian case, dispatch."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import cm
from full import edit

EPS, T, SD = 0.002, 80.0, 0.5
LEVELS = st.lists(st.floats(0.01, 80.0), min_size=1, max_size=4, unique=True).map(
    lambda v: sorted(v, reverse=True))



def exact_f(x, sigma):
    """f*(x, t) = x √(σd² + ε²) / √(σd² + t²), the consistency function of N(0, σd² I) data."""
    return x * math.sqrt(SD ** 2 + EPS ** 2) / math.sqrt(SD ** 2 + float(sigma) ** 2)


def random_f(channels: int, seed: int) -> cm.ConsistencyFunction:
    """A tiny UNet with random weights everywhere (the output layer too), so f is far from identity."""
    torch.manual_seed(seed)
    net = cm.UNet(channels, 8, (1, 2), blocks=1, resolution=8)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 1 / math.sqrt(max(p[0].numel(), 1)))
    return cm.ConsistencyFunction(net, SD, EPS).eval()


def images(seed: int, shape=(2, 1, 8, 8), dtype=torch.float32) -> torch.Tensor:
    return (torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype) * 2 - 1)


def noises(seed: int, n: int, shape, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=dtype) for _ in range(n)]


LUMA = torch.tensor(edit.LUMA, dtype=torch.float64)[None, :, None, None]


# --- bases [CM App. D] ---

@given(v=st.lists(st.floats(-10, 10), min_size=1, max_size=9).filter(lambda v: math.hypot(*v) > 1e-3))
def test_orthonormal_basis_is_orthogonal_with_v_first(v):
    Q = edit.orthonormal_basis(v)
    vt = torch.tensor(v, dtype=torch.float64)
    assert torch.allclose(Q @ Q.T, torch.eye(len(v), dtype=torch.float64), atol=1e-12)
    assert torch.allclose(Q[:, 0], vt / vt.norm(), atol=1e-12)


@pytest.mark.parametrize("factor", [1, 2, 3, 4, 8])
def test_patch_basis_first_axis_is_the_mean(factor):
    Q = edit.patch_basis(factor)
    assert torch.allclose(Q @ Q.T, torch.eye(factor ** 2, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(Q[:, 0], torch.full((factor ** 2,), 1 / factor, dtype=torch.float64), atol=1e-12)


def test_color_basis_matches_the_paper_up_to_column_signs():
    Q = edit.color_basis()
    paper = torch.tensor([[0.4471, -0.8204, 0.3563], [0.8780, 0.4785, 0], [0.1705, -0.3129, -0.9343]],
                         dtype=torch.float64)  # [CM App. D]
    assert torch.allclose(Q.abs(), paper.abs(), atol=1e-4)
    assert torch.allclose(Q[:, 0], paper[:, 0], atol=1e-4)


@given(seed=st.integers(0, 2 ** 16), factor=st.sampled_from([1, 2, 4]))
def test_linear_maps_invert(seed, factor):
    x = images(seed, (2, 3, 8, 8), torch.float64)
    Q, P = edit.color_basis(), edit.patch_basis(factor)
    assert torch.allclose(edit.from_color_space(edit.to_color_space(x, Q), Q), x, atol=1e-12)
    assert torch.allclose(edit.from_patches(edit.to_patches(x, P, factor), P, factor), x, atol=1e-12)
    # the kept coordinates are the luma (scaled by 1/‖luma‖) and the patch mean (scaled by p)
    assert torch.allclose(edit.to_color_space(x, Q)[:, 0],
                          (x * LUMA).sum(1) / LUMA.norm(), atol=1e-12)
    assert torch.allclose(edit.to_patches(x, P, factor)[..., 0], factor * F.avg_pool2d(x, factor), atol=1e-12)


# --- what each edit keeps, for any network ---

@given(seed=st.integers(0, 2 ** 16), p_known=st.floats(0, 1), levels=LEVELS, per_channel=st.booleans())
def test_inpaint_keeps_known_pixels_exactly(seed, p_known, levels, per_channel):
    f = random_f(1, seed % 3)
    ref = images(seed)
    shape = ref.shape if per_channel else (1, 1, 8, 8)
    mask = (torch.rand(shape, generator=torch.Generator().manual_seed(seed + 1)) < p_known).float()
    out = edit.inpaint(f, ref, mask, levels, EPS, generator=torch.Generator().manual_seed(seed))
    known = mask.expand_as(ref).bool()
    assert torch.equal(out[known], ref[known])
    assert torch.isfinite(out).all()


@given(seed=st.integers(0, 2 ** 16), levels=LEVELS, grey=st.booleans())
def test_colorize_preserves_luma(seed, levels, grey):
    f = random_f(3, seed % 3)
    ref = images(seed, (2, 1 if grey else 3, 8, 8))
    out = edit.colorize(f, ref, levels, EPS, generator=torch.Generator().manual_seed(seed))
    assert out.shape == (2, 3, 8, 8)
    ref_luma = (ref.expand(-1, 3, -1, -1) * LUMA.float()).sum(1)
    assert torch.allclose((out * LUMA.float()).sum(1), ref_luma, atol=1e-5)


@given(seed=st.integers(0, 2 ** 16), levels=LEVELS, factor=st.sampled_from([1, 2, 4, 8]),
       lowres=st.booleans(), channels=st.sampled_from([1, 3]))
def test_superres_preserves_patch_means(seed, levels, factor, lowres, channels):
    f = random_f(channels, seed % 3)
    full_res = images(seed, (2, channels, 8, 8))
    means = F.avg_pool2d(full_res, factor)
    ref = means if lowres else full_res
    out = edit.superres(f, ref, factor, levels, EPS, generator=torch.Generator().manual_seed(seed),
                        lowres=lowres)
    assert out.shape == full_res.shape
    assert torch.allclose(F.avg_pool2d(out, factor), means, atol=1e-5)


def test_superres_rejects_sizes_not_divisible():
    with pytest.raises(ValueError, match="multiple"):
        edit.superres(exact_f, torch.zeros(1, 1, 8, 8), 3, [T])


@given(seed=st.integers(0, 2 ** 16), levels=LEVELS)
def test_nothing_known_is_the_multistep_sampler(seed, levels):
    """Ω = 1 everywhere (no known pixel, y = 0): Alg. 4 is Alg. 1, i.e. cm.sample_multistep (both clamp)."""
    f = random_f(1, seed % 3)
    zs = noises(seed, len(levels), (2, 1, 8, 8), torch.float32)
    out = edit.inpaint(f, images(seed), torch.zeros(1, 1, 8, 8), levels, EPS, noises=zs)
    expected = cm.sample_multistep(f, zs[0], levels, EPS, noises=zs[1:])
    assert torch.allclose(out, expected, atol=1e-5)


# --- the exact Gaussian consistency function: each result is what Alg. 4 defines, by hand ---

def clamp(x):
    """Every denoised image is clamped to [-1, 1] before the replacement (the official code's order)."""
    return x.clamp(-1, 1)


def test_inpaint_two_levels_by_hand():
    ref = images(0, dtype=torch.float64)
    mask = edit.box_mask(ref.shape, 2, 1, 4, 5).double()
    t1, t2 = 5.0, 0.7
    z1, z2 = noises(1, 2, ref.shape)
    x = clamp(exact_f(ref * mask + t1 * z1, t1))       # lines 2-4: missing pixels of y are 0
    x = mask * ref + (1 - mask) * x                    # line 5
    x = clamp(exact_f(x + math.sqrt(t2 ** 2 - EPS ** 2) * z2, t2))  # lines 7-8
    x = mask * ref + (1 - mask) * x                    # line 9
    out = edit.inpaint(exact_f, ref, mask, [t1, t2], EPS, noises=[z1, z2])
    assert torch.allclose(out, x, atol=1e-12)


def test_colorize_two_levels_by_hand():
    """Keep the component along the unit luma axis u: x ← x - (u·x) u + (u·y) u, per pixel."""
    ref = images(2, (2, 3, 8, 8), torch.float64)
    u = LUMA / LUMA.norm()
    keep = lambda x, y: x - (u * x).sum(1, keepdim=True) * u + (u * y).sum(1, keepdim=True) * u  # noqa: E731
    t1, t2 = 80.0, 2.0
    z1, z2 = noises(3, 2, ref.shape)
    y = (u * ref).sum(1, keepdim=True) * u             # line 2: only the luma coordinate of y is left
    assert exact_f(y + t1 * z1, t1).abs().max() > 1.2  # the clamp has work to do
    x = keep(clamp(exact_f(y + t1 * z1, t1)), ref)
    x = keep(clamp(exact_f(x + math.sqrt(t2 ** 2 - EPS ** 2) * z2, t2)), ref)
    out = edit.colorize(exact_f, ref, [t1, t2], EPS, noises=[z1, z2])
    assert torch.allclose(out, x, atol=1e-12)
    unclamped = edit.colorize(exact_f, ref, [t1, t2], EPS, noises=[z1, z2], clip_denoised=False)
    x = keep(exact_f(keep(exact_f(y + t1 * z1, t1), ref) + math.sqrt(t2 ** 2 - EPS ** 2) * z2, t2), ref)
    assert torch.allclose(unclamped, x, atol=1e-12) and not torch.allclose(unclamped, out, atol=1e-3)


@pytest.mark.parametrize("factor", [2, 4])
def test_superres_two_levels_by_hand(factor):
    """Keep each patch mean: x ← x - up(mean_p(x)) + up(mean_p(y))."""
    ref = images(4, (2, 1, 8, 8), torch.float64)
    up = lambda m: m.repeat_interleave(factor, -1).repeat_interleave(factor, -2)  # noqa: E731
    keep = lambda x: x - up(F.avg_pool2d(x, factor)) + up(F.avg_pool2d(ref, factor))  # noqa: E731
    t1, t2 = 20.0, 0.5
    z1, z2 = noises(5, 2, ref.shape)
    x = keep(clamp(exact_f(up(F.avg_pool2d(ref, factor)) + t1 * z1, t1)))
    x = keep(clamp(exact_f(x + math.sqrt(t2 ** 2 - EPS ** 2) * z2, t2)))
    out = edit.superres(exact_f, ref, factor, [t1, t2], EPS, noises=[z1, z2])
    assert torch.allclose(out, x, atol=1e-12)


def test_stroke_denoise_interpolate_by_hand():
    y = images(6, dtype=torch.float64)
    t1, t2 = edit.STROKE_LEVELS
    z1, z2 = noises(7, 2, y.shape)
    x = clamp(exact_f(clamp(exact_f(y + t1 * z1, t1)) + math.sqrt(t2 ** 2 - EPS ** 2) * z2, t2))
    assert torch.allclose(edit.stroke(exact_f, y, noises=[z1, z2]), x, atol=1e-12)
    assert torch.allclose(edit.denoise(exact_f, y + 0.3 * z1, 0.3), exact_f(y + 0.3 * z1, 0.3), atol=1e-15)
    out = edit.interpolate(exact_f, z1, z2, [0.0, 0.25, 1.0], T)  # (B·3, C, H, W), a pair's frames together
    frames = out.reshape(len(z1), 3, *z1.shape[1:])
    for k, a in enumerate([0.0, 0.25, 1.0]):
        assert torch.allclose(frames[:, k], exact_f(T * edit.slerp(z1, z2, a), T), atol=1e-12)


def test_generator_draws_the_noise_on_the_cpu_in_order():
    """With a generator, the noises are z (line 3) then one per later level, drawn like cm.py does."""
    ref = images(8, dtype=torch.float64)
    mask = edit.half_mask(ref.shape)
    g = torch.Generator().manual_seed(9)
    zs = [torch.randn(ref.shape, generator=g).double() for _ in range(3)]
    out = edit.inpaint(exact_f, ref, mask, [10.0, 1.0, 0.1], EPS, generator=torch.Generator().manual_seed(9))
    assert torch.allclose(out, edit.inpaint(exact_f, ref, mask, [10.0, 1.0, 0.1], EPS, noises=zs), atol=1e-12)


@pytest.mark.parametrize("levels", [[], [1.0, 2.0], [1.0, 1.0], [1.0, 0.001]])
def test_bad_levels(levels):
    with pytest.raises(ValueError, match="levels"):
        edit.inpaint(exact_f, images(0), torch.ones(8, 8), levels, EPS)


# --- slerp [CM App. D, Interpolation] ---

@given(seed=st.integers(0, 2 ** 16), dim=st.integers(2, 64))
def test_slerp_endpoints_are_exact(seed, dim):
    z0, z1 = noises(seed, 2, (3, dim), torch.float32)
    assert torch.equal(edit.slerp(z0, z1, 0.0), z0)
    assert torch.equal(edit.slerp(z0, z1, 1.0), z1)


@given(seed=st.integers(0, 2 ** 16), alpha=st.floats(0, 1), scale=st.floats(0.1, 100))
def test_slerp_keeps_the_norm_of_orthogonal_equal_norm_latents(seed, alpha, scale):
    a, b = noises(seed, 2, (4, 1, 8, 8))
    a, b = a.flatten(1), b.flatten(1)
    b = b - (a * b).sum(1, keepdim=True) / (a * a).sum(1, keepdim=True) * a  # Gram-Schmidt: a ⟂ b
    a, b = scale * a / a.norm(dim=1, keepdim=True), scale * b / b.norm(dim=1, keepdim=True)
    z = edit.slerp(a, b, alpha)
    assert torch.allclose(z.norm(dim=1), torch.full((4,), scale, dtype=z.dtype), rtol=1e-10)
    # and the angle to a grows linearly in alpha: ψ_α = α·π/2
    cos = (z * a).sum(1) / scale ** 2
    assert torch.allclose(cos, torch.full((4,), math.cos(alpha * math.pi / 2), dtype=z.dtype), atol=1e-10)


def test_slerp_of_parallel_latents_is_the_line():
    z0 = torch.randn(2, 5, dtype=torch.float64)
    assert torch.allclose(edit.slerp(z0, 2 * z0, 0.5), 1.5 * z0, atol=1e-12)
    assert torch.isfinite(edit.slerp(z0, z0, 0.3)).all()


# --- masks ---

def test_masks():
    m = edit.box_mask((2, 1, 8, 8), 2, 3, 4, 2)
    assert m.shape == (2, 1, 8, 8) and m.sum() == 2 * (64 - 8) and m[0, 0, 2:6, 3:5].sum() == 0
    for side, hole in (("left", (slice(None), slice(0, 4))), ("right", (slice(None), slice(4, 8))),
                       ("top", (slice(0, 4), slice(None))), ("bottom", (slice(4, 8), slice(None)))):
        m = edit.half_mask((8, 8), side)
        assert m[hole].sum() == 0 and m.sum() == 32
    assert edit.half_mask((7, 7), "right")[:, 3:].sum() == 0  # odd sizes: the hole is the larger half
    assert edit.half_mask((7, 7), "bottom").sum() == edit.half_mask((7, 7), "left").sum() == 7 * 3
    with pytest.raises(ValueError, match="side"):
        edit.half_mask((8, 8), "middle")


# --- run_edit: one entry, the signature full/sample.py calls ---

def test_run_edit_dispatches_to_each_task():
    f = random_f(1, 0)
    ref = images(10)
    mask = edit.half_mask(ref.shape)
    lv = [20.0, 1.0]
    g = lambda: torch.Generator().manual_seed(11)  # noqa: E731
    assert set(edit.EDITS) == {"inpaint", "colorize", "superres", "stroke", "interpolate", "denoise"}
    cases = {
        "inpaint": (dict(mask=mask), lambda: edit.inpaint(f, ref, mask, lv, EPS, g())),
        "superres": (dict(factor=4), lambda: edit.superres(f, ref, 4, lv, EPS, g())),
        "stroke": ({}, lambda: edit.stroke(f, ref, lv, EPS, g())),
        "denoise": ({}, lambda: f(ref, 20.0).clamp(-1, 1)),
        "interpolate": (dict(alphas=[0, 0.5, 1]),
                        lambda: edit.interpolate(f, ref[:1], ref[1:], [0, 0.5, 1], 20.0).clamp(-1, 1)),
    }
    for task, (kw, direct) in cases.items():
        out = edit.run_edit(task, f, ref, levels=lv, sigma_min=EPS, generator=g(), **kw)
        assert torch.allclose(out, direct(), atol=1e-6), task
    f3, rgb = random_f(3, 1), images(12, (2, 3, 8, 8))
    assert torch.allclose(edit.run_edit("colorize", f3, rgb, levels=lv, sigma_min=EPS, generator=g()),
                          edit.colorize(f3, rgb, lv, EPS, g()), atol=1e-6)


def test_run_edit_defaults_and_errors():
    ref = images(13)
    assert edit.run_edit("interpolate", exact_f, ref).shape == (8, 1, 8, 8)
    assert edit.run_edit("stroke", exact_f, ref, generator=torch.Generator()).shape == ref.shape
    # the 18-point Karras grid from T without ε: (80^(1/7) + i/17 (0.002^(1/7) - 80^(1/7)))^7, i = 0..16
    levels = edit.default_levels("inpaint")
    assert len(levels) == 17 and levels[0] == T
    assert (levels[8], levels[11], levels[16]) == pytest.approx((3.256821519765537, 0.5853481231945422,
                                                                 0.0075280199627840785), rel=1e-9)
    assert edit.default_levels("stroke") == [5.38, 2.24]
    with pytest.raises(ValueError, match="inpaint, colorize, superres, stroke, interpolate, denoise"):
        edit.run_edit("deblur", exact_f, ref)
    with pytest.raises(ValueError, match="mask"):
        edit.run_edit("inpaint", exact_f, ref)
    with pytest.raises(ValueError, match="mask"):
        edit.run_edit("stroke", exact_f, ref, mask=torch.ones(8, 8))
    with pytest.raises(ValueError, match="noise level"):
        edit.run_edit("denoise", exact_f, ref)
    with pytest.raises(ValueError, match="two latents"):
        edit.run_edit("interpolate", exact_f, images(0, (3, 1, 8, 8)))
    with pytest.raises(ValueError, match="channels"):
        edit.run_edit("colorize", exact_f, images(0, (2, 2, 8, 8)))
    noisy = edit.run_edit("denoise", exact_f, ref, levels=[0.5], add_noise=True,
                          generator=torch.Generator().manual_seed(0))
    z = torch.randn(ref.shape, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(noisy, exact_f(ref + 0.5 * z, 0.5).clamp(-1, 1))


def test_sources_are_short_lines():
    from pathlib import Path
    for path in (Path(edit.__file__), Path(__file__)):
        long = [i for i, line in enumerate(path.read_text().splitlines(), 1) if len(line) > 110]
        assert not long, f"{path.name}: lines over 110 characters: {long}"
