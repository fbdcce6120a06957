"""python scripts/compare.py: CD, CT, iCT, ECT, sCT and sCD side by side on one data set, at cm.py's defaults.

    python scripts/compare.py --dataset digits       # ~45 min on 2 CPU cores: the table of docs/results.md
    python scripts/compare.py --dataset toy          # ~10 min
    python scripts/compare.py --dataset digits --modes ct,ict --out runs/compare-digits
    python scripts/compare.py --dataset toy --modes sct,scd      # the continuous-time pair [sCM]

One command per data set trains, in this order and each with its cm.py defaults: the EDM teacher, CD and
ECT from that one teacher, sCD from a second one whose time embedding has sCD's scale 1 (the student is
its teacher's network, cm.timestep_embedding), then CT, iCT and sCT (no teacher), as --modes lists them.
Every run prints its distances to fresh data (cm.report); this collects them into one markdown table with
the wall clock of each run. A row's time includes its teacher where it needs one (CD, ECT, sCD), since the
defaults give each row about the same wall-clock budget: the runs of `python cm.py --mode X` from a fresh
clone, which train their own teacher. On the digits the distance is the classifier-feature Fréchet distance
(energy distance in brackets); on the toy ring it is the energy distance. Each run's folder (<out>/<mode>)
keeps its grids and checkpoint.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from any folder without an install
if __name__ == "__main__":  # a signal while cm imports torch (a second): one line, as cm.py's own start
    def _stopped_while_starting(signum, frame):
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        sys.exit(f"error: stopped by {name} while starting; nothing was written")
    for _s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if _s is not None and (_s != getattr(signal, "SIGHUP", None) or signal.getsignal(_s) is not
                               signal.SIG_IGN):  # nohup's SIGHUP stays ignored
            signal.signal(_s, _stopped_while_starting)
import cm  # noqa: E402

ROWS = {"cd": "CD", "ct": "CT", "ict": "iCT", "ect": "ECT", "sct": "sCT", "scd": "sCD"}
FLOOR, TEACHER = "data vs data (floor)", "teacher Heun, 18 levels (35 NFE)"


def run(cfg: cm.TrainConfig) -> tuple[dict, float, cm.TrainConfig]:
    """cm.train(cfg) -> (its distances, its wall clock in seconds, the config)."""
    t0 = time.time()
    result = cm.train(cfg)
    return result, time.time() - t0, cfg


def cell(result: dict, key: str, digits: bool) -> str:
    if key not in result:
        return ""
    if digits:
        return f"{result[key + ' [feature FD]']:.1f} ({result[key]:.4f})"
    return f"{result[key]:.4f}"


def compare(dataset: str, modes: list[str], out: Path, overwrite: bool = False, **settings) -> list[dict]:
    """Train the teacher (if a mode needs one) and each mode; returns one row per mode. `settings` are
    settings of cm.config for every run (device; steps etc. for a quick look), the rest are cm.py's
    defaults. Earlier runs in <out>/<mode> are refused before anything trains, unless `overwrite`."""
    def config(mode, **kw):
        return cm.config(dataset, mode, overwrite=True, **settings, **kw)
    scales = {m: config(m, out=str(out / m)).time_scale for m in modes if cm.RECIPES[m].teacher}
    teachers = {s: out / ("teacher" if s == 100 else f"teacher-time-scale-{s:g}") for s in scales.values()}
    folders = [*teachers.values(), *(out / m for m in modes)]
    if not overwrite and (held := [f.name for f in folders if (f / "ckpt.pt").exists()]):
        raise cm.CMError(f"{out} holds earlier runs ({', '.join(held)}); pass --overwrite to replace them, "
                         "or another --out")
    trained = {}  # time scale -> (teacher checkpoint, its steps, its seconds)
    for scale, folder in teachers.items():
        _, sec, tcfg = run(config("edm", out=str(folder), time_scale=scale, report=False))
        trained[scale] = (str(folder / "ckpt.pt"), tcfg.steps, sec)
        print(f"teacher (time scale {scale:g}): {tcfg.steps} steps in {sec:.0f} s")
    rows = []
    for mode in modes:
        teacher, teacher_steps, teacher_s = trained[scales[mode]] if mode in scales else ("", 0, 0.0)
        result, sec, rcfg = run(config(mode, out=str(out / mode), teacher=teacher))
        rows.append(dict(mode=mode, steps=rcfg.steps, teacher_steps=teacher_steps, teacher=teacher,
                         sec=sec + teacher_s, own_sec=sec, result=result))
        print(f"{mode}: {rcfg.steps} steps in {sec:.0f} s")
    return rows


def table(rows: list[dict], dataset: str) -> str:
    digits = dataset == "digits"
    what = "feature FD (energy distance)" if digits else "energy distance"
    lines = [f"| {dataset} | steps | wall clock | 1 step | 2 steps | teacher Heun (35 NFE) | floor |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: list(ROWS).index(r["mode"])):
        steps = (
            f"teacher {r['teacher_steps']:,} + {r['steps']:,}" if r["teacher_steps"] else f"{r['steps']:,}"
        )
        wall = f"{r['sec']:.0f} s" + (
            f" ({r['own_sec']:.0f} s after the teacher)" if r["teacher_steps"] else ""
        )
        res = r["result"]
        lines.append(
            f"| {ROWS[r['mode']]} | {steps} | {wall} | {cell(res, '1-step', digits)} | "
            f"{cell(res, '2-step', digits)} | {cell(res, TEACHER, digits)} | {cell(res, FLOOR, digits)} |"
        )
    return "\n".join(lines) + f"\n\nDistances: {what} to fresh data; lower is better.\n"


def main(argv=None) -> None:
    p = cm.Parser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="digits", choices=["toy", "digits"])
    p.add_argument("--modes", default="cd,ect,ct,ict,sct,scd",
                   help="comma-separated, any of " + ", ".join(ROWS))
    p.add_argument("--out", default="", help="folder of the runs (default runs/compare-<dataset>)")
    p.add_argument("--device", default="", help="default: cuda if available, else cpu")
    p.add_argument("--steps", type=int, default=0, help="steps of every run, teacher included, for a quick "
                   "look (default 0: each mode's cm.py default, as in docs/results.md)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier comparison's runs in --out")
    args = p.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    try:
        if not modes or set(modes) - set(ROWS) or len(set(modes)) < len(modes):
            raise cm.CMError(
                f"--modes takes a comma-separated subset of {', '.join(ROWS)}, each mode once, "
                f"got {args.modes!r}"
            )
        # Ctrl-C, SIGTERM and a path the file system cannot resolve: one line, after the run being trained
        # (in this process) has removed its temporary files
        with cm.interrupts_as_errors(note=""):
            out = Path(args.out or f"runs/compare-{args.dataset}")
            t0 = time.time()
            rows = compare(
                args.dataset, modes, out, args.overwrite, device=args.device,
                **({"steps": args.steps} if args.steps else {}))
            text = table(rows, args.dataset)
            print("\n" + text + f"In all {time.time() - t0:.0f} s.")
            cm.atomic_write(out / "table.md", lambda fh: fh.write(text.encode()))
            cm.atomic_write(out / "rows.json", lambda fh: fh.write(json.dumps(rows, indent=1).encode()))
    except cm.CMError as e:
        cm.exit_on(e)


if __name__ == "__main__":
    main()
