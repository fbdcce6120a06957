"""python -m full.sample --checkpoint PATH --num N: one-step or multistep samples as a PNG grid and an .npz.

    python -m full.sample --checkpoint runs/cifar10-cd-lpips/export.pt --num-samples 50000 --batch-size 500
    python -m full.sample --checkpoint runs/cifar10-cd-lpips/export.pt --num 64 --ts 0,11,17 --grid-steps 18
    torchrun --standalone --nproc_per_node=8 -m full.sample --checkpoint ... --num-samples 50000
    python -m full.sample --checkpoint ... --edit inpaint --reference img.png --mask mask.png

Samplers [CM Alg. 1]. One step: x = f(T z, T) (cm.sample_onestep). Multistep: the descending levels
τ_1 > τ_2 > ... of cm.sample_multistep; `--ts` takes them in the official index convention (ascending
indices into a `--grid-steps`-point grid counted from T, e.g. 0,11,17 of 18; cm.ts_to_sigmas), `--sigmas`
as numbers. An edm checkpoint is a denoiser; it samples with EDM's Heun sampler (cm.sample_heun,
`--sampler heun --steps N`). Released files (CM's .pt, EDM's .pkl) load directly: full/official.py,
full/edm_pickle.py.

Seeds. Sample i draws everything (its class label, z, and the re-noising z' of every multistep level)
from torch.Generator().manual_seed(seed + i) on the CPU, so images do not depend on the batch size, the
device count or the rank that draws them (EDM's per-seed idea). Under torchrun rank r draws i = r, r+W, ...
and rank 0 gathers and writes `<out>/samples.png` (the first 64) and `<out>/samples.npz` (arr_0 uint8
(N, H, W, C), arr_1 int64 labels when class-conditional), the format FID tools read.
"""
from __future__ import annotations

import argparse
import dataclasses
import zipfile
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from cm import CMError, check_levels, exit_on, sample_heun, sample_multistep, sample_onestep, ts_to_sigmas
from cm import save_grid as cm_save_grid
from full import checkpoints, dist
from full.common import out_folder, to_uint8, uint8_to_unit
from full.model import image_shape
from full.presets import CLIParser


def per_sample_noise(indices: Iterable[int], shape: Sequence[int], levels: int, seed: int,
                     num_classes: int = 0) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor | None]:
    """z (B, *shape), the re-noising z' of each later level, and labels, all from seed + i per sample i."""
    zs, extra, labels = [], [], []
    for i in indices:
        g = torch.Generator().manual_seed(seed + int(i))
        if num_classes:
            labels.append(torch.randint(num_classes, (1,), generator=g))
        zs.append(torch.randn(*shape, generator=g))
        extra.append([torch.randn(*shape, generator=g) for _ in range(levels - 1)])
    noises = [torch.stack([e[j] for e in extra]) for j in range(levels - 1)]
    return torch.stack(zs), noises, (torch.cat(labels) if num_classes else None)


@torch.no_grad()
def generate(f, cfg, shape: Sequence[int], indices: Iterable[int], levels: Sequence[float] | None,
             seed: int = 0, heun: bool = False, class_labels: Sequence[int] | None = None,
             batch: int = 256, clip_denoised: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Samples `indices` (B, C, H, W) on the CPU, and their labels (None if unconditional).

    levels: descending τ's for cm.sample_multistep ([T] = one step); heun: EDM's sampler with
    cfg.run.grid_steps levels (for a denoiser). class_labels: label i is class_labels[i % len].
    clip_denoised: every denoised step is clamped to [-1, 1], as the official samplers do."""
    indices = list(indices)
    dev = next(f.parameters()).device
    k = cfg.net.num_classes if cfg.data.class_cond else 0
    c = cfg.cm
    xs, ys = [], []
    for s in range(0, len(indices), batch):
        idx = indices[s:s + batch]
        z, noises, y = per_sample_noise(idx, shape, 1 if heun else len(levels), seed, k)
        if k and class_labels:
            y = torch.tensor([class_labels[i % len(class_labels)] for i in idx])
        fy = (lambda x, t: f(x, t, y.to(dev))) if y is not None else f
        z = z.to(dev)
        if heun:
            x = sample_heun(fy, z, cfg.run.grid_steps, c.sigma_min, c.sigma_max, c.rho)
        elif len(levels) == 1 and levels[0] == c.sigma_max:
            x = sample_onestep(fy, z, c.sigma_max)
            x = x.clamp(-1, 1) if clip_denoised else x
        else:
            x = sample_multistep(fy, z, levels, c.sigma_min, noises=[n.to(dev) for n in noises],
                                 clip_denoised=clip_denoised)
        xs.append(x.float().cpu())
        ys.append(y)
    return torch.cat(xs), (torch.cat(ys) if k else None)


def save_grid(x: torch.Tensor, path: str | Path, nrow: int | None = None) -> Path:
    """cm.save_grid into a folder it creates; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cm_save_grid(x, path, nrow)
    return path


def levels_from_args(ts: str, sigmas: str, grid_steps: int, cfg) -> list[float]:
    """--ts (official indices of a grid_steps grid) or --sigmas (descending numbers); default [T]."""
    c = cfg.cm
    if ts and sigmas:
        raise CMError("give --ts or --sigmas, not both")
    try:
        if ts:
            return ts_to_sigmas([int(i) for i in ts.split(",")], grid_steps, c.sigma_min, c.sigma_max, c.rho)
        levels = [float(s) for s in sigmas.split(",")] if sigmas else [c.sigma_max]
    except ValueError as e:
        raise CMError(f"--ts/--sigmas: {e}") from None
    try:
        return check_levels(levels, c.sigma_min, c.sigma_max)
    except ValueError as e:
        raise CMError(f"--sigmas: {e}") from None


def load_reference(path: str, shape: Sequence[int]) -> torch.Tensor:
    """An image (PNG/JPG) or an .npz (arr_0 uint8 NHWC) -> (B, C, H, W) in [-1, 1]."""
    p = Path(path)
    if not p.is_file():
        raise CMError(f"no reference at {p}")
    if p.suffix == ".npz":
        try:
            with np.load(p, allow_pickle=False) as z:  # an object array (a pickle) is refused unread
                key = next((k for k in ("arr_0", "images") if k in z.files), None)
                if key is None:
                    raise CMError(f"reference {p} has no 'arr_0' or 'images' array (keys: {z.files})")
                arr = z[key]
        except (OSError, ValueError, zipfile.BadZipFile) as e:
            raise CMError(f"cannot read the reference {p} as .npz ({type(e).__name__})") from None
        if arr.dtype != np.uint8:  # a cast would wrap 256 to 0 and read floats in [-1, 1] as black
            raise CMError(f"reference {p}[{key}] must hold uint8 images in [0, 255], got {arr.dtype}")
    else:
        from PIL import Image
        try:
            with Image.open(p) as img:
                arr = np.asarray(img.convert("L" if shape[0] == 1 else "RGB").resize(shape[1:][::-1]))[None]
        except OSError as e:  # PIL's UnidentifiedImageError is an OSError
            raise CMError(f"cannot read the reference {p} as an image or .npz ({type(e).__name__})") from None
    arr = arr[..., None] if arr.ndim == 3 else arr
    if tuple(arr.shape[1:]) != (shape[1], shape[2], shape[0]):
        raise CMError(f"reference images are {tuple(arr.shape[1:])} (H, W, C); the model takes "
                      f"{(shape[1], shape[2], shape[0])}")
    return uint8_to_unit(arr).permute(0, 3, 1, 2)


def load_mask(path: str, shape: Sequence[int]) -> torch.Tensor:
    """A PNG mask (white = known pixel) -> (1, 1, H, W) float in {0, 1}."""
    from PIL import Image
    if not Path(path).is_file():
        raise CMError(f"no mask at {path}")
    try:
        img = Image.open(path)
    except OSError as e:  # UnidentifiedImageError is one
        raise CMError(f"cannot read the mask {path} as an image") from e
    with img:
        m = np.asarray(img.convert("L").resize(shape[1:][::-1], Image.NEAREST)) > 127
    return torch.from_numpy(m)[None, None].float()


def main(argv: Sequence[str] | None = None) -> None:
    p = CLIParser(description="Sample from a full/ checkpoint (one step by default).")
    p.add_argument("--checkpoint", required=True, help="a resume ckpt-*.pt or an export.pt, or a released "
                                                      "official file (CM's .pt, EDM's .pkl; README)")
    p.add_argument("--sampler", default="", choices=["", "onestep", "multistep", "heun"],
                   help="default: heun for a denoiser (edm), else one step (multistep with --ts/--sigmas)")
    p.add_argument("--steps", type=int, default=0, help="--sampler heun: grid levels (default: the file's)")
    p.add_argument("--arch", default="", help="released .pt: architecture (imagenet64, lsun256), "
                                              "overriding the one inferred from keys and shapes")
    p.add_argument("--kind", default="", help="released .pt: edm | cd | ct, overriding the file name")
    p.add_argument("--num", "--num-samples", dest="num", type=int, default=64,
                   help="number of samples (use --num-samples under torchrun, whose parser takes --num "
                        "for a prefix of its --numa-binding)")
    p.add_argument("--ts", default="", help="multistep levels as official indices, e.g. 0,11,17")
    p.add_argument("--grid-steps", type=int, default=None,
                   help="grid size the --ts indices refer to (default: the checkpoint's)")
    p.add_argument("--sigmas", default="", help="multistep levels as numbers, descending, e.g. 80,0.8")
    p.add_argument("--clip-denoised", action=argparse.BooleanOptionalAction, default=True,
                   help="clamp every denoised step to [-1, 1] before re-noising (the official samplers do)")
    p.add_argument("--class-labels", default="", help="comma-separated labels, cycled (default: random)")
    p.add_argument("--batch-size", "--batch", dest="batch", type=int, default=256,
                   help="samples per forward pass")
    p.add_argument("--seed", type=int, default=0, help="sample i uses seed + i")
    p.add_argument("--ema", type=float, default=None,
                   help="EMA rate to load (default: the run's ema.eval_rate, the one the paper evaluates)")
    p.add_argument("--out", default="", help="output folder (default: next to the checkpoint)")
    p.add_argument("--device", default="")
    p.add_argument("--edit", default="", help="zero-shot edit: inpaint, colorize, superres, stroke, "
                                              "interpolate, denoise (full/edit.py)")
    p.add_argument("--reference", default="", help="--edit input: an image or an .npz")
    p.add_argument("--mask", default="", help="--edit inpaint: PNG, white = known pixel")
    args = p.parse_args(argv)
    try:
        if args.num < 1 or args.batch < 1 or (args.grid_steps is not None and args.grid_steps < 2):
            raise CMError("need --num-samples >= 1, --batch-size >= 1 and --grid-steps >= 2")
        out = out_folder(args.out or Path(args.checkpoint).parent)
        dev = dist.init(args.device)
        state = checkpoints.load(args.checkpoint, args.arch, args.kind)
        f, cfg = checkpoints.model_from_state(state, args.ema, args.checkpoint)
        f = f.to(dev)
        if cfg.cm.mode == "edm" and (args.ts or args.sigmas or args.grid_steps) and not args.edit:
            raise CMError(f"{args.checkpoint} is an edm denoiser, sampled with EDM's Heun sampler; --ts, "
                          "--sigmas and --grid-steps are for consistency models (--steps sets the Heun levels)")
        grid_steps = args.grid_steps or cfg.run.grid_steps
        net = cfg.net
        shape = image_shape(net)
        labels = [int(v) for v in args.class_labels.split(",")] if args.class_labels else None
        num_classes = getattr(net, "num_classes", 0)
        if labels is not None and not all(0 <= v < num_classes for v in labels):
            raise CMError(f"--class-labels must lie in [0, {num_classes - 1}]" if num_classes else
                          "--class-labels given, but the model is not class-conditional")
        if args.edit:
            return run_edit_cli(args, f, cfg, shape, out)
        heun = cfg.cm.mode == "edm"
        if args.sampler and (args.sampler == "heun") != heun:
            raise CMError(f"--sampler {args.sampler} does not fit this checkpoint: it is "
                          + ("a denoiser (edm); use --sampler heun" if heun else
                             f"a consistency model ({cfg.cm.mode}); use onestep or multistep"))
        if args.steps:
            if args.steps < 2 or not heun:
                raise CMError("--steps N (N >= 2) sets the Heun grid of a denoiser; a consistency model "
                                 "takes --ts/--grid-steps")
            cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, grid_steps=args.steps))
        if heun and args.clip_denoised and state.get("official", {}).get("clamp"):
            from full.official import ClampDenoised  # CM's Heun sampler clamps every denoised image too
            f = ClampDenoised(f)
        levels = None if heun else levels_from_args(args.ts, args.sigmas, grid_steps, cfg)
        mine = range(dist.rank(), args.num, dist.world())
        x, y = generate(f, cfg, shape, mine, levels, args.seed, heun, labels, args.batch, args.clip_denoised)
        parts = dist.all_gather_object((list(mine), to_uint8(x), None if y is None else y.numpy()))
        if dist.rank() == 0:
            imgs = np.empty((args.num, *to_uint8(x[:1]).shape[1:]), dtype=np.uint8)
            labs = np.zeros(args.num, dtype=np.int64)
            for idx, arr, lab in parts:
                imgs[idx] = arr
                if lab is not None:
                    labs[idx] = lab
            out.mkdir(parents=True, exist_ok=True)
            extra = {"arr_1": labs} if y is not None else {}
            np.savez(out / "samples.npz", arr_0=imgs, **extra)
            grid = uint8_to_unit(imgs[:64]).permute(0, 3, 1, 2)
            save_grid(grid, out / "samples.png")
            how = "heun" if heun else f"{len(levels)}-step {[round(t, 4) for t in levels]}"
            print(f"wrote {args.num} samples ({how}) to {out / 'samples.npz'} and {out / 'samples.png'}")
    except CMError as e:
        exit_on(e)
    finally:
        dist.cleanup()


def run_edit_cli(args, f, cfg, shape, out: Path) -> None:
    """--edit TASK: full.edit.run_edit on the reference, per [CM Alg. 4]; writes edit-<task>.png/.npz."""
    try:
        from full.edit import run_edit
    except ImportError as e:
        raise CMError(f"--edit needs full/edit.py with run_edit ({e})") from None
    if not args.reference:
        raise CMError("--edit needs --reference IMG_OR_NPZ")
    if args.edit == "colorize" and shape[0] != 3:
        raise CMError(f"--edit colorize needs an RGB model; this one has {shape[0]} channel(s)")
    if args.edit == "interpolate":  # run_edit takes two N(0, I) latents, not images
        raise CMError("--edit interpolate is not available from the command line; call "
                      "full.edit.interpolate(f, z0, z1, alphas) with two Gaussian latents")
    ref = load_reference(args.reference, shape).to(next(f.parameters()).device)
    mask = load_mask(args.mask, shape).to(ref.device) if args.mask else None
    levels = (levels_from_args(args.ts, args.sigmas, args.grid_steps or cfg.run.grid_steps, cfg)
              if args.ts or args.sigmas else None)
    g = torch.Generator().manual_seed(args.seed)
    try:
        x = run_edit(args.edit, f, ref, mask=mask, levels=levels, sigma_min=cfg.cm.sigma_min, generator=g,
                     clip_denoised=args.clip_denoised).cpu()
    except ValueError as e:  # run_edit's checks of the task, mask and levels
        raise CMError(f"--edit {args.edit}: {e}") from None
    if dist.rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        np.savez(out / f"edit-{args.edit}.npz", arr_0=to_uint8(x))
        pair = torch.cat([ref.cpu(), x]) if len(ref) == len(x) else x  # references above, edits below
        save_grid(pair, out / f"edit-{args.edit}.png", nrow=len(x))
        print(f"wrote {out / f'edit-{args.edit}.png'}")


if __name__ == "__main__":
    main()
