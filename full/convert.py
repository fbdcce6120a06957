"""python -m full.convert CHECKPOINT --out FILE.pt: any checkpoint full/ reads, as a full/ export file.

    python -m full.convert cd-lpips/checkpoints/checkpoint_80 --out cd_cifar10_lpips.pt
    python -m full.convert edm_cifar10_ema --out edm_cifar10.pt                 # the CD teacher
    python -m full.convert ct-lpips/checkpoints --kind ct --out ct_cifar10_lpips.pt
    python -m full.convert cd_imagenet64_l2.pt --to diffusers --out cd_imagenet64_l2   # diffusers folder
    python -m full.convert export.pt --to safetensors --out export.safetensors

The paper's CIFAR-10 Flax checkpoints (full/released/flax.py) are converted once, so that sampling, editing,
FID and CD training read a plain torch file afterwards. `--kind` (edm | cd | ct) overrides the kind read off
the file; `--resolution` / `--attn` place the attention layers of a non-CIFAR-10 NCSN++ (they are not
visible in the weights). The export holds one EMA (the file's params_ema at its EMA rate), the config of
the matching cifar10 preset and the step; an atomic write (cm.save_checkpoint). `--to diffusers` writes
an ADM consistency model as a diffusers ConsistencyModelPipeline folder, `--to safetensors` the export as
a .safetensors file (full/diffusers_io.py); `--checkpoint` reads both back.
"""
from __future__ import annotations

import errno
import glob
import os
from collections.abc import Sequence
from pathlib import Path

from cm import (
    PATH_ERRNOS,
    CMError,
    exit_on,
    interrupts_as_errors,
    not_the_input,
    remove_stale_temporaries,
    save_checkpoint,
)
from full import checkpoints, diffusers_io
from full.config import CLIParser
from full.released import flax

# a file name's suffix -> the --to it says; --to safetensors writes .safetensors only, diffusers a folder
SUFFIXES = {".pt": "pt", ".pth": "pt", ".ckpt": "pt", ".bin": "pt", ".safetensors": "safetensors"}
RESOLUTIONS = (8, 1024)  # a Flax NCSN++'s --resolution: a power of two in this range (CIFAR-10: 32)


def power_of_two(flag: str, v: int, least: int, most: int) -> int:
    if not (least <= v <= most and v & (v - 1) == 0):
        raise CMError(f"{flag} must be a power of two in {least}..{most}, got {v}")
    return v


def check_flax_flags(src: Path, resolution: int | None, attn: Sequence[int] | None) -> None:
    """--resolution / --attn: only for a Flax checkpoint (any other file's config fixes them), a power of two
    in RESOLUTIONS, and attention at the resolution or one of its halvings."""
    if resolution is None and attn is None:
        return
    if not flax.is_flax(src):
        raise CMError(f"--resolution and --attn apply to the paper's Flax checkpoints only; {src}'s own "
                      "config fixes them")
    if resolution is not None:
        power_of_two("--resolution", resolution, *RESOLUTIONS)
    for a in attn or ():
        power_of_two("--attn", a, 1, resolution or 32)


def check_out(out: str | os.PathLike, to: str) -> None:
    """Before anything is read: --out's suffix says its --to, and the file system can resolve the path (a
    name too long, a loop of links: interrupts_as_errors' one line), its folder exists."""
    out = Path(out)
    said = SUFFIXES.get(out.suffix.lower())
    if (to == "safetensors") != (said == "safetensors") or (said and said != to):
        want = {"pt": "a .pt file", "safetensors": "a .safetensors file", "diffusers": "a folder"}[to]
        raise CMError(f"--out {out}: --to {to} writes {want}; pass --to {said}, or an --out of that kind"
                      if said else f"--out {out}: --to {to} writes {want}")
    try:
        os.stat(out)
    except OSError as e:  # a path the file system cannot resolve goes on to interrupts_as_errors
        if e.errno in PATH_ERRNOS:
            raise
        if e.errno not in (errno.ENOENT, errno.ENOTDIR):
            raise CMError(f"--out {out}: {e.strerror or e}") from None
    if to != "diffusers" and not out.absolute().parent.is_dir():  # a folder of diffusers is made
        raise CMError(f"--out {out}: no folder {out.absolute().parent}")
    if out.absolute().parent.is_dir():  # what a killed conversion to this --out left
        remove_stale_temporaries(out.absolute().parent, glob.escape(out.name))


def convert(src: str | Path, out: str | Path, kind: str = "", resolution: int | None = None,
            attn: Sequence[int] | None = None, to: str = "pt") -> dict:
    """Read `src` (full/ file, Flax checkpoint file or folder) and write it to `out` as an export dict
    (`to`: pt, safetensors, or diffusers: a pipeline folder). `resolution` / `attn` (default 32 / (16,),
    CIFAR-10's) place a Flax NCSN++'s attention; any other file's config fixes them, so they are refused."""
    src = Path(src)
    check_flax_flags(src, resolution, attn)
    check_out(out, to)
    not_the_input(out, src)
    if flax.is_flax(src):  # direct, for --resolution / --attn
        state = flax.import_flax(src, kind, 32 if resolution is None else resolution,
                                 (16,) if attn is None else tuple(attn))
    else:
        state = checkpoints.load(src, kind=kind)
    f, cfg = checkpoints.model_from_state(state, path=src)  # the weights must load before anything is written
    export = {k: state[k] for k in ("ema", "config", "step", "format")} | {"kind": "full", "export": True}
    if "official" in state:
        export["official"] = state["official"]
    if to == "diffusers":
        diffusers_io.write_folder(f, checkpoints.config_of(export), out)
    elif to == "safetensors":
        diffusers_io.write_safetensors(export, out)
    else:
        save_checkpoint(Path(out), export)
    return export



def main(argv: Sequence[str] | None = None) -> None:
    p = CLIParser(description="Convert a checkpoint (e.g. the paper's CIFAR-10 Flax files) to a "
                              "full/ export.")
    p.add_argument("checkpoint", help="a Flax checkpoint_<N> file or its folder, or a full/ checkpoint")
    p.add_argument("--out", required=True, help="the export file (.pt, .safetensors) or folder to write")
    p.add_argument("--to", default="pt", choices=("pt", "safetensors", "diffusers"),
                   help="pt: a full/ export | safetensors: the same as .safetensors | diffusers: an ADM "
                        "consistency model as a diffusers ConsistencyModelPipeline folder")
    p.add_argument("--kind", default="", choices=("", "edm", "cd", "ct"),
                   help="edm (the EDM teacher, a denoiser) | cd | ct (CM students); default: inferred")
    p.add_argument("--resolution", type=int, default=None,
                   help="a Flax file's image size (default 32, CIFAR-10)")
    p.add_argument("--attn", default=None,
                   help="a Flax file's resolutions with attention, comma-separated (default 16, CIFAR-10)")
    args = p.parse_args(argv)
    try:
        with interrupts_as_errors(note=""):  # Ctrl-C and a path the file system cannot resolve: one line
            try:
                attn = None if args.attn is None else tuple(int(a) for a in args.attn.split(",") if a)
            except ValueError:
                raise CMError(f"--attn takes comma-separated integers, got {args.attn!r}") from None
            check_flax_flags(Path(args.checkpoint), args.resolution, attn)  # before anything is read
            state = convert(args.checkpoint, args.out, args.kind, args.resolution, attn, args.to)
            info = state.get("official", {})
            src = info.get("kind_from", info.get("source", "inferred"))
            how = f" ({info['kind']}: {src})" if info else ""
            n = sum(v.numel() for v in next(iter(state["ema"].values())).values())
            print(f"wrote {args.out}: {state['config']['preset']}{how}, step {state['step']}, {n:,} values")
    except CMError as e:
        exit_on(e)


if __name__ == "__main__":
    main()
