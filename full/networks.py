"""The raw networks F(x_in, c_noise, class_labels=None) of the CM paper: NCSN++ (CIFAR-10) and ADM
(ImageNet-64, LSUN-256), configured by dataclasses.

References
    [CM]      Song, Dhariwal, Chen, Sutskever 2023, "Consistency Models", arXiv 2303.01469 (App. C).
    [NCSN++]  Song, Sohl-Dickstein, Kingma, Kumar, Ermon, Poole 2021, "Score-Based Generative Modeling
              through Stochastic Differential Equations", arXiv 2011.13456 (App. H: NCSN++).
    [ADM]     Dhariwal & Nichol 2021, "Diffusion Models Beat GANs on Image Synthesis", arXiv 2105.05233.
    [BigGAN]  Brock, Donahue, Simonyan 2019 (residual blocks that resample inside the block).
    [EDM]     Karras, Aittala, Aila, Laine 2022, arXiv 2206.00364 (same network / preconditioning split).

Contract. Every network maps x_in (B, C, H, W), c_noise (B,) float and class_labels (B,) long or None to a
tensor of x_in's shape. The preconditioning (c_skip, c_out, c_in, c_noise) lives in cm.py; here c_noise is
whatever number the noise level has already been turned into:
    NCSN++ (official CM CIFAR-10 JAX code)   c_noise = 0.25 ln(sigma)                  -> Gaussian Fourier
    ADM (released CM PyTorch checkpoints)    c_noise = 1000 * 0.25 ln(sigma + 1e-44)   -> sinusoidal
The sinusoidal embedding is guided-diffusion's `timestep_embedding` (max_period 10000, cos half first,
then sin), so a released checkpoint sees exactly the features it was trained on.

Official sources read for facts (structure, key names, hyper-parameters; no code copied):
openai/consistency_models_cifar10 `jcm/models/{ncsnpp,layerspp}.py` + `configs/cifar10_k_ve.py` (NCSN++),
openai/consistency_models `cm/unet.py` (ADM as used for the released checkpoints, itself guided-diffusion's
`unet.py` with flash attention), openai/consistency_models PR #37 (the qkv channel order).

NCSN++ [NCSN++ App. H] as the CM CIFAR-10 config sets it: nf 128, ch_mult (2, 2, 2), 4 residual blocks per
level, attention at 16x16, BigGAN blocks that up/downsample inside the block with the FIR kernel
[1, 3, 3, 1], every residual sum scaled by 1/sqrt(2), a "residual" input pyramid (a FIR-downsampling 3x3
conv of the previous pyramid level is added to each downsampled feature map), no output pyramid
(progressive = 'none'), Gaussian Fourier embedding of c_noise (128 frequencies ~ N(0, 16^2), sin then cos),
GroupNorm with min(C // 4, 32) groups (eps 1e-6, flax's default), SiLU, dropout 0 for CM (0.13 teacher).
Attention is single-head; the decoder applies it once per level after the level's res blocks, the
encoder after every res block. The Fourier frequencies are a fixed random buffer (the JAX code wraps them
in stop_gradient), so they are saved in the state_dict but not counted as parameters.
DDPM++ (EDM's VP CIFAR-10 networks, `NCSNppConfig.ddpmpp_cifar10`) is the same network with sinusoidal
noise features of width nf (`embedding='positional'`), no input pyramid (`encoder='standard'`) and the
[1, 1] resampling filter; `label_input=True` adds classes the way EDM's SongUNet does
(full/released/edm_pickle.py).

ADM [ADM] with guided-diffusion / CM key names, so `ADMUNet.load_state_dict(released_state_dict)` works:
    time_embed.{0,2}   label_emb   input_blocks.i.j   middle_block.{0,1,2}   output_blocks.i.j   out.{0,2}
    res block:  in_layers.{0,2}  emb_layers.1  out_layers.{0,3}  skip_connection
    attention:  norm  qkv  proj_out
Attention qkv channel order. guided-diffusion's QKVAttentionLegacy views qkv (B, 3*H*D, T) as
(B*H, 3*D, T) and splits, i.e. the channels are ordered (heads, three, head_dim). The released CM
checkpoints were trained with CM's QKVFlashAttention, which rearranges "b (three h d) s", i.e.
(three, heads, head_dim); sampling them with the legacy order gives bad images (CM PR #37). We implement
(three, heads, head_dim) by default (`ADMConfig.legacy_qkv_order = False`), so the released CM weights load
and run without any permutation; `legacy_qkv_order = True` runs guided-diffusion's own checkpoints.
CM builds `qkv`/`proj_out` as 1x1 Conv2d (weights (3C, C, 1, 1)); guided-diffusion uses Conv1d ((3C, C, 1)).
We use Conv2d and accept 3-D weights on load (they are unsqueezed), so both kinds of file load.

Parameter counts (`python -m full.networks`; counted on the meta device, nothing allocated):
    NCSN++ CIFAR-10   56,395,523   paper ~56.4M    -0.01%
    ADM ImageNet-64  295,899,267   paper ~295.9M   -0.00%
    ADM LSUN-256     526,304,771   paper ~526.3M   +0.00%

Precision. The nets are meant to run under torch.autocast (bf16/fp16). GroupNorm always computes in float32
and casts back (guided-diffusion's GroupNorm32), the noise embeddings are computed in float32, attention
uses F.scaled_dot_product_attention. There is no gradient checkpointing: forward is the plain graph.
"""
from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# --------------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------------


def _require(ok: bool, message: str) -> None:
    """A config check that `python -O` keeps (an assert would vanish): ValueError(message) unless ok."""
    if not ok:
        raise ValueError(message)


# Structural sizes of a network config, new or stored, bounded before anything is built from it (the
# largest released networks: 256 channels, 4 levels, 4 blocks; these leave room, and keep a tampered file
# from building millions of modules or terabytes of weights). A tuple field: each entry.
NET_SIZES = dict(img_resolution=(1, 4096), image_size=(1, 4096), in_channels=(1, 64), out_channels=(1, 64),
                 model_channels=(1, 4096), channel_mult=(1, 64), num_blocks=(1, 64), num_res_blocks=(1, 64),
                 num_classes=(0, 100_000), num_head_channels=(1, 4096))


def _require_sizes(cfg, res: str, attn: str) -> None:
    """Each NET_SIZES field that cfg has within its range, and every attention resolution one that a level
    of the network has (res, res/2, ... per channel_mult entry): one at no level would add no attention
    and silently train another network."""
    for name, (lo, hi) in NET_SIZES.items():
        if not hasattr(cfg, name):
            continue
        v = getattr(cfg, name)
        _require(all(lo <= x <= hi for x in (v if isinstance(v, tuple) else (v,))) and v != (),
                 f"{name}={v} must lie in {lo}..{hi}")
    levels = [getattr(cfg, res) >> i for i in range(len(cfg.channel_mult))]
    _require(set(getattr(cfg, attn)) <= set(levels),
             f"{attn}={getattr(cfg, attn)} must be resolutions of the network's levels {levels}")


@dataclass
class NCSNppConfig:
    """NCSN++ [NCSN++ App. H] with BigGAN blocks, FIR resampling and a residual input pyramid."""

    img_resolution: int = 32                          # input height = width (places the attention layers)
    in_channels: int = 3                              # channels of x_in
    out_channels: int = 3                             # channels of F's output
    model_channels: int = 128                         # nf: base channel count
    channel_mult: tuple[int, ...] = (2, 2, 2)         # channel multiplier per level (level 0 = full res.)
    num_blocks: int = 4                               # residual blocks per level (decoder: num_blocks + 1)
    attn_resolutions: tuple[int, ...] = (16,)         # resolutions (pixels) that get self-attention
    dropout: float = 0.0                              # dropout in res blocks (CM: 0, EDM/CM teacher: 0.13)
    fourier_scale: float = 16.0                       # std of the Gaussian Fourier frequencies
    resample_filter: tuple[int, ...] = (1, 3, 3, 1)   # 1-D FIR taps, outer product = 2-D kernel (even length)
    skip_scale: float = 1 / math.sqrt(2)              # every residual sum is multiplied by this
    num_classes: int = 0                              # 0 = unconditional; else adds a class embedding
    embedding: str = "fourier"                        # noise features: fourier (NCSN++) | positional (DDPM++)
    encoder: str = "residual"                         # residual input pyramid (NCSN++) | standard (DDPM++)
    label_input: bool = False                         # classes: False = Embedding added after the noise MLP;
    #                                                   True = EDM's Linear(one-hot · √K) added before it

    def __post_init__(self):
        # Tuples even when the config comes back from a checkpoint's asdict() / JSON as lists.
        self.channel_mult, self.attn_resolutions = tuple(self.channel_mult), tuple(self.attn_resolutions)
        self.resample_filter = tuple(self.resample_filter)
        _require_sizes(self, "img_resolution", "attn_resolutions")
        _require(self.embedding in ("fourier", "positional"), "embedding is fourier or positional")
        _require(self.encoder in ("residual", "standard"), "encoder is residual or standard")
        _require(len(self.resample_filter) % 2 == 0, "FIR resampling here needs an even number of taps")
        _require(self.img_resolution % 2 ** (len(self.channel_mult) - 1) == 0,
                 "resolution must halve cleanly")
        _require(min(self.channel_mult) * self.model_channels >= 4, "GroupNorm uses C // 4 groups")

    @classmethod
    def cifar10(cls, dropout: float = 0.0) -> NCSNppConfig:
        """CM CIFAR-10 (openai/consistency_models_cifar10 configs/cifar10_k_ve.py); teacher dropout 0.13."""
        return cls(dropout=dropout)

    @classmethod
    def ddpmpp_cifar10(cls, dropout: float = 0.13) -> NCSNppConfig:
        """DDPM++ as EDM's SongUNet builds it (EDM's VP CIFAR-10 models): sinusoidal noise features of
        width nf, plain encoder (no input pyramid), 2x2 box resampling filter [1, 1]; else NCSN++'s."""
        return cls(dropout=dropout, embedding="positional", encoder="standard", resample_filter=(1, 1))

    @classmethod
    def tiny(cls, img_resolution: int = 16, num_classes: int = 0) -> NCSNppConfig:
        """About 0.2M parameters: two levels of 16 and 32 channels, one block each, attention at res / 2."""
        return cls(img_resolution=img_resolution, model_channels=16, channel_mult=(1, 2), num_blocks=1,
                   attn_resolutions=(img_resolution // 2,), num_classes=num_classes)


@dataclass
class ADMConfig:
    """ADM UNet [ADM] with guided-diffusion's module tree (and so its state_dict key names)."""

    image_size: int = 64                              # input height = width (places the attention layers)
    in_channels: int = 3                              # channels of x_in
    out_channels: int = 3                             # channels of F's output (learn_sigma False)
    model_channels: int = 192                         # base channel count
    channel_mult: tuple[int, ...] = (1, 2, 3, 4)      # channel multiplier per level (level 0 = full res.)
    num_res_blocks: int = 3                           # residual blocks per level (decoder: one more)
    attention_resolutions: tuple[int, ...] = (32, 16, 8)  # resolutions (pixels) with attention, as CM's flag
    num_head_channels: int = 64                       # channels per attention head (heads = C // 64)
    dropout: float = 0.0                              # dropout in res blocks
    num_classes: int = 1000                           # 0 = unconditional; else label_emb joins the embedding
    use_scale_shift_norm: bool = True                 # FiLM: GN(h) * (1 + scale) + shift from the embedding
    resblock_updown: bool = True                      # up/downsample inside res blocks (else conv resampling)
    legacy_qkv_order: bool = False                    # False: (three, heads, dim) = released CM weights

    def __post_init__(self):
        self.channel_mult = tuple(self.channel_mult)                    # lists from asdict() / JSON
        self.attention_resolutions = tuple(self.attention_resolutions)
        _require_sizes(self, "image_size", "attention_resolutions")
        _require(self.image_size % 2 ** (len(self.channel_mult) - 1) == 0, "resolution must halve cleanly")
        _require(self.model_channels % 2 == 0, "the sinusoidal embedding needs an even width")
        _require(all(m * self.model_channels % 32 == 0 for m in self.channel_mult),
                 "GroupNorm uses 32 groups")
        _require(all(m * self.model_channels % self.num_head_channels == 0 for m in self.channel_mult),
                 "every level's channels must split into heads of num_head_channels")

    @classmethod
    def imagenet64(cls, dropout: float = 0.0) -> ADMConfig:
        """CM ImageNet-64: class-conditional, 192 channels, mult (1, 2, 3, 4), 3 blocks, scale-shift norm."""
        return cls(dropout=dropout)

    @classmethod
    def lsun256(cls, dropout: float = 0.0) -> ADMConfig:
        """CM LSUN-256: unconditional, 256 channels, mult (1, 1, 2, 2, 4, 4), 2 blocks, no scale-shift."""
        return cls(image_size=256, model_channels=256, channel_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2,
                   num_classes=0, use_scale_shift_norm=False, dropout=dropout)

    @classmethod
    def tiny(cls, image_size: int = 16, num_classes: int = 10) -> ADMConfig:
        """About 0.8M parameters: two levels of 32 and 64 channels, one block each, attention at res / 2."""
        return cls(image_size=image_size, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                   attention_resolutions=(image_size // 2,), num_head_channels=32, num_classes=num_classes)


# --------------------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------------------


def _fp32_or_wider(x: Tensor) -> Tensor:
    """x in float32, or float64 if it is float64 (norms and embeddings never run in bf16/fp16)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 and cast back to the input dtype (guided-diffusion's GroupNorm32)."""

    def forward(self, x: Tensor) -> Tensor:
        h = _fp32_or_wider(x)
        w = None if self.weight is None else self.weight.to(h.dtype)
        b = None if self.bias is None else self.bias.to(h.dtype)
        # group_norm is on autocast's float32 list, so float32 inputs stay float32 under autocast too.
        return F.group_norm(h, self.num_groups, w, b, self.eps).to(x.dtype)


def timestep_embedding(c_noise: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding [cos(c·ω_i), sin(c·ω_i)], ω_i = max_period^(-i/half), i < half = dim // 2.

    guided-diffusion's `timestep_embedding` (cos half first). (B,) -> (B, dim), float32 (or float64).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=c_noise.device) / half)  # (half,)
    args = _fp32_or_wider(c_noise)[:, None] * freqs[None]                                         # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)                                 # (B, 2 half)
    return F.pad(emb, (0, dim % 2))                                                             # (B, dim)


class PositionalEmbedding(nn.Module):
    """DDPM++'s sinusoidal features [sin(c ω_i), cos(c ω_i)], ω_i = 10000^(-i / (n - 1)), i < n = dim / 2.

    EDM's SongUNet PositionalEmbedding(endpoint=True) with its sin/cos swap, no parameters.
    (B,) -> (B, dim)."""

    def __init__(self, dim: int, max_period: float = 10000.0):
        super().__init__()
        self.dim, self.max_period = dim, max_period

    def forward(self, c_noise: Tensor) -> Tensor:
        n = self.dim // 2
        freqs = self.max_period ** (-torch.arange(n, device=c_noise.device, dtype=torch.float32) / (n - 1))
        x = _fp32_or_wider(c_noise)[:, None] * freqs[None]                        # (B, n)
        return torch.cat([torch.sin(x), torch.cos(x)], dim=-1)                   # (B, 2n)


class FourierEmbedding(nn.Module):
    """Gaussian Fourier features [sin(2π c w), cos(2π c w)], w ~ N(0, scale²), fixed.  [NCSN++ App. H]"""

    def __init__(self, num_freqs: int, scale: float):
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_freqs) * scale)  # saved, never trained

    def forward(self, c_noise: Tensor) -> Tensor:
        c = _fp32_or_wider(c_noise)
        x = c[:, None] * (2 * math.pi * self.freqs.to(c.dtype))[None]          # (B, n)
        return torch.cat([torch.sin(x), torch.cos(x)], dim=-1)                  # (B, 2n)


def fir_kernel(taps: Sequence[int]) -> Tensor:
    """2-D FIR kernel outer(k, k) / sum, from 1-D taps (e.g. [1, 3, 3, 1]); (K, K) float32."""
    k = torch.tensor(taps, dtype=torch.float32)
    k = torch.outer(k, k)
    return k / k.sum()


def fir_downsample(x: Tensor, kernel: Tensor) -> Tensor:
    """Filter with `kernel` then keep every 2nd pixel; (B, C, H, W) -> (B, C, H/2, W/2).

    score_sde's `downsample_2d` (upfirdn2d with pad ((K-2+1)//2, (K-2)//2), down 2), as a depthwise conv.
    """
    C, K = x.shape[1], kernel.shape[-1]
    p = K - 2
    w = kernel.flip(0, 1).to(x.dtype)[None, None].expand(C, 1, K, K)  # true convolution, as upfirdn2d
    x = F.pad(x, ((p + 1) // 2, p // 2, (p + 1) // 2, p // 2))
    return F.conv2d(x, w, stride=2, groups=C)


def fir_upsample(x: Tensor, kernel: Tensor) -> Tensor:
    """Insert zeros between pixels then filter with 4·`kernel`; (B, C, H, W) -> (B, C, 2H, 2W).

    score_sde's `upsample_2d` (upfirdn2d with up 2, gain 4, pad ((K-2+1)//2 + 1, (K-2)//2)); for an even
    kernel length K this is exactly a depthwise transposed conv with stride 2 and padding K/2 - 1.
    """
    C, K = x.shape[1], kernel.shape[-1]
    w = (4 * kernel).to(x.dtype)[None, None].expand(C, 1, K, K)
    return F.conv_transpose2d(x, w, stride=2, padding=K // 2 - 1, groups=C)


def _init_xavier(module: nn.Module, zero: bool = False, scale: float = 1.0) -> nn.Module:
    """score_sde's default_init(scale): weight ~ U(±sqrt(3 scale / fan_avg)) (Xavier, gain √scale), bias 0;
    `zero`: init_scale 0."""
    if zero:
        nn.init.zeros_(module.weight)
    else:
        nn.init.xavier_uniform_(module.weight, gain=math.sqrt(scale))
    nn.init.zeros_(module.bias)
    return module


# --------------------------------------------------------------------------------------------------------
# NCSN++  [NCSN++ App. H], CM CIFAR-10 configuration
# --------------------------------------------------------------------------------------------------------


def _ncsnpp_norm(channels: int) -> GroupNorm32:
    return GroupNorm32(min(channels // 4, 32), channels, eps=1e-6)


def _conv(in_ch: int, out_ch: int, k: int, zero: bool = False) -> nn.Conv2d:
    return _init_xavier(nn.Conv2d(in_ch, out_ch, k, padding=k // 2), zero)


class NCSNppResBlock(nn.Module):
    """BigGAN residual block [NCSN++ App. H, BigGAN]: resampling happens inside, after the first norm.

    h = conv1(drop(act(GN(conv0(resample(act(GN(x)))) + dense(act(emb))))));  out = (skip(resample(x)) + h)/√2
    """

    def __init__(self, in_ch: int, out_ch: int, emb_ch: int, dropout: float, skip_scale: float,
                 resample: str | None = None, kernel: Sequence[int] = (1, 3, 3, 1)):
        super().__init__()
        assert resample in (None, "up", "down")
        self.resample, self.skip_scale = resample, skip_scale
        self.norm0 = _ncsnpp_norm(in_ch)
        self.conv0 = _conv(in_ch, out_ch, 3)
        self.emb = _init_xavier(nn.Linear(emb_ch, out_ch))
        self.norm1 = _ncsnpp_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = _conv(out_ch, out_ch, 3, zero=True)
        # A 1x1 shortcut whenever the shape changes (channels or resolution), as in layerspp's BigGAN block.
        self.skip = _conv(in_ch, out_ch, 1) if (in_ch != out_ch or resample) else None
        self.register_buffer("kernel", fir_kernel(kernel), persistent=False)

    def _resample(self, x: Tensor) -> Tensor:
        if self.resample == "up":
            return fir_upsample(x, self.kernel)
        if self.resample == "down":
            return fir_downsample(x, self.kernel)
        return x

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = F.silu(self.norm0(x))                                      # (B, Cin, H, W)
        h = self.conv0(self._resample(h))                              # (B, Cout, H', W')
        h = h + self.emb(F.silu(emb))[:, :, None, None].to(h.dtype)    # per-channel bias from the embedding
        h = self.conv1(self.dropout(F.silu(self.norm1(h))))            # (B, Cout, H', W')
        x = self._resample(x)
        if self.skip is not None:
            x = self.skip(x)
        return (x + h) * self.skip_scale


class NCSNppAttention(nn.Module):
    """Single-head self-attention over pixels, out = (x + proj(attn(GN(x)))) · skip_scale.  [NCSN++]"""

    def __init__(self, channels: int, skip_scale: float):
        super().__init__()
        self.skip_scale = skip_scale
        self.norm = _ncsnpp_norm(channels)
        # The JAX code's three NINs (q, k, v), stacked. Each is default_init(0.1), U(±√(0.3 / C)) for C -> C;
        # on the stacked C -> 3C conv that is Xavier with gain √0.2 (EDM's init_attn = √0.2).
        self.qkv = _init_xavier(nn.Conv2d(channels, 3 * channels, 1), scale=0.2)
        self.proj = _conv(channels, channels, 1, zero=True)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, 3, 1, C, H * W)         # (B, three, heads=1, C, T)
        q, k, v = qkv.transpose(-1, -2).unbind(1)                         # each (B, 1, T, C)
        h = F.scaled_dot_product_attention(q, k, v)                       # (B, 1, T, C), scale C^-1/2
        h = h.transpose(-1, -2).reshape(B, C, H, W)
        return (x + self.proj(h)) * self.skip_scale


class FIRConvDown(nn.Module):
    """3x3 conv fused with FIR downsampling, for the residual input pyramid.

    score_sde's `Conv2d(down=True, resample_kernel=...)`: FIR filter (pad (K+1)//2, K//2 for K taps), then a
    stride-2 3x3 conv without padding. Away from the border this equals a 'same' 3x3 conv followed by
    `fir_downsample`. (B, Cin, H, W) -> (B, Cout, H/2, W/2).
    """

    def __init__(self, in_ch: int, out_ch: int, kernel: Sequence[int]):
        super().__init__()
        self.conv = _init_xavier(nn.Conv2d(in_ch, out_ch, 3, stride=2))
        self.register_buffer("kernel", fir_kernel(kernel), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        C, K = x.shape[1], self.kernel.shape[-1]
        p = K                                                # (K - 2) for the FIR + (3 - 1) for the conv
        w = self.kernel.flip(0, 1).to(x.dtype)[None, None].expand(C, 1, K, K)
        x = F.conv2d(F.pad(x, ((p + 1) // 2, p // 2, (p + 1) // 2, p // 2)), w, groups=C)  # (B, C, H+1, W+1)
        return self.conv(x)                                  # (B, Cout, H/2, W/2)


class NCSNpp(nn.Module):
    """NCSN++ [NCSN++ App. H] as the CM CIFAR-10 network: F(x_in, c_noise, class_labels) -> x_in's shape.

    Encoder per level: num_blocks x (res block [+ attention]), then (except at the last level) a res block
    that downsamples, summed with the residual input pyramid. Middle: res, attention, res. Decoder per level:
    (num_blocks + 1) x res block on [h, skip], one attention at attn resolutions, then a res block that
    upsamples (except at level 0). Output: act(GN(h)) -> 3x3 conv (zero-initialised).
    """

    def __init__(self, cfg: NCSNppConfig):
        super().__init__()
        self.cfg = cfg
        nf, emb_ch, s = cfg.model_channels, 4 * cfg.model_channels, cfg.skip_scale

        def res(i: int, o: int, resample: str | None = None) -> NCSNppResBlock:
            return NCSNppResBlock(i, o, emb_ch, cfg.dropout, s, resample, cfg.resample_filter)

        # Noise (and class) embedding: Fourier(nf freqs) -> Linear(2nf, 4nf) -> SiLU -> Linear(4nf, 4nf).
        # DDPM++: sinusoidal features of width nf instead (EDM's SongUNet, channel_mult_noise 1).
        if cfg.embedding == "fourier":
            self.fourier, noise_ch = FourierEmbedding(nf, cfg.fourier_scale), 2 * nf
        else:
            self.fourier, noise_ch = PositionalEmbedding(nf), nf
        self.emb0 = _init_xavier(nn.Linear(noise_ch, emb_ch))
        self.emb1 = _init_xavier(nn.Linear(emb_ch, emb_ch))
        self.label_emb = None
        if cfg.num_classes:
            self.label_emb = (_init_xavier(nn.Linear(cfg.num_classes, noise_ch)) if cfg.label_input
                              else nn.Embedding(cfg.num_classes, emb_ch))

        self.conv_in = _conv(cfg.in_channels, nf, 3)
        ch, res_px, skip_chs = nf, cfg.img_resolution, [nf]
        pyr_ch = cfg.in_channels  # the input pyramid's width: x_in's, then the previous level's
        self.down = nn.ModuleList()
        for level, mult in enumerate(cfg.channel_mult):
            stage = nn.ModuleDict()
            stage["blocks"], stage["attns"] = nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg.num_blocks):
                stage["blocks"].append(res(ch, nf * mult))
                ch = nf * mult
                has_attn = res_px in cfg.attn_resolutions
                stage["attns"].append(NCSNppAttention(ch, s) if has_attn else nn.Identity())
                skip_chs.append(ch)
            if level != len(cfg.channel_mult) - 1:
                stage["downsample"] = res(ch, ch, "down")
                # The pyramid starts from x_in and then carries the width of the level it was added at
                # (ncsnpp.py's pyramid_downsample(out_ch=h.shape[-1]); equal widths at CIFAR-10).
                if cfg.encoder == "residual":
                    stage["pyramid"] = FIRConvDown(pyr_ch, ch, cfg.resample_filter)
                pyr_ch = ch
                skip_chs.append(ch)
                res_px //= 2
            self.down.append(stage)

        self.mid = nn.ModuleDict(dict(block0=res(ch, ch), attn=NCSNppAttention(ch, s), block1=res(ch, ch)))

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            stage = nn.ModuleDict()
            stage["blocks"] = nn.ModuleList()
            for _ in range(cfg.num_blocks + 1):
                stage["blocks"].append(res(ch + skip_chs.pop(), nf * mult))
                ch = nf * mult
            stage["attn"] = NCSNppAttention(ch, s) if res_px in cfg.attn_resolutions else nn.Identity()
            if level != 0:
                stage["upsample"] = res(ch, ch, "up")
                res_px *= 2
            self.up.append(stage)
        assert not skip_chs

        self.norm_out = _ncsnpp_norm(ch)
        self.conv_out = _conv(ch, cfg.out_channels, 3, zero=True)

    def forward(self, x: Tensor, c_noise: Tensor, class_labels: Tensor | None = None) -> Tensor:
        emb = self.fourier(c_noise)                                        # (B, 2nf) or (B, nf)
        if self.label_emb is not None:
            assert class_labels is not None, "class-conditional network needs class_labels"
        if self.label_emb is not None and self.cfg.label_input:          # EDM: one-hot · √K, before the MLP
            k = self.cfg.num_classes
            emb = emb + self.label_emb(F.one_hot(class_labels, k).to(emb.dtype) * math.sqrt(k))
        emb = self.emb1(F.silu(self.emb0(emb)))                            # (B, 4nf)
        if self.label_emb is not None and not self.cfg.label_input:
            emb = emb + self.label_emb(class_labels)

        pyramid = x                                                        # (B, Cin, H, W)
        h = self.conv_in(x)                                                # (B, nf, H, W)
        skips = [h]
        for stage in self.down:
            for block, attn in zip(stage["blocks"], stage["attns"]):
                h = attn(block(h, emb))
                skips.append(h)
            if "downsample" in stage:
                h = stage["downsample"](h, emb)                            # (B, C, H/2, W/2)
                if "pyramid" in stage:
                    pyramid = (stage["pyramid"](pyramid) + h) * self.cfg.skip_scale
                    h = pyramid
                skips.append(h)

        h = self.mid["block1"](self.mid["attn"](self.mid["block0"](h, emb)), emb)

        for stage in self.up:
            for block in stage["blocks"]:
                h = block(torch.cat([h, skips.pop()], dim=1), emb)         # (B, C_level, h, w)
            h = stage["attn"](h)
            if "upsample" in stage:
                h = stage["upsample"](h, emb)                              # (B, C, 2h, 2w)

        return self.conv_out(F.silu(self.norm_out(h)))                     # (B, Cout, H, W)


# --------------------------------------------------------------------------------------------------------
# ADM  [ADM], guided-diffusion / CM module tree and key names
# --------------------------------------------------------------------------------------------------------


def _zero(module: nn.Module) -> nn.Module:
    """guided-diffusion's zero_module: all parameters start at 0."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class EmbedSequential(nn.Sequential):
    """guided-diffusion's TimestepEmbedSequential: passes the embedding to the children that take one."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ADMResBlock) else layer(x)
        return x


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling with an optional 3x3 conv (key `conv`)."""

    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1) if use_conv else None

    def forward(self, x: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return x if self.conv is None else self.conv(x)


class Downsample(nn.Module):
    """2x downsampling: stride-2 3x3 conv, or 2x2 average pooling (key `op` either way)."""

    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class ADMResBlock(nn.Module):
    """ADM residual block [ADM Sec. 3]: optional up/down inside (BigGAN) and scale-shift norm (AdaGN).

    h = in_layers(x) (resampled before its conv); scale-shift: h = GN(h)(1 + s) + b, else h = h + e;
    out = skip_connection(resample(x)) + out_layers(h). Key names follow guided-diffusion's ResBlock.
    """

    def __init__(self, channels: int, emb_ch: int, dropout: float, out_channels: int | None = None,
                 use_scale_shift_norm: bool = False, up: bool = False, down: bool = False):
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(GroupNorm32(32, channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_ch, 2 * out_channels if use_scale_shift_norm else out_channels))
        self.out_layers = nn.Sequential(GroupNorm32(32, out_channels), nn.SiLU(), nn.Dropout(dropout),
                                        _zero(nn.Conv2d(out_channels, out_channels, 3, padding=1)))
        # Identity when shapes match; guided-diffusion's use_conv=False shortcut is a 1x1 conv.
        self.skip_connection = (nn.Identity() if out_channels == channels
                                else nn.Conv2d(channels, out_channels, 1))

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        if self.updown:
            h = self.in_layers[:-1](x)                              # GN, SiLU at the input resolution
            h, x = self.h_upd(h), self.x_upd(x)                     # both branches resampled
            h = self.in_layers[-1](h)                               # (B, Cout, H', W')
        else:
            h = self.in_layers(x)
        e = self.emb_layers(emb).to(h.dtype)[:, :, None, None]      # (B, Cout or 2 Cout, 1, 1)
        if self.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + e)
        return self.skip_connection(x) + h


class ADMAttention(nn.Module):
    """Multi-head self-attention over pixels, out = x + proj_out(attn(qkv(GN(x)))).  [ADM Sec. 3]

    qkv channels are split as (three, heads, head_dim) (the released CM checkpoints, CM's QKVFlashAttention),
    or as (heads, three, head_dim) with `legacy_order` (guided-diffusion's QKVAttentionLegacy).
    """

    def __init__(self, channels: int, num_head_channels: int, legacy_order: bool = False):
        super().__init__()
        assert channels % num_head_channels == 0
        self.num_heads, self.legacy_order = channels // num_head_channels, legacy_order
        self.norm = GroupNorm32(32, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)             # CM: conv_nd(2, ...), 1x1
        self.proj_out = _zero(nn.Conv2d(channels, channels, 1))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # guided-diffusion stores qkv / proj_out as Conv1d weights (O, I, 1); ours are (O, I, 1, 1).
        for name in ("qkv.weight", "proj_out.weight"):
            w = state_dict.get(prefix + name)
            if w is not None and w.ndim == 3:
                state_dict[prefix + name] = w[..., None]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        nh, T = self.num_heads, H * W
        qkv = self.qkv(self.norm(x)).reshape(B, 3 * C, T)                 # (B, 3C, T)
        if self.legacy_order:
            qkv = qkv.reshape(B, nh, 3, C // nh, T).transpose(1, 2)      # (B, three, heads, D, T)
        else:
            qkv = qkv.reshape(B, 3, nh, C // nh, T)                      # (B, three, heads, D, T)
        q, k, v = qkv.transpose(-1, -2).unbind(1)                        # each (B, heads, T, D)
        h = F.scaled_dot_product_attention(q, k, v)                      # (B, heads, T, D), scale D^-1/2
        h = h.transpose(-1, -2).reshape(B, C, H, W)                      # channels (heads, D)
        return x + self.proj_out(h)


class ADMUNet(nn.Module):
    """ADM UNet [ADM] (guided-diffusion `UNetModel`, as in CM `cm/unet.py`): F(x_in, c_noise, class_labels).

    input_blocks: conv, then per level num_res_blocks x (res [+ attn]) and a downsampling res block;
    middle_block: res, attn, res; output_blocks: per level (num_res_blocks + 1) x (res on [h, skip] [+ attn]),
    the last of each level (but level 0) followed by an upsampling res block; out: GN, SiLU, conv (zero).
    """

    def __init__(self, cfg: ADMConfig):
        super().__init__()
        self.cfg = cfg
        mc, emb_ch = cfg.model_channels, 4 * cfg.model_channels
        attn_ds = {cfg.image_size // r for r in cfg.attention_resolutions}  # as downsample rates `ds`

        def res(i: int, o: int | None = None, up: bool = False, down: bool = False) -> ADMResBlock:
            return ADMResBlock(i, emb_ch, cfg.dropout, o, cfg.use_scale_shift_norm, up, down)

        def attn(c: int) -> ADMAttention:
            return ADMAttention(c, cfg.num_head_channels, cfg.legacy_qkv_order)

        self.time_embed = nn.Sequential(nn.Linear(mc, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
        self.label_emb = nn.Embedding(cfg.num_classes, emb_ch) if cfg.num_classes else None

        ch = input_ch = cfg.channel_mult[0] * mc
        self.input_blocks = nn.ModuleList([EmbedSequential(nn.Conv2d(cfg.in_channels, ch, 3, padding=1))])
        skip_chs, ds = [ch], 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [res(ch, mult * mc)]
                ch = mult * mc
                if ds in attn_ds:
                    layers.append(attn(ch))
                self.input_blocks.append(EmbedSequential(*layers))
                skip_chs.append(ch)
            if level != len(cfg.channel_mult) - 1:
                down = res(ch, ch, down=True) if cfg.resblock_updown else Downsample(ch, use_conv=True)
                self.input_blocks.append(EmbedSequential(down))
                skip_chs.append(ch)
                ds *= 2

        self.middle_block = EmbedSequential(res(ch), attn(ch), res(ch))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [res(ch + skip_chs.pop(), mc * mult)]
                ch = mc * mult
                if ds in attn_ds:
                    layers.append(attn(ch))
                if level and i == cfg.num_res_blocks:
                    up = res(ch, ch, up=True) if cfg.resblock_updown else Upsample(ch, use_conv=True)
                    layers.append(up)
                    ds //= 2
                self.output_blocks.append(EmbedSequential(*layers))
        assert not skip_chs

        self.out = nn.Sequential(GroupNorm32(32, ch), nn.SiLU(),
                                 _zero(nn.Conv2d(input_ch, cfg.out_channels, 3, padding=1)))

    def forward(self, x: Tensor, c_noise: Tensor, class_labels: Tensor | None = None) -> Tensor:
        emb = self.time_embed(timestep_embedding(c_noise, self.cfg.model_channels))  # (B, 4 mc)
        if self.label_emb is not None:
            assert class_labels is not None, "class-conditional network needs class_labels"
            emb = emb + self.label_emb(class_labels)

        skips, h = [], x                                        # (B, Cin, H, W)
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)                           # (B, C_last, H / 2^(L-1), ...)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)                                      # (B, Cout, H, W)


# --------------------------------------------------------------------------------------------------------
# Building and counting
# --------------------------------------------------------------------------------------------------------

NetworkConfig = NCSNppConfig | ADMConfig
NETWORKS: dict[type, type[nn.Module]] = {NCSNppConfig: NCSNpp, ADMConfig: ADMUNet}

# Paper parameter counts, for `python -m full.networks` and the tests.
PAPER_CONFIGS = {
    "ncsnpp-cifar10": (NCSNppConfig.cifar10, 56.4e6),
    "adm-imagenet64": (ADMConfig.imagenet64, 295.9e6),
    "adm-lsun256": (ADMConfig.lsun256, 526.3e6),
}


def build_network(cfg: NetworkConfig) -> nn.Module:
    """The network class that matches the config's type (NCSNppConfig -> NCSNpp, ADMConfig -> ADMUNet)."""
    return NETWORKS[type(cfg)](cfg)


def count_parameters(cfg: NetworkConfig) -> int:
    """Trainable parameter count, built on the meta device (no memory is allocated for the weights)."""
    with torch.device("meta"):
        net = build_network(cfg)
    return sum(p.numel() for p in net.parameters())


def main(argv: list[str] | None = None) -> None:
    """Print our parameter counts next to the paper's figures."""
    argparse.ArgumentParser(description=main.__doc__).parse_args(argv)
    from cm import CMError, exit_on, interrupts_as_errors
    try:
        with interrupts_as_errors(note=""):  # Ctrl-C, a closed pipe or a full device on stdout: one line
            print(f"{'network':<16} {'ours':>13} {'paper':>13} {'rel. diff':>10}")
            for name, (make_cfg, paper) in PAPER_CONFIGS.items():
                n = count_parameters(make_cfg())
                print(f"{name:<16} {n:>13,} {paper:>13,.0f} {(n - paper) / paper:>+10.2%}")
    except CMError as e:
        exit_on(e)


if __name__ == "__main__":
    main()
