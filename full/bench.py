"""python -m full.bench: training and sampling throughput, and peak memory, measured side by side.

Each row trains the same network with the same data for the same number of steps and differs in one
thing (the precision), so the ratios in the last column are comparisons within one run on one machine.
Timings are never asserted in tests; they are reported here.

    python -m full.bench                                  # tiny NCSN++, CPU-sized, fp32 vs bf16
    python -m full.bench --net ncsnpp-cifar10 --batch-size 128 --precisions fp32,bf16,fp16   # a GPU

What is timed (after --warmup untimed steps, with a CUDA synchronize around the clock):
    train   one CT step: cm.ct_loss (online forward+backward, target forward), RAdam step, target update
    sample  one-step generation cm.sample_onestep with the online network, no grad
Peak memory is torch.cuda.max_memory_allocated on CUDA; on the CPU it is not tracked (shown as '-').

    python -m full.bench --loss-error --grids 18,150,201  # how far bf16/fp16 move the CT/CD loss and gradient

--loss-error evaluates cm.ct_loss and cm.cd_loss (l2, Heun teacher) on one fixed batch (x, n, z) at each
grid size N, in fp32 and under autocast (fp16 with GradScaler's initial loss scale 2^16), and reports the
relative change of the loss and of the full gradient against fp32 (and the gradients' cosine). The networks are the chosen architecture with random
weights, every parameter perturbed by 0.1 N(0, 1) so that no output layer is zero; the teacher is a second
such network read as a denoiser (ε = 0). With --checkpoint (and --teacher) they are trained full/ runs
instead, on the first --batch images of the run's data:

    python -m full.bench --loss-error --checkpoint runs/tiny-cd/export.pt --teacher runs/tiny-edm/export.pt
"""
from __future__ import annotations

import copy
import time

import torch

import cm
from full.networks import ADMConfig, NCSNppConfig, build_network
from full.presets import CLIParser
from full.train import autocast_ctx

NETS = {  # name -> (config factory, image resolution, channels)
    "ncsnpp-tiny": (lambda: NCSNppConfig.tiny(img_resolution=16), 16, 3),
    "adm-tiny": (lambda: ADMConfig.tiny(image_size=16, num_classes=0), 16, 3),
    "ncsnpp-cifar10": (NCSNppConfig.cifar10, 32, 3),
    "adm-imagenet64": (lambda: ADMConfig.imagenet64(), 64, 3),
}
PRECISIONS = ("fp32", "bf16", "fp16")


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def bench_one(net_name: str, precision: str, batch: int, steps: int, warmup: int, dev: torch.device,
              seed: int = 0) -> dict:
    """Train-step and one-step-sampling throughput (images/s) and peak memory for one setting."""
    make_cfg, res, ch = NETS[net_name]
    net_cfg = make_cfg()
    torch.manual_seed(seed)
    f = cm.ConsistencyFunction(build_network(net_cfg), 0.5, 0.002).to(dev)
    target = copy.deepcopy(f).requires_grad_(False)
    opt = torch.optim.RAdam(f.parameters(), lr=1e-4)
    autocast = autocast_ctx(precision, dev)
    scaler = torch.amp.GradScaler(dev.type, enabled=precision == "fp16")
    sigmas = cm.karras_sigmas(18)
    labels = torch.zeros(batch, dtype=torch.long, device=dev) if getattr(net_cfg, "num_classes", 0) else None
    call = (lambda x, s: f(x, s, labels)) if labels is not None else f
    call_t = (lambda x, s: target(x, s, labels)) if labels is not None else target
    x = torch.randn(batch, ch, res, res, device=dev).clamp(-1, 1)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)

    def train_step():
        with autocast:
            loss = cm.ct_loss(call, call_t, x, sigmas, cm.l2)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        cm.ema_update(target, f, 0.99)
        return loss

    for _ in range(warmup):
        loss = train_step()
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = train_step()
    _sync(dev)
    train_ips = batch * steps / (time.perf_counter() - t0)
    z = torch.randn_like(x)
    with autocast:
        cm.sample_onestep(call, z)
        _sync(dev)
        t0 = time.perf_counter()
        for _ in range(steps):
            cm.sample_onestep(call, z)
        _sync(dev)
    sample_ips = batch * steps / (time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(dev) / 2 ** 30 if dev.type == "cuda" else None
    return dict(net=net_name, precision=precision, batch=batch, train_ips=train_ips, sample_ips=sample_ips,
                peak_gib=peak, loss_finite=bool(torch.isfinite(loss)))


def _perturbed(net_cfg, seed: int, sigma_min: float, dev: torch.device) -> cm.ConsistencyFunction:
    torch.manual_seed(seed)
    f = cm.ConsistencyFunction(build_network(net_cfg), 0.5, sigma_min).to(dev)
    with torch.no_grad():
        for p in f.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return f


def loss_error(net_name: str, precisions: list[str], grids: list[int], batch: int, dev: torch.device,
               seed: int = 0, checkpoint: str = "", teacher_path: str = "") -> list[dict]:
    """Relative change of the CT and CD loss and gradient under autocast against fp32, per grid size N.

    checkpoint / teacher_path: a trained f (its eval EMA) and EDM teacher from full/ runs, measured on the
    first `batch` images of the run's data, instead of perturbed random networks on uniform noise."""
    g = torch.Generator().manual_seed(seed)
    if checkpoint:
        from full import checkpoints
        from full.data import make_dataset
        f, cfg = checkpoints.model_from_state(checkpoints.load(checkpoint), path=checkpoint)
        f = f.to(dev).requires_grad_(True)
        teacher = checkpoints.model_from_state(checkpoints.load(teacher_path or checkpoint),
                                               denoiser=True)[0].to(dev)
        ds = make_dataset(cfg.data.name, cfg.data.root or None, cfg.data.resolution or None)
        x = torch.stack([ds[i][0] for i in range(batch)]).to(dev)
        labels = None
    else:
        make_cfg, res, ch = NETS[net_name]
        f = _perturbed(make_cfg(), seed, 0.002, dev)
        teacher = _perturbed(make_cfg(), seed + 1, 0.0, dev).requires_grad_(False)
        labels = None
        if getattr(make_cfg(), "num_classes", 0):
            labels = torch.zeros(batch, dtype=torch.long, device=dev)
        x = (torch.rand(batch, ch, res, res, generator=g) * 2 - 1).to(dev)
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
                    with autocast_ctx(q, dev):
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
    return rows


def main(argv=None) -> list[dict]:
    p = CLIParser(description=__doc__.splitlines()[0])
    p.add_argument("--net", default="ncsnpp-tiny", choices=sorted(NETS))
    p.add_argument("--batch-size", "--batch", dest="batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=5, help="timed steps per setting")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16, fp16")
    p.add_argument("--device", default="", help="default: cuda if available, else cpu")
    p.add_argument("--loss-error", action="store_true", help="measure the loss/gradient change of each "
                                                                "precision against fp32 instead of speed")
    p.add_argument("--grids", default="18,150,201", help="--loss-error: grid sizes N")
    p.add_argument("--checkpoint", default="", help="--loss-error: a trained full/ checkpoint instead of --net")
    p.add_argument("--teacher", default="", help="--loss-error with --checkpoint: the EDM teacher for CD")
    args = p.parse_args(argv)
    try:
        dev = cm.pick_device(args.device)
        precisions = args.precisions.split(",")
        if bad := [q for q in precisions if q not in PRECISIONS]:
            raise cm.CMError(f"unknown precision {bad[0]!r}; choose from {', '.join(PRECISIONS)}")
        if args.batch < 1 or args.steps < 1 or args.warmup < 0:
            raise cm.CMError(f"need --batch-size >= 1, --steps >= 1, --warmup >= 0 (got {args.batch}, "
                             f"{args.steps}, {args.warmup})")
    except cm.CMError as e:
        cm.exit_on(e)
    threads = torch.get_num_threads()
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({threads} threads)"
    if args.loss_error:
        others = [q for q in precisions if q != "fp32"]
        rows = loss_error(args.net, others, [int(v) for v in args.grids.split(",")], args.batch, dev,
                          checkpoint=args.checkpoint, teacher_path=args.teacher)
        print(f"{args.checkpoint or args.net}, batch {args.batch}, on {name}: change against fp32 on the "
              f"same (x, n, z)")
        print(f"{'N':>4} {'loss':>4} {'precision':>9} {'fp32 loss':>11} {'loss rel':>10} {'grad rel':>10} "
              f"{'grad cos':>9}")
        for r in rows:
            print(f"{r['N']:4d} {r['mode']:>4} {r['precision']:>9} {r['loss']:11.4e} {r['loss_rel']:10.2e} "
                  f"{r['grad_rel']:10.2e} {r['grad_cos']:9.5f}")
        return rows
    print(f"{args.net}, batch {args.batch}, {args.steps} timed steps, on {name}")
    rows = [bench_one(args.net, q, args.batch, args.steps, args.warmup, dev) for q in precisions]
    base = rows[0]
    print(f"{'precision':>9} {'train img/s':>12} {'x':>6} {'1-step img/s':>13} {'x':>6} "
          f"{'peak GiB':>9} finite")
    for r in rows:
        peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "-"
        print(f"{r['precision']:>9} {r['train_ips']:12.1f} {r['train_ips'] / base['train_ips']:6.2f} "
              f"{r['sample_ips']:13.1f} {r['sample_ips'] / base['sample_ips']:6.2f} {peak:>9} "
              f"{r['loss_finite']}")
    return rows


if __name__ == "__main__":
    main()
