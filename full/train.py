"""python -m full.train --preset NAME [section.field=value ...]: consistency training / distillation at scale.

    python -m full.train --preset tiny-ct                                  # seconds, CPU
    python -m full.train --preset cifar10-edm                              # the CD teacher [EDM]
    python -m full.train --preset cifar10-cd-lpips run.teacher=runs/cifar10-edm/export.pt
    torchrun --standalone --nproc_per_node=8 -m full.train --preset imagenet64-ct
    python -m full.train --preset cifar10-ct --print-config

Modes [CM Alg. 2, Alg. 3, App. C; EDM Sec. 5]. Every formula comes from cm.py:
    ct   L = d(f_θ(x + t_{n+1} z, t_{n+1}), f_θ⁻(x + t_n z, t_n)),
         N(k) = cm.ct_num_steps, μ(k) = cm.ct_target_rate
    cd   L = d(f_θ(x_{t_{n+1}}, t_{n+1}), f_θ⁻(x̂_{t_n}, t_n)), x̂ one Heun step of the teacher D_φ;
         N, μ fixed
    edm  the teacher's own denoising score matching (cm.edm_loss)
    θ⁻ ← μ θ⁻ + (1 - μ) θ (cm.ema_update) after every optimiser step; the evaluation EMAs likewise.

Distributed. Under torchrun each rank takes opt.batch / world samples per step, in rounds of opt.microbatch
(gradient accumulation; DDP all-reduces only in the last round). Rank 0 alone logs and writes files.

Dropout. When the network has dropout, the online and target evaluations share their masks, as the
official code intends: the first of the two calls records the CPU and CUDA RNG states and the second
replays them under torch.random.fork_rng (the official code saved only the CPU state). The target then
runs in train mode; the teacher and the evaluation EMAs always run in eval mode.

Resume. ckpt-{step}.pt holds model, target, EMAs, optimiser, GradScaler, step, the CPU/CUDA RNG state of
every rank and the data position, so a resumed run continues bit for bit on CPU (same world size).
`run.resume='auto'` (default) resumes from the newest checkpoint of the run folder if there is one, which
is what a torchrun --max-restarts restart needs. A non-finite loss stops the run, without saving, naming
the step of the first one and the last good checkpoint: the check runs on the device every step and is
read by the host before each log line, grid and checkpoint (never every step: that would stall a GPU).
"""
from __future__ import annotations

if __name__ == "__main__":  # a torchrun worker dies with its agent: armed before the slow imports below
    import full
    full.die_with_parent()

import copy
import dataclasses
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn as nn

import full
from cm import (
    RECIPES,
    Accounting,
    CMError,
    RunFolder,
    SharedDropout,
    atomic_write,
    autocast,
    changed_fields,
    ema_update,
    ema_warmup_rate,
    exit_on,
    files_or_absent,
    generate,
    grid_name,
    interrupts_as_errors,
    keeps_target_copy,
    load_for_resume,
    log_line,
    make_metric,
    recipe_loss,
    save_grid,
    schedule,
    step_flops,
    summary_line,
    tensorboard_grids,
    tensorboard_scalars,
    tensorboard_writer,
    trim_log,
)
from full import checkpoints, dist, evaluate
from full.config import CLIParser, RunConfig, to_json, two_step_levels
from full.data import make_dataset, make_loader
from full.model import for_sampling, has_dropout, image_shape, make_model
from full.presets import resolve

# ----------------------------------------------------------------------------------------------
# Pieces


def split_batch(batch: int, world: int, microbatch: int = 0) -> tuple[int, int, int]:
    """Global batch -> (per-rank batch, microbatch, accumulation rounds), with a one-line error."""
    if batch % world:
        raise CMError(f"opt.batch={batch} does not divide over {world} processes")
    per_rank = batch // world
    micro = microbatch or per_rank
    if per_rank % micro:
        raise CMError(f"opt.microbatch={micro} does not divide the per-process batch {per_rank} "
                      f"(opt.batch={batch} over {world} processes)")
    return per_rank, micro, per_rank // micro


def rng_state(device: torch.device) -> dict:
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


# ----------------------------------------------------------------------------------------------
# The trainer state: built once, stepped, saved, restored


class Trainer:
    """Online net θ (maybe DDP-wrapped), target θ⁻, evaluation EMAs, teacher, optimiser and scaler."""

    def __init__(self, cfg: RunConfig, device: torch.device, teacher: nn.Module | None = None):
        self.cfg, self.device = cfg, device
        self.world, self.rank = dist.world(), dist.rank()
        self.per_rank, self.micro, self.accum = split_batch(cfg.opt.batch, self.world, cfg.opt.microbatch)
        torch.manual_seed(cfg.run.seed)  # the same initial weights on every rank
        self.model = make_model(cfg).to(device)             # θ (f_θ, or D_θ for edm)
        recipe = RECIPES[cfg.cm.mode]
        self.teacher = teacher if recipe.teacher == "loss" else None  # ct and ect only start from it
        if teacher is not None and (cfg.run.init_from_teacher or recipe.teacher == "init"):
            checkpoints.load_weights(self.model.net, teacher.net.state_dict(), "teacher", cfg.run.teacher)
        self.shared_dropout = cfg.cm.mode != "edm" and has_dropout(self.model)
        # θ⁻: a copy of θ kept as an EMA, in train mode only when it must replay the online dropout masks;
        # none where μ = 0 throughout (cm.keeps_target_copy: the online net under no_grad is θ⁻).
        self.target = None
        if keeps_target_copy(cfg.cm):
            self.target = copy.deepcopy(self.model).requires_grad_(False).train(self.shared_dropout)
        self.emas = {r: copy.deepcopy(self.model).requires_grad_(False).eval() for r in cfg.ema.rates}
        self.ddp = self.model
        if dist.enabled():
            self.ddp = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device] if device.type == "cuda" else None, broadcast_buffers=False)
        opt_cls = {"radam": torch.optim.RAdam, "adam": torch.optim.Adam}[cfg.opt.optimizer]
        # the multi-tensor kernels: the same update up to float round-off, faster (python -m full.bench)
        fast = {"radam": dict(foreach=True), "adam": dict(fused=True)}[cfg.opt.optimizer]
        self.opt = opt_cls(self.model.parameters(), lr=cfg.opt.lr, betas=tuple(cfg.opt.betas),
                           eps=cfg.opt.eps, weight_decay=cfg.opt.weight_decay, **fast)
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.opt.precision == "fp16")
        self.metric = make_metric(cfg.cm, device) if cfg.cm.mode != "edm" else None
        self.step_k = 0
        self.acc = Accounting(cfg.opt.batch, self.world)  # restore() continues the stored device hours
        self.bad_step = torch.zeros((), dtype=torch.long, device=device)  # first non-finite loss (0: none)
        self.bad_loss = torch.zeros((), device=device)
        # Different dropout masks and noise on each rank from here on (the init above was shared).
        torch.manual_seed(cfg.run.seed + 1_000_003 * (self.rank + 1))

    # -- one optimiser step ------------------------------------------------------------------

    def _amp(self, fn: Callable | None, labels: torch.Tensor | None) -> Callable | None:
        """fn under autocast (only the networks; metric and ODE arithmetic stay fp32), labels bound."""
        if fn is None:
            return None

        def call(x, sigma, **kw):  # kw: trig=True, TrigFlow's training view (cm.TrigFlow.forward)
            with autocast(self.cfg.opt.precision, self.device):
                return fn(x, sigma, labels, **kw)
        return call

    def loss(self, x: torch.Tensor, labels: torch.Tensor | None, s, n=None, z=None, sigma=None):
        """The mode's loss (cm.recipe_loss) at schedule s on one microbatch; n (grid indices), z and sigma
        (ect's t, edm's σ) may be given, else cm.py draws them."""
        online = self._amp(self.ddp, labels)
        target = self._amp(self.model if self.target is None else self.target, labels)
        if self.shared_dropout:
            share = SharedDropout(self.device)
            online, target = share.wrap(online), share.wrap(target)
        return recipe_loss(self.cfg.cm, s, online, target, self._amp(self.teacher, labels), x, z, self.metric,
                           n=n, t=sigma)

    def step(self, x: torch.Tensor, labels: torch.Tensor | None, n=None, z=None, sigma=None) -> dict:
        """One optimiser step on this rank's batch (accumulated over microbatches); returns log values."""
        cfg, k = self.cfg, self.step_k
        sched = schedule(cfg.cm, k, cfg.opt.steps)
        lr = cfg.opt.lr * (min(1.0, (k + 1) / cfg.opt.warmup) if cfg.opt.warmup else 1.0)
        for g in self.opt.param_groups:
            g["lr"] = lr
        x = x.to(self.device, non_blocking=True)
        if labels is not None:
            labels = labels.to(self.device, non_blocking=True) if cfg.data.class_cond else None
        part = lambda t, i: None if t is None else t[i * self.micro:(i + 1) * self.micro]
        total = torch.zeros((), device=self.device)
        self.opt.zero_grad(set_to_none=True)
        for i in range(self.accum):
            with dist.ddp_sync(self.ddp, i == self.accum - 1):
                loss = self.loss(part(x, i), part(labels, i), sched, part(n, i), part(z, i), part(sigma, i))
                self.scaler.scale(loss / self.accum).backward()
            total += loss.detach() / self.accum
        total = dist.all_mean(total)
        # Remember the first non-finite loss on the device: reading it on the host every step would
        # stall the GPU; check_finite() reads it before every log line, grid and checkpoint.
        first = ~torch.isfinite(total) & (self.bad_step == 0)
        self.bad_step = torch.where(first, k + 1, self.bad_step)
        self.bad_loss = torch.where(first, total, self.bad_loss)
        if cfg.opt.grad_clip > 0:
            self.scaler.unscale_(self.opt)
            nn.utils.clip_grad_norm_(self.model.parameters(), cfg.opt.grad_clip)
        self.scaler.step(self.opt)
        self.scaler.update()
        if self.target is not None:
            ema_update(self.target, self.model, sched.mu)  # θ⁻ ← μ θ⁻ + (1 - μ) θ  [CM Alg. 2/3]
        for rate, ema in self.emas.items():
            ema_update(ema, self.model, ema_warmup_rate(rate, k) if cfg.ema.warmup else rate)
        self.step_k = k + 1
        return {"step": k + 1, "loss": total, "N": sched.N, "mu": sched.mu, "stage": sched.stage,
                "r": sched.r, "lr": lr}  # loss stays a device tensor; r: sCM's tangent warm-up

    def measure_flops(self, x: torch.Tensor, labels: torch.Tensor | None) -> int:
        """The FLOPs of one optimiser step of all processes: one microbatch's forward and backward of the
        loss (cm.step_flops; no all-reduce), times the accumulation rounds and the processes."""
        x = x[:self.micro].to(self.device)
        if labels is not None:
            labels = labels[:self.micro].to(self.device) if self.cfg.data.class_cond else None
        sched = schedule(self.cfg.cm, self.step_k, self.cfg.opt.steps)
        with dist.ddp_sync(self.ddp, False):
            flops = step_flops(lambda: self.loss(x, labels, sched), self.model, self.device)
        self.acc.flops_per_step = flops * self.accum * self.world
        return self.acc.flops_per_step

    def first_nonfinite(self) -> str:
        """'' or 'loss is nan at step k' for the first step whose loss was NaN or inf (one host read)."""
        bad = int(self.bad_step)
        return f"loss is {float(self.bad_loss)} at step {bad}" if bad else ""

    # -- checkpoints -------------------------------------------------------------------------

    def state(self) -> dict:
        """The resume dict (collective: every rank must call it, for the RNG states)."""
        rngs = dist.all_gather_object(rng_state(self.device))
        return {"model": self.model.state_dict(),
                "target": None if self.target is None else self.target.state_dict(),
                "ema": {float(r): m.state_dict() for r, m in self.emas.items()},
                "opt": self.opt.state_dict(), "scaler": self.scaler.state_dict(), "step": self.step_k,
                "rng": {"cpu": [r["cpu"] for r in rngs], "cuda": [r["cuda"] for r in rngs]},
                "data": {"start_step": self.step_k, "world": self.world, "batch": self.per_rank},
                "config": dataclasses.asdict(self.cfg), "accounting": self.acc.state()}

    def restore(self, state: dict, path: Path) -> None:
        """Load a resume dict; the RNG state last, so nothing built afterwards shifts it."""
        checkpoints.load_weights(self.model, state["model"], "model", path, same_dtypes=True)
        if self.target is not None:
            checkpoints.load_weights(self.target, state["target"] or {}, "target", path, same_dtypes=True)
        saved = {float(r): s for r, s in state["ema"].items()}
        for rate, ema in self.emas.items():
            if rate not in saved:
                raise CMError(f"{path} has no EMA at rate {rate} (it has {', '.join(map(str, saved))})")
            checkpoints.load_weights(ema, saved[rate], f"EMA {rate}", path, same_dtypes=True)
        load_for_resume(self.opt, state["opt"], "optimiser", path, int(state["step"]))  # moments, steps
        try:
            self.scaler.load_state_dict(state["scaler"])
        except (ValueError, KeyError, RuntimeError) as e:
            raise CMError(f"{path}: the grad scaler state does not fit ({e})") from None
        self.step_k = int(state["step"])
        self.acc = Accounting(self.cfg.opt.batch, self.world, state.get("accounting"))
        rng = state["rng"]
        if len(rng["cpu"]) == self.world:
            torch.set_rng_state(rng["cpu"][self.rank])
            if self.device.type == "cuda" and rng["cuda"][self.rank] is not None:
                torch.cuda.set_rng_state(rng["cuda"][self.rank], self.device)
        else:
            dist.print0(f"note: {path} was written by {len(rng['cpu'])} processes, this run has "
                        f"{self.world}: RNG streams and data order differ from an uninterrupted run")
            torch.manual_seed(self.cfg.run.seed + 1_000_003 * (self.rank + 1) + self.step_k)


# ----------------------------------------------------------------------------------------------
# Teacher, data, samples


def load_teacher(cfg: RunConfig, device: torch.device) -> nn.Module:
    """D_φ for CD (or the start of CT) from a full/ checkpoint of an edm run (its eval EMA), a released CM
    edm_*.pt or an EDM .pkl (checkpoints.import_official), in eval mode."""
    if not cfg.run.teacher:
        raise CMError(f"cm.mode={cfg.cm.mode} needs run.teacher=PATH (a checkpoint of an edm run, e.g. "
                      "python -m full.train --preset tiny-edm)")
    state = checkpoints.load(cfg.run.teacher, cfg.run.teacher_arch, cfg.run.teacher_kind)
    tcfg = checkpoints.config_of(state)
    if tcfg.cm.mode != "edm":
        raise CMError(f"run.teacher {cfg.run.teacher} is a {tcfg.cm.mode} checkpoint, not an edm one")
    if tcfg.arch != cfg.arch:
        raise CMError(f"run.teacher is an {tcfg.arch} network, this preset trains an {cfg.arch} network")
    # A teacher of other data would crash or mislead. A released file records no data section: compare
    # the images its network takes instead.
    if "official" in state:
        mine, theirs = (_net_geometry(c.net) for c in (cfg, tcfg))
        if mine != theirs:
            raise CMError(f"run.teacher takes images of (resolution, channels, classes) {theirs}, this run's "
                          f"network takes {mine}")
    for k in () if "official" in state else ("name", "resolution", "class_cond"):
        mine, theirs = getattr(cfg.data, k), getattr(tcfg.data, k)
        if mine != theirs:
            raise CMError(f"run.teacher was trained with data.{k}={theirs!r}, this run has {mine!r}")
    teacher, _ = checkpoints.model_from_state(state, path=cfg.run.teacher, denoiser=True)
    return teacher.to(device)


def _net_geometry(net) -> tuple[int, int, int]:
    return image_shape(net)[1], net.in_channels, net.num_classes


def check_data(cfg: RunConfig, ds) -> None:
    """The dataset must fit the network: channels, resolution, classes."""
    net = cfg.net
    res = image_shape(net)[1]
    if (ds.channels, ds.resolution) != (net.in_channels, res):
        raise CMError(f"data {cfg.data.name} is {ds.channels}x{ds.resolution}x{ds.resolution} but the "
                      f"network takes {net.in_channels}x{res}x{res}")
    if cfg.data.class_cond != bool(net.num_classes) or (net.num_classes and ds.num_classes > net.num_classes):
        raise CMError(f"data.class_cond={cfg.data.class_cond} ({ds.num_classes} classes) does not fit "
                      f"net.num_classes={net.num_classes}")


def write_grids(cfg: RunConfig, f: nn.Module, shape: Sequence[int], out: Path, step: int) -> list[Path]:
    """One-step and two-step grids (CM), or a Heun grid (EDM), from fixed per-sample seeds (cm.generate)."""
    c = cfg.cm
    kinds = {"heun": None} if c.mode == "edm" else {"1step": [c.sigma_max], "2step": two_step_levels(cfg)}
    k = cfg.net.num_classes if cfg.data.class_cond else 0
    fs, cs = for_sampling(cfg, f)
    return [save_grid(generate(fs, cs, shape, range(cfg.run.sample_num), levels, cfg.run.seed,
                               cfg.run.grid_steps, k, clip_denoised=cfg.run.clamp_mid)[0],
                      out / grid_name(name, step))
            for name, levels in kinds.items()]


# ----------------------------------------------------------------------------------------------
# The loop


# What a resume may not change without allow_config_change (section or section.field of the config):
# the network, the data, the schedule and the steps, and the math the mode reads (cm.CMConfig.run_fields).
# Folders, intervals, workers may differ.
RUN_FIELDS = ("arch", "net", "opt.optimizer", "opt.lr", "opt.betas", "opt.eps", "opt.weight_decay",
              "opt.warmup", "opt.grad_clip", "opt.batch", "opt.steps", "opt.precision", "ema", "data.name",
              "data.resolution", "data.random_flip", "data.class_cond", "run.seed", "run.teacher",
              "run.init_from_teacher")


def flat(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    out = {}
    for k, v in d.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def run_changes(saved: dict, cfg: RunConfig) -> list[str]:
    """The run-changing fields whose value differs between a stored config and cfg."""
    a, b = flat(json.loads(json.dumps(saved))), flat(json.loads(to_json(cfg)))  # tuples as lists on both
    fields = RUN_FIELDS + tuple(f"cm.{f}" for f in cfg.cm.run_fields())
    keys = sorted(k for k in set(a) | set(b) if any(k == f or k.startswith(f + ".") for f in fields))
    if a.get("arch") != b.get("arch"):  # another network family: its fields say nothing more
        keys = [k for k in keys if not k.startswith("net.")]
    changed = changed_fields(a, b, keys)
    return changed[:6] + ([f"{len(changed) - 6} more"] if len(changed) > 6 else [])


def claim_folder(cfg: RunConfig, out: Path, overwrite: bool) -> tuple[Path | None, list[Path]]:
    """(the checkpoint to resume from or None, the earlier run's files to delete before the first write).

    An earlier run's folder (checkpoints, an export, a non-empty log) is refused unless resumed
    (run.resume) or overwritten: --overwrite starts afresh, so it contradicts run.resume=True. The files are
    deleted by the caller only once every check of the new run has passed."""
    if overwrite and cfg.run.resume is True:
        raise CMError("--overwrite starts afresh and run.resume=True continues the run: pass one of them")
    ckpt = checkpoints.latest(out) if cfg.run.resume in (True, "auto") and not overwrite else None
    if cfg.run.resume is True and ckpt is None:
        raise CMError(f"run.resume=True but {out} has no ckpt-*.pt")
    files_or_absent(out / "log.jsonl", out / "config.json", out / "export.pt")
    ckpts = checkpoints.list_checkpoints(out)
    others = [p for p in (out / "export.pt", out / "log.jsonl") if p.is_file() and p.stat().st_size > 0]
    earlier = ckpts + others
    if ckpt is None and earlier and not overwrite:
        how = "resume it (run.resume='auto')" if ckpts else "it has no ckpt-*.pt: use another run.out"
        raise CMError(f"{out} holds an earlier run ({earlier[0].name}); {how} or pass --overwrite to start "
                      "afresh")
    return ckpt, (earlier if ckpt is None else [])


def train(cfg: RunConfig, device: str = "", on_checkpoint: Callable[[int, Path], None] | None = None,
          allow_config_change: bool = False, overwrite: bool = False) -> dict:
    """Train (or resume) the run; returns {"step", "loss", "checkpoint"}. Call dist.init first for DDP."""
    dev = dist.init(device or cfg.run.device)
    if cfg.opt.precision == "fp16" and dev.type != "cuda":
        raise CMError("opt.precision=fp16 needs a CUDA device (fp16 autocast on a CPU is ~100x slower "
                      "than fp32 here); use opt.precision=bf16 or fp32")
    out = Path(cfg.out)
    per_rank, _, _ = split_batch(cfg.opt.batch, dist.world(), cfg.opt.microbatch)
    folder = RunFolder(out) if dist.rank() == 0 else None  # refuses a second run in the same folder
    try:
        return _train(cfg, dev, out, per_rank, on_checkpoint, allow_config_change, overwrite)
    finally:
        if folder is not None:
            folder.release()


def _train(cfg, dev, out, per_rank, on_checkpoint, allow_config_change, overwrite) -> dict:
    ckpt, earlier = claim_folder(cfg, out, overwrite)
    state = checkpoints.load(ckpt) if ckpt else None
    if state is not None and (state.get("export") or not all(k in state for k in ("opt", "data", "rng"))):
        raise CMError(f"{ckpt} is an export (EMA weights only: no optimiser, data or RNG state), not a "
                      "checkpoint a run continues from; move it out of the run folder")
    if state and (changed := run_changes(state["config"], cfg)):
        if not allow_config_change:
            raise CMError(f"{ckpt} was trained with other {', '.join(changed)}; use another run.out, or "
                          "--allow-config-change to continue it with the new settings")
        dist.print0(f"note: continuing {ckpt} with {', '.join(changed)}")
    ds = make_dataset(cfg.data.name, cfg.data.root or None, cfg.data.resolution or None,
                      class_cond=cfg.data.class_cond, random_flip=cfg.data.random_flip,
                      download=cfg.data.download)
    check_data(cfg, ds)
    # CD, sCD need D_φ and ECT tunes it; CT and sCT may start from it (run.teacher set), as OCM's CT launch
    # scripts and FastGen's sCT config do
    use_teacher = bool(RECIPES[cfg.cm.mode].teacher) or (
        cfg.cm.mode in ("ct", "sct") and bool(cfg.run.teacher) and cfg.run.init_from_teacher)
    teacher = load_teacher(cfg, dev) if use_teacher else None
    tr = Trainer(cfg, dev, teacher)
    main = dist.rank() == 0
    start = int(state["step"]) if state else 0
    tb = tensorboard_writer(out, start, "run.tensorboard=True") if main and cfg.run.tensorboard else None
    if main:  # every check of the new run has passed (the package of run.tensorboard too): only now is
        for p in earlier:  # the earlier run deleted
            p.unlink(missing_ok=True)
    loader = make_loader(ds, per_rank, dist.rank(), dist.world(), cfg.run.seed, cfg.data.num_workers,
                         start_step=start)  # built before the RNG restore: DataLoader draws a base seed
    if state:
        if state["data"]["world"] != dist.world() or state["data"]["batch"] != per_rank:
            dist.print0(f"note: {ckpt} was written with {state['data']['world']} processes x batch "
                        f"{state['data']['batch']}; the data order now differs from an uninterrupted run")
        tr.restore(state, ckpt)
        dist.print0(f"resumed from {ckpt} at step {start}")
        if main and (dropped := trim_log(out / "log.jsonl", start)):
            dist.print0(f"log.jsonl: removed its last {dropped} line(s), written after this checkpoint")
    last_ckpt = ckpt
    if main:
        atomic_write(out / "config.json", lambda fh: fh.write(to_json(cfg).encode()))
        if not state:
            (out / "log.jsonl").write_text("")
    dist.barrier()
    log = open(out / "log.jsonl", "ab", buffering=0) if main else None  # closed in the finally below
    bar = None
    if main:
        from tqdm import tqdm
        bar = tqdm(initial=start, total=cfg.opt.steps, desc=f"{cfg.preset} {cfg.cm.mode}", mininterval=1.0,
                   disable=None, file=sys.stderr, dynamic_ncols=True)
    shape = (ds.channels, ds.resolution, ds.resolution)
    k_log, rec, fid_cache = start, None, {}
    first = next(loader) if tr.step_k < cfg.opt.steps else None
    if first is not None:
        tr.measure_flops(*first)
    t0 = t_log = tr.acc.t0 = time.time()
    try:
        while tr.step_k < cfg.opt.steps:
            x, y = first if first is not None else next(loader)
            first = None
            rec = tr.step(x, y)
            k = tr.step_k
            log_now, ckpt_now = k % cfg.run.log_every == 0, k % cfg.run.ckpt_every == 0
            grid_now = cfg.run.sample_every and k % cfg.run.sample_every == 0
            if log_now or ckpt_now or grid_now or k == cfg.opt.steps:  # nothing non-finite is logged or saved
                if bad := tr.first_nonfinite():
                    good = (f"the last good checkpoint is {last_ckpt}" if last_ckpt
                            else "no checkpoint was written yet")
                    raise CMError(f"{bad}; stopped without saving; {good}")
            if main and (log_now or k == cfg.opt.steps):
                now = time.time()
                rec.update({"loss": rec["loss"].item(), "sec": now - t0,
                            "img/s": cfg.opt.batch * (k - k_log) / max(now - t_log, 1e-9),
                            **tr.acc.fields(k)})
                log_line(log, rec)
                if tb is not None:
                    tensorboard_scalars(tb, rec, k, cfg.cm.mode)
                k_log, t_log = k, now
                bar.set_postfix({n: rec[n] for n in ("N", "stage") if rec[n]}, loss=f"{rec['loss']:.4g}",
                                img_s=f"{rec['img/s']:.0f}")
            if bar is not None:
                bar.update(1)
            if ckpt_now or k == cfg.opt.steps:  # before the grids, which may fail
                st = tr.state()  # every rank: gathers the RNG states
                if main:
                    last_ckpt = checkpoints.save(out, st, cfg.run.keep_last)
                dist.barrier()
                last_ckpt = checkpoints.ckpt_path(out, k)
                if on_checkpoint is not None:
                    on_checkpoint(k, last_ckpt)
            if main and (grid_now or k == cfg.opt.steps):
                grids = write_grids(cfg, tr.emas[cfg.ema.for_eval()], shape, out, k)
                if tb is not None:
                    tensorboard_grids(tb, grids, k)
            if main and cfg.run.fid_every and k % cfg.run.fid_every == 0:
                f_eval = tr.emas[cfg.ema.for_eval()]
                fid = evaluate.fid_during_training(f_eval, cfg, shape, ds, out, fid_cache, dev)
                if fid is not None:
                    bar.write(f"step {k}: FID {fid:.2f} ({cfg.run.fid_samples} one-step samples, "
                              "training set)")
                    log_line(log, {"step": k, "fid": fid, "sec": time.time() - t0,
                                   "device_hours": tr.acc.device_hours()})
                    if tb is not None:
                        tb.add_scalar("fid", fid, k)
        summary = tr.acc.summary(tr.step_k)
        if main:
            checkpoints.export(out / "export.pt", tr.emas, cfg, tr.step_k, summary)
            text = json.dumps(dataclasses.asdict(cfg) | {"accounting": summary}, indent=1).encode()
            atomic_write(out / "config.json", lambda fh: fh.write(text))  # the settings, then the compute
            bar.write(summary_line(summary), file=sys.stdout)
        dist.barrier()
    finally:
        if bar is not None:
            bar.close()
        if log is not None:
            log.close()
        if tb is not None:
            tb.close()
    return {"step": tr.step_k, "loss": float(rec["loss"]) if rec else None, "checkpoint": last_ckpt,
            "trainer": tr}


def main(argv: Sequence[str] | None = None) -> None:
    p = CLIParser(description="Train a consistency model (ct, cd) or its EDM teacher (edm).",
                  epilog="overrides: section.field=value or --section.field=value, e.g. opt.lr=1e-4")
    p.add_argument("--preset", required=True, help="a name from full/presets.py (python -m full.presets)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--resume", action="store_true", help="same as run.resume=True")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in a folder that holds an earlier run (deletes its checkpoints)")
    p.add_argument("--allow-config-change", action="store_true",
                   help="resume a checkpoint with other settings (e.g. more opt.steps, another opt.lr)")
    args, rest = p.parse_known_args(argv)
    try:
        cfg = resolve(args.preset, rest + (["run.resume=True"] if args.resume else []))
        if args.print_config:
            with interrupts_as_errors(note=""):  # a closed pipe or full device on stdout: one line
                print(to_json(cfg))
            return
        full.parent_alive_or_exit()
        with interrupts_as_errors():
            result = train(cfg, allow_config_change=args.allow_config_change, overwrite=args.overwrite)
            dist.print0(f"done: step {result['step']}, loss {result['loss']}, checkpoint "
                        f"{result['checkpoint']}")
    except CMError as e:
        exit_on(e)
    finally:
        dist.cleanup()


if __name__ == "__main__":
    main()
