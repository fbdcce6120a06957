"""The network F of full/networks.py wrapped in cm.ConsistencyFunction (architecture ≠ parameterization).

    f_θ(x, t) = c_skip(t) x + c_out(t) F_θ(c_in(t) x, c_noise(t))   [CM Eq. 7], ε = sigma_min
    D(x, t)   = the same with ε = 0, EDM's denoiser                  [EDM Tab. 1] (the CD teacher)
"""
from __future__ import annotations

import torch.nn as nn

from cm import RECIPES, ConsistencyFunction
from full.networks import build_network


def make_model(cfg, denoiser: bool | None = None) -> ConsistencyFunction:
    """f_θ for a RunConfig (D_θ when `denoiser`, by default for edm and for ect, which tunes EDM's D)."""
    denoiser = RECIPES[cfg.cm.mode].denoiser if denoiser is None else denoiser
    return ConsistencyFunction(build_network(cfg.net), cfg.cm.sigma_data,
                               0.0 if denoiser else cfg.cm.sigma_min, cfg.cm.noise_cond)


def image_shape(net) -> tuple[int, int, int]:
    """(C, H, W) of the images a network config takes (NCSN++: img_resolution, ADM: image_size)."""
    res = net.img_resolution if hasattr(net, "img_resolution") else net.image_size
    return net.in_channels, res, res


def has_dropout(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Dropout) and m.p > 0 for m in module.modules())
