"""The network F of full/networks.py wrapped in its parameterization (architecture ≠ parameterization).

    f_θ(x, t) = c_skip(t) x + c_out(t) F_θ(c_in(t) x, c_noise(t))   [CM Eq. 7], ε = sigma_min
    D(x, t)   = the same with ε = 0, EDM's denoiser                  [EDM Tab. 1] (the CD teacher)
    f_θ(x_t, t) = cos(t) x_t - sin(t) σd F_θ(x_t / σd, c_noise(t))  [sCM Eq. 4] (sct, scd: cm.TrigFlow)
"""
from __future__ import annotations

import copy
import dataclasses

import torch
import torch.nn as nn

from cm import CMConfig, CMError, ConsistencyFunction, parameterize
from full.networks import build_network


def make_model(cfg, denoiser: bool | None = None) -> nn.Module:
    """The mode's model for a RunConfig (cm.parameterize: f_θ, D_θ for edm and ect, TrigFlow for sct and
    scd); `denoiser` True or False asks for D_θ or f_θ of the network whatever the mode."""
    if denoiser is None:
        return parameterize(cfg.cm, build_network(cfg.net))
    return ConsistencyFunction(build_network(cfg.net), cfg.cm.sigma_data,
                               0.0 if denoiser else cfg.cm.sigma_min, cfg.cm.noise_cond)


def check_buildable(cfg) -> None:
    """The net.* settings build a network (widths the group norms divide, dropout in [0, 1), ...), checked
    on the meta device (shapes only, no memory): a bad one is a one-line CMError before step 0."""
    try:
        with torch.device("meta"):
            build_network(cfg.net)
    except (ValueError, RuntimeError, ZeroDivisionError, TypeError, AssertionError, IndexError) as e:
        raise CMError(f"the net.* settings do not build a {cfg.arch} network: {str(e)[:100]}") from None


def for_sampling(cfg, f: nn.Module) -> tuple[nn.Module, CMConfig]:
    """(f, c) as cm.generate takes them for this run's samples. f: with the boundary ε of run.eval_sigma_min
    when set (locuslab/ect's ECMPrecond trains with ε = 0 and samples with ε = 0.003), a shallow copy
    sharing the weights. c: cm with the re-noising ε of run.renoise_sigma_min when set (ECT adds τ z)."""
    r = cfg.run
    if r.eval_sigma_min >= 0 and isinstance(f, ConsistencyFunction):
        f = copy.copy(f)
        f.sigma_min = r.eval_sigma_min
    c = cfg.cm if r.renoise_sigma_min < 0 else dataclasses.replace(cfg.cm, sigma_min=r.renoise_sigma_min)
    return f, c


def image_shape(net) -> tuple[int, int, int]:
    """(C, H, W) of the images a network config takes (NCSN++: img_resolution, ADM: image_size)."""
    res = net.img_resolution if hasattr(net, "img_resolution") else net.image_size
    return net.in_channels, res, res


def has_dropout(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Dropout) and m.p > 0 for m in module.modules())
