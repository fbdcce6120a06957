"""python -m full.plot_log RUN_DIR: FID against device hours, from the run's log.jsonl.

Reads the FID lines of run.fid_every ({"step", "fid", "device_hours"}) and writes
RUN_DIR/fid_vs_device_hours.png (matplotlib, no pyplot). A line that is not JSON, or a log without FID
lines, is a one-line error.
"""
from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from cm import CMError, atomic_write, exit_on, files_or_absent, interrupts_as_errors, json_value


def fid_points(log: Path) -> list[tuple[float, float]]:
    """(device_hours, fid) of every FID line of a log.jsonl that carries both, in file order."""
    points = []
    files_or_absent(log)  # a FIFO would block for ever
    try:
        lines = log.read_bytes().splitlines()
    except OSError as e:
        raise CMError(f"cannot read {log}: {e.strerror or e}") from None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json_value(line)
        except ValueError:  # also bytes that are not UTF-8, and nesting too deep for the parser
            raise CMError(f"{log}:{i} is not a JSON line") from None
        if isinstance(rec, dict) and "fid" in rec and "device_hours" in rec:
            xy = rec["device_hours"], rec["fid"]
            if not all(type(v) in (int, float) and abs(v) < 1e300 for v in xy):  # NaN, inf: False too
                raise CMError(f"{log}:{i}: fid and device_hours are not both finite numbers")
            points.append((float(xy[0]), float(xy[1])))
    return points


def plot_fid(run_dir: str | Path) -> Path:
    """Write <run_dir>/fid_vs_device_hours.png; returns its path."""
    run_dir = Path(run_dir)
    points = fid_points(run_dir / "log.jsonl")
    if not points:
        raise CMError(f"{run_dir / 'log.jsonl'} has no FID lines with device_hours (set run.fid_every)")
    from matplotlib.figure import Figure
    fig = Figure(figsize=(5, 3.5))
    ax = fig.subplots()
    ax.plot(*zip(*points), marker="o")
    ax.set(xlabel="device hours", ylabel="FID", title=run_dir.name)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = run_dir / "fid_vs_device_hours.png"
    return atomic_write(out, lambda fh: fig.savefig(fh, dpi=100, format="png"))


def main(argv: Sequence[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if len(argv) != 1:
            raise CMError("usage: python -m full.plot_log RUN_DIR")
        with interrupts_as_errors(note=""):
            print(f"wrote {plot_fid(argv[0])}")
    except CMError as e:
        exit_on(e)


if __name__ == "__main__":
    main()
