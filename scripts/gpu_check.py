"""python scripts/gpu_check.py: the prepared GPU check, one report in about 8 minutes of a GPU.

    python scripts/gpu_check.py                   # test_gpu.py, bench (fp32/bf16/fp16), cm.py, full.train
    python scripts/gpu_check.py --dry-run         # the same pipeline on the CPU, tiny, < 1 min
    python scripts/gpu_check.py --parts bench     # one part again: test_gpu, bench, cm-ct or tiny-ct

A script that drives the library (python -m full.bench, cm.py, full.train), each part in its own process
group with a time limit; it writes <out>/report.md, <out>/<part>.log and <out>/bench.json.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from any folder without an install
from cm import CMError, exit_on  # noqa: E402

PRECISIONS = ("fp32", "bf16", "fp16")


GPU_CHECK_PARTS = ("test_gpu", "bench", "cm-ct", "tiny-ct")


def gpu_check(out: Path, dry_run: bool, budget: float = 480.0, parts=GPU_CHECK_PARTS) -> int:
    """tests/test_gpu.py, the bench in fp32/bf16/fp16, a minute each of cm.py and full.train: one report,
    <out>/report.md, beside each part's whole output in <out>/<part>.log and the bench's numbers in
    <out>/bench.json. `parts` (names in GPU_CHECK_PARTS) runs only some, e.g. the ones that failed.

    Each part runs in its own process with a time limit, so a hang or crash is reported and the rest
    still runs; the limits keep the whole within `budget` seconds. A rerun in the same `out` starts
    afresh (the two training runs are overwritten)."""
    if bad := [v for v in parts if v not in GPU_CHECK_PARTS]:
        raise CMError(f"unknown --parts {bad[0]!r}; choose from {', '.join(GPU_CHECK_PARTS)}")
    dev = torch.device("cpu" if dry_run else "cuda")
    if not dry_run and not torch.cuda.is_available():
        raise CMError("--gpu-check needs a CUDA device (torch.cuda.is_available() is False); "
                         "--dry-run runs the same pipeline on the CPU")
    out.mkdir(parents=True, exist_ok=True)
    report = out / "report.md"
    device_name = "CPU (dry run)" if dry_run else torch.cuda.get_device_name(dev)
    lines = [f"# python scripts/gpu_check.py{' --dry-run' if dry_run else ''}",
             f"{time.strftime('%Y-%m-%d %H:%M')}, {device_name}, torch {torch.__version__}\n"]
    failed, deadline = [], time.perf_counter() + (budget if not dry_run else 3 * budget)
    env = dict(os.environ, CM_GPU_CHECK_DEVICE=dev.type)
    # seconds of training for each of cm.py and full.train (the dry run's few steps end well before)
    train_s = 120 if dry_run else 60

    def shell(title: str, name: str, cmd: list[str], limit: float, reserve: float, ok_on_timeout=False,
              full=False):
        """Run cmd for at most `limit` s, leaving `reserve` s of the budget to the parts after it. Its whole
        stdout and stderr go to <out>/<name>.log; the report keeps all of stdout with `full` (the bench's
        tables), else the last lines of each."""
        if name not in parts:
            return
        limit = max(min(limit, deadline - time.perf_counter() - reserve), 1.0)
        t0 = time.perf_counter()
        # its own process group: a timeout stops its children too (compile and data workers), so that
        # nothing is left holding the GPU or the output pipes for the next part or a rerun
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, errors="replace", start_new_session=True)
        try:
            stdout, stderr = proc.communicate(timeout=limit)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
            rc = 0 if ok_on_timeout else "timeout"
            stderr += f"\n(stopped after {limit:.0f} s{', as planned' if ok_on_timeout else ''})"
        if rc != 0:
            failed.append(title)
        log = out / f"{name}.log"
        log.write_text(f"$ {' '.join(cmd)}\n{stdout}\n--- stderr ---\n{stderr}")
        keep = lambda text, n: "\n".join(text.replace("\r", "\n").strip().splitlines()[-n:])
        text = keep(stdout, 10 ** 6 if full else 40)
        if err := keep(stderr, 20 if full or rc == 0 else 40):
            text += f"\n--- stderr (last lines; all of it in {log.name}) ---\n{err}"
        status = "ok" if rc == 0 else f"FAILED ({rc})"
        lines.append(f"## {title}: {status}, {time.perf_counter() - t0:.0f} s, log {log.name}\n"
                     f"$ {' '.join(cmd)}\n```\n{text}\n```\n")
        print(lines[-1], flush=True)

    py, tmp = sys.executable, out / "runs"
    shell("tests/test_gpu.py", "test_gpu", [py, "-m", "pytest", "-q", "tests/test_gpu.py", "-p",
                                            "no:cacheprovider"], 300 if dry_run else 150, 2 * train_s + 180)
    net, batch = ("ncsnpp-tiny", 4) if dry_run else ("ncsnpp-cifar10", 128)
    precisions = "fp32,bf16" if dry_run else ",".join(PRECISIONS)  # fp16 autocast is a CUDA setting
    shell(f"bench {precisions} + options", "bench", [
        py, "-m", "full.bench", "--net", net, "--batch-size", str(batch), "--precision", precisions,
        "--rounds", "1" if dry_run else "3", "--reps", "1" if dry_run else "3", "--warmup", "1",
        "--device", dev.type, "--json", str(out / "bench.json"), *([] if dry_run else ["--compile"])],
          300, 2 * train_s, full=True)
    # --overwrite: a rerun in the same --out starts these two runs afresh instead of being refused
    cm_args = (["--dataset", "toy", "--channels", "32", "--batch-size", "64", "--steps", "10"] if dry_run
               else ["--steps", "100000", "--log-every", "200"])
    shell("cm.py --mode ct", "cm-ct", [py, "cm.py", "--mode", "ct", "--device", dev.type, "--out",
                                       str(tmp / "cm-ct"), "--overwrite", *cm_args],
          train_s, train_s, ok_on_timeout=True)
    shell("full.train --preset tiny-ct", "tiny-ct", [
        py, "-m", "full.train", "--preset", "tiny-ct", "--overwrite", f"run.out={str(tmp / 'tiny-ct')!r}",
        f"run.device={dev.type!r}", f"opt.steps={10 if dry_run else 100000}", "run.log_every=100",
        "run.ckpt_every=1000", "run.resume=False"], train_s, 0, ok_on_timeout=True)
    for log in sorted(tmp / v / "log.jsonl" for v in ("cm-ct", "tiny-ct") if v in parts):
        rows = [json.loads(v) for v in log.read_text().splitlines() if v.strip()] if log.is_file() else []
        if rows:
            lines.append(f"{log.parent.name}: last log line {json.dumps(rows[-1])}\n")
    lines.append(f"\nresult: {'all ok' if not failed else 'FAILED: ' + ', '.join(failed)}\n")
    report.write_text("\n".join(lines))
    print(f"\n{lines[-1].strip()}; report in {report}")
    return 1 if failed else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="the same pipeline on the CPU, tiny")
    p.add_argument("--out", default="runs/gpu-check", help="folder of report.md and the logs")
    p.add_argument("--parts", default=",".join(GPU_CHECK_PARTS),
                   help="the parts to run (default: all), e.g. to rerun one that failed")
    args = p.parse_args(argv)
    try:
        return gpu_check(Path(args.out), args.dry_run, parts=args.parts.split(","))
    except CMError as e:
        exit_on(e)


if __name__ == "__main__":
    sys.exit(main())
