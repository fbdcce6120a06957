"""ADM consistency models as diffusers ConsistencyModelPipeline folders, and back (full/diffusers_io.py).

diffusers is a test-only dependency: it is imported inside the tests (pytest.importorskip) to load what the
converter wrote with json + safetensors alone. The expected samples come from this project's own sampler
(cm.sample_onestep / cm.sample_multistep with cm.ts_to_sigmas), the expected network outputs from ADMUNet:
diffusers' UNet2DModel, ConsistencyModelPipeline and CMStochasticIterativeScheduler are an independent
implementation of the same function, so agreement to float32 round-off checks every renamed tensor, the
qkv split, the scalings c_skip, c_out, c_in, the time input 1000 · 0.25 ln(σ + 1e-44) and the re-noising.
"""
from __future__ import annotations

import dataclasses
import json
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import full.convert
import full.sample
from cm import CMError, sample_multistep, sample_onestep, ts_to_sigmas
from full import checkpoints, diffusers_io
from full.config import export_dict
from full.model import make_model
from full.networks import ADMConfig, NCSNppConfig, build_network
from full.presets import get_preset

pytest.importorskip("safetensors")


def cond_net() -> ADMConfig:  # ImageNet-64's settings (classes, scale-shift norm), 16x16, attention at 8x8
    return ADMConfig.tiny(16, num_classes=10)


def uncond_net() -> ADMConfig:  # LSUN-256's settings (no classes, no scale-shift), attention at full size,
    # two heads in guided-diffusion's legacy qkv order (permuted on conversion)
    return ADMConfig(image_size=8, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                     attention_resolutions=(8,), num_head_channels=16, num_classes=0,
                     use_scale_shift_norm=False, legacy_qkv_order=True)


NETS = {"cond": cond_net, "uncond": uncond_net}


def make_state(net: ADMConfig, seed: int = 0, mode: str = "cd", **run) -> dict:
    """An export dict of a consistency model with random weights (none zero: every tensor matters)."""
    cfg = get_preset("imagenet64-cd-lpips")
    cfg = dataclasses.replace(cfg, net=net, cm=dataclasses.replace(cfg.cm, mode=mode),
                              run=dataclasses.replace(cfg.run, **run))
    f = make_model(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in f.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return export_dict(cfg, {0.0: f.state_dict()}, 7)


def write_folder(state: dict, out):
    return diffusers_io.write_folder(*checkpoints.model_from_state(state), out)


def f_of(state: dict):
    return checkpoints.model_from_state(state)[0]


@pytest.fixture(params=list(NETS))
def folder(request, tmp_path):
    state = make_state(NETS[request.param]())
    out = write_folder(state, tmp_path / "cd_tiny")
    return state, out


def labels_for(net: ADMConfig, b: int):
    return torch.arange(b) % net.num_classes if net.num_classes else None


def test_files_are_the_hub_layout(folder):
    _, out = folder
    names = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert names == ["model_index.json", "scheduler/scheduler_config.json", "unet/config.json",
                     "unet/diffusion_pytorch_model.safetensors"]
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "ConsistencyModelPipeline"
    sched = json.loads((out / "scheduler/scheduler_config.json").read_text())
    assert (sched["sigma_min"], sched["sigma_max"], sched["sigma_data"], sched["rho"],
            sched["num_train_timesteps"], sched["s_noise"], sched["clip_denoised"]) == \
        (0.002, 80.0, 0.5, 7.0, 40, 1.0, True)


def test_unet_equals_adm(folder):
    """diffusers' UNet2DModel, loaded from the folder with nothing missing or left over, computes ADMUNet's
    F."""
    diffusers = pytest.importorskip("diffusers")
    state, out = folder
    net = f_of(state).net
    unet, info = diffusers.UNet2DModel.from_pretrained(out / "unet", output_loading_info=True)
    assert not any(info.values()), info
    cfg = net.cfg
    x = torch.randn(3, cfg.in_channels, cfg.image_size, cfg.image_size,
                    generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([80.0, 1.3, 0.002])
    t = 1000 * 0.25 * torch.log(sigma + 1e-44)
    y = labels_for(cfg, 3)
    with torch.no_grad():
        want = net(x, t, y)
        got = unet(x, t, class_labels=y).sample
    assert want.abs().max() > 0.1  # not a trivially small output
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5 * want.abs().max().item())


def _pipeline(out):
    diffusers = pytest.importorskip("diffusers")
    pipe = diffusers.ConsistencyModelPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_pipeline_samples_equal_ours(folder):
    """The same noise gives the same one- and two-step samples in ConsistencyModelPipeline and cm.py's
    samplers: x = f(T z, T), then f(x + √(τ² - ε²) z', τ) at τ = level 22 of the 40-point grid, clamped."""
    state, out = folder
    pipe = _pipeline(out)
    f = f_of(state)
    cfg = f.net.cfg
    b = 2
    z = torch.randn(b, cfg.in_channels, cfg.image_size, cfg.image_size,
                    generator=torch.Generator().manual_seed(2))
    y = labels_for(cfg, b)
    fy = (lambda x, t: f(x, t, y)) if y is not None else f
    kw = {"class_labels": y.tolist()} if y is not None else {}

    one = pipe(batch_size=b, num_inference_steps=1, latents=z.clone(), output_type="pt", **kw).images
    want_one = sample_onestep(fy, z, 80.0).clamp(-1, 1)

    g = torch.Generator().manual_seed(3)  # the pipeline draws z' (and a second, unused, noise) from it
    two = pipe(batch_size=b, timesteps=[22, 0], latents=z.clone(), generator=g, output_type="pt", **kw).images
    z2 = torch.randn(z.shape, generator=torch.Generator().manual_seed(3))
    levels = ts_to_sigmas([0, 22, 39], 40)
    want_two = sample_multistep(fy, z, levels, 0.002, noises=[z2])

    for got, want in ((one, want_one), (two, want_two)):
        assert 0.05 < want.std() and want.abs().max() < 1  # away from the clamp: a wrong F would show
        torch.testing.assert_close(got * 2 - 1, want, rtol=0, atol=2e-5)
    assert (want_two - want_one).abs().max() > 0.01  # the second step did something


def test_folder_reads_back_identical_weights(folder):
    state, out = folder
    back = checkpoints.load(out)
    f, g = f_of(state), f_of(back)
    cfg, cfg_back = checkpoints.config_of(state), checkpoints.config_of(back)
    assert cfg_back.net == dataclasses.replace(cfg.net, legacy_qkv_order=False)
    assert (cfg_back.cm.sigma_min, cfg_back.cm.sigma_max, cfg_back.cm.sigma_data, cfg_back.cm.rho,
            cfg_back.cm.noise_cond, cfg_back.run.grid_steps, cfg_back.run.ts, cfg_back.run.clamp_mid) == \
        (0.002, 80.0, 0.5, 7.0, "adm", 40, (0, 22, 39), True)
    assert cfg_back.cm.mode == "cd"  # from the folder name cd_tiny
    sd, sd_back = f.state_dict(), g.state_dict()
    assert sd.keys() == sd_back.keys()
    if not cfg.net.legacy_qkv_order:
        assert all(torch.equal(sd[k], sd_back[k]) for k in sd)
    else:  # only the qkv rows are permuted: the same function
        assert all(torch.equal(sd[k], sd_back[k]) for k in sd if ".qkv." not in k)
        assert any(not torch.equal(sd[k], sd_back[k]) for k in sd if ".qkv." in k)
    x = torch.randn(2, cfg.net.in_channels, cfg.net.image_size, cfg.net.image_size)
    y = labels_for(cfg.net, 2)
    with torch.no_grad():
        torch.testing.assert_close(g(x, 3.0, y), f(x, 3.0, y), rtol=0, atol=1e-6)


def test_old_attention_names_and_fp16_variant(folder):
    """Older diffusers files name attention query / key / value / proj_attn; a folder may hold only the
    fp16 variant: both read back to the same weights (fp16: to half precision)."""
    from safetensors.torch import load_file, save_file
    _, out = folder
    sd = f_of(checkpoints.load(out)).state_dict()  # as written
    w = out / "unet" / diffusers_io.WEIGHTS
    new = load_file(w)
    old = {k.replace(".to_q.", ".query.").replace(".to_k.", ".key.").replace(".to_v.", ".value.")
            .replace(".to_out.0.", ".proj_attn."): v for k, v in new.items()}
    assert old.keys() != new.keys()
    save_file(old, w)
    back = f_of(checkpoints.load(out)).state_dict()
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    w.unlink()
    save_file({k: v.half() for k, v in new.items()}, w.with_name("diffusion_pytorch_model.fp16.safetensors"))
    back = f_of(checkpoints.load(out)).state_dict()
    assert all(torch.equal(back[k], sd[k].half().float()) for k in sd)


def test_qkv_permutation_is_its_own_inverse():
    """legacy (heads, three, dim) -> (three, heads, dim) and back, on labelled rows."""
    heads, dim = 2, 3
    w = torch.arange(3 * heads * dim, dtype=torch.float32)[:, None]
    new = diffusers_io._qkv_order(w, heads, legacy_to_new=True)
    # legacy row (h, s, d) = h*3*dim + s*dim + d lands at (s, h, d) = s*heads*dim + h*dim + d
    rows = [h * 3 * dim + s * dim + d for s in range(3) for h in range(heads) for d in range(dim)]
    want = torch.tensor(rows, dtype=torch.float32)[:, None]
    assert torch.equal(new, want)
    assert torch.equal(diffusers_io._qkv_order(new, heads, legacy_to_new=False), w)


def test_cli_convert_and_sample(tmp_path, capsys):
    """python -m full.convert EXPORT --to diffusers, then full.sample --checkpoint FOLDER (kind ct given)."""
    state = make_state(cond_net(), ts=(0, 106, 200), grid_steps=201, mode="ct")
    src = checkpoints.export(tmp_path / "export.pt", {0.0: f_of(state)}, checkpoints.config_of(state), 7)
    out = tmp_path / "diffusers-ct_tiny"
    full.convert.main([str(src), "--to", "diffusers", "--out", str(out)])
    full.convert.main([str(out), "--kind", "ct", "--out", str(tmp_path / "back.pt")])  # folder -> .pt
    assert checkpoints.config_of(checkpoints.load(tmp_path / "back.pt")).cm.mode == "ct"
    assert json.loads((out / "scheduler/scheduler_config.json").read_text())["num_train_timesteps"] == 201
    back = checkpoints.load(out)
    assert checkpoints.config_of(back).cm.mode == "ct"  # the diffusers- prefix is skipped
    assert checkpoints.config_of(back).run.ts == (0, 200)  # no ts in the folder, none known for the name
    full.sample.main(["--checkpoint", str(out), "--num-samples", "2", "--ts", "0,106,200",
                      "--out", str(tmp_path / "s")])
    assert (tmp_path / "s" / "samples.npz").is_file()
    assert "diffusers ConsistencyModelPipeline folder" in capsys.readouterr().out


def test_safetensors_export_round_trip(tmp_path):
    state = make_state(uncond_net())
    state["ema"][0.999] = {k: v + 1 for k, v in state["ema"][0.0].items()}
    out = tmp_path / "e.safetensors"
    full.convert.main([_write_pt(state, tmp_path), "--to", "safetensors", "--out", str(out)])
    back = checkpoints.load(out)
    assert back["config"] == state["config"] and back["step"] == state["step"]
    assert back["ema"].keys() == state["ema"].keys()
    for r in state["ema"]:
        assert back["ema"][r].keys() == state["ema"][r].keys()
        assert all(torch.equal(back["ema"][r][k], v) for k, v in state["ema"][r].items())


@pytest.mark.parametrize("head", ["[" * 100_000, "{", "[1, 2]", '{"rates": "x"}'],
                         ids=["deep", "torn", "list", "retyped"])
def test_a_safetensors_export_with_a_hostile_header_is_one_line(tmp_path, head):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    out = diffusers_io.write_safetensors(make_state(uncond_net()), tmp_path / "e.safetensors")
    with safe_open(out, "pt") as f:
        meta = f.metadata()
    save_file(load_file(out), out, metadata=meta | {diffusers_io._META: head})
    with pytest.raises(CMError) as e:
        checkpoints.load(out)
    assert "\n" not in str(e.value) and str(out) in str(e.value)


def _write_pt(state: dict, tmp_path) -> str:
    from cm import save_checkpoint
    save_checkpoint(tmp_path / "src.pt", state)
    return str(tmp_path / "src.pt")


# ----------------------------------------------------------------------------------------------
# What cannot be converted, and damaged folders: one line each


@pytest.mark.parametrize("why, state", [
    ("EDM teacher", lambda: make_state(cond_net(), mode="edm")),
    ("other eps", lambda: make_state(cond_net(), eval_sigma_min=0.0)),
    ("channel_mult[0]", lambda: make_state(dataclasses.replace(cond_net(), channel_mult=(2, 2)))),
])
def test_refused(tmp_path, why, state):
    with pytest.raises(CMError) as e:
        write_folder(state(), tmp_path / "x")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "x" / "model_index.json").exists()


def test_cli_refusal_is_one_line(tmp_path, capsys):
    src = _write_pt(make_state(cond_net(), mode="edm"), tmp_path)
    with pytest.raises(SystemExit) as e:
        full.convert.main([src, "--to", "diffusers", "--out", str(tmp_path / "x")])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "cm.mode=edm" in err


def test_ncsnpp_refused():
    with pytest.raises(CMError, match="ADM"):
        diffusers_io.unet_config(NCSNppConfig.tiny())


def _damage(out, what):
    if what == "bin only":
        (out / "unet" / diffusers_io.WEIGHTS).rename(out / "unet" / "diffusion_pytorch_model.bin")
    elif what == "conv downsampling":
        c = json.loads((out / "unet/config.json").read_text())
        c["downsample_type"] = "conv"
        (out / "unet/config.json").write_text(json.dumps(c))
    elif what == "missing tensor":
        from safetensors.torch import load_file, save_file
        t = load_file(out / "unet" / diffusers_io.WEIGHTS)
        del t["mid_block.attentions.0.to_k.weight"]
        save_file(t, out / "unet" / diffusers_io.WEIGHTS)
    elif what == "truncated":
        p = out / "unet" / diffusers_io.WEIGHTS
        p.write_bytes(p.read_bytes()[:1000])
    elif what == "other scheduler":
        (out / "model_index.json").write_text(json.dumps({"unet": ["diffusers", "UNet2DModel"],
                                                          "scheduler": ["diffusers", "DDPMScheduler"]}))
    elif what == "bad json":
        (out / "unet/config.json").write_text("{")
    elif what == "deep json":  # deeper than json.loads recurses: a RecursionError there
        (out / "model_index.json").write_text("[" * 100_000)
    elif what == "not utf-8":
        (out / "scheduler/scheduler_config.json").write_bytes(b'{"a": "\xff"}')


@pytest.mark.parametrize("what", ["bin only", "conv downsampling", "missing tensor", "truncated",
                                  "other scheduler", "bad json", "deep json", "not utf-8"])
def test_damaged_folder_one_line(tmp_path, what):
    out = write_folder(make_state(cond_net()), tmp_path / "cd_x")
    _damage(out, what)
    with pytest.raises(CMError) as e:
        checkpoints.load(out)
    assert "\n" not in str(e.value) and str(out) in str(e.value)


def test_without_safetensors_one_line(tmp_path, monkeypatch):
    out = write_folder(make_state(cond_net()), tmp_path / "cd_x")
    monkeypatch.setitem(sys.modules, "safetensors", None)  # import safetensors -> ImportError
    with pytest.raises(CMError, match="pip install safetensors"):
        checkpoints.load(out)


@st.composite
def adm_nets(draw) -> ADMConfig:
    levels = draw(st.integers(1, 3))
    mult = (1,) + tuple(draw(st.sampled_from((1, 2))) for _ in range(levels - 1))
    size = 2 ** (levels - 1) * draw(st.sampled_from((2, 4)))
    attn = tuple(size // 2 ** lv for lv in range(levels) if draw(st.booleans()))
    return ADMConfig(image_size=size, in_channels=draw(st.sampled_from((1, 3))), out_channels=3,
                     model_channels=32, channel_mult=mult, num_res_blocks=draw(st.integers(1, 2)),
                     attention_resolutions=attn, num_head_channels=draw(st.sampled_from((16, 32))),
                     num_classes=draw(st.sampled_from((0, 5))), use_scale_shift_norm=draw(st.booleans()),
                     legacy_qkv_order=draw(st.booleans()))


@settings(max_examples=12)
@given(net=adm_nets(), seed=st.integers(0, 2 ** 16))
def test_any_adm_loads_strictly_and_computes_the_same(net, seed):
    """For ADMs of 1-3 levels, 1-2 blocks, attention anywhere, with or without classes / scale-shift /
    legacy qkv order: the converted tensors load strictly into UNet2DModel(**unet/config.json) and give
    ADMUNet's output; the config maps back to the same ADMConfig."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(seed)
    ours = build_network(net).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.1)
    config = diffusers_io.unet_config(net)
    unet = diffusers.UNet2DModel(**{k: v for k, v in config.items() if not k.startswith("_")}).eval()
    unet.load_state_dict(diffusers_io.to_diffusers(ours.state_dict(), net))  # strict: names and shapes
    x = torch.randn(2, net.in_channels, net.image_size, net.image_size)
    t = 1000 * 0.25 * torch.log(torch.tensor([80.0, 0.01]))
    y = torch.tensor([0, 4]) if net.num_classes else None
    with torch.no_grad():
        want, got = ours(x, t, y), unet(x, t, class_labels=y).sample
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5 * want.abs().max().item())
    assert diffusers_io.adm_config(json.loads(json.dumps(config)), "x") == \
        dataclasses.replace(net, legacy_qkv_order=False)


def hub_unet_config(size: int, width: int, mult, blocks: int, attn_from: int, classes, shift: str) -> dict:
    """unet/config.json as the Hub's converted CM folders have it (the settings of diffusers'
    scripts/convert_consistency_to_diffusers.py: attention from level `attn_from` on, resnet resampling)."""
    levels = range(len(mult))
    d = {"_class_name": "UNet2DModel", "sample_size": size, "in_channels": 3, "out_channels": 3,
         "layers_per_block": blocks, "num_class_embeds": classes,
         "block_out_channels": [width * m for m in mult], "attention_head_dim": 64,
         "down_block_types": ["AttnDownBlock2D" if lv >= attn_from else "ResnetDownsampleBlock2D"
                              for lv in levels],
         "up_block_types": ["AttnUpBlock2D" if lv >= attn_from else "ResnetUpsampleBlock2D"
                            for lv in reversed(levels)],
         "resnet_time_scale_shift": shift, "upsample_type": "resnet", "downsample_type": "resnet"}
    return d | ({"attn_norm_num_groups": 32} if shift == "scale_shift" else {})


def test_hub_configs_are_the_released_architectures():
    """The Hub folders' UNet configs read as the two released ADM architectures (full size, no weights)."""
    imagenet = hub_unet_config(64, 192, (1, 2, 3, 4), 3, 1, 1000, "scale_shift")
    lsun = hub_unet_config(256, 256, (1, 1, 2, 2, 4, 4), 2, 3, None, "default")
    assert diffusers_io.adm_config(imagenet, "x") == ADMConfig.imagenet64()
    assert diffusers_io.adm_config(lsun, "x") == ADMConfig.lsun256()
    with pytest.raises(CMError, match="attn_norm_num_groups"):  # scale-shift attention without its norm
        diffusers_io.adm_config(imagenet | {"attn_norm_num_groups": None}, "x")


def test_every_diffusers_tensor_is_mapped():
    """The mapping's image is exactly UNet2DModel's state dict, for both test nets (nothing left over)."""
    diffusers = pytest.importorskip("diffusers")
    for make in NETS.values():
        net = make()
        kmap = diffusers_io.key_map(net)
        theirs = {n for t in kmap.values() for n in (t if isinstance(t, tuple) else (t,))}
        with torch.device("meta"):
            unet = diffusers.UNet2DModel(**{k: v for k, v in diffusers_io.unet_config(net).items()
                                            if not k.startswith("_")})
        assert theirs == set(unet.state_dict())
        assert diffusers_io.adm_config(diffusers_io.unet_config(net), "x") == \
            dataclasses.replace(net, legacy_qkv_order=False)


def test_arch_and_kind_are_refused_for_files_that_name_their_own(tmp_path):
    """--arch and --kind fill in what a released guided-diffusion .pt leaves out; given for a diffusers
    folder (--arch) or a full/ safetensors export (either), they were ignored without a word."""
    state = make_state(cond_net())
    folder = write_folder(state, tmp_path / "cd_x")
    diffusers_io.write_safetensors(state, tmp_path / "e.safetensors")
    for path, arch, kind in [(folder, "imagenet64", ""), (tmp_path / "e.safetensors", "imagenet64", ""),
                             (tmp_path / "e.safetensors", "", "ct")]:
        flag = "--arch" if arch else "--kind"
        with pytest.raises(CMError, match=f"^{flag} \\(run.teacher_{flag[2:]}\\) applies to a released"):
            checkpoints.load(path, arch, kind)
    assert checkpoints.load(folder, kind="ct")["config"]["cm"]["mode"] == "ct"  # a folder's --kind: read
