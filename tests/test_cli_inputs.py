"""Flag values that pass argparse but not the program: one line, before any work is done.

Each class here once gave a traceback, a late failure or a silent surprise: sizes without an upper bound
(--num-samples 10^12 allocated, then MemoryError), an --out made only after every sample was drawn, text where
numbers go (--class-labels x, --grids a,b), flags that contradict (--sampler onestep with two levels), network
settings that do not build (net.dropout=1.5, widths the group norms cannot divide), an unwritable --json found
only after the benchmark had run.
"""
import dataclasses
import os
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_reliability import assert_one_line, run_main

import cm
import full.bench


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("full") / "run"
    code, err = run_main("full.train", ["--preset", "tiny-ct", "opt.steps=1", "run.sample_every=0",
                                        "run.device=cpu", f"run.out={str(out)!r}"])
    assert code == 0, err
    return out / "export.pt"


@pytest.mark.parametrize("flags, needle", [
    (["--class-labels", "x"], "--class-labels"),
    (["--class-labels", "1,two"], "--class-labels"),
    (["--num-samples", str(10 ** 12)], "--num-samples"),
    (["--num-samples", str(10 ** 7 + 1)], "--num-samples"),
    (["--batch-size", str(10 ** 9)], "--batch-size"),
    (["--grid-steps", str(10 ** 9)], "--grid-steps"),
    (["--seed", str(2 ** 70)], "--seed"), (["--seed", "-1"], "--seed"),
    (["--sampler", "onestep", "--ts", "0,8,17"], "--sampler onestep"),
    (["--sampler", "onestep", "--sigmas", "80,1"], "--sampler onestep"),
])
def test_full_sample_refuses_in_one_line_and_writes_nothing(export, tmp_path, flags, needle):
    out = tmp_path / "s"
    code, err = run_main("full.sample", ["--checkpoint", str(export), "--out", str(out), "--device", "cpu",
                                         *flags])
    assert_one_line(code, err, needle)
    assert not (out / "samples.npz").exists()


def test_full_sample_checks_out_before_it_samples(export, tmp_path, monkeypatch):
    import full.sample
    monkeypatch.setattr(full.sample, "generate", lambda *a, **k: pytest.fail("sampled before --out"))
    (tmp_path / "file").write_text("")
    for bad in (tmp_path / "file", tmp_path / "file" / "below"):
        code, err = run_main("full.sample", ["--checkpoint", str(export), "--out", str(bad),
                                             "--device", "cpu"])
        assert_one_line(code, err, str(tmp_path / "file"))


@pytest.mark.parametrize("flags, needle", [
    (["--grids", "a,b"], "--grids"), (["--grids", "1,18"], "--grids"),
    (["--json", "/no/such/folder/x.json"], "--json"), (["--json", "."], "--json"),
])
def test_full_bench_checks_its_flags_before_the_benchmark(monkeypatch, flags, needle):
    monkeypatch.setattr(full.bench, "bench", lambda *a, **k: pytest.fail("benchmarked before the check"))
    code, err = run_main("full.bench", ["--device", "cpu", *flags])
    assert_one_line(code, err, needle)


@pytest.mark.parametrize("override", ["net.dropout=1.5", "net.dropout=-0.1", "net.model_channels=7",
                                      "net.model_channels=0"])
def test_network_settings_that_do_not_build_are_refused_under_print_config(override):
    code, err = run_main("full.train", ["--preset", "tiny-ct", override, "--print-config"])
    assert_one_line(code, err, "net")


def test_full_sample_bounds_the_heun_grid_before_sampling(tmp_path, monkeypatch):
    """--steps sets a denoiser's Heun grid: 10^9 levels would be 2·10^9 network calls (a hang) and a 4 GB
    grid, so it is bounded like --grid-steps, before anything is sampled."""
    import full.sample
    out = tmp_path / "edm"
    code, err = run_main("full.train", ["--preset", "tiny-edm", "opt.steps=1", "run.sample_every=0",
                                        "run.device=cpu", f"run.out={str(out)!r}"])
    assert code == 0, err
    monkeypatch.setattr(full.sample, "generate", lambda *a, **k: pytest.fail("sampled before the check"))
    for steps in (10 ** 9, 2 ** 16 + 1):
        code, err = run_main("full.sample", ["--checkpoint", str(out / "export.pt"), "--out",
                                             str(tmp_path / "s"), "--device", "cpu", "--steps", str(steps)])
        assert_one_line(code, err, "--steps <= 65536")


@pytest.mark.parametrize("override, needle", [
    ("run.seed=-1", "run.seed"), (f"run.seed={2 ** 64}", "run.seed"),
    (f"run.grid_steps={10 ** 20}", "run.grid_steps"), (f"run.sample_num={10 ** 12}", "run.sample_num"),
    (f"data.num_workers={10 ** 6}", "data.num_workers"), (f"opt.batch={10 ** 9}", "opt.batch"),
    (f"opt.steps={2 ** 70}", "opt.steps"), ("net.num_blocks=-1", "num_blocks"),
    ("net.num_blocks=0", "num_blocks"),
    ("net.num_classes=-1", "num_classes"), (f"net.img_resolution={2 ** 40}", "img_resolution"),
    ("net.attn_resolutions=(3,)", "attn_resolutions"), ("net.attn_resolutions=(16,)", "attn_resolutions"),
])
def test_full_train_sizes_and_counts_are_bounded_where_they_are_parsed(override, needle):
    """Integers that once passed --print-config and then overflowed (seed 2^64, grid_steps 10^20), exhausted
    memory (sample_num 10^12), started 10^6 worker processes, or trained another network than asked without
    a word (attention at a resolution no level has: tiny-ct's levels are 8 and 4)."""
    code, err = run_main("full.train", ["--preset", "tiny-ct", override, "--print-config"])
    assert_one_line(code, err, needle)


@pytest.mark.parametrize("text", ["-" * 100_000 + "1", "(" * 100_000 + ")" * 100_000, "[" * 150 + "]" * 150,
                                  "9" * 5000, "(" * 5 + "1," + "),)" * 5],
                         ids=["minus-chain", "parens-1e5", "brackets-150", "digits-5000", "nested-tuples"])
def test_an_override_nested_or_long_past_the_parser_is_one_short_line(text):
    """literal_eval of a value nested past Python's parser is a MemoryError or RecursionError, not a
    ValueError: the override is the wrong type like any other, and the line shows only its start."""
    code, err = run_main("full.train", ["--preset", "tiny-ct", f"run.ts={text}", "--print-config"])
    assert_one_line(code, err, "run.ts=", "has the wrong type")
    assert len(err) < 400, err


def test_a_quoted_override_of_bytes_that_are_not_utf8_is_the_path_without_its_quotes(tmp_path):
    """argv holds bytes that are not UTF-8 as surrogates, which literal_eval cannot take: the quoted value
    used to be taken whole, quotes and all, so the run went to a folder named "'/tmp/...'" with exit 0."""
    from full.config import apply_override
    from full.presets import get_preset
    want = str(tmp_path / "q") + os.fsdecode(b"\xff")
    for item in (f"run.out='{want}'", f'run.out="{want}"', f"run.out={want}"):
        assert apply_override(get_preset("tiny-ct"), item).run.out == want
    assert os.fsencode(want).endswith(b"q\xff")
    code, err = run_main("full.train", ["--preset", "tiny-ct", "opt.steps=1", "run.device='cpu'",
                                        f"run.out='{want}'"])
    assert code == 0, err
    assert (tmp_path / os.fsdecode(b"q\xff") / "export.pt").is_file() and sorted(os.listdir(tmp_path)) == [
        os.fsdecode(b"q\xff")]


@pytest.mark.parametrize("override", ["opt.betas={[1]}", "opt.lr={[]: 1}", "run.ts={{1}}"])
def test_an_override_literal_eval_fails_on_with_a_type_error_is_the_wrong_type(override):
    code, err = run_main("full.train", ["--preset", "tiny-ct", override, "--print-config"])
    assert_one_line(code, err, "has the wrong type")


def test_a_nul_in_the_run_folder_is_one_line(tmp_path):
    code, err = run_main("full.train", ["--preset", "tiny-ct", "opt.steps=1", "run.device='cpu'",
                                        f"run.out='{tmp_path}/a\\x00b'"])
    assert_one_line(code, err, "NUL")
    code, err = run_main("cm.py", ["--dataset", "toy", "--steps", "1", "--out", f"{tmp_path}/a\x00b"])
    assert_one_line(code, err, "NUL")


@settings(max_examples=40, deadline=None)
@given(seed=st.one_of(st.integers(-2 ** 70, 2 ** 70), st.integers(2 ** 62 - 5, 2 ** 63 + 5)))
def test_an_accepted_seed_derives_seeds_torch_takes(seed):
    """Any run.seed: refused in one line naming it, or every seed the trainer derives from it (a rank's
    offset 1_000_003 (rank + 1), plus the step, for up to 2^16 ranks and 2^40 steps) is one
    torch.manual_seed takes (an int64 that is not negative)."""
    code, err = run_main("full.train", ["--preset", "tiny-ct", f"run.seed={seed}", "--print-config"])
    if code == 0:
        torch.Generator().manual_seed(seed)
        torch.Generator().manual_seed(seed + 1_000_003 * 2 ** 16 + 2 ** 40)
        assert seed >= 0
    else:
        assert_one_line(code, err, "run.seed")


@settings(max_examples=10, deadline=None)
@given(order=st.permutations(["net.img_resolution=16", "net.attn_resolutions=(8,)",
                              "net.channel_mult=(1,2,2)", "cm.sigma_min=100.0", "cm.sigma_max=200.0"]))
def test_overrides_that_go_together_are_accepted_in_any_order(order):
    """Fields checked together (a resolution and its attention levels, sigma_min < sigma_max) are checked
    once every override is applied: any order of a valid set gives the same config."""
    from full.config import to_json
    from full.presets import resolve
    cfg = resolve("tiny-ct", list(order))
    assert (cfg.net.img_resolution, cfg.net.attn_resolutions, cfg.cm.sigma_min) == (16, (8,), 100.0)
    assert to_json(cfg) == to_json(resolve("tiny-ct", sorted(order)))


# ----------------------------------------------------------------------------------------------
# cm.py: a flag its mode does not read, or that contradicts another, is refused


class _Spy(cm.CMConfig):
    """A CMConfig that records which of its fields are read while `recording` holds a set."""
    recording = None

    def __getattribute__(self, name):
        seen = type(self).recording
        if seen is not None and name in cm.MATH_FIELDS:
            seen.add(name)
        return object.__getattribute__(self, name)


@pytest.mark.parametrize("mode", sorted(cm.RECIPES))
def test_a_mode_reads_only_the_settings_it_claims(mode):
    """cm.py refuses a math flag outside a recipe's Recipe.fields (--ablate for ct, --mu for ct); that is
    only right if the recipe's schedule and loss never read it: one step of each, every field read
    recorded, is within the fields it claims plus the scalings every mode has."""
    cfg = cm.config("toy", mode, channels=8, batch_size=8, device="cpu")
    c = _Spy(**{f: getattr(cfg.cm, f) for f in cm.MATH_FIELDS})
    f = cm.parameterize(cfg.cm, cm.make_net(cfg, (2,)))
    D = cm.parameterize(dataclasses.replace(cfg.cm, mode="edm"), cm.make_net(cfg, (2,))) \
        if cm.RECIPES[mode].teacher else None
    x, metric = cm.toy_ring(8), cm.make_metric(cfg.cm)  # the metric is built for every mode (d unused)
    _Spy.recording = seen = set()
    try:
        for k in (0, 5, 9):
            cm.recipe_loss(c, cm.schedule(c, k, 10), f, f, D, x, torch.randn_like(x), metric)
            cm.keeps_target_copy(c)
    finally:
        _Spy.recording = None
    common = {"mode", "sigma_min", "sigma_max", "sigma_data", "rho", "noise_cond", "lpips_pretrained"}
    assert seen - common <= set(cm.RECIPES[mode].fields), (mode, seen)
    assert all(mode in cm.readers(k) for k in seen)  # what it reads, cm.py accepts


@pytest.mark.parametrize("flags, needle", [
    (["--mode", "ct", "--ablate", "weight"], "--ablate"), (["--mode", "ct", "--mu", "0.5"], "--mu"),
    (["--mode", "cd", "--mu0", "0.5"], "--mu0"), (["--mode", "sct", "--metric", "l1"], "--metric"),
    (["--mode", "edm", "--teacher", "t.pt"], "--teacher"),
    (["--mode", "ct", "--teacher", "t.pt"], "--teacher"),
    (["--mode", "ict", "--teacher-steps", "5"], "--teacher-steps"),
    (["--mode", "ct", "--mid-t", "0.5"], "--mid-t"),
    (["--mode", "edm", "--ts", "0,5,17"], "--ts"),
    (["--mode", "ict", "--ts", "0,5,17", "--mid-t", "1.0"], "--mid-t"),
    (["--resolution", "16"], "--resolution"), (["--data-dir", "elsewhere"], "--data-dir"),
    (["--mode", "cd", "--teacher", "t.pt", "--teacher-steps", "3"], "--teacher-steps"),
    (["--mode", "ct", "--N", "18"], "--N"), (["--mode", "sct", "--mu", "0"], "--mu"),  # at their defaults:
    (["--mode", "cd", "--ablate", ""], "--ablate"),  # still not read, and the command line says otherwise
    (["--grid-minutes", "nan"], "--grid-minutes"), (["--grid-minutes", "-1"], "--grid-minutes"),
    (["--dataset", "x" * 300], "too long"), (["--dataset", __file__], "not a folder"),
])
def test_cm_refuses_flags_its_run_would_ignore(flags, needle, tmp_path):
    """Flags that were accepted with exit 0 and did nothing (the run was not the one asked for), or that
    passed and failed later: one line naming the flag, before training."""
    argv = ["--dataset", "toy", *flags, "--out", str(tmp_path / "r"), "--print-config"]
    code, err = run_main("cm.py", argv)
    assert_one_line(code, err, needle)


@pytest.mark.parametrize("flags", [
    ["--mode", "ict", "--ablate", "weight"], ["--mode", "cd", "--mu", "0.5"],
    ["--mode", "ect", "--mid-t", "0.5"], ["--mode", "ct", "--mu0", "0.5"], ["--mode", "ict", "--ablate", ""],
    ["--mode", "cd", "--teacher-steps", "5"],
])
def test_cm_accepts_the_same_flags_where_they_are_read(flags, tmp_path):
    """The counterpart: each flag with a mode that reads it passes."""
    argv = ["--dataset", "toy", *flags, "--out", str(tmp_path / "r"), "--print-config"]
    code, err = run_main("cm.py", argv)
    assert code == 0, err


def test_a_script_may_name_a_setting_at_its_default_for_any_mode():
    """cm.config from a script (scripts/compare.py passes teacher='' to every mode): a default changes
    nothing and passes; another value is refused as on the command line."""
    assert cm.config("toy", "ct", teacher="", N=cm.FIELD_DEFAULTS["N"]).cm.mode == "ct"
    with pytest.raises(cm.CMError, match="does not read --N"):
        cm.config("toy", "ct", N=cm.FIELD_DEFAULTS["N"] + 1)


@pytest.fixture(scope="module")
def cm_ckpt(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cm") / "run"
    code, err = run_main("cm.py", ["--dataset", "toy", "--mode", "ct", "--steps", "1", "--channels", "8",
                                   "--batch-size", "8", "--device", "cpu", "--no-report", "--out", str(out)])
    assert code == 0, err
    return out / "ckpt.pt"


@pytest.mark.parametrize("flags, needle", [
    (["--resume"], "--resume"), (["--steps", "5"], "--steps"), (["--lr", "0.1"], "--lr"),
    (["--search-ts", "--steps", "3"], "--steps"),
    (["--search-ts", "--num-samples", str(10 ** 12)], "--num-samples"),
])
def test_cm_checkpoint_refuses_training_flags_and_unbounded_sizes(cm_ckpt, tmp_path, flags, needle):
    """--checkpoint writes grids from a finished run: a training flag with it did nothing (exit 0); a search
    over 10^12 samples was a MemoryError traceback."""
    code, err = run_main("cm.py", ["--checkpoint", str(cm_ckpt), *flags, "--out", str(tmp_path / "g")])
    assert_one_line(code, err, needle)
    assert not (tmp_path / "g").exists()


@pytest.mark.parametrize("preset, override, needle, ok", [
    ("tiny-ct", "cm.ablate='weight'", "cm.ablate", False), ("tiny-ict", "cm.ablate='weight'", "", True),
    ("tiny-edm", "cm.mu=0.5", "cm.mu", False), ("tiny-cd", "cm.mu=0.5", "", True),
    ("tiny-sct", "cm.metric='l1'", "cm.metric", False), ("tiny-ct", "cm.mu0=0.5", "", True),
    ("tiny-edm", "run.teacher='t.pt'", "run.teacher", False),
    ("tiny-ict", "run.teacher='t.pt'", "run.teacher", False),
    ("tiny-ct", "run.teacher_kind='edm'", "run.teacher", False),
    ("tiny-edm", "run.ts=(0,5,17)", "run.ts", False), ("tiny-edm", "run.sigmas=(80.0,1.0)", "run.ts", False),
    ("tiny-ct", "run.ts=(0,5,17)", "", True),
])
def test_full_train_refuses_settings_its_mode_does_not_read(preset, override, needle, ok):
    """The same rule as cm.py's for full.train's overrides: a cm.* field outside the mode's recipe, or a
    teacher for a mode that never loads one, was accepted and ignored; where the mode reads it, it passes."""
    code, err = run_main("full.train", ["--preset", preset, override, "--print-config"])
    if ok:
        assert code == 0, err
    else:
        assert_one_line(code, err, needle)


@pytest.mark.parametrize("argv, needle", [
    (["S.npz", "--ref", "R.npz", "--data-dir", "d"], "--data-dir"),
    (["S.npz", "--ref", "R.npz", "--download"], "--download"),
    (["S.npz", "--ref", "R.npz", "--out", "o.npz"], "--out"),
    (["--make-ref", "imgs", "--out", "o.npz", "--download"], "--download"),
    (["--make-ref", "cifar10", "--out", "o.npz", "--splits", "5"], "--splits"),
])
def test_full_evaluate_refuses_flags_its_mode_ignores(argv, needle):
    """FID of samples reads no --data-dir, --download or --out; --make-ref computes no IS (--splits), and
    only cifar10 is downloaded: each was accepted and ignored (exit 0 after a FID), now a usage line."""
    code, err = run_main("full.evaluate", argv)
    assert code == 2 and err.count("\n") == 1 and needle in err, err
