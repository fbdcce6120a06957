"""Named runs of the papers: each a RunConfig (full/config.py) with the hyperparameters of the paper.

    python -m full.train --preset cifar10-cd-lpips opt.lr=2e-4 run.out='runs/x' --print-config

Each paper run is one preset, with the
hyperparameters of [CM Tab. 3] (CM) and [EDM Tab. 7 / training configs] (teachers); where the official
launch scripts (openai/consistency_models scripts/launch.sh) differ, a comment says so. The `tiny-*`
presets run on a laptop CPU in seconds (8x8 digits, ~0.1M-parameter networks) for tests and smoke runs.

References
    [CM]  Song, Dhariwal, Chen, Sutskever. Consistency Models. arXiv:2303.01469v2 (Tab. 3, App. C).
    [EDM] Karras, Aittala, Aila, Laine. Elucidating the Design Space of Diffusion-Based Generative
          Models. arXiv:2206.00364 (App. F: training configurations).
    [sCM] Lu, Song. Simplifying, Stabilizing and Scaling Continuous-Time Consistency Models.
          arXiv:2410.11081 (Sec. 4); OpenAI released no code, so the run lengths, EMAs and optimiser lines
          of the sCM presets are NVlabs/FastGen's (configs/methods/config_scm.py, experiments/EDM/*scm*).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

from cm import CMConfig, CMError, exit_on, interrupts_as_errors, readers
from full.config import (
    CLIParser,
    DataSection,
    EMASection,
    OptSection,
    RunConfig,
    RunSection,
    apply_override,
    checked,
    ema_beta,
    to_json,
)
from full.model import check_buildable
from full.networks import ADMConfig, NCSNppConfig

# ----------------------------------------------------------------------------------------------
# Presets: one per paper run [CM Tab. 3], the EDM teachers, and CPU-sized tiny runs


def _cifar10(mode: str, lr: float = 4e-4, **cm) -> RunConfig:
    """CIFAR-10, NCSN++ ~56M, RAdam lr 4e-4 (CD-l1 2e-4), batch 512, 800k steps, EMA 0.9999.  [CM Tab. 3]"""
    # fp32: the official CIFAR-10 runs are JAX in fp32 (override with opt.precision='bf16')
    return RunConfig(net=NCSNppConfig.cifar10(), cm=CMConfig(mode=mode, **cm),
                     opt=OptSection("radam", lr, batch=512, steps=800_000, precision="fp32"),
                     ema=EMASection((0.9999,), eval_rate=0.9999),
                     data=DataSection("cifar10", "data/cifar10"),
                     run=RunSection(ts=(0, 11, 17), grid_steps=18))


# ImageNet-64 / LSUN-256 (ADM). The official scripts keep three eval EMAs; 0.9999432189950708 is
# EDM's half-life of 50 Mimg at batch 4096, the rate [CM Tab. 3] quotes as 0.999943 and evaluates.
# Precision: the official runs train these in fp16 (fp32 master weights, dynamic loss scaling), which
# is fp16 autocast + GradScaler here (CUDA only).
_EVAL_EMA = 0.9999432189950708
_ADM_EMAS = (0.999, 0.9999, _EVAL_EMA)


def _imagenet64(mode: str, lr: float, steps: int, ts=(0, 22, 39), grid_steps=40, **cm) -> RunConfig:
    """ImageNet-64 (class-conditional), ADM ~296M, batch 2048, c_noise of the ADM code.  [CM Tab. 3]"""
    return RunConfig(net=ADMConfig.imagenet64(), cm=CMConfig(mode=mode, noise_cond="adm", **cm),
                     opt=OptSection("radam", lr, batch=2048, steps=steps, precision="fp16"),
                     ema=EMASection(_ADM_EMAS, eval_rate=_EVAL_EMA),
                     data=DataSection("imagenet64", "data/imagenet64", class_cond=True),
                     run=RunSection(ts=ts, grid_steps=grid_steps))


def _lsun256(mode: str, steps: int, ts: tuple, grid_steps: int, **cm) -> RunConfig:
    """LSUN-256 bedroom or cat (the same recipe; point data.root at either), ADM ~526M.  [CM Tab. 3]

    Paper: batch 2048, lr 1e-5. The launch scripts use batch 256 (and lr 5e-5 for CT)."""
    return RunConfig(net=ADMConfig.lsun256(), cm=CMConfig(mode=mode, noise_cond="adm", **cm),
                     opt=OptSection("radam", 1e-5, batch=2048, steps=steps, precision="fp16"),
                     ema=EMASection((0.9999, 0.99994, _EVAL_EMA), eval_rate=_EVAL_EMA),
                     data=DataSection("folder", "data/lsun_bedroom", resolution=256),
                     run=RunSection(ts=ts, grid_steps=grid_steps))


def _edm_ocm(base: RunConfig, net, batch: int, steps: int) -> RunConfig:
    """An EDM teacher as openai/consistency_models' scripts/edm_train.py ran it (scripts/launch.sh):
    RAdam lr 1e-4 without warm-up, fp16, dropout 0.1, EMAs 0.999, 0.9999, 0.999943, ln t ~ N(-1.2, 1.2²).
    The script sets no length (lr_anneal_steps 0 trains until stopped): `steps` is our choice."""
    return dataclasses.replace(base, net=net, opt=OptSection("radam", 1e-4, batch=batch, steps=steps,
                                                             precision="fp16"),
                               ema=EMASection(_ADM_EMAS, eval_rate=_EVAL_EMA))


def _ect(net: NCSNppConfig, run: RunSection) -> RunConfig:
    """ECT on CIFAR-10 (locuslab/ect run_ecm.sh and ct_train.py's defaults; see the two presets)."""
    return dataclasses.replace(
        _cifar10("ect", metric="l2_norm", P_mean=-1.1, P_std=2.0, q=2.0, stage_steps=25_000), net=net,
        opt=OptSection("radam", 1e-4, batch=128, steps=200_000, precision="fp32"),
        data=DataSection("cifar10", "data/cifar10", random_flip=False), run=run)


def _tiny(mode: str, **cm) -> RunConfig:
    """8x8 digits, tiny NCSN++ (~0.1M), batch 32, l2, fp32: a few seconds on a CPU."""
    net = dataclasses.replace(NCSNppConfig.tiny(8), in_channels=1, out_channels=1)
    return RunConfig(net=net, cm=CMConfig(**{"mode": mode, "metric": "l2", **cm}),
                     opt=OptSection("adam" if mode == "edm" else "radam", 1e-3 if mode == "edm" else 2e-4,
                                    batch=32, steps=20, precision="fp32"),
                     ema=EMASection((0.99, 0.999), warmup=True),
                     data=DataSection("digits", "", random_flip=False, num_workers=0),
                     run=RunSection(ckpt_every=10, keep_last=2, log_every=5, sample_every=0, sample_num=16,
                                    ts=(0, 8, 17), grid_steps=18))


def _with_positional(cfg: RunConfig) -> RunConfig:
    return dataclasses.replace(cfg, net=dataclasses.replace(cfg.net, embedding="positional"))


def _scm(net, mode: str, steps: int) -> RunConfig:
    """sCT / sCD on CIFAR-10 [sCM Sec. 4; FastGen's config_sct_cifar10.py, config_scd_cifar10.py]."""
    base = _cifar10(mode, noise_cond="trig" if mode == "sct" else "edm", P_mean=-1.0, P_std=1.4,
                    tangent_warmup=10_000, tangent_c=0.1)
    t_mid = 0.5 * math.tan(1.1)
    return dataclasses.replace(base, net=net, opt=OptSection("radam", 1e-4, betas=(0.9, 0.99), grad_clip=10.0,
                                                             batch=512, steps=steps, precision="fp32"),
                               ema=EMASection((0.9999, 0.99995, 0.9996), eval_rate=0.9999),
                               run=RunSection(sigmas=(80.0, t_mid)))


def _scm_imagenet64(mode: str) -> RunConfig:
    """sCT / sCD on ImageNet-64, ADM [sCM Sec. 4; FastGen's config_scd_in64.py]."""
    base = _imagenet64(mode, 7e-5, 600_000, P_mean=-1.0, P_std=1.6, tangent_warmup=10_000, tangent_c=0.1)
    opt = OptSection("adam", 7e-5, betas=(0.9, 0.99), eps=1e-11, grad_clip=10.0, batch=1024, steps=600_000,
                     precision="bf16")
    return dataclasses.replace(base, opt=opt,
                               ema=EMASection((0.9999, 0.99995, 0.9996), eval_rate=0.9999),
                               run=RunSection(sigmas=(80.0, 0.5 * math.tan(1.1))))


PRESETS: dict[str, Callable[[], RunConfig]] = {
    # EDM teacher for CIFAR-10 CD as the official JAX config ran it (configs/cifar10_k_ve.py): NCSN++ (VE),
    # dropout 0.13, Adam lr 1e-3 with a 10 Mimg ramp, batch 512, 400k steps (n_iters 400,001), EMA
    # half-life 0.5 Mimg, fp32. [EDM App. F.1] (EDM's non-leaky augmentation is not implemented.)
    "cifar10-edm": lambda: dataclasses.replace(
        _cifar10("edm"), net=NCSNppConfig.cifar10(dropout=0.13),
        opt=OptSection("adam", 1e-3, warmup=19_531, batch=512, steps=400_000, precision="fp32"),
        ema=EMASection((ema_beta(512, 5e5),))),
    "cifar10-cd-lpips": lambda: _cifar10("cd", N=18, mu=0.0, metric="lpips"),
    "cifar10-cd-l2": lambda: _cifar10("cd", N=18, mu=0.0, metric="l2"),
    "cifar10-cd-l1": lambda: _cifar10("cd", 2e-4, N=18, mu=0.0, metric="l1"),  # launch.sh: lr 2e-4 for l1
    "cifar10-ct": lambda: _cifar10("ct", s0=2, s1=150, mu0=0.9, metric="lpips"),
    # EDM's ImageNet-64 ADM teacher: dropout 0.1, Adam lr 2e-4, batch 4096, 2500 Mimg, EMA half-life 50 Mimg,
    # fp16 [EDM App. F.1]; and the same network as OCM's edm_train ran it (released: edm_imagenet64_ema.pt).
    "imagenet64-edm": lambda: dataclasses.replace(
        _imagenet64("edm", 2e-4, 610_352), net=ADMConfig.imagenet64(dropout=0.1),
        opt=OptSection("adam", 2e-4, warmup=2_441, batch=4096, steps=610_352, precision="fp16"),
        ema=EMASection((ema_beta(4096, 5e7),))),
    "imagenet64-edm-ocm": lambda: _edm_ocm(_imagenet64("edm", 1e-4, 610_352),
                                           ADMConfig.imagenet64(dropout=0.1), batch=4096, steps=610_352),
    "imagenet64-cd-lpips": lambda: _imagenet64("cd", 8e-6, 600_000, N=40, mu=0.95, metric="lpips_piq"),
    "imagenet64-cd-l2": lambda: _imagenet64("cd", 8e-6, 600_000, N=40, mu=0.95, metric="l2"),
    # Paper lr 8e-6; the launch script uses 1e-4, and passes a teacher that CT starts from (run.teacher=...).
    # Two-step ts of the launch scripts: CT 0,106,200 of 201, LSUN CD-lpips 0,17,39 and CD-l2 0,18,39 of 40,
    # LSUN bedroom CT 0,67,150 of 151 (cat: 0,62,150).
    "imagenet64-ct": lambda: _imagenet64("ct", 8e-6, 800_000, ts=(0, 106, 200), grid_steps=201,
                                         s0=2, s1=200, mu0=0.95, metric="lpips_piq"),
    # LSUN-256 EDM teachers (bedroom, cat) as OCM's launch script trains them: batch 256, no scale-shift norm.
    "lsun256-edm": lambda: _edm_ocm(_lsun256("edm", 600_000, (0, 17, 39), 40),
                                    ADMConfig.lsun256(dropout=0.1), batch=256, steps=600_000),
    "lsun256-cd-lpips": lambda: _lsun256("cd", 600_000, (0, 17, 39), 40, N=40, mu=0.95, metric="lpips_piq"),
    "lsun256-cd-l2": lambda: _lsun256("cd", 600_000, (0, 18, 39), 40, N=40, mu=0.95, metric="l2"),
    "lsun256-ct": lambda: _lsun256("ct", 1_000_000, (0, 67, 150), 151, s0=2, s1=150, mu0=0.95,
                                   metric="lpips_piq"),
    # iCT [iCT Sec. 3-5]: no teacher, μ = 0, pseudo-Huber, s0 10 -> s1 1280 doubling, lognormal n
    # (P_mean -1.1, P_std 2.0), λ = 1/(t_{n+1} - t_n), dropout 0.3, Fourier scale 0.02, two steps at
    # (80, 0.821). Optimiser RAdam lr 1e-4, batch 1024, eval EMA 0.99993, 400k steps: the paper has no code,
    # and its own appendix text on these was not retrievable when this was written (the stored copies of
    # arXiv 2310.14189 / ICLR 2024 return its abstract and introduction only); a secondary summary of the
    # paper states the same optimiser, lr, batch and EMA. Check the appendix before quoting them.
    "cifar10-ict": lambda: dataclasses.replace(
        _cifar10("ict", s0=10, s1=1280, mu=0.0, metric="pseudo_huber", P_mean=-1.1, P_std=2.0),
        net=dataclasses.replace(NCSNppConfig.cifar10(dropout=0.3), fourier_scale=0.02),
        opt=OptSection("radam", 1e-4, batch=1024, steps=400_000, precision="fp32"),
        ema=EMASection((0.99993,)), run=RunSection(sigmas=(80.0, 0.821))),
    # ECT (locuslab/ect run_ecm.sh, ct_train.py defaults): tune the EDM teacher (run.teacher), RAdam lr 1e-4,
    # batch 128, dropout 0.2, 25.6 Mimg = 200k steps, a stage every 250 ticks x 12.8 kimg = 25k steps,
    # q 2, ln t ~ N(-1.1, 2.0²), ‖·‖₂ (c = 0), eval EMA 0.9999, two steps at (80, 0.821), no flips
    # (--augment 0, --xflip False). cifar10-ect is the one-teacher variant: its network is the teacher's
    # (NCSN++ as cifar10-edm trains it, the teacher of CD and CT here) and it samples as the CM codes do
    # (ε = 0 wrapper, clamped two-step, truncated uint8). cifar10-ect-vp is the official run.
    "cifar10-ect": lambda: _ect(NCSNppConfig.cifar10(dropout=0.2), RunSection(sigmas=(80.0, 0.821))),
    # ECT's CIFAR-10 run as locuslab/ect runs it (run_ecm.sh; its --transfer is EDM's VP pickle: pass
    # run.teacher=edm-cifar10-32x32-uncond-vp.pkl). ct_train.py --arch ddpmpp: SongUNet, positional
    # embedding, standard encoder/decoder, channel_mult_noise 1, resample_filter [1,1], 128 channels,
    # mult [2,2,2] (NCSNppConfig.ddpmpp_cifar10). The VP weights are copied into ECMPrecond
    # (training/networks.py): c_noise = ln(σ)/4, scalings with ε = 0 in train mode, sigma_min = 0.003 in
    # eval mode. Sampling as training/ct_training_loop.py generator_fn: x = net(x, t) unclamped, then
    # x + t_next z (no √(t² - ε²)); uint8 as metrics/metric_utils.py: (x·127.5 + 128).clamp(0, 255).
    "cifar10-ect-vp": lambda: _ect(NCSNppConfig.ddpmpp_cifar10(dropout=0.2), RunSection(
        sigmas=(80.0, 0.821), eval_sigma_min=0.003, renoise_sigma_min=0.0, clamp_mid=False, uint8="round")),
    # sCT / sCD [sCM] on CIFAR-10: DDPM++ (NCSNppConfig.ddpmpp_cifar10: positional time features, the
    # architecture change sCM makes for stability: large-scale Fourier features make dF/dt explode), RAdam
    # lr 1e-4 β (0.9, 0.99), batch 512, gradient norm clipped at 10, EMAs 0.9999 / 0.99995 / 0.9996,
    # t ~ arctan(e^τ / σd), τ ~ N(-1.0, 1.4²), tangent warm-up 10k steps, c = 0.1; sCT 350k steps with
    # dropout 0.2, sCD 500k without. Two steps at the paper's t_mid = 1.1 (σ = σd tan 1.1). sCD distils an
    # EDM denoiser of the same network, run.teacher=edm-cifar10-32x32-uncond-vp.pkl (EDM's DDPM++ VP model,
    # which FastGen also starts both from; its weights run under EDM's c_noise = ln(σ)/4 as cm.noise_cond
    # 'edm'). sCT trains TrigFlow's c_noise = t from scratch; with run.teacher it starts from the teacher
    # (then set cm.noise_cond='edm'). fp32; the JVP runs in the training precision.
    "cifar10-sct": lambda: _scm(NCSNppConfig.ddpmpp_cifar10(dropout=0.2), "sct", 350_000),
    "cifar10-scd": lambda: _scm(NCSNppConfig.ddpmpp_cifar10(dropout=0.0), "scd", 500_000),
    # ImageNet-64 [sCM] on ADM (class-conditional; EDM's ADM teacher, edm-imagenet-64x64-cond-adm.pkl, or an
    # imagenet64-edm export): Adam lr 7e-5 β (0.9, 0.99) ε 1e-11, batch 1024, 600k steps, clip 10, bf16
    # with the JVP in fp32 (here: in the training precision; set opt.precision='fp32' to match), τ ~
    # N(-1.0, 1.6²). FastGen decays the lr as 1/√(k/35000) after 35k steps; not implemented here (constant).
    # imagenet64-sct takes the same settings without a teacher (no public config states sCT's).
    "imagenet64-scd": lambda: _scm_imagenet64("scd"),
    "imagenet64-sct": lambda: _scm_imagenet64("sct"),
    # tiny-sct embeds t as the paper's DDPM++ does (positional, frequencies up to 1; NCSN++'s Fourier features
    # of scale 16 make dF/dt large [sCM Sec. 4.1]); tiny-scd keeps its tiny-edm teacher's network.
    "tiny-sct": lambda: _with_positional(_tiny("sct", noise_cond="trig", tangent_warmup=5)),
    "tiny-scd": lambda: _tiny("scd", tangent_warmup=5),
    "tiny-edm": lambda: _tiny("edm"),
    "tiny-cd": lambda: _tiny("cd", N=18, mu=0.0),
    "tiny-ct": lambda: _tiny("ct", s0=2, s1=20, mu0=0.9),
    "tiny-ict": lambda: _tiny("ict", s0=2, s1=16, metric="pseudo_huber", P_mean=-1.1, P_std=2.0),
    "tiny-ect": lambda: _tiny("ect", metric="l2_norm", P_mean=-1.1, P_std=2.0, stage_steps=5),
    # Class-conditional path (ADM, labels 0..9) at CPU size.
    "tiny-ct-adm": lambda: dataclasses.replace(
        _tiny("ct", s0=2, s1=20, mu0=0.9),
        net=dataclasses.replace(ADMConfig.tiny(8, num_classes=10), in_channels=1, out_channels=1),
        cm=CMConfig("ct", noise_cond="adm", s0=2, s1=20, mu0=0.9, metric="l2"),
        data=DataSection("digits", "", random_flip=False, class_cond=True, num_workers=0)),
}


def get_preset(name: str) -> RunConfig:
    """The preset `name`, its `preset` field filled in."""
    if name not in PRESETS:
        raise CMError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name](), preset=name)


def resolve(preset: str, overrides: Sequence[str] = ()) -> RunConfig:
    """The preset with the overrides applied in order (then validated again)."""
    cfg = get_preset(preset)
    for item in overrides:
        cfg = apply_override(cfg, item)
    cfg = checked(cfg)
    given = {item.removeprefix("--").partition("=")[0].partition(".")[2] for item in overrides
             if item.removeprefix("--").startswith(("cm.", "run.ts=", "run.grid_steps=", "run.sigmas="))}
    given = {"ts" if k == "sigmas" else k for k in given}  # two-step levels: not read by edm's Heun grid
    if unread := sorted(k for k in given if cfg.cm.mode not in readers(k)):  # cm.ablate for ct: ignored
        raise CMError(f"cm.mode={cfg.cm.mode} does not read " + "; ".join(
            f"{'run' if k in ('ts', 'grid_steps') else 'cm'}.{k} (a setting of {', '.join(readers(k))})"
            for k in unread))
    check_buildable(cfg)
    return cfg


def main(argv: Sequence[str] | None = None) -> None:
    """List the presets (or print one resolved)."""
    p = CLIParser(description=main.__doc__)
    p.add_argument("--preset", default=None)
    args, rest = p.parse_known_args(argv)
    try:
        with interrupts_as_errors(note=""):  # Ctrl-C, a closed pipe or a full device on stdout: one line
            if args.preset is None:
                for name in PRESETS:
                    c = get_preset(name)
                    print(f"{name:20s} {c.arch:7s} {c.cm.mode:4s} batch {c.opt.batch:5d} lr {c.opt.lr:<8g} "
                          f"steps {c.opt.steps}")
                return
            print(to_json(resolve(args.preset, rest)))
    except CMError as e:
        exit_on(e)


if __name__ == "__main__":
    main()
