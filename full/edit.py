"""Zero-shot editing with a consistency model: inpainting, colorization, super-resolution, stroke-guided
generation (SDEdit), interpolation and denoising.  [CM Sec. 6, Alg. 4, App. D]

Algorithm 4 is the multistep sampler (cm.sample_multistep, [CM Alg. 1]) with a replacement step after
every denoise. With an invertible linear map A and a binary mask Ω in A's space (Ω = 1: generate,
Ω = 0: keep the reference y):

    y ← A⁻¹[(A y) ⊙ (1 - Ω)]                         (line 2: drop what is not known)
    x ← f(y + τ_1 z, τ_1)                            (lines 3-4)
    x ← A⁻¹[(A y) ⊙ (1 - Ω) + (A x) ⊙ Ω]              (line 5: the replacement)
    for τ_2 > τ_3 > ...: x ← f(x + √(τ² - ε²) z', τ), then the replacement again (lines 6-10)

The tasks differ only in (A, Ω) [CM App. D]:
    inpaint    A = I, Ω = 1 on the missing pixels (here `mask` = 1 marks the known pixels, Ω = 1 - mask)
    colorize   A = per-pixel 3x3 orthogonal Q, first column ∝ luma (0.2989, 0.5870, 0.1140); keep axis 0
    superres   A = p²x p² orthogonal Q on every p x p patch, first column 1/p (the patch mean); keep axis 0
    stroke     A = I, Ω = 1 everywhere: no replacement, only the start x = y + τ_1 z (SDEdit)
Interpolation (slerp of latents, then one step) and denoising (one step from the given level) are
single evaluations of f.

Conventions: images are (B, C, H, W) in [-1, 1]; `levels` are descending τ_1 > τ_2 > ... (as
cm.sample_multistep takes them; cm.ts_to_sigmas turns official `ts` indices into levels); noise is
drawn on the CPU with `generator` and moved to x's device, as cm.py does, or passed in as `noises`.
Every denoised image is clamped to [-1, 1] before the replacement, as the official code does
(`clip_denoised=False` turns it off). Deviation from the official code, on purpose: it starts from pure
noise T z; we follow Alg. 4 and start from y + τ_1 z. Importing has no side effects.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import Tensor

import cm

LUMA = (0.2989, 0.5870, 0.1140)  # ITU-R 601 luma weights, as [CM App. D]
STROKE_LEVELS = (5.38, 2.24)     # τ_1, τ_2 of the paper's SDEdit runs [CM App. D]


# ----------------------------------------------------------------------------------------------
# Orthonormal bases and the linear maps A, A⁻¹ [CM App. D]


def orthonormal_basis(v: Sequence[float] | Tensor) -> Tensor:
    """An orthogonal matrix Q (d, d) whose first column is v/‖v‖ (QR of [v | e_2 ... e_d]).  [CM App. D]

    QR (Householder) completes the first axis with orthonormal columns; the signs are fixed so the
    first column points along +v. Float64, so Q Qᵀ = I to ~1e-16."""
    v = torch.as_tensor(v, dtype=torch.float64).flatten()
    M = torch.eye(len(v), dtype=torch.float64)
    M[:, 0] = v / v.norm()
    Q, R = torch.linalg.qr(M)
    return Q * torch.where(torch.diagonal(R) < 0, -1.0, 1.0)[None]  # Q R = M with diag(R) >= 0


def color_basis() -> Tensor:
    """Q (3, 3), first column the unit luma axis (0.2989, 0.5870, 0.1140)/‖·‖.  [CM App. D, Colorization]"""
    return orthonormal_basis(LUMA)


def patch_basis(factor: int) -> Tensor:
    """Q (p², p²): first column (1/p, ..., 1/p), the unit patch-mean axis.  [CM App. D, Super-resolution]"""
    return orthonormal_basis([1.0] * factor ** 2)


def to_color_space(x: Tensor, Q: Tensor) -> Tensor:
    """A x: per pixel a_k = Σ_l x_l Q[l, k]. (B, 3, H, W) -> (B, 3, H, W); a_0 = luma·x / ‖luma‖."""
    return torch.einsum("blhw,lk->bkhw", x, Q.to(x))


def from_color_space(a: Tensor, Q: Tensor) -> Tensor:
    """A⁻¹ a = Q a per pixel (Q is orthogonal): x_k = Σ_l a_l Q[k, l]."""
    return torch.einsum("blhw,kl->bkhw", a, Q.to(a))


def to_patches(x: Tensor, Q: Tensor, factor: int) -> Tensor:
    """A x: each p x p patch, flattened row-major, times Q. (B, C, H, W) -> (B, C, H/p, W/p, p²)."""
    B, C, H, W = x.shape
    p = factor
    patches = x.reshape(B, C, H // p, p, W // p, p).permute(0, 1, 2, 4, 3, 5)  # (B, C, H/p, W/p, p, p)
    return patches.reshape(B, C, H // p, W // p, p * p) @ Q.to(x)


def from_patches(a: Tensor, Q: Tensor, factor: int) -> Tensor:
    """A⁻¹ a: back from patch coordinates to pixels. (B, C, H/p, W/p, p²) -> (B, C, H, W)."""
    B, C, h, w, _ = a.shape
    p = factor
    patches = (a @ Q.to(a).T).reshape(B, C, h, w, p, p).permute(0, 1, 2, 4, 3, 5)  # (B, C, h, p, w, p)
    return patches.reshape(B, C, h * p, w * p)


def _identity(x: Tensor) -> Tensor:
    return x


# ----------------------------------------------------------------------------------------------
# Algorithm 4


def replace(x: Tensor, y: Tensor, omega: Tensor, A: Callable = _identity,
            A_inv: Callable = _identity) -> Tensor:
    """x ← A⁻¹[(A y) ⊙ (1 - Ω) + (A x) ⊙ Ω], Ω ∈ {0, 1} broadcast over A x.  [CM Alg. 4, lines 5, 9]

    Written as a select, not a product, so the kept coordinates are A y bit for bit (and with A = I
    the known pixels are exactly y, even where x is not finite)."""
    return A_inv(torch.where(omega.to(torch.bool), A(x), A(y)))


def _check_levels(levels: Sequence[float], sigma_min: float) -> list[float]:
    return cm.check_levels(levels, sigma_min)


def _denoise_and_replace(x: Tensor, tau: float, f: Callable, y: Tensor, omega: Tensor, A: Callable,
                         A_inv: Callable, clip_denoised: bool = True) -> Tensor:
    """x ← f(x, τ), clamped to [-1, 1] if clip_denoised, then the replacement.  [CM Alg. 4, l. 4-5, 8-9]"""
    x = f(x, tau)
    return replace(x.clamp(-1, 1) if clip_denoised else x, y, omega, A, A_inv)


@torch.no_grad()
def edit_multistep(f: Callable, y: Tensor, omega: Tensor, levels: Sequence[float], sigma_min: float = 0.002,
                   A: Callable = _identity, A_inv: Callable = _identity,
                   generator: torch.Generator | None = None,
                   noises: Sequence[Tensor] | None = None, clip_denoised: bool = True) -> Tensor:
    """Zero-shot editing: Alg. 1's multistep sampler with the replacement after each step.  [CM Alg. 4]

    y: the reference (B, C, H, W); omega: Ω in A's space (1 = generate); levels: τ_1 > τ_2 > ...;
    noises: optional [z for line 3, z' for each later level], otherwise drawn from `generator`;
    clip_denoised: clamp each f(·) to [-1, 1] before the replacement (the official order).
    The start x = y' + τ_1 z (y' = y with Ω-coordinates zeroed, line 2) is passed to
    cm.sample_multistep as the latent z + y'/τ_1, whose first step evaluates f(τ_1 · latent, τ_1)."""
    levels = _check_levels(levels, sigma_min)
    omega = torch.as_tensor(omega, device=y.device)
    y = A_inv(torch.where(omega.to(torch.bool), torch.zeros((), dtype=y.dtype, device=y.device), A(y)))
    z = (noises[0] if noises is not None else torch.randn(y.shape, generator=generator)).to(y.device)
    f_edit = partial(_denoise_and_replace, f=f, y=y, omega=omega, A=A, A_inv=A_inv,
                     clip_denoised=clip_denoised)
    return cm.sample_multistep(f_edit, z + y / levels[0], levels, sigma_min, clip_denoised=False,
                               noises=None if noises is None else noises[1:], generator=generator)


# ----------------------------------------------------------------------------------------------
# The tasks [CM App. D]


def inpaint(f: Callable, ref: Tensor, mask: Tensor, levels: Sequence[float], sigma_min: float = 0.002,
            generator: torch.Generator | None = None, noises: Sequence[Tensor] | None = None,
            clip_denoised: bool = True) -> Tensor:
    """Fill the pixels where mask = 0; where mask = 1 the result is exactly ref.  [CM App. D, Inpainting]

    A = I and Ω = 1 - mask; mask broadcasts to ref, e.g. (1, 1, H, W) or (B, C, H, W)."""
    omega = (torch.as_tensor(mask, device=ref.device) == 0).expand_as(ref)
    return edit_multistep(f, ref, omega, levels, sigma_min, generator=generator, noises=noises,
                          clip_denoised=clip_denoised)


def colorize(f: Callable, ref: Tensor, levels: Sequence[float], sigma_min: float = 0.002,
             generator: torch.Generator | None = None, noises: Sequence[Tensor] | None = None,
             clip_denoised: bool = True) -> Tensor:
    """RGB images whose luma 0.2989 R + 0.5870 G + 0.1140 B equals the reference's.  [CM App. D, Colorization]

    ref: (B, 1, H, W) grey (repeated to the three channels, as the paper's y) or (B, 3, H, W) RGB
    (only its luma is used). A = Qᵀ per pixel, Ω = (0, 1, 1) over the three coordinates."""
    if ref.shape[1] == 1:
        ref = ref.expand(-1, 3, -1, -1)
    if ref.shape[1] != 3:
        raise ValueError(f"colorize needs 1 or 3 channels, got shape {tuple(ref.shape)}")
    Q = color_basis()
    omega = torch.tensor([0, 1, 1], dtype=torch.bool, device=ref.device)[None, :, None, None]
    return edit_multistep(f, ref, omega, levels, sigma_min, partial(to_color_space, Q=Q),
                          partial(from_color_space, Q=Q), generator=generator, noises=noises,
                          clip_denoised=clip_denoised)


def superres(f: Callable, ref: Tensor, factor: int, levels: Sequence[float], sigma_min: float = 0.002,
             generator: torch.Generator | None = None, noises: Sequence[Tensor] | None = None,
             lowres: bool = False, clip_denoised: bool = True) -> Tensor:
    """Images whose p x p patch means equal the reference's (p = factor).  [CM App. D, Super-resolution]

    ref: a full-resolution image (B, C, H, W) whose patch means are the information kept, or with
    lowres=True the low-resolution image (B, C, H/p, W/p), up-sampled by repetition (the paper's y).
    A = Q over each patch, Ω = (0, 1, ..., 1): the patch-mean coordinate is kept."""
    if lowres:
        ref = ref.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)
    if ref.shape[-1] % factor or ref.shape[-2] % factor:
        raise ValueError(f"image size {tuple(ref.shape[-2:])} is not a multiple of factor {factor}")
    Q = patch_basis(factor)
    omega = torch.ones(factor ** 2, dtype=torch.bool, device=ref.device)
    omega[0] = False
    return edit_multistep(f, ref, omega, levels, sigma_min, partial(to_patches, Q=Q, factor=factor),
                          partial(from_patches, Q=Q, factor=factor), generator=generator, noises=noises,
                          clip_denoised=clip_denoised)


def stroke(f: Callable, stroke_img: Tensor, levels: Sequence[float] = STROKE_LEVELS, sigma_min: float = 0.002,
           generator: torch.Generator | None = None, noises: Sequence[Tensor] | None = None,
           clip_denoised: bool = True) -> Tensor:
    """Stroke-guided generation (SDEdit): x = f(y + τ_1 z, τ_1), then the multistep chain.  [CM App. D]

    The paper's Alg. 4 with A = I and Ω = 1 everywhere: the replacement never fires, and line 3 starts
    from the stroke painting y itself (line 2 read literally would erase all of y, leaving plain
    sampling; SDEdit noises y). The paper uses τ = (5.38, 2.24)."""
    levels = _check_levels(levels, sigma_min)
    z = noises[0] if noises is not None else torch.randn(stroke_img.shape, generator=generator)
    return cm.sample_multistep(f, z.to(stroke_img.device) + stroke_img / levels[0], levels, sigma_min,
                               noises=None if noises is None else noises[1:], generator=generator,
                               clip_denoised=clip_denoised)


def slerp(z0: Tensor, z1: Tensor, alpha: float) -> Tensor:
    """sin((1-α)ψ)/sin ψ · z0 + sin(αψ)/sin ψ · z1, ψ = arccos(z0·z1/(‖z0‖‖z1‖)) per sample.  [CM App. D]

    Falls back to the straight line where z0 ∥ z1 (sin ψ ≈ 0), the limit of the formula."""
    a, b = z0.flatten(1).double(), z1.flatten(1).double()  # (B, D)
    cos = ((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))).clamp(-1, 1)
    psi = torch.arccos(cos)  # (B,)
    s = torch.sin(psi)
    small = s < 1e-6
    s = torch.where(small, torch.ones_like(s), s)
    w0 = torch.where(small, torch.full_like(psi, 1 - alpha), torch.sin((1 - alpha) * psi) / s)
    w1 = torch.where(small, torch.full_like(psi, alpha), torch.sin(alpha * psi) / s)
    return (cm.append_dims(w0, a.ndim) * a + cm.append_dims(w1, b.ndim) * b).reshape(z0.shape).to(z0.dtype)


@torch.no_grad()
def interpolate(f: Callable, z0: Tensor, z1: Tensor, alphas: Sequence[float],
                sigma_max: float = 80.0) -> Tensor:
    """One-step samples f(T z_α, T) along the slerp z_α of two latents z ~ N(0, I).  [CM App. D]

    z0, z1: (B, C, H, W). Returns (B·K, C, H, W) for K alphas, the K frames of each pair consecutive
    (a grid with K columns shows one pair per row); alpha 0 and 1 give cm.sample_onestep of z0, z1."""
    frames = [cm.sample_onestep(f, slerp(z0, z1, a), sigma_max) for a in alphas]
    return torch.stack(frames, 1).flatten(0, 1)  # (B, K, C, H, W) -> (B·K, C, H, W)


@torch.no_grad()
def denoise(f: Callable, x_noisy: Tensor, sigma: float) -> Tensor:
    """f(x_noisy, σ): one step from an image with N(0, σ² I) noise, ε <= σ <= T.  [CM App. D]"""
    return f(x_noisy, sigma)


# ----------------------------------------------------------------------------------------------
# Masks for inpainting (1 = known pixel, 0 = to fill), shaped like the image's (..., H, W)


def box_mask(shape: Sequence[int], top: int, left: int, height: int, width: int) -> Tensor:
    """Known everywhere except a height x width hole whose top-left corner is (top, left)."""
    mask = torch.ones(tuple(shape))
    mask[..., top:top + height, left:left + width] = 0
    return mask


def half_mask(shape: Sequence[int], side: str = "right") -> Tensor:
    """Known everywhere except one half: side is 'left', 'right', 'top' or 'bottom' (the half to fill;
    for an odd size the larger one)."""
    H, W = shape[-2:]
    boxes = {"left": (0, 0, H, W - W // 2), "right": (0, W // 2, H, W - W // 2),
             "top": (0, 0, H - H // 2, W), "bottom": (H // 2, 0, H - H // 2, W)}
    if side not in boxes:
        raise ValueError(f"side must be one of {', '.join(boxes)}, got {side!r}")
    return box_mask(shape, *boxes[side])


# ----------------------------------------------------------------------------------------------
# One entry point: run_edit(task, f, reference, mask=..., levels=..., sigma_min=..., generator=...)


def default_levels(task: str, sigma_min: float = 0.002, sigma_max: float = 80.0, N: int = 18) -> list[float]:
    """Levels used when none are given: the whole descending N-point Karras grid without ε for the
    replacement tasks (a CD model is trained on exactly these levels; cm.ts_to_sigmas), the paper's
    (5.38, 2.24) for stroke, [T] for interpolate. Denoising has no default: its level is the input's."""
    if task in ("inpaint", "colorize", "superres"):
        return cm.ts_to_sigmas(list(range(N - 1)), N, sigma_min, sigma_max)
    if task == "stroke":
        return list(STROKE_LEVELS)
    if task == "interpolate":
        return [sigma_max]
    raise ValueError(f"{task} needs levels=[sigma], the noise level of the input")


def _run_inpaint(f, reference, mask, levels, sigma_min, generator, **kw):
    if mask is None:
        raise ValueError("inpaint needs a mask (1 = known pixel, 0 = to fill)")
    return inpaint(f, reference, mask, levels, sigma_min, generator, **kw)


def _run_colorize(f, reference, mask, levels, sigma_min, generator, **kw):
    return colorize(f, reference, levels, sigma_min, generator, **kw)


# Super-resolution patch size p per dataset, as the official code runs it: openai/consistency_models
# (ImageNet-64, LSUN-256) fixes `patch_size = 8` in cm/karras_diffusion.py `iterative_superres`; the CIFAR-10
# JAX notebook (openai/consistency_models_cifar10 editing_multistep_sampling.ipynb) defines
# `get_iterative_superres(..., patch_size=4)` but runs it with `patch_size=2`, the value used here.
SUPERRES_FACTOR = {"cifar10": 2, "digits": 2, "imagenet64": 8, "folder": 8}


def superres_factor(dataset: str) -> int:
    """The default patch size p of `superres` for a data set name (2 for any other)."""
    return SUPERRES_FACTOR.get(dataset, 2)


def _run_superres(f, reference, mask, levels, sigma_min, generator, factor: int = 2, **kw):
    return superres(f, reference, factor, levels, sigma_min, generator, **kw)


def _run_stroke(f, reference, mask, levels, sigma_min, generator, **kw):
    return stroke(f, reference, levels, sigma_min, generator, **kw)


def _run_interpolate(f, reference, mask, levels, sigma_min, generator, alphas: Sequence[float] | None = None):
    if len(reference) != 2:
        raise ValueError(f"interpolate needs a reference of two latents (2, C, H, W), got {len(reference)}")
    alphas = torch.linspace(0, 1, 8).tolist() if alphas is None else alphas
    return interpolate(f, reference[:1], reference[1:], alphas, levels[0])


def _run_denoise(f, reference, mask, levels, sigma_min, generator, add_noise: bool = False):
    sigma = levels[0]
    if add_noise:  # reference is clean: perturb it with N(0, σ² I) first (a demo)
        reference = reference + sigma * torch.randn(reference.shape, generator=generator).to(reference.device)
    return denoise(f, reference, sigma)


EDITS: dict[str, Callable] = {
    "inpaint": _run_inpaint,
    "colorize": _run_colorize,
    "superres": _run_superres,
    "stroke": _run_stroke,
    "interpolate": _run_interpolate,
    "denoise": _run_denoise,
}


def run_edit(task: str, f: Callable, reference: Tensor, mask: Tensor | None = None,
             levels: Sequence[float] | None = None, sigma_min: float = 0.002,
             generator: torch.Generator | None = None, clip_denoised: bool = True, **kw) -> Tensor:
    """Run one zero-shot edit by name.  [CM Alg. 4, App. D]

    reference, by task:
      inpaint      the image (B, C, H, W); `mask` 1 = known pixel (kept exactly), 0 = to fill
      colorize     grey (B, 1, H, W) or RGB (B, 3, H, W) images; returns RGB with the same luma
      superres     full-resolution images whose factor x factor patch means are kept (kw factor=2;
                   full.sample: superres_factor of the data set; lowres=True for a (B, C, H/p, W/p) input)
      stroke       a stroke painting, noised to levels[0] and denoised (SDEdit)
      interpolate  two latents z ~ N(0, I) stacked as (2, C, H, W); levels[0] is T (default 80);
                   kw alphas (default 8 from 0 to 1); returns (len(alphas), C, H, W)
      denoise      a noisy image whose noise std is levels[0] (required); kw add_noise=True noises a
                   clean reference first, with `generator`
    levels default to default_levels(task); kw noises=[...] pins the noise of the Alg. 4 tasks.
    clip_denoised clamps every evaluation of f to [-1, 1] (the official default)."""
    if task not in EDITS:
        raise ValueError(f"unknown edit task {task!r}; choose one of {', '.join(EDITS)}")
    if mask is not None and task != "inpaint":
        raise ValueError(f"only inpaint takes a mask, not {task}")
    levels = default_levels(task, sigma_min) if levels is None else [float(t) for t in levels]
    if not levels:
        raise ValueError("levels must not be empty")
    if task in ("interpolate", "denoise"):  # single evaluations of f
        x = EDITS[task](f, reference, mask, levels, sigma_min, generator, **kw)
        return x.clamp(-1, 1) if clip_denoised else x
    return EDITS[task](f, reference, mask, levels, sigma_min, generator, clip_denoised=clip_denoised, **kw)
