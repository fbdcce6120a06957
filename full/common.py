"""The plumbing shared by cm.py and full/: errors and range checks, pixel conversion, the LPIPS wrappers,
atomic files, the checkpoint container and resume, run folders, device choice, autocast, sample grids,
the distances a run reports (energy, FID), and a dataclass as command-line flags.

Nothing here is the method (that is cm.py, read top to bottom); cm.py imports these names back, so
`cm.X` and `full.common.X` are the same object. This module never imports cm (cm imports it).
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import math
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


# ----------------------------------------------------------------------------------------------
# Errors and range checks

class CMError(RuntimeError):
    """A user-facing error (bad input, a run that cannot go on): every main() of cm.py and full/ prints its
    message as one line and exits with status 1 (argparse's usage errors exit with 2). Nothing else is
    caught, so a programming error still shows its traceback."""


def exit_on(e: CMError):
    """What every main() does with a CMError: `error: <message>` as one line on stderr, exit status 1."""
    print("error: " + " ".join(str(e).split()), file=sys.stderr, flush=True)
    raise SystemExit(1) from None


SIGMA_MAX_LIMIT = 1e4  # far above any paper's T = 80; beyond it float32 images lose their signal


def check_math(prefix: str = "", **v) -> None:
    """Range checks of the math settings shared by cm.py and full/ (a CMError names the first bad one):
    finite numbers, 0 < sigma_min < sigma_max <= 1e4, sigma_data > 0, rho > 0, N >= 2, 2 <= s0 <= s1,
    0 <= mu < 1, 0 < mu0 < 1, every EMA rate in [0, 1)."""
    for k, x in v.items():
        for y in (x if isinstance(x, (list, tuple)) else [x]):
            if not isinstance(y, (int, float)) or not math.isfinite(y):
                raise CMError(f"{prefix}{k} must be a finite number, got {y!r}")
    if not 0 < v["sigma_min"] < v["sigma_max"] <= SIGMA_MAX_LIMIT:
        raise CMError(f"need 0 < {prefix}sigma_min < {prefix}sigma_max <= {SIGMA_MAX_LIMIT:g} "
                      f"(got {v['sigma_min']}, {v['sigma_max']})")
    if v["sigma_data"] <= 0 or v["rho"] <= 0:
        raise CMError(f"need {prefix}sigma_data > 0 and {prefix}rho > 0 (got {v['sigma_data']}, {v['rho']})")
    if v["N"] < 2 or v["s0"] < 2 or v["s1"] < v["s0"]:
        raise CMError(f"need {prefix}N >= 2 and 2 <= {prefix}s0 <= {prefix}s1 "
                      f"(got N={v['N']}, s0={v['s0']}, s1={v['s1']})")
    if not (0 <= v["mu"] < 1 and 0 < v["mu0"] < 1 and v["ema"] and all(0 <= e < 1 for e in v["ema"])):
        raise CMError(f"need 0 <= {prefix}mu < 1, 0 < {prefix}mu0 < 1 and EMA rates in [0, 1) "
                      f"(got mu={v['mu']}, mu0={v['mu0']}, ema={v['ema']})")


# ----------------------------------------------------------------------------------------------
# Pixels: uint8 [0, 255] <-> [-1, 1]

def uint8_to_unit(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Map uint8 pixels v to float32 v / 127.5 - 1 in [-1, 1] (0 -> -1, 255 -> 1 exactly); shape kept."""
    t = torch.as_tensor(np.array(x, dtype=np.uint8, copy=True))
    return t.to(torch.float32) / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] (B, C, H, W) -> uint8 (B, H, W, C): (v + 1) 127.5 clamped to [0, 255], then truncated.

    Truncation, not rounding, as both official codebases write the samples their FIDs were measured
    on (every value lands up to one level lower than rounding would put it; FID moves slightly)."""
    return ((x.float() + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


# ----------------------------------------------------------------------------------------------
# The LPIPS metrics d of [CM Sec. 5] (cm.METRICS holds them beside l2, l1, ...)

class LPIPS(nn.Module):
    """LPIPS(VGG) with inputs upsampled bilinearly to 224x224, images in [-1, 1].  [CM Sec. 5, App. C]

    The `lpips` package's network (max pooling), as the official CIFAR-10 (JAX) runs used it.
    `pretrained_backbone=False` gives a randomly initialised VGG (offline tests); the linear
    calibration layers ship inside the `lpips` package, the VGG16 weights are downloaded once."""

    avg_pool = False  # PiqLPIPS: average pooling, and no resize from 256 pixels up

    def __init__(self, pretrained_backbone: bool = True):
        super().__init__()
        try:
            import lpips
            with warnings.catch_warnings():  # lpips still uses torchvision's deprecated `pretrained=`
                warnings.simplefilter("ignore", UserWarning)
                self.net = lpips.LPIPS(net="vgg", pnet_rand=not pretrained_backbone, verbose=False)
        except Exception as e:  # no package, or no internet for the VGG16 weights
            raise CMError(f"LPIPS(VGG) is unavailable ({type(e).__name__}: {str(e)[:80]}); "
                          "use --metric l2 (or pip install lpips and allow the VGG16 download)") from e
        for block in self.net.net.children() if self.avg_pool else ():
            for name, layer in block.named_children():
                if isinstance(layer, nn.MaxPool2d):
                    setattr(block, name, nn.AvgPool2d(2, 2))
        self.net.eval().requires_grad_(False)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        if x.shape[1] == 1:  # grey images: repeat to RGB
            x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)
        if not self.avg_pool or x.shape[-1] < 256:
            x, y = (F.interpolate(v.float(), size=224, mode="bilinear", align_corners=False) for v in (x, y))
        return self.net(x.float(), y.float()).flatten(1).mean(1)


class PiqLPIPS(LPIPS):
    """piq's LPIPS(replace_pooling=True), as the official ImageNet-64 / LSUN-256 runs used it.

    The same VGG16 features and calibration with average instead of max pooling, and a resize to 224
    only for images below 256 pixels. piq standardises (x + 1)/2 by the ImageNet mean and std, which is
    exactly the `lpips` scaling layer on x in [-1, 1], so the inputs stay in [-1, 1] here."""

    avg_pool = True


# ----------------------------------------------------------------------------------------------
# Checkpoints: plain state dicts, written atomically, read with weights_only=True; run folders

CKPT_FORMAT = 1
# The two checkpoint kinds carry distinct markers ("kind"); files written before the marker existed
# are told apart by their config (a full/ config has an "arch").
KINDS = {"cm": ("a cm.py checkpoint", "python cm.py --sample PATH"),
         "full": ("a full/ checkpoint", "python -m full.sample --checkpoint PATH")}


def atomic_write(path: str | os.PathLike, write: Callable) -> Path:
    """write(fh) into a temporary file unique to this process, fsync it, then rename it over `path`: a
    crash (kill -9, power cut) never leaves a half-written file, and a failed write (disk full) leaves
    neither the file nor its temporary behind, only a one-line CMError."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())  # on disk before the rename, so a power cut cannot leave an empty file
        os.replace(tmp, path)
        if hasattr(os, "O_DIRECTORY"):  # and the rename itself on disk (POSIX: fsync the folder)
            fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
        tmp.unlink(missing_ok=True)
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0][:120]
        raise CMError(f"cannot write {path}: {why}") from None
    return path


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """torch.save through atomic_write."""
    atomic_write(path, lambda fh: torch.save(state, fh))


def checkpoint_kind(state) -> str | None:
    """'cm' or 'full' for a checkpoint dict of this project, None for anything else."""
    if not isinstance(state, dict) or state.get("format") != CKPT_FORMAT or \
            not isinstance(state.get("config"), dict):
        return None
    return state.get("kind") or ("full" if "arch" in state["config"] else "cm")


def read_weights_only(path: str | os.PathLike):
    """torch.load(path, weights_only=True): tensors and Python primitives only, so a pickle that would
    run code is refused unread. A missing, corrupt or truncated file is a one-line CMError."""
    path = Path(path)
    if not path.is_file():
        raise CMError(f"no checkpoint at {path}")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the one line below says it all
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, garbage bytes, pickled code
        raise CMError(f"cannot read checkpoint {path}: corrupt or truncated, or not a weights-only "
                      f"PyTorch file ({type(e).__name__})") from None


def load_checkpoint(path: str | os.PathLike, kind: str = "cm") -> dict:
    """Read a checkpoint of `kind` with weights_only=True (a pickle that would run code is refused
    unread); a missing, corrupt or foreign file, or one of the other kind, is a one-line CMError."""
    state = read_weights_only(path)
    found = checkpoint_kind(state)
    if found != kind:
        what, how = KINDS[found] if found else ("", "")
        raise CMError(f"{path} is not {KINDS[kind][0]} (format {CKPT_FORMAT})" +
                      (f"; it is {what}: use {how.replace('PATH', str(path))}" if found else ""))
    return state


def out_folder(path: str | os.PathLike, make: bool = False) -> Path:
    """--out as a folder: a file there is a one-line CMError; with `make` the folder is created (a one-line
    CMError if it cannot be)."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise CMError(f"--out {out} is a file, not a folder")
    if make:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CMError(f"cannot use {out} as the run folder: {e.strerror or e}") from None
    return out


class RunFolder:
    """The run folder, held with an OS lock for the life of the run (released on exit, kill -9 included):
    a second run in the same folder is refused with one line instead of sharing its files."""

    def __init__(self, out: str | os.PathLike):
        self.out = out_folder(out, make=True)
        try:
            self.fh = open(self.out / ".lock", "a")
        except OSError as e:
            raise CMError(f"cannot use {self.out} as the run folder: {e.strerror or e}") from None
        try:
            import fcntl  # POSIX; elsewhere runs are not locked
            fcntl.flock(self.fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:
            pass
        except OSError:
            self.fh.close()
            raise CMError(f"another process is running in {self.out} (it holds {self.out / '.lock'}); "
                          "wait for it or use another --out") from None

    def release(self) -> None:
        self.fh.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def changed_fields(saved: dict, now: dict, fields: Sequence[str]) -> list[str]:
    """The fields whose saved and current values differ (as 'name saved -> now')."""
    return [f"{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in fields if saved.get(k) != now.get(k)]


def finished(path: str | os.PathLike, steps: int) -> bool:
    """A checkpoint of a run of `steps` steps that reached its end."""
    if not Path(path).is_file():
        return False
    state = load_checkpoint(path)
    return state["step"] == state["config"]["steps"] == steps


def restore(state: dict, path: str | os.PathLike, device: torch.device, **modules) -> int:
    """Load a checkpoint's module and optimiser states (one that does not fit is a one-line CMError naming
    it) and its RNG states; returns its step."""
    for name, m in modules.items():
        try:
            m.load_state_dict(state[name])
        except (RuntimeError, KeyError, ValueError) as e:
            raise CMError(f"{path}: the {name} state does not fit this run ({type(e).__name__})") from None
    torch.set_rng_state(state["rng"])
    if device.type == "cuda" and "rng_cuda" in state:
        torch.cuda.set_rng_state(state["rng_cuda"], device)
    return state["step"]


# ----------------------------------------------------------------------------------------------
# Devices, autocast, sample grids, and the distances a run reports

def pick_device(name: str = "") -> torch.device:
    """--device: '' -> cuda if available, else cpu; an unknown name or an absent device -> CMError."""
    try:
        dev = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except (RuntimeError, ValueError):
        raise CMError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise CMError(f"device {name!r} is not available: this machine has "
                      f"{torch.cuda.device_count()} CUDA device(s); use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise CMError(f"device {name!r} is not supported; use cpu, cuda or cuda:N")
    return dev


def autocast_ctx(precision: str, device: torch.device):
    """torch.autocast for bf16/fp16, a no-op for fp32."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def under_autocast(fn: Callable, precision: str, device: torch.device) -> Callable:
    """fn under autocast_ctx: for the networks only, never the metric or the ODE arithmetic."""
    def call(*args, **kwargs):
        with autocast_ctx(precision, device):
            return fn(*args, **kwargs)
    return call


def check_levels(levels: Sequence[float], sigma_min: float, sigma_max: float = math.inf) -> list[float]:
    """Multistep levels τ_1 > τ_2 > ...: finite, strictly decreasing, within [ε, T] (a level at ε only
    re-noises by √(ε² - ε²) = 0); anything else is a ValueError. The one check of sampling and editing."""
    levels = [float(t) for t in levels]
    if not levels or not all(map(math.isfinite, levels)) or any(a <= b for a, b in zip(levels, levels[1:])) \
            or levels[-1] < sigma_min or levels[0] > sigma_max:
        raise ValueError(f"levels must be finite, strictly decreasing and within [sigma_min, sigma_max] = "
                         f"[{sigma_min}, {sigma_max}], got {levels}")
    return levels


def grid_name(how: str, step: int) -> str:
    """The file name of a sample grid, the same in cm.py and full/: grid-1step-0000800.png, grid-heun-..."""
    return f"grid-{how.replace('-', '')}-{step:07d}.png"


def save_grid(x: Tensor, path: Path, nrow: int | None = None) -> None:
    """PNG grid of images in [-1, 1] (tiny ones upscaled to 32 pixels), or a scatter plot of 2-D points."""
    if x.ndim == 2:
        from matplotlib.figure import Figure  # no pyplot: leaves a notebook's backend alone
        fig = Figure(figsize=(4, 4))
        ax = fig.subplots()
        ax.scatter(*x.cpu().T, s=2)
        ax.set(xlim=(-1.2, 1.2), ylim=(-1.2, 1.2), aspect="equal", title=path.stem)
        atomic_write(path, lambda fh: fig.savefig(fh, dpi=80, format="png"))
        return
    import torchvision
    x = (x.clamp(-1, 1) + 1) / 2
    if x.shape[-1] < 32:
        x = F.interpolate(x, scale_factor=32 // x.shape[-1], mode="nearest")
    nrow = nrow or max(1, int(math.sqrt(len(x))))
    atomic_write(path, lambda fh: torchvision.utils.save_image(x.float().cpu(), fh, format="png", nrow=nrow,
                                                               padding=2, pad_value=1))


def energy_distance(x: Tensor, y: Tensor) -> float:
    """Energy distance 2E‖X-Y‖ - E‖X-X'‖ - E‖Y-Y'‖ (zero iff same law; unbiased, so ≈ 0 can dip below)."""
    x, y = x.flatten(1).double(), y.flatten(1).double()
    off = lambda d: d.sum() / (d.numel() - d.shape[0])  # mean over i != j
    return (2 * torch.cdist(x, y).mean() - off(torch.cdist(x, x)) - off(torch.cdist(y, y))).item()


def fid_score(draw: Callable[[int, int], Tensor], num: int, batch: int, data: Tensor, out: Path, cache: dict,
              device: torch.device) -> float | None:
    """FID of `num` samples (draw(n, i): n samples, the i-th onward) against the training set, through
    full.evaluate (torch-fidelity's TF Inception, downloaded once). Where that cannot run (offline, no
    package): one line, None, and no more FIDs this run; training goes on."""
    if cache.get("off"):
        return None
    try:
        from full import evaluate as ev
        if "ref" not in cache:
            cache["extractor"] = ev.make_extractor(device)
            ref = out / "fid_ref.npz"  # the training set's Inception statistics, computed once per run folder
            if not ref.is_file():
                st = ev.make_reference(to_uint8(data), cache["extractor"])
                ev.save_stats(ref, st["mu"], st["sigma"], st["n"])
            cache["ref"] = ev.load_stats(ref)[:2]
        x = torch.cat([draw(min(batch, num - i), i).cpu() for i in range(0, num, batch)])
        return ev.evaluate(to_uint8(x), *cache["ref"], cache["extractor"])["fid"]
    except (ImportError, ValueError, OSError, RuntimeError) as e:  # EvaluationError is a ValueError
        cache["off"] = True
        print(f"note: FID is off for this run: {str(e).splitlines()[0][:300]}", file=sys.stderr)
        return None


def distance_table(samples: dict[str, Tensor], real: Callable[[], Tensor], title: str,
                   features: bool) -> dict:
    """Print and return each sample set's energy distance to fresh data (each real() call draws a fresh set);
    with `features`, also the Fréchet distance of a small digits classifier's features (full/evaluate.py)."""
    rows = {k: energy_distance(v, real()) for k, v in samples.items()}
    fd = {}
    if features:
        from full.evaluate import digits_classifier, digits_feature_distance
        net = digits_classifier()
        fd = {k: digits_feature_distance(v, real(), net) for k, v in samples.items()}
    print(f"\ndistance to fresh data ({title}): energy" + ", feature Fréchet" * bool(fd))
    for k, v in rows.items():
        print(f"  {k:34s} {v:8.4f}" + (f"  {fd[k]:8.2f}" if fd else ""))
    return rows | {f"{k} [feature FD]": v for k, v in fd.items()}


# ----------------------------------------------------------------------------------------------
# Command line

def add_field_flags(p: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field of the dataclass `cls` (--batch-size for batch_size; --x / --no-x for a bool), its
    help the comment on that field in the source."""
    notes = dict(re.findall(r"^ +(\w+): \w+ = .*?# *(.*)$", inspect.getsource(cls), re.M))
    for f in dataclasses.fields(cls):
        flag, help = "--" + f.name.replace("_", "-"), notes.get(f.name, "").replace("%", "%%")
        if f.type in ("bool", bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, help=help)
        else:
            p.add_argument(flag, type=type(f.default), help=f"{help} (default: {f.default!r})")
