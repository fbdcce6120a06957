"""Step search: cm.ternary_search on unimodal sequences, and `python -m full.sample --search-ts` end to end
on a digits checkpoint trained by full.train (its table, search.json, its criterion, its one-line errors)."""
import dataclasses
import json
import math
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import cm
import full.sample
import full.train
from full import checkpoints
from full import evaluate as ev
from full.files import to_uint8
from full.model import make_model
from full.presets import resolve

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
ROW = re.compile(r"^\s*(\d+)\s+([0-9.e+-]+)\s+([0-9.e+-]+)(\s+<- chosen)?$")


def bound(n: int) -> int:
    """Evaluations a ternary search may spend on n candidates: two per round, a round keeps at most
    ⌈2w/3⌉ of a width w >= 3, then at most three candidates compared directly."""
    return 2 * math.ceil(math.log(max(n, 1)) / math.log(1.5)) + 3


@st.composite
def unimodal(draw):
    """(lo, values): strictly decreasing, a flat bottom, strictly increasing, on lo, lo + 1, ..."""
    down = draw(st.lists(st.integers(1, 50), max_size=40))
    flat = draw(st.integers(1, 4))
    up = draw(st.lists(st.integers(1, 50), max_size=40))
    base = draw(st.integers(-100, 100))
    left = [base + sum(down[i:]) for i in range(len(down))]  # ... > base
    right = [base + sum(up[:i + 1]) for i in range(len(up))]
    return draw(st.integers(-20, 20)), left + [base] * flat + right


@given(unimodal())
def test_ternary_search_finds_a_minimiser_within_the_bound(case):
    lo, values = case
    calls = Counter()

    def f(i):
        calls[i] += 1
        return values[i - lo]

    best, tried = cm.ternary_search(f, lo, lo + len(values) - 1)
    assert lo <= best < lo + len(values) and values[best - lo] == min(values)
    assert max(calls.values()) == 1  # never the same candidate twice
    assert tried == {i: values[i - lo] for i in calls} and list(tried) == list(calls)
    assert len(calls) <= bound(len(values))
    assert tried[best] == min(tried.values())


def test_ternary_search_edges():
    assert cm.ternary_search(lambda i: 5.0, 3, 3) == (3, {3: 5.0})
    with pytest.raises(ValueError, match="empty"):
        cm.ternary_search(lambda i: 0.0, 4, 3)
    with pytest.raises(ValueError, match="NaN"):
        cm.ternary_search(lambda i: math.nan, 1, 16)
    # the 16 middle indices of an 18-point grid (the official two-step CD search): 2 log_1.5(16) + 3
    assert len(cm.ternary_search(lambda i: (i - 11) ** 2, 1, 16)[1]) <= 17


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A digits checkpoint made by full.train (tiny-ct: 8x8 digits, two steps)."""
    out = tmp_path_factory.mktemp("digits")
    full.train.train(resolve("tiny-ct", ["opt.steps=2", f"run.out={str(out)!r}"]))
    return out / "export.pt"


def karras(i: int, n: int) -> float:
    """Index i of an n-point grid counted from T = 80 (ε = 0.002, ρ = 7)."""
    return (80 ** (1 / 7) + i / (n - 1) * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7


def table(stdout: str) -> list[tuple[int, float, float, bool]]:
    rows = [ROW.match(line) for line in stdout.splitlines()]
    return [(int(m[1]), float(m[2]), float(m[3]), bool(m[4])) for m in rows if m]


def samples(path, levels, n: int, seed: int = 0):
    f, cfg = checkpoints.model_from_state(checkpoints.load(path))
    x, _ = cm.generate(f, cfg.cm, (1, 8, 8), range(n), levels, seed)
    return x


def test_cli_searches_ts_on_a_digits_checkpoint(digits_run, tmp_path):
    p = subprocess.run([sys.executable, "-m", "full.sample", "--checkpoint", str(digits_run), "--search-ts",
                        "--num-samples", "24", "--grid-steps", "12", "--batch", "10", "--seed", "3",
                        "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=ENV)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = table(p.stdout)
    res = json.loads((tmp_path / "search.json").read_text())
    tried = res["tried"]
    # one row per evaluated level, each index once, in index order, within 1..N-2
    assert [r[0] for r in rows] == [t["ts_index"] for t in tried] == sorted(res["evaluated_in_order"])
    assert len(set(res["evaluated_in_order"])) == len(tried) <= bound(10)
    assert all(1 <= r[0] <= 10 for r in rows)
    for (i, sigma, value, _), t in zip(rows, tried):
        assert sigma == pytest.approx(karras(i, 12), rel=1e-5) and t["sigma"] == pytest.approx(karras(i, 12))
        assert value == pytest.approx(t["digits_feature_distance"], rel=1e-5)
    best = res["best"]["ts_index"]
    assert [r[0] for r in rows if r[3]] == [best]
    assert best == min(tried, key=lambda t: t["digits_feature_distance"])["ts_index"]
    assert res["ts"] == [0, best, 11] and f"chosen: --ts 0,{best},11 --grid-steps 12" in p.stdout
    # each value is the stated criterion of two-step samples drawn from the same seeds 3, 4, ...
    real, net = cm.load_digits(), cm.digits_classifier(verbose=False)
    for t in (tried[0], tried[-1]):
        x = samples(digits_run, [80.0, karras(t["ts_index"], 12)], 24, seed=3)
        assert cm.digits_feature_distance(x, real, net) == pytest.approx(t["digits_feature_distance"],
                                                                         rel=1e-6)


def test_search_sigma_is_log_spaced(digits_run, tmp_path, capsys):
    full.sample.main(["--checkpoint", str(digits_run), "--search-ts", "--search-sigma", "--num-samples", "8",
                      "--grid-steps", "7", "--out", str(tmp_path)])
    rows = table(capsys.readouterr().out)
    res = json.loads((tmp_path / "search.json").read_text())
    assert rows and len(rows) == len(res["tried"])
    for i, sigma, _, _ in rows:
        assert 1 <= i <= 5
        assert math.log(sigma) == pytest.approx(math.log(80) + i / 6 * (math.log(0.002) - math.log(80)),
                                                abs=1e-5)
    assert res["levels"] == [80.0, pytest.approx(res["best"]["sigma"])] and "ts" not in res


def test_search_by_fid_against_reference_statistics(digits_run, tmp_path, monkeypatch, capsys):
    from test_evaluate import StandIn
    monkeypatch.setattr(ev, "make_extractor", lambda device=None, weights_path=None: StandIn())
    ref = ev.make_reference(to_uint8(cm.load_digits()), StandIn())
    ev.save_stats(tmp_path / "ref.npz", ref["mu"], ref["sigma"], ref["n"])
    full.sample.main(["--checkpoint", str(digits_run), "--search-ts", "--num-samples", "16",
                      "--grid-steps", "6", "--ref", str(tmp_path / "ref.npz"), "--out", str(tmp_path)])
    assert len(table(capsys.readouterr().out)) > 0
    res = json.loads((tmp_path / "search.json").read_text())
    assert res["criterion"] == "fid"
    for t in res["tried"]:
        x = samples(digits_run, [80.0, karras(t["ts_index"], 6)], 16)
        feats = StandIn()(torch.from_numpy(to_uint8(x)).permute(0, 3, 1, 2).repeat(1, 3, 1, 1))[0].double()
        mu, cov = feats.mean(0), torch.cov(feats.T)  # FID's formula, in torch, from the features
        want = cm.frechet_distance(mu, cov, torch.as_tensor(ref["mu"]), torch.as_tensor(ref["sigma"]))
        assert t["fid"] == pytest.approx(want, rel=1e-4, abs=1e-6)


@pytest.fixture(scope="module")
def edm_export(tmp_path_factory):
    cfg = resolve("tiny-edm")
    path = tmp_path_factory.mktemp("edm") / "export.pt"
    return checkpoints.export(path, {cfg.ema.rates[0]: make_model(cfg)}, cfg, step=0)


def error_of(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        full.sample.main(argv)
    assert e.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.parametrize("extra, message", [
    (["--ts", "0,5,17"], "picks the levels itself"),
    (["--sigmas", "80,1"], "picks the levels itself"),
    (["--grid-steps", "2"], "a grid of >= 3 levels"),
    (["--grid-steps", "3"], None),
    (["--num-samples", "1"], "--num-samples >= 2"),
    (["--ref", "no/such.npz"], "reference statistics not found"),
])
def test_bad_inputs_are_one_line(digits_run, tmp_path, capsys, extra, message):
    argv = ["--checkpoint", str(digits_run), "--search-ts", "--num-samples", "4", "--out", str(tmp_path),
            *extra]
    if message is None:  # 3 levels: only i = 1 to try
        full.sample.main(argv)
        assert [r[0] for r in table(capsys.readouterr().out)] == [1]
        return
    assert message in error_of(capsys, argv)


def test_grid_of_fewer_than_three_levels_and_stray_flags(digits_run, tmp_path, capsys):
    _, cfg = checkpoints.model_from_state(checkpoints.load(digits_run))
    with pytest.raises(ValueError, match=">= 3 levels"):
        cm.search_two_step(lambda levels: 0.0, 2, cfg.cm)
    assert "belong to --search-ts" in error_of(capsys, ["--checkpoint", str(digits_run), "--search-sigma"])


def test_edm_checkpoint_and_other_data_are_one_line(edm_export, digits_run, tmp_path, capsys):
    assert "edm denoiser" in error_of(capsys, ["--checkpoint", str(edm_export), "--search-ts",
                                               "--out", str(tmp_path)])
    state = checkpoints.load(digits_run)
    f, cfg = checkpoints.model_from_state(state)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, name="folder", root="imgs"))
    other = checkpoints.export(tmp_path / "other.pt", {cfg.ema.eval_rate: f}, cfg, step=0)
    assert "needs --ref" in error_of(capsys, ["--checkpoint", str(other), "--search-ts",
                                              "--out", str(tmp_path)])


# ----------------------------------------------------------------------------------------------
# cm.py --checkpoint CKPT --search-ts (its toy and digits checkpoints)

TINY = dict(dataset="toy", channels=32, batch_size=64, log_every=5, ckpt_every=10, device="cpu", report=False)


@pytest.fixture(scope="module")
def toy_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    cm.train(cm.config(mode="ct", steps=10, out=str(out / "ct"), **TINY))
    cm.train(cm.config(mode="edm", steps=2, out=str(out / "edm"), **TINY))
    return out / "ct" / "ckpt.pt", out / "edm" / "ckpt.pt"


def cm_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "cm.py"), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=ENV)


def test_cm_cli_searches_by_energy_distance(toy_runs, tmp_path):
    p = cm_cli("--checkpoint", str(toy_runs[0]), "--search-ts", "--num-samples", "300", "--grid-steps", "9",
               "--seed", "2", "--out", str(tmp_path))
    assert p.returncode == 0, p.stderr[-2000:]
    rows, res = table(p.stdout), json.loads((tmp_path / "search.json").read_text())
    assert res["criterion"] == "energy_distance" and [r[0] for r in rows] == sorted(res["evaluated_in_order"])
    best = min(res["tried"], key=lambda t: t["energy_distance"])
    assert res["best"] == best and [r[0] for r in rows if r[3]] == [best["ts_index"]]
    model, cfg = cm.model_from_checkpoint(cm.load_checkpoint(toy_runs[0]))
    real = cm.toy_ring(2000, torch.Generator().manual_seed(2 + 123))
    for t in res["tried"]:
        assert t["sigma"] == pytest.approx(karras(t["ts_index"], 9), rel=1e-5)
        x, _ = cm.generate(model, cfg.cm, (2,), range(300), [80.0, karras(t["ts_index"], 9)], seed=2)
        assert cm.energy_distance(x, real) == pytest.approx(t["energy_distance"], rel=1e-5)


@pytest.mark.parametrize("which, extra, message", [
    (1, [], "edm denoiser"),
    (0, ["--ts", "0,3,17"], "not --ts"),
    (0, ["--grid-steps", "2"], ">= 3 levels"),
    (0, ["--num-samples", "1"], "2 <= --num-samples"),
    (None, ["--search-sigma"], "go with --checkpoint"),
])
def test_cm_cli_bad_inputs_are_one_line(toy_runs, tmp_path, which, extra, message):
    ckpt = [] if which is None else ["--checkpoint", str(toy_runs[which]), "--search-ts"]
    p = cm_cli(*ckpt, *extra, "--out", str(tmp_path))
    err = p.stderr.strip().splitlines()
    assert p.returncode != 0 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
