"""python -m full.bench: what a training step and a sample cost, measured side by side in one run.

    python -m full.bench                                     # CIFAR-10 NCSN++, batch 2: ~2 min on 2 CPU cores
    python -m full.bench --batch-size 128                    # the same on a GPU (default device: cuda)
    python scripts/gpu_check.py                              # the prepared GPU check around it (its doc)

Every table is measured in interleaved rounds: each round times every row once, in turn, and a row's
number is the median over rounds, so a shared or warming machine slows all rows alike and the ratios,
measured within one round, stay fair. Each timed call ends with a CUDA synchronize.

1. train: one optimiser step of full.train.Trainer (the code a run executes) per recipe, metric l2,
   RAdam, one evaluation EMA, fp32 unless --precision. Beside each recipe's cost relative to an EDM
   step stands its floor, built from the measured cost of the pieces (same network, batch, precision):
       F  forward pass without grad           B  forward + backward of a mean square (grad of F)
       O  optimiser step                       U  one EMA update (the target θ⁻ or an evaluation EMA)
       EDM = B + O + U        CT = B + F + O + 2U        CD = B + 3F + O + 2U (a Heun step: 2 teacher calls)
       iCT/ECT = B + F + O + U, and CD with μ = 0 = B + 3F + O + U: their target is θ under stop-grad,
       the online net itself evaluated without grad (full.train keeps no θ⁻ copy then)
   sCM's steps [sCM] add one forward-mode JVP of F (J, measured as a piece: torch.func.jvp of F along
   a random tangent, no grad) and, for sCD, one teacher call:
       sCT = B + J + O + U      sCD = B + J + F + O + U      sCT-fd (--jvp fd) = B + 3F + O + U
   Where backward costs twice a forward (B = 3F) and O, U are small (a GPU at a large batch) the
   floors are 4/3 = 1.33 for CT and 6/3 = 2 for CD, and with J = 2F (one forward, one tangent pass)
   5/3 for sCT, 2 for sCD and 2 for sCT-fd: the "nominal" column. sCT's "x EDM" against sCT-fd's is
   the exact JVP against its finite-difference fallback.
2. sample: a bare forward pass of F (the limit of any sampler), one-step and two-step consistency
   sampling and the teacher's Heun sampler (18 levels, 35 evaluations); img/s and the ratio to F.
3. options: a CT step and one-step sampling under fp32, bf16 and fp16 (not on a CPU) autocast, channels_last,
   a foreach or fused optimiser, and torch.compile (of F in the online and target nets; opt-in on a CPU
   with --compile, where compiling NCSN++ takes minutes), with the largest difference of a one-step
   sample from the fp32 one (same weights and noise): 0 or float round-off means the option leaves
   results alone.
Memory: on CUDA, the peak of torch.cuda.max_memory_allocated during a step above what was allocated
before it, plus the recipe's own state (weights, grads, optimiser state, target, EMA, teacher). On a
CPU the step's part is the size of the tensors saved for backward (a lower bound; no allocator stats).

    python -m full.bench --ddp --net ncsnpp-tiny --batch-size 8    # DDP scaling: 2 processes against 1

--ddp times a training step (--recipe, default ct) of one process and of two processes under torchrun
(gloo on a CPU, nccl on two GPUs), each process with --batch-size images, in alternating rounds of
fresh processes, and reports the scaling efficiency t(1 process) / t(2 processes): 1.0 means the
gradient all-reduce costs nothing, which is what a cluster run loses to communication. On a CPU each
process gets half the cores (so one process runs on the threads a DDP process gets).

    python -m full.bench --loss-error --net ncsnpp-tiny --precision bf16,fp16   # precision vs fp32
    python -m full.bench --loss-error --checkpoint runs/tiny-cd/export.pt --teacher runs/tiny-edm/export.pt

--loss-error evaluates cm.ct_loss and cm.cd_loss (l2, Heun teacher) on one fixed batch (x, n, z) at each
grid size N (--grids, default 18,150,201), in fp32 and under autocast (fp16 with GradScaler's initial
loss scale 2^16), and reports the relative change of the loss and of the full gradient against fp32
(and the gradients' cosine). The networks are --net's with random weights, every parameter perturbed by
0.1 N(0, 1) so that no output layer is zero (the teacher: a second such network read as a denoiser), on
uniform noise images; or, with --checkpoint (and --teacher), trained full/ runs on their data's first
--batch-size images.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

import cm
from full import checkpoints
from full.config import CLIParser
from full.data import make_dataset
from full.model import image_shape, make_model
from full.presets import get_preset, resolve
from full.train import Trainer

ROOT = Path(__file__).resolve().parents[1]
NETS = {  # --net -> the preset whose network (and data shape) it uses
    "ncsnpp-cifar10": "cifar10-ct",    # NCSN++ ~56M, 3x32x32 [CM Tab. 3]
    "ncsnpp-tiny": "tiny-ct",          # ~0.1M, 1x8x8
    "adm-tiny": "tiny-ct-adm",         # ~0.8M, class-conditional, 1x8x8
    "adm-imagenet64": "imagenet64-ct",  # ADM ~296M, 3x64x64 (a large GPU)
}
PRECISIONS = ("fp32", "bf16", "fp16")
# recipe -> forwards without grad beside the one forward+backward (EMA updates: see floor)
FLOORS = {"edm": 0, "ct": 1, "cd": 3, "ict": 1, "ect": 1, "sct": 0, "scd": 1, "sct-fd": 3}
JVPS = {"sct": 1, "scd": 1}  # forward-mode JVPs of F per step (sct-fd: three forwards instead)
RECIPES = [r for r in ("edm", "cd", "ct", "ict", "ect", "sct", "scd", "sct-fd")
           if r.split("-")[0] in cm.RECIPES]
NOT_YET = [r for r in FLOORS if r not in RECIPES]  # a row appears once full.train accepts cm.mode=<it>


def floor(
    recipe: str, F: float, B: float, O: float = 0.0, U: float = 0.0, target: bool | None = None,
    J: float | None = None,
) -> float:
    """The recipe's unavoidable work over an EDM step's: (B + n_F·F + n_J·J + O + n_U·U) / (B + O + U),
    n_U = 2 with a target θ⁻ to update (CT; CD with μ > 0), else 1 (the evaluation EMA; θ⁻ = stopgrad θ
    at μ = 0); n_J = 1 for sCT and sCD; J defaults to 2F (a forward and its tangent)."""
    target = recipe in ("ct", "cd") if target is None else target
    J = 2 * F if J is None else J
    return (B + FLOORS[recipe] * F + JVPS.get(recipe, 0) * J + O + (1 + target) * U) / (B + O + U)


# ----------------------------------------------------------------------------------------------
# Timing


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn: Callable, dev: torch.device, reps: int = 1) -> float:
    """Seconds per call of fn, averaged over reps calls, synchronized."""
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync(dev)
    return (time.perf_counter() - t0) / reps


def rounds(rows: dict[str, Callable], dev: torch.device, n_rounds: int, reps: int, warmup: int,
           before: dict[str, Callable] | None = None, cold: tuple = (), once: tuple = ()
           ) -> dict[str, list[float]]:
    """{row: [seconds per call in round 1, 2, ...]}: every row once per round, the order rotating.

    before[row] (untimed) runs ahead of each timing of that row: it switches a shared trainer's options.
    Rows named in `cold` skip the warm-up (slow rows whose network the others have warmed), rows in
    `once` are timed in the first round only (a ratio to them uses that round)."""
    names, before = list(rows), before or {}
    times = {k: [] for k in names}
    first = {}
    for k in names:  # warm-up (and compilation) is timed separately: the first call's cost
        if k in cold:
            continue
        before.get(k, lambda: None)()
        first[k] = timed(rows[k], dev) if warmup else 0.0
        for _ in range(warmup - 1):
            rows[k]()
    for r in range(n_rounds):
        for k in names[r % len(names):] + names[:r % len(names)]:
            if r and k in once:
                continue
            before.get(k, lambda: None)()
            times[k].append(timed(rows[k], dev, reps))
    times["_first"] = first  # type: ignore[assignment]
    return times


def one_line(e: BaseException, width: int = 200) -> str:
    """An exception as one short line: its type and the first line of its message."""
    msg = next((v.strip() for v in str(e).splitlines() if v.strip()), "")
    text = f"{type(e).__name__}: {msg}" if msg else type(e).__name__
    return text if len(text) <= width else text[:width - 3] + "..."


def median_ratio(a: list[float], b: list[float]) -> float:
    """Median over rounds of a[r] / b[r]: each ratio is taken within one round."""
    return statistics.median(x / y for x, y in zip(a, b))


def state_bytes(*modules_or_opts) -> int:
    """Bytes of the weights, grads and optimiser state a recipe keeps between steps."""
    seen, total = set(), 0
    for m in modules_or_opts:
        if m is None:
            continue
        tensors = ([t for s in m.state.values() for t in s.values() if torch.is_tensor(t)]
                   if isinstance(m, torch.optim.Optimizer) else
                   [*m.parameters(), *m.buffers(), *(p.grad for p in m.parameters() if p.grad is not None)])
        for t in tensors:
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


def step_bytes(fn: Callable, dev: torch.device) -> int:
    """Memory a call of fn needs above what was allocated before it: CUDA's allocator peak, or on a CPU
    the bytes of the tensors autograd saves for backward (a lower bound)."""
    if dev.type == "cuda":
        _sync(dev)
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        fn()
        _sync(dev)
        return torch.cuda.max_memory_allocated(dev) - base
    seen, total = set(), [0]

    def pack(t):
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total[0] += key[1]
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total[0]


# ----------------------------------------------------------------------------------------------
# The three tables


@dataclasses.dataclass
class Setup:
    net: str
    batch: int
    dev: torch.device
    precision: str = "fp32"
    rounds: int = 5
    reps: int = 1
    warmup: int = 1


def run_config(s: Setup, mode: str, optimizer: str = "radam"):
    mode, _, jvp = mode.partition("-")  # sct-fd: sCT with the finite-difference JVP
    l2 = ["cm.metric='l2'"] if mode in cm.readers("metric") else []  # sct, scd, edm have no metric
    return resolve(NETS[s.net], [f"cm.mode={mode!r}", *l2, f"opt.batch={s.batch}",
                                 *([f"cm.jvp={jvp!r}"] if jvp else []),
                                 "opt.microbatch=0", f"opt.precision={s.precision!r}",
                                 f"opt.optimizer={optimizer!r}", "opt.warmup=0", "opt.grad_clip=0.0",
                                 "ema.rates=0.9999", "ema.warmup=False"])


def make_trainer(s: Setup, mode: str) -> Trainer:
    cfg = run_config(s, mode)
    teacher = None
    if mode in ("cd", "scd"):  # a denoiser of the same network stands in for the teacher (same cost)
        teacher = make_model(cfg, denoiser=True).to(s.dev).eval().requires_grad_(False)
    return Trainer(cfg, s.dev, teacher)


def batch_for(tr: Trainer, n: int, dev: torch.device, seed: int = 0):
    net = tr.cfg.net
    res = getattr(net, "img_resolution", None) or net.image_size
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, net.in_channels, res, res, generator=g).clamp(-1, 1).to(dev)
    y = torch.randint(0, net.num_classes, (n,), generator=g).to(dev) if net.num_classes else None
    return x, y


def train_table(s: Setup, trainers: dict[str, Trainer]) -> list[dict]:
    """Recipes' step times, img/s, memory, and ratios to EDM beside their floors."""
    ct = trainers["ct"]
    x, y = batch_for(ct, s.batch, s.dev)
    sigma = cm.karras_sigmas(18)[torch.randint(0, 18, (s.batch,))].float().to(s.dev)
    model, amp = ct.model, lambda fn: ct._amp(fn, y)

    def fwd():  # F
        with torch.no_grad():
            amp(model)(x + cm.append_dims(sigma, 4) * x, sigma)

    def fwd_bwd():  # B
        ct.opt.zero_grad(set_to_none=True)
        ct.scaler.scale(amp(model)(x, sigma).float().square().mean()).backward()

    tangent = torch.randn_like(x)

    def jvp():  # J: F and dF along (dx, dt) in one forward-mode pass, as cm.trig_jvp runs it
        with torch.no_grad():
            torch.func.jvp(lambda v, t: amp(model)(v, t), (x, sigma), (tangent, torch.ones_like(sigma)))

    rows = {f"step {r}": (lambda tr=tr: tr.step(x, y)) for r, tr in trainers.items()}
    rows.update({"F": fwd, "B": fwd_bwd, "O": lambda: ct.opt.step(),
                 "U": lambda: cm.ema_update(ct.target, ct.model, 0.999)})
    if JVPS.keys() & trainers.keys():
        rows["J"] = jvp
    fwd_bwd()  # grads for O
    t = rounds(rows, s.dev, s.rounds, s.reps, s.warmup)
    F, B, O, U = (t[k] for k in "FBOU")
    J = t.get("J") or [None] * len(F)
    out = []
    for r, tr in trainers.items():
        sec = statistics.median(t[f"step {r}"])
        peak = state_bytes(tr.model, tr.target, tr.teacher, tr.opt, *tr.emas.values()) + step_bytes(
            lambda: tr.step(x, y), s.dev)
        floors = [floor(r, *p, target=tr.target is not None, J=j) for *p, j in zip(F, B, O, U, J)]
        out.append(dict(recipe=r, sec=sec, ips=s.batch / sec, mem_gib=peak / 2 ** 30,
                        x_edm=median_ratio(t[f"step {r}"], t["step edm"]),
                        floor=statistics.median(floors), nominal=floor(r, 1.0, 3.0)))
    for r in out:
        r["mem_x"] = r["mem_gib"] / out[0]["mem_gib"]
    pieces = {k: statistics.median(t[k]) for k in "FBOUJ" if k in t}
    print(f"\ntrain: one optimiser step per recipe ({s.net}, batch {s.batch}, {s.precision}, RAdam, l2; "
          f"median of {s.rounds} interleaved rounds)")
    print(f"  pieces: F {pieces['F'] * 1e3:.1f} ms (forward, no grad), B {pieces['B'] * 1e3:.1f} ms "
          f"(forward+backward, B/F = {pieces['B'] / pieces['F']:.2f}), O {pieces['O'] * 1e3:.1f} ms "
          f"(RAdam step), U {pieces['U'] * 1e3:.1f} ms (EMA update)"
          + (f", J {pieces['J'] * 1e3:.1f} ms (JVP of F, J/F = {pieces['J'] / pieces['F']:.2f})"
             if "J" in pieces else ""))
    print(f"  {'recipe':7} {'ms/step':>9} {'img/s':>9} {'x EDM':>7} {'floor':>7} {'nominal':>8} "
          f"{'mem GiB':>8} {'mem x':>6}")
    for r in out:
        print(f"  {r['recipe']:7} {r['sec'] * 1e3:9.1f} {r['ips']:9.1f} {r['x_edm']:7.3f} {r['floor']:7.3f} "
              f"{r['nominal']:8.2f} {r['mem_gib']:8.2f} {r['mem_x']:6.2f}", flush=True)
    if NOT_YET:
        print(f"  ({', '.join(NOT_YET)}: not in full.train yet; a row appears once cm.mode accepts them)")
    return out


def sample_table(s: Setup, f: torch.nn.Module, D: torch.nn.Module, tr: Trainer) -> list[dict]:
    """One-step, two-step and Heun sampling beside a bare forward pass of F, img/s."""
    x, y = batch_for(tr, s.batch, s.dev, seed=1)
    c, run = tr.cfg.cm, tr.cfg.run
    call, call_D = tr._amp(f, y), tr._amp(D, y)
    T = torch.full((s.batch,), c.sigma_max, device=s.dev)
    c_in, c_noise = cm.append_dims(cm.boundary_scalings(T, c.sigma_data, c.sigma_min)[2], 4), f.c_noise(T)
    levels = cm.ts_to_sigmas(run.ts, run.grid_steps, c.sigma_min, c.sigma_max, c.rho)

    def bare():
        with torch.no_grad():
            tr._amp(lambda v, t, lab: f.net(v, t, lab), y)(c_in * x, c_noise)
    rows = {"bare F": bare,
            "1-step": lambda: cm.sample_onestep(call, x, c.sigma_max),
            f"{len(levels)}-step": lambda: cm.sample_multistep(call, x, levels, c.sigma_min,
                                                               noises=[x] * (len(levels) - 1)),
            "Heun 35": lambda: cm.sample_heun(call_D, x, 18, c.sigma_min, c.sigma_max, c.rho)}
    evals = {"bare F": 1, "1-step": 1, f"{len(levels)}-step": len(levels), "Heun 35": 35}
    t = rounds(rows, s.dev, s.rounds, s.reps, s.warmup, cold=("Heun 35",), once=("Heun 35",))
    print(f"\nsample ({s.net}, batch {s.batch}, {s.precision}; median of {s.rounds} interleaved rounds, "
          f"Heun in the first)")
    print(f"  {'sampler':9} {'evals':>5} {'ms/batch':>10} {'img/s':>9} {'x bare F':>9}")
    out = []
    for k in rows:
        sec = statistics.median(t[k])
        out.append(dict(sampler=k, evals=evals[k], sec=sec, ips=s.batch / sec,
                        x_bare=median_ratio(t["bare F"], t[k])))
        print(f"  {k:9} {evals[k]:5d} {sec * 1e3:10.1f} {s.batch / sec:9.1f} {out[-1]['x_bare']:9.3f}",
              flush=True)
    return out


def options_table(s: Setup, tr: Trainer, compile_net: bool) -> list[dict]:
    """A CT step and one-step sampling under each precision/speed option, against fp32 (one trainer,
    switched between rows, so the weights and memory are shared)."""
    x, y = batch_for(tr, s.batch, s.dev)
    f = tr.emas[tr.cfg.ema.rates[0]]
    params = list(tr.model.parameters())
    with torch.no_grad():  # F's output layer starts at zero, so a fresh f ignores F: give it weights
        for p in params:
            if not p.any():
                p.normal_(0.0, 0.05)
        for avg in (tr.target, f):
            cm.ema_update(avg, tr.model, 0.0)
    opts = {"radam": tr.opt, "radam foreach": torch.optim.RAdam(params, foreach=True),
            "adam": torch.optim.Adam(params, foreach=False),
            "adam fused": torch.optim.Adam(params, fused=True)}
    scalers = {p: torch.amp.GradScaler(s.dev.type, enabled=p == "fp16") for p in PRECISIONS}
    raw = {m: m.net for m in (tr.model, tr.target, f)}
    compiled = {}
    options = {"fp32": {}, "bf16": dict(precision="bf16"), "fp16": dict(precision="fp16"),
               "channels_last": dict(channels_last=True)}
    if (
        s.dev.type == "cpu"
    ):  # CPU fp16 convolutions run several times slower, and full.train refuses fp16 there
        del options["fp16"]
    fmt = {True: torch.channels_last, False: torch.contiguous_format}

    def switch(precision="fp32", channels_last=False, opt="radam", compile=False):
        tr.cfg = dataclasses.replace(tr.cfg, opt=dataclasses.replace(tr.cfg.opt, precision=precision))
        tr.scaler, tr.opt = scalers[precision], opts[opt]
        for m, n in raw.items():
            m.to(memory_format=fmt[channels_last])
            m.net = compiled[m] if compile else n
    xs = {True: x.to(memory_format=torch.channels_last), False: x}
    compile_failed, t_compile = "", 0.0
    if compile_net:  # compiled on a first step and sample here, so that a failure costs only its row
        try:
            compiled.update({m: torch.compile(n) for m, n in raw.items()})
            switch(compile=True)
            t_compile = timed(lambda: (tr.step(x, y), cm.sample_onestep(tr._amp(f, y), x)), s.dev)
            options["compile"] = dict(compile=True)
        except Exception as e:  # no C compiler for Triton, an unsupported op, ...: report it, go on
            compile_failed = one_line(e)
            torch.compiler.reset()
        finally:
            switch()
    step_rows = {k: (lambda o=o: tr.step(xs[o.get("channels_last", False)], y)) for k, o in options.items()}
    # the optimisers: their step alone (the rest of a training step does not depend on them)
    step_rows.update({k: (lambda o=o: o.step()) for k, o in opts.items()})
    samp_rows = {k: (lambda o=o: cm.sample_onestep(tr._amp(f, y), xs[o.get("channels_last", False)]))
                 for k, o in options.items()}
    before = {k: (lambda o=o: switch(**o)) for k, o in options.items()}
    before.update({k: switch for k in opts})
    t0 = time.perf_counter()
    ts = rounds(step_rows, s.dev, s.rounds, s.reps, max(s.warmup, 1), before)
    if "compile" in options:  # its first call was the one above, which compiled
        ts["_first"]["compile"] = t_compile
    tsamp = rounds(samp_rows, s.dev, s.rounds, s.reps, max(s.warmup, 1), before)
    wall = time.perf_counter() - t0
    samples = {}
    for k in samp_rows:  # same weights, same noise: how far each option moves a one-step sample
        switch(**options[k])
        samples[k] = cm.sample_onestep(tr._amp(f, y), xs[options[k].get("channels_last", False)]).float()
    switch()
    print(f"\noptions: a CT step and one-step sampling ({s.net}, batch {s.batch}, on {s.dev.type}; "
          f"median of {s.rounds} interleaved rounds, {wall:.0f} s)")
    print(f"  {'option':14} {'step ms':>9} {'x fp32':>7} {'1-step ms':>10} {'x fp32':>7} "
          f"{'max|Δ| 1-step':>14} {'1st call s':>10}")
    out = []
    for k in [*options, *opts]:
        st, sx = statistics.median(ts[k]), median_ratio(ts["fp32" if k in options else "radam"], ts[k])
        sm = statistics.median(tsamp[k]) if k in tsamp else None
        smx = median_ratio(tsamp["fp32"], tsamp[k]) if k in tsamp else None
        delta = (samples[k] - samples["fp32"]).abs().max().item() if k in samples else None
        out.append(dict(option=k, step_sec=st, step_x=sx, sample_sec=sm, sample_x=smx, max_delta=delta,
                        first_call_sec=ts["_first"][k], helps=sx > 1.05))
        fm = lambda v, f_: "-" if v is None else format(v, f_)
        print(f"  {k:14} {st * 1e3:9.1f} {sx:7.2f} {fm(sm and sm * 1e3, '10.1f'):>10} {fm(smx, '7.2f'):>7} "
              f"{fm(delta, '14.2e'):>14} {ts['_first'][k]:10.1f}")
    if compile_failed:
        print(f"  compile: failed ({compile_failed})")
        out.append(dict(option="compile", failed=compile_failed, step_sec=None, step_x=None, sample_sec=None,
                        sample_x=None, max_delta=None, first_call_sec=None, helps=False))
    print(
        "  (x fp32 > 1 is faster; the optimiser rows time the optimiser step alone, against RAdam's\n"
        "   for-loop step; '1st call s' includes compilation for the compile row"
        + ("; no fp16 row on a CPU, where full.train refuses fp16)" if "fp16" not in options else ")"),
        flush=True,
    )
    return out


# ----------------------------------------------------------------------------------------------
# Entry points


def bench(s: Setup, tables=("train", "sample", "options"), compile_net: bool = False) -> dict:
    name = torch.cuda.get_device_name(s.dev) if s.dev.type == "cuda" else \
        f"CPU ({torch.get_num_threads()} threads)"
    print(f"full.bench: {s.net}, batch {s.batch}, {s.precision}, on {name}, "
          f"torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}")
    result = {"device": name, "net": s.net, "batch": s.batch, "precision": s.precision}
    trainers = {r: make_trainer(s, r) for r in RECIPES} if {"train", "sample"} & set(tables) else {}
    if "train" in tables:
        result["train"] = train_table(s, trainers)
    if "sample" in tables:
        result["sample"] = sample_table(s, trainers["ct"].emas[0.9999], trainers["edm"].model.eval(),
                                        trainers["ct"])
    trainers.clear()
    if "options" in tables:
        result["options"] = options_table(dataclasses.replace(s, precision="fp32"), make_trainer(s, "ct"),
                                          compile_net)
    return result


def _perturbed(cfg, seed: int, denoiser: bool, dev: torch.device) -> cm.ConsistencyFunction:
    torch.manual_seed(seed)
    f = make_model(cfg, denoiser).to(dev)
    with torch.no_grad():
        for p in f.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return f


def loss_error(net_name: str, precisions: list[str], grids: list[int], batch: int, dev: torch.device,
               seed: int = 0, checkpoint: str = "", teacher_path: str = "") -> list[dict]:
    """Relative change of the CT and CD loss and gradient under autocast against fp32, per grid size N."""
    g = torch.Generator().manual_seed(seed)
    labels = None
    if checkpoint:
        f, cfg = checkpoints.model_from_state(checkpoints.load(checkpoint), path=checkpoint)
        f = f.to(dev).requires_grad_(True)
        teacher = checkpoints.model_from_state(checkpoints.load(teacher_path or checkpoint),
                                               denoiser=True)[0].to(dev)
        ds = make_dataset(cfg.data.name, cfg.data.root or None, cfg.data.resolution or None)
        if batch > len(ds):
            raise cm.CMError(f"--batch-size {batch}: {checkpoint}'s data set {cfg.data.name} holds {len(ds)} "
                             "images")
        x = torch.stack([ds[i][0] for i in range(batch)]).to(dev)
    else:
        cfg = resolve(NETS[net_name])
        f = _perturbed(cfg, seed, False, dev)
        teacher = _perturbed(cfg, seed + 1, True, dev).requires_grad_(False)
        if cfg.net.num_classes:
            labels = torch.zeros(batch, dtype=torch.long, device=dev)
        res = getattr(cfg.net, "img_resolution", None) or cfg.net.image_size
        x = (torch.rand(batch, cfg.net.in_channels, res, res, generator=g) * 2 - 1).to(dev)
    target = copy.deepcopy(f).requires_grad_(False)
    z = torch.randn(x.shape, generator=g).to(dev)
    rows = []
    for N in grids:
        n = torch.randint(0, N - 1, (batch,), generator=g).to(dev)
        sigmas = cm.karras_sigmas(N)
        results = {}
        for q in ["fp32"] + precisions:
            def amp(m):
                def call(v, s):
                    with cm.autocast(q, dev):
                        return m(v, s, labels) if labels is not None else m(v, s)
                return call
            for mode in ("ct", "cd"):
                f.zero_grad(set_to_none=True)
                loss = (cm.ct_loss(amp(f), amp(target), x, sigmas, cm.l2, n=n, z=z) if mode == "ct" else
                        cm.cd_loss(amp(f), amp(target), amp(teacher), x, sigmas, cm.l2, n=n, z=z))
                scale = 2.0 ** 16 if q == "fp16" else 1.0  # GradScaler's initial scale: no fp16 underflow
                (loss * scale).backward()
                grad = torch.cat([p.grad.flatten().double() for p in f.parameters()]) / scale
                results[q, mode] = (loss.item(), grad)
        for q in precisions:
            for mode in ("ct", "cd"):
                (l32, g32), (lq, gq) = results["fp32", mode], results[q, mode]
                rows.append(dict(N=N, mode=mode, precision=q, loss=l32, loss_rel=abs(lq - l32) / l32,
                                 grad_rel=((gq - g32).norm() / g32.norm()).item(),
                                 grad_cos=torch.nn.functional.cosine_similarity(gq, g32, dim=0).item()))
    print(f"{checkpoint or net_name}, batch {batch}: change against fp32 on the same (x, n, z)")
    print(f"{'N':>4} {'loss':>4} {'precision':>9} {'fp32 loss':>11} {'loss rel':>10} {'grad rel':>10} "
          f"{'grad cos':>9}")
    for r in rows:
        print(f"{r['N']:4d} {r['mode']:>4} {r['precision']:>9} {r['loss']:11.4e} {r['loss_rel']:10.2e} "
              f"{r['grad_rel']:10.2e} {r['grad_cos']:9.5f}")
    return rows


def _ddp_worker(net: str, recipe: str, batch: int, steps: int, precision: str, out: str) -> None:
    """One process of --ddp (also the one-process reference): `steps` timed steps after two warm-ups."""
    from full import dist
    dev = dist.init()
    world = dist.world()
    s = Setup(net, batch * world, dev, precision)
    tr = make_trainer(s, recipe)
    x, y = batch_for(tr, batch, dev, seed=dist.rank())
    for _ in range(2):
        tr.step(x, y)
    dist.barrier()
    sec = timed(lambda: tr.step(x, y), dev, steps)
    dist.barrier()
    if dist.rank() == 0:
        cm.atomic_write(out, lambda fh: fh.write(json.dumps({"sec": sec, "world": world}).encode()))
    dist.cleanup()


def child(cmd: list[str], env: dict, timeout: float, what: str) -> tuple[int, str]:
    """Run cmd to its end: (exit status, stderr). An interrupt here (Ctrl-C, SIGTERM) is passed on as a
    SIGTERM and waited for, so the child (torchrun and its workers) cleans up before this process goes on
    to its own one-line exit; a child past `timeout` is stopped the same way and is a one-line error."""
    import signal
    import subprocess
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _, err = p.communicate(timeout=timeout)
        return p.returncode, err
    except BaseException as e:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.communicate(timeout=60)
            except BaseException:  # a second interrupt, or a child that ignores SIGTERM
                p.kill()
                p.wait()
                raise
        if isinstance(e, subprocess.TimeoutExpired):
            raise cm.CMError(f"{what} took more than {timeout:.0f} s; stopped") from None
        raise


def ddp_table(net: str, recipe: str, batch: int, n_rounds: int, steps: int, precision: str,
              dev: torch.device) -> dict:
    """Per-step time of 1 and 2 processes at the same per-process batch, alternating, fresh processes."""
    if dev.type == "cuda" and torch.cuda.device_count() < 2:
        raise cm.CMError(f"--ddp on CUDA needs two GPUs, this machine has {torch.cuda.device_count()}")
    threads = max(1, (os.cpu_count() or 2) // 2)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    worker = ["-m", "full.bench", "--ddp-worker", "--net", net, "--recipe", recipe, "--batch-size",
              str(batch), "--reps", str(steps), "--precision", precision]
    times = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(n_rounds):
            for world in (1, 2) if r % 2 == 0 else (2, 1):
                out = Path(tmp) / f"{world}-{r}.json"
                launch = [] if world == 1 else ["-m", "torch.distributed.run", "--standalone",
                                                f"--nproc_per_node={world}"]
                cmd = [sys.executable, *launch, *worker, "--json", str(out)]
                code, err = child(cmd, env, 1800, f"--ddp: the {world}-process run")
                if code or not out.is_file():
                    raise cm.CMError(f"--ddp: the {world}-process run failed: "
                                     f"{(err.strip().splitlines() or ['no output'])[-1]}")
                times[world].append(json.loads(out.read_text())["sec"])
    t1, t2 = statistics.median(times[1]), statistics.median(times[2])
    row = dict(recipe=recipe, net=net, batch_per_process=batch, sec_1=t1, sec_2=t2, efficiency=t1 / t2,
               ips_1=batch / t1, ips_2=2 * batch / t2,
               threads_per_process=threads if dev.type == "cpu" else None)
    print(f"\nddp: {recipe} step, {net}, batch {batch} per process, {precision}, "
          f"{'gloo' if dev.type == 'cpu' else 'nccl'}; median of {n_rounds} rounds of {steps} steps")
    print(f"  1 process  {t1 * 1e3:9.1f} ms/step {row['ips_1']:9.1f} img/s")
    print(f"  2 processes{t2 * 1e3:9.1f} ms/step {row['ips_2']:9.1f} img/s   efficiency {t1 / t2:.3f} "
          f"(speed-up {row['ips_2'] / row['ips_1']:.2f}x of 2)", flush=True)
    return row


# integer flag -> (least, most) where it is parsed: past these a benchmark runs for days or cannot allocate
LIMITS = {"--rounds": (0, 10_000), "--reps": (1, 10_000), "--warmup": (0, 10_000),
          "--batch-size": (1, 2 ** 16)}
INPUT_BYTES = 2 ** 30  # a batch's fp32 input images at most (the steps' activations are many times more)
LIST_CAP = 32  # entries of a comma-separated flag
LOSS_ERROR, DDP = "with --loss-error", "with --ddp"
TABLES = "to the tables (not with --ddp or --loss-error)"
# flag -> (where it applies, whether the command line is there): elsewhere it changes nothing, so it is
# refused instead of being ignored
NEEDS: dict[str, tuple[str, Callable]] = {
    "--grids": (LOSS_ERROR, lambda a: a.loss_error),
    "--checkpoint": (LOSS_ERROR, lambda a: a.loss_error),
    "--teacher": ("with --checkpoint (the random networks bring their own teacher)", lambda a: a.checkpoint),
    "--recipe": (DDP, lambda a: a.ddp),
    "--loss-error": ("without --ddp (two different benchmarks: run one)", lambda a: not a.ddp),
    "--net": ("without --checkpoint (the checkpoint's own network is measured)", lambda a: not a.checkpoint),
    "--tables": (TABLES, lambda a: not (a.ddp or a.loss_error)),
    "--warmup": (TABLES, lambda a: not (a.ddp or a.loss_error)),
    "--compile": ("to the options table (--tables with options; not with --ddp or --loss-error)",
                  lambda a: not (a.ddp or a.loss_error) and "options" in (a.tables or "options").split(",")),
    "--rounds": ("to the tables and --ddp (not with --loss-error)", lambda a: not a.loss_error),
    "--reps": ("to the tables and --ddp (not with --loss-error)", lambda a: not a.loss_error),
}
DEFAULTS = {"net": "ncsnpp-cifar10", "tables": "train,sample,options", "rounds": 0, "reps": 1, "warmup": 1,
            "grids": "18,150,201", "checkpoint": "", "teacher": "", "recipe": "ct"}


def _dest(flag: str) -> str:
    return flag[2:].replace("-", "_")


def _items(flag: str, value: str, choices: tuple = ()) -> list[str]:
    """A comma-separated flag's entries: known ones (`choices`, when given), none twice, at most LIST_CAP."""
    items = value.split(",")
    if choices and (bad := [v for v in items if v not in choices]):
        what = flag.removeprefix("--").removesuffix("s")
        raise cm.CMError(f"{flag}: unknown {what} {bad[0]!r}; choose from {', '.join(choices)}")
    if len(set(items)) < len(items) or len(items) > LIST_CAP:
        raise cm.CMError(f"{flag} lists each entry once, at most {LIST_CAP} of them, got {value[:80]!r}")
    return items


def check_flags(args: argparse.Namespace) -> None:
    """Every flag within its range and where it has an effect (NEEDS), before anything runs."""
    for flag, (least, most) in LIMITS.items():
        v = getattr(args, _dest(flag))
        if v is not None and not least <= v <= most:
            raise cm.CMError(f"need {flag} >= {least} and <= {most}, got {v}")
    for flag, (where, present) in NEEDS.items():
        if getattr(args, _dest(flag)) not in (None, False) and not present(args):
            raise cm.CMError(f"{flag} applies only {where}")
    if args.batch_size is not None and not args.checkpoint:
        net = args.net or DEFAULTS["net"]
        shape = image_shape(get_preset(NETS[net]).net)
        most = INPUT_BYTES // (4 * math.prod(shape))
        if args.batch_size > most:
            raise cm.CMError(f"--batch-size {args.batch_size}: at most {most} of {net}'s "
                             f"{'x'.join(map(str, shape))} images fit the {INPUT_BYTES // 2 ** 30} GiB "
                             "bound on a batch's inputs")


def writable_file(flag: str, path: str) -> None:
    """Write a probe byte next to `path` (then remove it): a folder that is missing, read-only, full or
    under a file-size limit fails here, before the benchmark, in one line."""
    target = Path(path)
    if target.is_dir():
        raise cm.CMError(f"{flag} {path}: a folder, not a file")
    probe = target.with_name(f".{target.name}.{os.getpid()}.tmp")  # atomic_write's name: a kill -9 leftover
    try:  # is removed like atomic_write's own
        with open(probe, "wb") as fh:
            fh.write(b"{}")
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as e:
        if e.errno in cm.PATH_ERRNOS:
            raise
        raise cm.CMError(f"{flag} {path}: cannot write there ({e.strerror or e})") from None
    finally:
        try:
            probe.unlink(missing_ok=True)
        except OSError:
            pass



def main(argv=None) -> dict | int:
    p = CLIParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    # flags defaulting to None: check_flags tells a given flag from an absent one (DEFAULTS fill them in)
    p.add_argument("--net", default=None, choices=sorted(NETS), help=f"default {DEFAULTS['net']}")
    p.add_argument("--batch-size", type=int, default=None,
                   help="per step (default: 2 on a CPU, 128 on a GPU)")
    p.add_argument("--batch", dest="batch_size", type=int, help=argparse.SUPPRESS)  # the old name
    p.add_argument("--precision", default="fp32",
                   help="for the train and sample tables; a comma-separated list runs each in turn")
    p.add_argument("--precisions", dest="precision", help=argparse.SUPPRESS)  # the old name
    p.add_argument("--tables", default=None, help="comma-separated: train, sample, options (default: all)")
    p.add_argument("--rounds", type=int, default=None,
                   help="interleaved rounds, each row's median is reported (default: 3 on a CPU, 5 on a GPU)")
    p.add_argument("--reps", type=int, default=None,
                   help="calls per row and round (timed together; default 1)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed calls per row before the rounds (default 1)")
    p.add_argument("--compile", action="store_true", help="add a torch.compile row to the options table")
    p.add_argument("--device", default="", help="default: cuda if available, else cpu")
    p.add_argument("--json", default="", help="also write the numbers to this file")
    p.add_argument(
        "--loss-error",
        action="store_true",
        help="the change of the CT/CD loss and gradient under --precision against fp32 (see above)",
    )
    p.add_argument("--grids", default=None,
                   help=f"with --loss-error: grid sizes N (default {DEFAULTS['grids']})")
    p.add_argument("--checkpoint", default=None, help="with --loss-error: a trained full/ checkpoint")
    p.add_argument("--teacher", default=None,
                   help="with --loss-error and --checkpoint: the EDM teacher for CD")
    p.add_argument("--ddp", action="store_true", help="DDP scaling: one process against two (see above)")
    p.add_argument("--recipe", default=None, choices=RECIPES,
                   help="with --ddp: the step to time (default ct)")
    p.add_argument("--ddp-worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        with cm.interrupts_as_errors(note=""):  # Ctrl-C, SIGTERM, a bad path: one line
            if args.ddp_worker:
                _ddp_worker(args.net or DEFAULTS["net"], args.recipe or DEFAULTS["recipe"],
                            args.batch_size or 2, args.reps or DEFAULTS["reps"], args.precision, args.json)
                return 0
            check_flags(args)
            for k, v in DEFAULTS.items():
                setattr(args, k, v if getattr(args, k) is None else getattr(args, k))
            result, numbers = run(args)
            if args.json:
                cm.atomic_write(args.json, lambda fh: fh.write(json.dumps(numbers, indent=1).encode()))
            return result
    except cm.CMError as e:
        cm.exit_on(e)


def run(args: argparse.Namespace) -> tuple[dict | list, dict | list]:
    """The benchmark the checked flags ask for (--ddp, --loss-error or the tables): (what main returns,
    what --json writes: the tables' results as a list, one entry per precision)."""
    tables = _items("--tables", args.tables, ("train", "sample", "options"))
    precisions = _items("--precision", args.precision, PRECISIONS)
    grids = _items("--grids", args.grids)
    try:
        grids = [int(v) for v in grids]
    except ValueError:
        raise cm.CMError(f"--grids must be comma-separated grid sizes, got {args.grids!r}") from None
    if not all(2 <= n <= cm.MAX_LEVELS for n in grids):
        raise cm.CMError(f"--grids sizes must lie in 2..{cm.MAX_LEVELS}, got {args.grids}")
    if args.ddp and len(precisions) > 1:
        raise cm.CMError(f"--ddp times one --precision, got {args.precision!r}")
    if args.json:  # checked now, not after the benchmark
        writable_file("--json", args.json)
    dev = cm.pick_device(args.device)
    gpu = dev.type == "cuda"
    try:
        if args.ddp:
            row = ddp_table(args.net, args.recipe, args.batch_size or (128 if gpu else 2),
                            args.rounds or 3, max(args.reps, 3), args.precision, dev)
            return row, row
        if args.loss_error:
            others = [q for q in precisions if q != "fp32"] or ["bf16", "fp16"]
            rows = loss_error(args.net, others, grids, args.batch_size or 16, dev, checkpoint=args.checkpoint,
                              teacher_path=args.teacher)
            return rows, rows
        results = []
        for i, q in enumerate(precisions):  # the options table once, after the last precision's tables
            s = Setup(args.net, args.batch_size or (128 if gpu else 2), dev, q,
                      args.rounds or (5 if gpu else 3), args.reps, args.warmup)
            last = [t for t in tables if t != "options" or i == len(precisions) - 1]
            results.append(bench(s, last, args.compile))
    except torch.OutOfMemoryError:
        raise cm.CMError(f"out of {dev.type} memory at --batch-size {args.batch_size}: pass a smaller one") \
            from None
    except RuntimeError as e:  # the CPU allocator's refusal is a plain RuntimeError
        if "can't allocate memory" not in str(e):
            raise
        raise cm.CMError(f"out of memory at --batch-size {args.batch_size}: pass a smaller one") from None
    return (results[0] if len(results) == 1 else {"by_precision": results}), results


if __name__ == "__main__":
    r = main()
    sys.exit(r if isinstance(r, int) else 0)
