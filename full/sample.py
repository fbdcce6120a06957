"""python -m full.sample --checkpoint PATH --num N: one-step or multistep samples as a PNG grid and an .npz.

    python -m full.sample --checkpoint runs/cifar10-cd-lpips/export.pt --num-samples 50000 --batch-size 500
    python -m full.sample --checkpoint runs/cifar10-cd-lpips/export.pt --num 64 --ts 0,11,17 --grid-steps 18
    torchrun --standalone --nproc_per_node=8 -m full.sample --checkpoint ... --num-samples 50000
    python -m full.sample --checkpoint ... --edit inpaint --reference img.png --mask mask.png
    python -m full.sample --checkpoint runs/cifar10-cd-lpips/export.pt --search-ts --ref ref.npz --num 5000

Samplers [CM Alg. 1]. One step: x = f(T z, T) (cm.sample_onestep). Multistep: the descending levels
τ_1 > τ_2 > ... of cm.sample_multistep; `--ts` takes them in the official index convention (ascending
indices into a `--grid-steps`-point grid counted from T, e.g. 0,11,17 of 18; cm.ts_to_sigmas), `--sigmas`
as numbers. An edm checkpoint is a denoiser; it samples with EDM's Heun sampler (cm.sample_heun,
`--sampler heun --steps N`). Released files (CM's .pt, EDM's .pkl) load directly (full/released/).

Seeds. Sample i draws everything (its class label, z, and the re-noising z' of every multistep level)
from torch.Generator().manual_seed(seed + i) on the CPU, so images do not depend on the batch size, the
device count or the rank that draws them (EDM's per-seed idea). Under torchrun rank r draws i = r, r+W, ...
and rank 0 gathers and writes `<out>/samples.png` (the first 64) and `<out>/samples.npz` (arr_0 uint8
(N, H, W, C), arr_1 int64 labels when class-conditional), the format FID tools read.

Step search (`--search-ts`). The middle level of two-step sampling is picked by a ternary search
(cm.ternary_search), as the official scripts/ternary_search.py picks it for the released models: ts = 0,
i, N-1 of a `--grid-steps` grid with i in 1..N-2, or with `--search-sigma` the i-th of N levels spaced
evenly in log σ between ε and T (the ends excluded). Each candidate samples `--num-samples` images from
the same seeds and is scored by FID against `--ref` statistics (full.evaluate), or without `--ref`, for a
digits run, by cm.digits_feature_distance to the digits data set. The table of the levels tried and the
chosen one are printed and written to `<out>/search.json`. (`python cm.py --checkpoint CKPT --search-ts`
runs the same cm.search_two_step on a cm.py checkpoint.)
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

import cm
from cm import (
    MAX_SEED,
    CMError,
    atomic_write,
    check_levels,
    exit_on,
    finite_samples,
    generate,
    interrupts_as_errors,
    out_folder,
    parse_ts,
    save_grid,
    ts_to_sigmas,
)
from full import checkpoints, dist
from full.config import CLIParser
from full.edit import run_edit, superres_factor
from full.files import open_image, read_npz_images, to_uint8, uint8_to_unit
from full.model import for_sampling, image_shape


def levels_from_args(ts: str, sigmas: str, grid_steps: int, cfg) -> list[float]:
    """--ts (official indices of a grid_steps grid) or --sigmas (descending numbers); default [T]."""
    c = cfg.cm
    if ts and sigmas:
        raise CMError("give --ts or --sigmas, not both")
    try:
        if ts:
            return ts_to_sigmas(parse_ts(ts), grid_steps, c.sigma_min, c.sigma_max, c.rho)
        levels = [float(s) for s in sigmas.split(",")] if sigmas else [c.sigma_max]
    except ValueError as e:
        raise CMError(f"--ts/--sigmas: {e}") from None
    try:
        return check_levels(levels, c.sigma_min, c.sigma_max)
    except ValueError as e:
        raise CMError(f"--sigmas: {e}") from None


def load_reference(path: str, shape: Sequence[int]) -> torch.Tensor:
    """An image (PNG/JPG/WebP) or an .npz (arr_0 uint8 NHWC) -> (B, C, H, W) in [-1, 1]."""
    p = Path(path)
    if not p.is_file():
        raise CMError(f"no reference at {p}")
    if p.suffix in (".npz", ".npy"):
        arr = read_npz_images(p)
    else:
        img = open_image(p, "L" if shape[0] == 1 else "RGB")
        arr = np.asarray(img.resize(shape[1:][::-1]))[None]
    arr = arr[..., None] if arr.ndim == 3 else arr
    if tuple(arr.shape[1:]) != (shape[1], shape[2], shape[0]):
        raise CMError(f"--reference {p}: its images are {tuple(arr.shape[1:])} (H, W, C); the model takes "
                      f"{(shape[1], shape[2], shape[0])}")
    return uint8_to_unit(arr).permute(0, 3, 1, 2)


def load_mask(path: str, shape: Sequence[int]) -> torch.Tensor:
    """A PNG mask (white = known pixel) -> (1, 1, H, W) float in {0, 1}."""
    from PIL import Image
    if not Path(path).is_file():
        raise CMError(f"no mask at {path}")
    m = np.asarray(open_image(path, "L").resize(shape[1:][::-1], Image.NEAREST)) > 127
    return torch.from_numpy(m)[None, None].float()


def search_criterion(ref: str, cfg, shape, device, batch: int) -> tuple[str, Callable]:
    """(name, score) of the step search: score(x) of samples x (B, C, H, W) in [-1, 1], lower is better.
    FID against the statistics in `ref`; else, for digits, the digits feature distance to all 1,797."""
    if ref:
        from full import evaluate as ev
        mu, sigma, _ = ev.load_stats(ref)
        extractor = ev.make_extractor(device)
        return "fid", lambda x: ev.evaluate(to_uint8(x, cfg.run.uint8), mu, sigma, extractor, batch)["fid"]
    if cfg.data.name == "digits" and tuple(shape) == (1, 8, 8):
        real, net = cm.load_digits(), cm.digits_classifier(verbose=False)
        return "digits_feature_distance", lambda x: cm.digits_feature_distance(x, real, net)
    raise CMError(f"--search-ts needs --ref STATS.npz (FID; python -m full.evaluate --make-ref) for "
                  f"data.name={cfg.data.name!r} at {tuple(shape)}; without it only 8x8 digits are scored")


def run_search(args, f, cm_sampling, cfg, shape, num_classes: int, labels, grid_steps: int,
               out: Path) -> dict:
    """--search-ts: cm.search_two_step with the criterion of search_criterion on --num-samples samples
    drawn from the same seeds for every candidate; prints the table, writes search.json."""
    if args.num < 2:
        raise CMError("--search-ts needs --num-samples >= 2 (a distance between sample sets)")
    name, score = search_criterion(args.ref, cfg, shape, next(f.parameters()).device, args.batch)
    mine = range(dist.rank(), args.num, dist.world())
    k = num_classes if cfg.data.class_cond else 0

    def criterion(levels: list[float]) -> float:
        x, _ = generate(f, cm_sampling, shape, mine, levels, args.seed, grid_steps, k, labels, args.batch,
                        args.clip_denoised)
        parts = dist.all_gather_object((list(mine), x))
        value = None
        if dist.rank() == 0:
            xs = torch.empty((args.num, *x.shape[1:]))
            for idx, part in parts:
                xs[idx] = part
            value = score(xs) if torch.isfinite(xs).all() else None  # refused below, on every rank
            if value is not None:
                dist.print0(f"  sigma {levels[1]:.6g}: {name} {value:.6g}")
        value = dist.all_gather_object(value)[0]
        if value is None:
            finite_samples(torch.tensor(float("nan")), f"{args.checkpoint} at sigma {levels[1]:.6g}")
        return value

    try:
        result = cm.search_two_step(criterion, grid_steps, cfg.cm, args.search_sigma, name)
    except ValueError as e:  # a grid of < 3 levels, a NaN criterion
        raise CMError(f"--search-ts: {e}") from None
    result.update(num_samples=args.num, seed=args.seed, ref=args.ref or None)
    if dist.rank() == 0:
        cm.write_search(result, out)  # out was made before sampling
    return result


class ClampDenoised(torch.nn.Module):
    """f (or D) with its output clamped to [-1, 1], as the official sampler's `clip_denoised=True`."""

    def __init__(self, f: torch.nn.Module):
        super().__init__()
        self.f = f

    def forward(self, x, sigma, class_labels=None):
        return self.f(x, sigma, class_labels).clamp(-1, 1)


MAX_SAMPLES = 10 ** 7  # 200 times the 50k of an FID


def main(argv: Sequence[str] | None = None) -> None:
    p = CLIParser(description="Sample from a full/ checkpoint (one step by default).")
    p.add_argument("--checkpoint", required=True,
                   help="a resume ckpt-*.pt or an export.pt, or a released official file (CM's .pt, "
                        "EDM's .pkl; docs/released-weights.md), or a released name (python -m full.released)")
    p.add_argument("--sampler", default="", choices=["", "onestep", "multistep", "heun"],
                   help="default: heun for a denoiser (edm), else one step (multistep with --ts/--sigmas)")
    p.add_argument("--steps", type=int, default=None,
                   help="--sampler heun: grid levels, >= 2 (default: the file's)")
    p.add_argument("--arch", default="", help="released .pt: architecture (imagenet64, lsun256), "
                                              "overriding the one inferred from keys and shapes")
    p.add_argument("--kind", default="", help="released .pt: edm | cd | ct, overriding the file name")
    p.add_argument("--num", "--num-samples", dest="num", type=int, default=None,
                   help="number of samples (use --num-samples under torchrun, whose parser takes --num "
                        "for a prefix of its --numa-binding; default 64)")
    p.add_argument("--ts", default="", help="multistep levels as official indices, e.g. 0,11,17")
    p.add_argument("--grid-steps", type=int, default=None,
                   help="grid size the --ts indices refer to (default: the checkpoint's)")
    p.add_argument("--sigmas", default="", help="multistep levels as numbers, descending, e.g. 80,0.8")
    p.add_argument("--search-ts", action="store_true",
                   help="pick the two-step middle level by a ternary search (ts = 0,i,N-1 of --grid-steps); "
                        "FID against --ref, else the digits feature distance; writes <out>/search.json")
    p.add_argument("--search-sigma", action="store_true",
                   help="--search-ts over --grid-steps levels evenly spaced in log sigma instead")
    p.add_argument("--ref", default="", help="--search-ts: FID reference statistics (.npz of full.evaluate)")
    p.add_argument("--clip-denoised", action=argparse.BooleanOptionalAction, default=None,
                   help="clamp every denoised step to [-1, 1] before re-noising (default: the run's "
                        "run.clamp_mid; the CM samplers clamp, ECT's does not)")
    p.add_argument("--class-labels", default="", help="comma-separated labels, cycled (default: random)")
    p.add_argument("--batch-size", "--batch", dest="batch", type=int, default=None,
                   help="samples per forward pass (default 256)")
    p.add_argument("--seed", type=int, default=0, help="sample i uses seed + i")
    p.add_argument("--ema", type=float, default=None,
                   help="EMA rate to load (default: the run's ema.eval_rate, the one the paper evaluates)")
    p.add_argument("--out", default="", help="output folder (default: next to the checkpoint)")
    p.add_argument("--device", default="")
    p.add_argument("--edit", default="", help="zero-shot edit: inpaint, colorize, superres, stroke, "
                                              "interpolate, denoise (full/edit.py)")
    p.add_argument("--reference", default="", help="--edit input: an image or an .npz")
    p.add_argument("--mask", default="", help="--edit inpaint: PNG, white = known pixel")
    p.add_argument("--factor", type=int, default=None, help="--edit superres: patch size p >= 2, dividing "
                   "the resolution (default: the official code's for the data set, 8 for ImageNet-64/LSUN, 2 "
                   "for CIFAR-10)")
    args = p.parse_args(argv)
    try:
        with interrupts_as_errors(note=""):
            sample(args)
    except CMError as e:
        exit_on(e)
    finally:
        dist.cleanup()


# Which flags belong to which mode (--edit TASK, --search-ts, plain sampling and its --sampler): a flag
# given outside its mode would do nothing, so it is refused, in one line, before anything is loaded. Each
# row: the flags, whether they belong with the other flags given (args -> bool), and the refusal. Whether
# a checkpoint is a denoiser (--sampler heun, --steps) or a consistency model is known only once it is
# loaded, and is checked in sample().
EDIT_FLAGS = "--reference, --mask (inpaint), --factor (superres)"
FLAG_MODES: list[tuple[tuple[str, ...], Callable, str]] = [
    (("--reference",), lambda a: bool(a.edit),
     f"does nothing without --edit (the flags of --edit: {EDIT_FLAGS})"),
    (("--mask",), lambda a: a.edit == "inpaint", "belongs to --edit inpaint (white = known pixel)"),
    (("--factor",), lambda a: a.edit == "superres", "is the patch size of --edit superres"),
    (("--ref", "--search-sigma"), lambda a: a.search_ts,
     "does nothing without --search-ts (the flags that belong to --search-ts: --ref, --search-sigma)"),
    (("--ts", "--sigmas", "--edit"), lambda a: not a.search_ts,
     "is not for --search-ts: --search-ts picks the levels itself"),
    (("--sampler",), lambda a: not a.edit and (not a.search_ts or a.sampler == "multistep"),
     "does not fit: --edit runs its own sampler (CM Alg. 4), --search-ts samples in two steps (multistep)"),
    (("--steps",), lambda a: not a.edit and not a.search_ts and a.sampler in ("", "heun"),
     "sets the grid of --sampler heun (a denoiser); it does nothing with --edit, --search-ts, or "
     "--sampler onestep/multistep"),
    (("--grid-steps",), lambda a: bool(a.ts) or a.search_ts,
     "is the grid that --ts indices (or --search-ts) count in; without them it does nothing (the Heun "
     "grid of a denoiser is --steps)"),
    (("--class-labels",), lambda a: not a.edit,
     "does nothing with --edit: the edits of full.edit take no class labels"),
]
FLAG_DEST = {"--reference": "reference", "--mask": "mask", "--factor": "factor", "--ref": "ref",
             "--search-sigma": "search_sigma", "--ts": "ts", "--sigmas": "sigmas", "--edit": "edit",
             "--sampler": "sampler", "--steps": "steps", "--grid-steps": "grid_steps",
             "--class-labels": "class_labels"}


def check_flags(args) -> None:
    """The flags given (not left at their default: None, "" or False) fit the mode chosen (FLAG_MODES),
    and their values lie in range; else one CMError naming the flag. Sets --num-samples and --batch-size
    to their defaults (64, 256) where not given."""
    for flags, fits, why in FLAG_MODES:
        for flag in flags:
            value = getattr(args, FLAG_DEST[flag])
            if value is not None and value is not False and value != "" and not fits(args):
                raise CMError(f"{flag} {why}")
    if args.num is None:
        args.num = 64
    if args.batch is None:
        args.batch = 256
    if not (1 <= args.num <= MAX_SAMPLES and 1 <= args.batch <= 2 ** 16) or \
            (args.grid_steps is not None and not 2 <= args.grid_steps <= 2 ** 16):
        raise CMError(f"need 1 <= --num-samples <= {MAX_SAMPLES}, 1 <= --batch-size <= 65536 and "
                      "2 <= --grid-steps <= 65536")
    if not 0 <= args.seed <= MAX_SEED:  # sample i's seed is seed + i, an int64 torch takes
        raise CMError(f"--seed {args.seed}: need 0 <= --seed <= 2^62")
    if args.steps is not None and not 2 <= args.steps <= 2 ** 16:
        raise CMError(f"--steps {args.steps}: need 2 <= --steps <= 65536, the levels of the Heun grid (EDM's "
                      "sampler needs at least its two ends)")
    if args.factor is not None and not 2 <= args.factor <= 2 ** 16:
        raise CMError(f"--factor {args.factor}: the superres patch size must be an integer >= 2 that "
                      "divides the image size")


def sample(args) -> None:
    """What main does with the parsed flags (so Ctrl-C and SIGTERM end it as one line)."""
    check_flags(args)  # and sets the defaults of --num-samples and --batch-size
    out = out_folder(args.out or Path(args.checkpoint).parent, make=True)  # fails before sampling
    if not os.access(out, os.W_OK):  # found before sampling, not at the first write
        why = "a read-only file system" if os.statvfs(out).f_flag & os.ST_RDONLY else "no write permission"
        raise CMError(f"cannot write into {out}: {why}")
    cm.remove_stale_temporaries(out)  # of samples.npz, edit-*.npz, search.json by a killed full.sample
    dev = dist.init(args.device)
    state = checkpoints.load(args.checkpoint, args.arch, args.kind)
    f, cfg = checkpoints.model_from_state(state, args.ema, args.checkpoint)
    f = f.to(dev)
    if args.clip_denoised is None:
        args.clip_denoised = cfg.run.clamp_mid
    f, cm_sampling = for_sampling(cfg, f)
    if cfg.cm.mode == "edm" and (args.ts or args.sigmas or args.grid_steps or args.search_ts) \
            and not args.edit:
        raise CMError(
            f"{args.checkpoint} is an edm denoiser, sampled with EDM's Heun sampler; --ts, --sigmas, "
            "--grid-steps and --search-ts are for consistency models (--steps sets the Heun levels)"
        )
    grid_steps = args.grid_steps or cfg.run.grid_steps
    net = cfg.net
    shape = image_shape(net)
    try:
        labels = [int(v) for v in args.class_labels.split(",")] if args.class_labels else None
    except ValueError:
        raise CMError(f"--class-labels must be comma-separated integers, got {args.class_labels!r}"
                      ) from None
    if args.num * math.prod(shape) * 4 > 2 ** 36:  # the samples are held in memory as float32
        raise CMError(f"--num-samples {args.num} of {'x'.join(map(str, shape))} would hold "
                      f"{args.num * math.prod(shape) * 4 / 2 ** 30:.0f} GiB in memory; sample in parts "
                      "(--seed sets where a part starts)")
    num_classes = getattr(net, "num_classes", 0)
    if labels is not None and not all(0 <= v < num_classes for v in labels):
        raise CMError(f"--class-labels must lie in [0, {num_classes - 1}]" if num_classes else
                      "--class-labels given, but the model is not class-conditional")
    if args.edit:
        return run_edit_cli(args, f, cfg, shape, out)
    if args.search_ts:
        run_search(args, f, cm_sampling, cfg, shape, num_classes, labels, grid_steps, out)
        return
    heun = cfg.cm.mode == "edm"
    if args.sampler and (args.sampler == "heun") != heun:
        raise CMError(f"--sampler {args.sampler} does not fit this checkpoint: it is "
                      + ("a denoiser (edm); use --sampler heun" if heun else
                         f"a consistency model ({cfg.cm.mode}); use onestep or multistep"))
    if args.steps is not None:
        if not heun:
            raise CMError(f"--steps sets the Heun grid of a denoiser; {args.checkpoint} is a consistency "
                          f"model ({cfg.cm.mode}), which takes --ts/--grid-steps")
        cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, grid_steps=args.steps))
    if heun and args.clip_denoised and state.get("official", {}).get("clamp"):
        f = ClampDenoised(f)  # CM's Heun sampler clamps every denoised image too
    levels = None if heun else levels_from_args(args.ts, args.sigmas, grid_steps, cfg)
    if args.sampler == "onestep" and len(levels) > 1:
        raise CMError(f"--sampler onestep samples from T alone; --ts/--sigmas give {len(levels)} levels: "
                      "use --sampler multistep, or drop them")
    mine = range(dist.rank(), args.num, dist.world())
    k = num_classes if cfg.data.class_cond else 0
    x, y = generate(f, cm_sampling, shape, mine, levels, args.seed, cfg.run.grid_steps, k, labels,
                    args.batch, args.clip_denoised)
    parts = dist.all_gather_object((list(mine), to_uint8(x, cfg.run.uint8),
                                    None if y is None else y.numpy(), bool(torch.isfinite(x).all())))
    if not all(p[3] for p in parts):  # every rank refuses alike, so none is left waiting
        finite_samples(torch.tensor(float("nan")), args.checkpoint)
    if dist.rank() == 0:
        imgs = np.empty((args.num, *to_uint8(x[:1]).shape[1:]), dtype=np.uint8)
        labs = np.zeros(args.num, dtype=np.int64)
        for idx, arr, lab, _ in parts:
            imgs[idx] = arr
            if lab is not None:
                labs[idx] = lab
        extra = {"arr_1": labs} if y is not None else {}
        atomic_write(out / "samples.npz", lambda fh: np.savez(fh, arr_0=imgs, **extra))
        grid = uint8_to_unit(imgs[:64]).permute(0, 3, 1, 2)
        save_grid(grid, out / "samples.png")
        how = "heun" if heun else f"{len(levels)}-step {[round(t, 4) for t in levels]}"
        print(f"wrote {args.num} samples ({how}) to {out / 'samples.npz'} and {out / 'samples.png'}")


def run_edit_cli(args, f, cfg, shape, out: Path) -> None:
    """--edit TASK: full.edit.run_edit on the reference, per [CM Alg. 4]; writes edit-<task>.png/.npz."""
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
    if args.factor is not None and (shape[1] % args.factor or shape[2] % args.factor):
        raise CMError(f"--factor {args.factor} does not divide the model's image size {shape[1]}x{shape[2]}")
    kw = {"factor": args.factor or superres_factor(cfg.data.name)} if args.edit == "superres" else {}
    try:
        x = run_edit(args.edit, f, ref, mask=mask, levels=levels, sigma_min=cfg.cm.sigma_min, generator=g,
                     clip_denoised=args.clip_denoised, **kw).cpu()
    except ValueError as e:  # run_edit's checks of the task, mask and levels
        raise CMError(f"--edit {args.edit}: {e}") from None
    finite_samples(x, args.checkpoint)
    if dist.rank() == 0:
        atomic_write(out / f"edit-{args.edit}.npz",
                     lambda fh: np.savez(fh, arr_0=to_uint8(x, cfg.run.uint8)))
        pair = torch.cat([ref.cpu(), x]) if len(ref) == len(x) else x  # references above, edits below
        save_grid(pair, out / f"edit-{args.edit}.png", nrow=len(x))
        print(f"wrote {out / f'edit-{args.edit}.png'}")


if __name__ == "__main__":
    main()
