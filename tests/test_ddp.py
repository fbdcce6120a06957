"""DDP on 2 CPU processes (gloo) takes the same optimiser step as 1 process on the whole global batch, and
torchrun runs full.train end to end and resumes bit for bit (docs/reliability.md; kill and
resume under torchrun)."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

OVERRIDES = ["opt.batch=8", "opt.lr=1e-3"]
STEPS = 2


def _batch(step: int, N: int):
    """The global batch of one step: images, indices n ~ U{0..N-2} and noise z, fixed by the step."""
    g = torch.Generator().manual_seed(100 + step)
    x = torch.rand(8, 1, 8, 8, generator=g) * 2 - 1
    n = torch.randint(0, N - 1, (8,), generator=g)
    z = torch.randn(8, 1, 8, 8, generator=g)
    return x, n, z


def _train(rank: int, world: int, microbatch: int, out: str, port: int):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import cm
    from full import dist
    from full.model import make_model
    from full.presets import resolve
    from full.train import Trainer
    dist.init("cpu")
    cfg = resolve("tiny-ct", OVERRIDES + [f"opt.microbatch={microbatch}"])
    tr = Trainer(cfg, torch.device("cpu"))
    per = 8 // world
    for step in range(STEPS):
        x, n, z = _batch(step, cm.schedule(cfg.cm, step, cfg.opt.steps).N)
        s = slice(rank * per, (rank + 1) * per)
        tr.step(x[s], None, n=n[s], z=z[s])
    if rank == 0:
        torch.manual_seed(cfg.run.seed)
        init = make_model(cfg).state_dict()
        torch.save({"model": tr.model.state_dict(), "target": tr.target.state_dict(), "init": init,
                    "ema": {r: m.state_dict() for r, m in tr.emas.items()}}, out)
    dist.cleanup()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one(tmp_path):
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    mp.spawn(_train, args=(1, 0, str(one), _free_port()), nprocs=1)
    mp.spawn(_train, args=(2, 2, str(two), _free_port()), nprocs=2)  # 2 ranks x 2 rounds of 2
    a, b = torch.load(one, weights_only=True), torch.load(two, weights_only=True)
    for part in ("model", "target"):
        for k in a[part]:
            torch.testing.assert_close(a[part][k], b[part][k], rtol=1e-5, atol=1e-6, msg=f"{part}.{k}")
    for r in a["ema"]:
        for k in a["ema"][r]:
            torch.testing.assert_close(a["ema"][r][k], b["ema"][r][k], rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(v, a["model"][k]) for k, v in a["init"].items())  # the step moved θ


def _torchrun(out: Path, steps: int, *extra: str) -> subprocess.CompletedProcess:
    """python -m torch.distributed.run (= torchrun) with 2 CPU processes, tiny-edm (whose loss, unlike CT's
    curriculum, does not depend on opt.steps: a run stopped at step 3 and one told to go to 4 agree)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "full.train", "--preset", "tiny-edm", f"run.out={str(out)!r}", "run.ckpt_every=3", "opt.batch=16",
           f"opt.steps={steps}", *extra]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV)
    assert p.returncode == 0, p.stderr[-2000:]
    return p


def test_torchrun_train_and_resume_is_bit_exact(tmp_path):
    resumed, straight = tmp_path / "resumed", tmp_path / "straight"
    _torchrun(resumed, 3)
    assert (resumed / "ckpt-0000003.pt").is_file() and (resumed / "grid-heun-0000003.png").is_file()
    state = torch.load(resumed / "ckpt-0000003.pt", weights_only=True)
    assert len(state["rng"]["cpu"]) == 2 and state["data"]["world"] == 2 and state["data"]["batch"] == 8
    p = _torchrun(resumed, 4, "--allow-config-change")  # opt.steps 3 -> 4
    assert "resumed from" in p.stdout and "ckpt-0000003.pt" in p.stdout
    _torchrun(straight, 4)
    a = torch.load(resumed / "ckpt-0000004.pt", weights_only=True)
    b = torch.load(straight / "ckpt-0000004.pt", weights_only=True)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for r in a["ema"]:
        assert all(torch.equal(a["ema"][r][k], b["ema"][r][k]) for k in a["ema"][r])
    assert all(torch.equal(x, y) for x, y in zip(a["rng"]["cpu"], b["rng"]["cpu"]))
    losses = lambda run: [eval(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]  # noqa
    assert losses(resumed)[-1] == losses(straight)[-1]
