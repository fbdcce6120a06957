"""Tests of full/networks.py: paper parameter counts, guided-diffusion key names, the qkv channel order of the
released CM checkpoints, FIR resampling against a direct upfirdn2d, and forward/backward of the tiny nets."""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from full.networks import (
    PAPER_CONFIGS,
    ADMAttention,
    ADMConfig,
    ADMUNet,
    FIRConvDown,
    NCSNpp,
    NCSNppAttention,
    NCSNppConfig,
    build_network,
    count_parameters,
    fir_downsample,
    fir_kernel,
    fir_upsample,
    timestep_embedding,
)

TINY = {"ncsnpp": lambda: NCSNppConfig.tiny(), "ncsnpp-cond": lambda: NCSNppConfig.tiny(num_classes=10),
        "adm": lambda: ADMConfig.tiny(), "adm-uncond": lambda: ADMConfig.tiny(num_classes=0)}



def _size(cfg) -> int:
    return cfg.img_resolution if isinstance(cfg, NCSNppConfig) else cfg.image_size


def _inputs(cfg, batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    r = _size(cfg)
    x = torch.randn(batch, cfg.in_channels, r, r, generator=g)
    c_noise = torch.randn(batch, generator=g)
    labels = torch.randint(0, cfg.num_classes, (batch,), generator=g) if cfg.num_classes else None
    return x, c_noise, labels


def _tiny(name: str, seed: int = 0) -> torch.nn.Module:
    """A tiny net with every parameter perturbed: the zero-initialised output layers of the paper nets
    would otherwise give F = 0 and block every gradient upstream of them."""
    torch.manual_seed(seed)
    net = build_network(TINY[name]())
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net


# ---------------------------------------------------------------------------------------------------------
# Paper configurations (meta device: nothing allocated)
# ---------------------------------------------------------------------------------------------------------

# Exact counts of the official networks: openai/consistency_models' cm/unet.py UNetModel with the launch
# script's flags (295,899,267 and 526,304,771, counted on the meta device), and the CIFAR-10 JAX NCSN++'s
# parameter tree (56,395,651) less the 128 Fourier-projection values kept here as a fixed buffer.
# A missing attention layer or a wrong channel count changes them; a 1% tolerance would hide it.
EXACT = {"ncsnpp-cifar10": 56_395_651 - 128, "adm-imagenet64": 295_899_267, "adm-lsun256": 526_304_771}


@pytest.mark.parametrize("name", list(PAPER_CONFIGS))
def test_paper_parameter_counts_are_exact(name):
    make_cfg, paper = PAPER_CONFIGS[name]
    assert count_parameters(make_cfg()) == EXACT[name]
    assert abs(EXACT[name] - paper) / paper < 1e-3  # and the paper's rounded figure


def test_ncsnpp_attention_init_is_the_jax_one():
    """q, k, v: score_sde's default_init(0.1) per C -> C NIN, U(±√(0.3 / C)), variance 0.1 / C; output: 0."""
    torch.manual_seed(0)
    C = 128
    attn = NCSNppAttention(C, 1.0)
    w = attn.qkv.weight.detach().reshape(3, C, C)
    bound = math.sqrt(0.3 / C)
    for part in w:  # q, k, v alike
        assert part.abs().max() <= bound and part.abs().max() > 0.99 * bound
        assert part.var().item() == pytest.approx(0.1 / C, rel=0.03)
    assert not attn.qkv.bias.any() and not attn.proj.weight.any() and not attn.proj.bias.any()


def test_paper_figures_are_the_cm_ones():
    assert {k: v for k, (_, v) in PAPER_CONFIGS.items()} == {
        "ncsnpp-cifar10": 56.4e6, "adm-imagenet64": 295.9e6, "adm-lsun256": 526.3e6}


def test_adm_imagenet64_uses_guided_diffusion_key_names():
    with torch.device("meta"):
        net = ADMUNet(ADMConfig.imagenet64())
    keys = set(net.state_dict())
    expected = {
        "time_embed.0.weight", "time_embed.2.weight", "label_emb.weight", "input_blocks.0.0.weight",
        "input_blocks.1.0.in_layers.0.weight", "input_blocks.1.0.in_layers.2.weight",
        "input_blocks.1.0.emb_layers.1.weight", "input_blocks.1.0.out_layers.0.weight",
        "input_blocks.1.0.out_layers.3.weight", "input_blocks.4.0.in_layers.2.weight",  # the first down block
        "input_blocks.5.0.skip_connection.weight", "input_blocks.5.1.norm.weight",  # 192->384, attn 32
        "input_blocks.5.1.qkv.weight", "input_blocks.5.1.proj_out.weight",
        "middle_block.0.in_layers.2.weight", "middle_block.1.qkv.weight", "middle_block.1.norm.bias",
        "middle_block.2.out_layers.3.bias", "output_blocks.0.0.skip_connection.weight",
        "output_blocks.3.2.in_layers.2.weight",                                        # the first up block
        "out.0.weight", "out.2.weight", "out.2.bias",
    }
    assert expected <= keys, expected - keys
    # Exactly guided-diffusion's block counts: 1 + 4 levels x 3 + 3 downsamplers, 4 x 4 decoder blocks.
    assert len(net.input_blocks) == 16 and len(net.output_blocks) == 16
    # CM builds qkv / proj_out as 1x1 Conv2d, and the embedding emits scale and shift.
    sd = net.state_dict()
    assert sd["middle_block.1.qkv.weight"].shape == (3 * 768, 768, 1, 1)
    assert sd["input_blocks.1.0.emb_layers.1.weight"].shape == (2 * 192, 768)
    assert sd["label_emb.weight"].shape == (1000, 768)


def test_adm_lsun256_is_unconditional_without_scale_shift():
    with torch.device("meta"):
        net = ADMUNet(ADMConfig.lsun256())
    sd = net.state_dict()
    assert "label_emb.weight" not in sd
    assert sd["input_blocks.1.0.emb_layers.1.weight"].shape == (256, 1024)
    assert len(net.input_blocks) == 1 + 6 * 2 + 5


def test_build_network_dispatches_on_config_type():
    with torch.device("meta"):
        assert type(build_network(NCSNppConfig.cifar10())) is NCSNpp
        assert type(build_network(ADMConfig.imagenet64())) is ADMUNet


def test_ncsnpp_fourier_frequencies_are_saved_not_trained():
    net = NCSNpp(NCSNppConfig.tiny())
    assert "fourier.freqs" in net.state_dict()
    assert all("freqs" not in n for n, _ in net.named_parameters())
    assert all("kernel" not in k for k in net.state_dict())  # FIR kernels are constants, not state


# ---------------------------------------------------------------------------------------------------------
# Embeddings, attention order, FIR resampling: against direct reference formulas
# ---------------------------------------------------------------------------------------------------------

def test_timestep_embedding_is_cos_then_sin():
    c = torch.tensor([0.0, 3.0])
    emb = timestep_embedding(c, 8)
    freqs = torch.tensor([10000 ** (-i / 4) for i in range(4)])
    torch.testing.assert_close(emb[1], torch.cat([torch.cos(3 * freqs), torch.sin(3 * freqs)]))
    assert emb[0].tolist() == [1.0] * 4 + [0.0] * 4
    assert timestep_embedding(c, 7).shape == (2, 7)


def _attention_reference(qkv: torch.Tensor, heads: int, legacy: bool) -> torch.Tensor:
    """Softmax attention on qkv (B, 3C, T); channels (heads, three, D) if legacy, else (three, heads, D)."""
    B, C3, T = qkv.shape
    D = C3 // (3 * heads)
    if legacy:   # guided-diffusion QKVAttentionLegacy: view as (B * heads, 3D, T) and split
        q, k, v = qkv.reshape(B * heads, 3 * D, T).split(D, dim=1)
    else:        # CM QKVFlashAttention: "b (three h d) s"
        q, k, v = (t.reshape(B * heads, D, T) for t in qkv.chunk(3, dim=1))
    w = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / math.sqrt(D), dim=-1)
    return torch.einsum("bts,bcs->bct", w, v).reshape(B, heads * D, T)


@pytest.mark.parametrize("legacy", [False, True])
def test_adm_attention_channel_order(legacy):
    torch.manual_seed(0)
    att = ADMAttention(64, num_head_channels=16, legacy_order=legacy)
    with torch.no_grad():
        for p in att.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    x = torch.randn(2, 64, 4, 4)
    qkv = att.qkv(att.norm(x)).reshape(2, 192, 16)
    want = x + att.proj_out(_attention_reference(qkv, 4, legacy).reshape(2, 64, 4, 4))
    torch.testing.assert_close(att(x), want, rtol=1e-4, atol=1e-5)
    other = _attention_reference(qkv, 4, not legacy).reshape(2, 64, 4, 4)
    assert not torch.allclose(att(x), x + att.proj_out(other), atol=1e-3)  # the two orders differ


def test_adm_loads_conv2d_and_conv1d_attention_weights():
    """Released CM files store qkv / proj_out as (O, I, 1, 1), guided-diffusion's as (O, I, 1)."""
    src, dst = _tiny("adm", seed=1), ADMUNet(ADMConfig.tiny())
    sd = src.state_dict()
    dst.load_state_dict(sd)
    conv1d = {k: (v[..., 0] if k.endswith(("qkv.weight", "proj_out.weight")) else v) for k, v in sd.items()}
    assert any(v.ndim == 3 for v in conv1d.values())
    dst2 = ADMUNet(ADMConfig.tiny())
    dst2.load_state_dict(conv1d)
    x, c, y = _inputs(ADMConfig.tiny(), 2)
    with torch.no_grad():
        torch.testing.assert_close(dst(x, c, y), src(x, c, y))
        torch.testing.assert_close(dst2(x, c, y), src(x, c, y))


def _upfirdn2d(x, k2d, up: int, down: int, pad: tuple[int, int]) -> torch.Tensor:
    """Direct upfirdn2d: zero-insert by `up`, pad, true 2-D convolution with k2d, keep every `down`-th."""
    B, C, H, W = x.shape
    u = torch.zeros(B, C, H * up, W * up, dtype=x.dtype)
    u[:, :, ::up, ::up] = x
    u = F.pad(u, (pad[0], pad[1], pad[0], pad[1]))
    K = k2d.shape[0]
    w = k2d.flip(0, 1)[None, None].expand(C, 1, K, K)
    return F.conv2d(u, w, groups=C)[:, :, ::down, ::down]


@pytest.mark.parametrize("taps", [(1, 3, 3, 1), (1, 1), (1, 2, 5, 3)])
def test_fir_resampling_matches_upfirdn2d(taps):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    k = fir_kernel(taps).double()
    p = len(taps) - 2
    torch.testing.assert_close(fir_downsample(x, k), _upfirdn2d(x, k, 1, 2, ((p + 1) // 2, p // 2)))
    torch.testing.assert_close(fir_upsample(x, k), _upfirdn2d(x, 4 * k, 2, 1, ((p + 1) // 2 + 1, p // 2)))
    assert fir_upsample(x, k).shape == (2, 3, 16, 16) and fir_downsample(x, k).shape == (2, 3, 4, 4)
    # A constant image stays constant away from the zero-padded border (kernels whose two polyphase
    # halves have equal sums, as the symmetric ones used by NCSN++).
    ones = torch.ones(1, 1, 8, 8, dtype=torch.float64)
    if sum(taps[::2]) == sum(taps[1::2]):
        torch.testing.assert_close(fir_upsample(ones, k)[..., 2:-2, 2:-2], torch.ones(1, 1, 12, 12).double())


def test_fir_conv_down_is_fused_conv_and_fir_downsample():
    """score_sde's fused op: upfirdn2d pad (2, 2), then a stride-2 3x3 conv; away from the border this is
    a 'same' 3x3 conv followed by fir_downsample (the border differs only by where zeros are padded)."""
    torch.manual_seed(0)
    m = FIRConvDown(3, 5, (1, 3, 3, 1)).double()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    fused = F.conv2d(_upfirdn2d(x, m.kernel.double(), 1, 1, (2, 2)), m.conv.weight, m.conv.bias, stride=2)
    torch.testing.assert_close(m(x), fused)
    two_step = fir_downsample(F.conv2d(x, m.conv.weight, m.conv.bias, padding=1), m.kernel.double())
    torch.testing.assert_close(m(x)[..., 1:-1, 1:-1], two_step[..., 1:-1, 1:-1])
    assert m(x).shape == (2, 5, 8, 8)


# ---------------------------------------------------------------------------------------------------------
# Tiny nets: shapes, gradients, conditioning, autocast
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def nets():
    return {name: _tiny(name) for name in TINY}


@settings(max_examples=4, deadline=None)
@given(name=st.sampled_from(sorted(TINY)), batch=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_tiny_output_shape_and_finite(nets, name, batch, seed):
    net = nets[name]
    x, c, y = _inputs(net.cfg, batch, seed)
    with torch.no_grad():
        out = net(x, c, y)
    assert out.shape == x.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("name", sorted(TINY))
def test_tiny_gradients_reach_every_parameter(nets, name):
    net = nets[name]
    net.zero_grad()
    x, c, y = _inputs(net.cfg, 2)
    net(x, c, y).square().mean().backward()
    for n, p in net.named_parameters():
        if n == "label_emb.weight":   # only the rows of the classes present in the batch get gradient
            assert p.grad[y].abs().sum() > 0, n
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n


@pytest.mark.parametrize("name", ["ncsnpp-cond", "adm"])
def test_class_labels_change_the_output(nets, name):
    net = nets[name]
    x, c, _ = _inputs(net.cfg, 2)
    with torch.no_grad():
        a = net(x, c, torch.tensor([0, 1]))
        b = net(x, c, torch.tensor([2, 3]))
    assert (a - b).abs().amax() > 1e-4


@pytest.mark.parametrize("name", sorted(TINY))
def test_c_noise_changes_the_output(nets, name):
    net = nets[name]
    x, c, y = _inputs(net.cfg, 2)
    with torch.no_grad():
        assert (net(x, c, y) - net(x, c + 0.5, y)).abs().amax() > 1e-4


@pytest.mark.parametrize("name", sorted(TINY))
def test_bf16_autocast_forward_is_finite_and_close(nets, name):
    net = nets[name]
    x, c, y = _inputs(net.cfg, 2)
    with torch.no_grad():
        ref = net(x, c, y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net(x, c, y)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert (out.float() - ref).norm() / ref.norm() < 0.1


def test_paper_nets_accept_their_resolution_on_meta():
    """Shape flow of the full-size nets at their native resolution, without computing anything."""
    for cfg in (NCSNppConfig.cifar10(), ADMConfig.imagenet64()):
        with torch.device("meta"):
            net = build_network(cfg)
            x, c, y = _inputs_meta(cfg)
            assert net(x, c, y).shape == x.shape


def _inputs_meta(cfg):
    r = _size(cfg)
    y = torch.zeros(2, dtype=torch.long) if cfg.num_classes else None
    return torch.empty(2, cfg.in_channels, r, r), torch.empty(2), y


def test_dropout_is_configured():
    net = build_network(ADMConfig.tiny())
    assert all(m.p == 0.0 for m in net.modules() if isinstance(m, torch.nn.Dropout))
    net = build_network(dataclasses.replace(NCSNppConfig.tiny(), dropout=0.13))
    ps = [m.p for m in net.modules() if isinstance(m, torch.nn.Dropout)]
    assert ps and all(p == 0.13 for p in ps)


@pytest.mark.parametrize("cfg", [dataclasses.replace(NCSNppConfig.tiny(8), in_channels=1, out_channels=1),
                                 dataclasses.replace(ADMConfig.tiny(8), in_channels=1, out_channels=1)])
def test_tiny_nets_run_on_8x8_grayscale(cfg):
    """The offline default data (sklearn digits) is 1 x 8 x 8."""
    x, c, y = _inputs(cfg, 3)
    assert build_network(cfg)(x, c, y).shape == (3, 1, 8, 8)


def test_configs_from_lists_become_tuples():
    d = dataclasses.asdict(ADMConfig.lsun256())
    d = {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
    assert ADMConfig(**d) == ADMConfig.lsun256()
    assert NCSNppConfig(channel_mult=[2, 2, 2], attn_resolutions=[16]) == NCSNppConfig.cifar10()
