"""full.bench: the floors' closed forms, no extra network pass in any recipe's step, the three tables
and the GPU check's dry run end to end on the CPU (timings are reported, never asserted)."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from full import bench

pos = st.floats(1e-3, 1e3)


def test_nominal_floors():
    """Backward = 2 forwards, no optimiser or EMA cost: CT = (3 + 1) / 3, CD = (3 + 3) / 3."""
    assert bench.floor("edm", 1.0, 3.0) == 1.0
    assert bench.floor("ct", 1.0, 3.0) == pytest.approx(4 / 3)
    assert bench.floor("cd", 1.0, 3.0) == pytest.approx(2.0)


@given(pos, pos, pos, pos)
def test_floor_is_the_extra_work_over_an_edm_step(F, B, O, U):
    edm = B + O + U
    assert bench.floor("edm", F, B, O, U) == pytest.approx(1.0)
    assert bench.floor("ct", F, B, O, U) == pytest.approx(1 + (F + U) / edm)
    assert bench.floor("cd", F, B, O, U) == pytest.approx(1 + (3 * F + U) / edm)
    assert bench.floor("cd", F, B, O, U, target=False) == pytest.approx(1 + 3 * F / edm)  # μ = 0
    assert bench.floor("ict", F, B, O, U) == bench.floor("ect", F, B, O, U) == pytest.approx(1 + F / edm)
    J = 2.5 * F
    assert bench.floor("sct", F, B, O, U, J=J) == pytest.approx(1 + J / edm)  # one JVP of the target
    assert bench.floor("scd", F, B, O, U, J=J) == pytest.approx(1 + (J + F) / edm)  # and the teacher
    assert bench.floor("sct-fd", F, B, O, U) == pytest.approx(1 + 3 * F / edm)  # three target forwards


@pytest.mark.parametrize("recipe", ["ict", "ect", "cd"])
def test_mu_zero_keeps_no_target_copy_and_gives_the_same_loss(recipe):
    """With μ = 0, θ⁻ = stopgrad(θ): the trainer keeps no copy, and its loss equals the loss with a
    separate frozen copy of θ as the target (same draws), gradient included; with μ > 0 there is a copy."""
    import copy

    import cm
    s = bench.Setup("ncsnpp-tiny", 4, torch.device("cpu"))
    tr = bench.make_trainer(s, recipe)
    if recipe == "cd":
        assert tr.cfg.cm.mu == 0
    assert tr.target is None
    x, y = bench.batch_for(tr, 4, s.dev)
    with torch.no_grad():
        for p in tr.model.parameters():  # a zero output layer would make f ignore the network
            p.add_(0.05 * torch.randn_like(p))
    torch.manual_seed(1)
    n, z, t = torch.randint(0, 17, (4,)), torch.randn_like(x), torch.rand(4) * 5 + 0.1
    draws = dict(sigma=t) if recipe == "ect" else dict(n=n)
    sched = cm.Schedule(0, 0.0, 3) if recipe == "ect" else cm.Schedule(18, 0.0)
    loss = tr.loss(x, y, sched, z=z, **draws)
    grads = torch.autograd.grad(loss, list(tr.model.parameters()), allow_unused=True)
    tr.target = copy.deepcopy(tr.model).requires_grad_(False)  # the copy the trainer no longer keeps
    ref = tr.loss(x, y, sched, z=z, **draws)
    ref_grads = torch.autograd.grad(ref, list(tr.model.parameters()), allow_unused=True)
    assert torch.equal(loss, ref)
    for a, b in zip(grads, ref_grads):
        assert (a is None and b is None) or torch.equal(a, b)
    with_mu = bench.resolve(bench.NETS[s.net], ["cm.mode='cd'", "cm.metric='l2'", "cm.mu=0.5"])
    assert bench.Trainer(with_mu, s.dev, tr.teacher).target is not None


@pytest.mark.parametrize("recipe, grad_calls, no_grad_calls",
                         [("edm", 1, 0), ("ct", 1, 1), ("cd", 1, 3), ("ict", 1, 1), ("ect", 1, 1),
                          ("sct", 1, 1), ("scd", 1, 2), ("sct-fd", 1, 3)])
def test_a_step_runs_the_network_no_more_than_the_recipe_needs(recipe, grad_calls, no_grad_calls):
    """One forward with grad (then its backward) per step; CT adds the target, CD the target and a Heun
    step of the teacher (2 calls); sCT one JVP pass of the target (forward-mode: one call), sCD that and
    one teacher call, sCT-fd three target calls. Any extra pass in a loss or Trainer.step fails this."""
    s = bench.Setup("ncsnpp-tiny", 2, torch.device("cpu"))
    tr = bench.make_trainer(s, recipe)
    calls = []
    for m in {tr.model.net, getattr(tr.target, "net", None), getattr(tr.teacher, "net", None)} - {None}:
        m.register_forward_hook(lambda *_: calls.append(torch.is_grad_enabled()))
    x, y = bench.batch_for(tr, 2, s.dev)
    tr.step(x, y)
    assert (calls.count(True), calls.count(False)) == (grad_calls, no_grad_calls)


def test_bench_prints_three_tables(capsys):
    r = bench.main(["--net", "ncsnpp-tiny", "--batch", "2", "--rounds", "1", "--warmup", "0",
                    "--device", "cpu"])
    out = capsys.readouterr().out
    assert all(t in out for t in ("\ntrain:", "\nsample", "\noptions:"))
    assert [row["recipe"] for row in r["train"]] == bench.RECIPES
    assert all(row["ips"] > 0 and row["floor"] >= 1 and row["mem_gib"] > 0 for row in r["train"])
    assert {row["sampler"] for row in r["sample"]} == {"bare F", "1-step", "2-step", "Heun 35"}
    fp32 = [row for row in r["options"] if row["option"] == "fp32"][0]
    assert fp32["max_delta"] == 0 and fp32["step_x"] == 1
    assert all(row["max_delta"] < 0.1 for row in r["options"] if row["max_delta"] is not None)


@pytest.mark.parametrize("argv, needle", [(["--precision", "fp8"], "unknown precision"),
                                          (["--tables", "train,speed"], "unknown table"),
                                          (["--rounds", "-1"], "--rounds >= 0"),
                                          (["--device", "tpu"], "device")])
def test_bench_rejects_bad_arguments_in_one_line(capsys, argv, needle):
    with pytest.raises(SystemExit) as e:
        bench.main([*argv, "--net", "ncsnpp-tiny"])
    err = capsys.readouterr().err
    assert e.value.code == 1 and needle in err and err.count("\n") == 1, err


@pytest.mark.parametrize("where", ["torch.compile", "first call"])
def test_a_failing_compile_costs_only_its_row(monkeypatch, capsys, where):
    """torch.compile raising (no C compiler for Triton, an unsupported op) at compile time or at the first
    call of the compiled net: the options table reports it in one line and keeps its other rows."""
    class Broken(torch.nn.Module):
        def forward(self, *args):
            raise RuntimeError("no C compiler found for Triton\n  (a long traceback)")

    def fake_compile(module, *args, **kwargs):
        if where == "torch.compile":
            raise RuntimeError("Dynamo is not supported here\n  details")
        return Broken()
    monkeypatch.setattr(torch, "compile", fake_compile)
    r = bench.main(["--net", "ncsnpp-tiny", "--batch", "2", "--rounds", "1", "--warmup", "0",
                    "--device", "cpu", "--tables", "options", "--compile"])
    reason = "Dynamo is not supported here" if where == "torch.compile" else "no C compiler found for Triton"
    out = capsys.readouterr().out
    assert [v for v in out.splitlines() if "compile" in v and "failed" in v] == \
        [f"  compile: failed (RuntimeError: {reason})"]
    rows = {row["option"]: row for row in r["options"]}
    assert set(rows) == {"fp32", "bf16", "channels_last", "radam", "radam foreach", "adam", "adam fused",
                         "compile"}
    assert rows["compile"]["failed"] == f"RuntimeError: {reason}" and rows["compile"]["step_sec"] is None
    assert rows["fp32"]["max_delta"] == 0 and rows["channels_last"]["max_delta"] < 1e-4


def test_loss_error_compares_each_precision_with_fp32(capsys):
    rows = bench.main(["--loss-error", "--net", "ncsnpp-tiny", "--batch-size", "2", "--grids", "18,40",
                       "--precision", "fp32,bf16", "--device", "cpu"])
    assert [(r["N"], r["mode"]) for r in rows] == [(18, "ct"), (18, "cd"), (40, "ct"), (40, "cd")]
    for r in rows:  # bf16 moves them a little, not to nonsense (docs/benchmarks.md reports the sizes)
        assert r["loss"] > 0 and 0 < r["loss_rel"] < 0.05 and 0 < r["grad_rel"] < 0.5 and r["grad_cos"] > 0.9
    assert "grad rel" in capsys.readouterr().out


def test_ddp_row_times_one_and_two_processes(capsys):
    """--ddp launches a one-process and a two-process (torchrun, gloo) step at the same per-process
    batch and reports their ratio; the numbers are timings, so only their presence and sense are checked."""
    r = bench.main(["--ddp", "--net", "ncsnpp-tiny", "--batch-size", "2", "--rounds", "1", "--recipe", "sct",
                    "--device", "cpu"])
    assert r["recipe"] == "sct" and r["sec_1"] > 0 and r["sec_2"] > 0
    assert r["efficiency"] == pytest.approx(r["sec_1"] / r["sec_2"])
    assert "efficiency" in capsys.readouterr().out
