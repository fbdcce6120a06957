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


def main(argv=None) -> list[dict]:
    p = CLIParser(description=__doc__.splitlines()[0])
    p.add_argument("--net", default="ncsnpp-tiny", choices=sorted(NETS))
    p.add_argument("--batch-size", "--batch", dest="batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=5, help="timed steps per setting")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16, fp16")
    p.add_argument("--device", default="", help="default: cuda if available, else cpu")
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
