"""full.bench, scripts/compare.py and full.convert against hostile flags, paths, file-size limits and signals.

Each bad input is one line `error: ...` with a non-zero exit, found before any benchmark or training
starts where the flags alone decide it; a signal stops a command in one line after its clean-ups, and no
temporary file or partial output is left behind. Most rows call main(argv) in-process with the expensive
part replaced by a sentinel (reaching it proves the flags were accepted); the rows about the process
itself (signals, file-size limits) run as subprocesses.
"""
import importlib.util
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_reliability import ENV, ROOT, _fsize_limit, assert_one_line, export

import cm
import full.bench as bench
import full.convert
from full import checkpoints, diffusers_io

_spec = importlib.util.spec_from_file_location("compare", ROOT / "scripts" / "compare.py")
compare = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compare)

LONG = "n" * 300  # one path component longer than any file system's NAME_MAX (255)
FLAX = ROOT / "tests" / "fixtures" / "jax_ncsnpp" / "checkpoints" / "checkpoint_3"


class Started(Exception):
    """Raised where the benchmark (or a training) would start: the flags were accepted."""


@pytest.fixture
def no_benchmark(monkeypatch):
    def started(*a, **k):
        raise Started
    for name in ("bench", "loss_error", "ddp_table"):
        monkeypatch.setattr(bench, name, started)


def call_main(main, capsys, argv) -> tuple[int | str, str]:
    """(exit status, or 'started' where the work itself began, stderr) of main(argv)."""
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    except Started:
        code = "started"
    return code, capsys.readouterr().err


def bench_main(capsys, *argv) -> tuple[int | str, str]:
    return call_main(bench.main, capsys, argv)


@pytest.fixture(scope="module")
def ct_export(tmp_path_factory) -> Path:
    return export(tmp_path_factory.mktemp("export") / "export.pt", "tiny-ct")


def popen(argv: list[str]) -> subprocess.Popen:
    """A command with a terminal's default Ctrl-C (a test runner in the background may ignore SIGINT)."""
    return subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def assert_stopped(p: subprocess.Popen, sig: int, folder: Path) -> None:
    p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 1, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    who = "SIGTERM" if sig == signal.SIGTERM else "Ctrl-C"
    assert err.startswith(f"error: stopped by {who}"), err
    assert not [q.name for q in folder.rglob("*tmp")], list(folder.rglob("*"))


# ----------------------------------------------------------------------------------------------
# full.bench: flags


@pytest.mark.parametrize("argv, needle", [
    (["--rounds", str(10 ** 12)], "--rounds"),  # used to run (hang) for ever
    (["--reps", "100000"], "--reps"),
    (["--warmup", "100000"], "--warmup"),
    (["--batch-size", str(10 ** 9)], "--batch-size"),  # used to be an allocation traceback
    # 1 GiB of inputs / (3 * 64 * 64 * 4 bytes an image) = 21845.3 images
    (["--net", "adm-imagenet64", "--batch-size", "21846"], "at most 21845"),
])
def test_bench_integer_flags_are_bounded_before_anything_runs(no_benchmark, capsys, argv, needle):
    code, err = bench_main(capsys, "--device", "cpu", *argv)
    assert_one_line(code, err, needle)


def test_bench_bounds_admit_their_largest_values(no_benchmark, capsys):
    for argv in (["--rounds", "10000", "--reps", "10000", "--warmup", "10000"],
                 ["--net", "adm-imagenet64", "--batch-size", "21845"]):
        assert bench_main(capsys, "--device", "cpu", *argv) == ("started", "")


def test_bench_names_the_flag_of_an_unknown_table(no_benchmark, capsys):
    code, err = bench_main(capsys, "--tables", "train,nope", "--device", "cpu")
    assert_one_line(code, err, "--tables", "'nope'")


@pytest.mark.parametrize("argv, needles", [
    (["--grids", "18"], ["--grids", "--loss-error"]),
    (["--checkpoint", "c.pt"], ["--checkpoint", "--loss-error"]),
    (["--loss-error", "--teacher", "t.pt"], ["--teacher", "--checkpoint"]),
    (["--recipe", "cd"], ["--recipe", "--ddp"]),
    (["--ddp", "--loss-error"], ["--loss-error", "--ddp"]),
    (["--loss-error", "--checkpoint", "c.pt", "--net", "ncsnpp-tiny"], ["--net", "--checkpoint"]),
    (["--loss-error", "--rounds", "3"], ["--rounds", "--loss-error"]),
    (["--loss-error", "--reps", "3"], ["--reps", "--loss-error"]),
    (["--ddp", "--tables", "train"], ["--tables", "--ddp"]),
    (["--ddp", "--warmup", "2"], ["--warmup", "--ddp"]),
    (["--compile", "--tables", "train"], ["--compile", "options"]),
    (["--ddp", "--precision", "fp32,bf16"], ["--ddp", "--precision"]),
    (["--precision", "fp32,fp32"], ["--precision", "once"]),
])
def test_bench_refuses_a_flag_that_would_change_nothing(no_benchmark, capsys, argv, needles):
    code, err = bench_main(capsys, "--device", "cpu", *argv)
    assert_one_line(code, err, *needles)


@pytest.mark.parametrize("argv", [
    ["--loss-error", "--grids", "18"], ["--loss-error", "--checkpoint", "c.pt", "--teacher", "t.pt"],
    ["--ddp", "--recipe", "cd", "--rounds", "2"], ["--compile", "--tables", "train,options", "--warmup", "0"],
])
def test_bench_accepts_each_flag_beside_the_one_it_needs(no_benchmark, capsys, argv):
    assert bench_main(capsys, "--device", "cpu", *argv) == ("started", "")


def test_bench_checks_the_json_folder_before_the_benchmark(no_benchmark, capsys, tmp_path):
    code, err = bench_main(capsys, "--device", "cpu", "--json", str(tmp_path / "missing" / "b.json"))
    assert_one_line(code, err, "--json")
    code, err = bench_main(capsys, "--device", "cpu", "--json", str(tmp_path))  # a folder
    assert_one_line(code, err, "--json")
    assert not list(tmp_path.iterdir())


def test_bench_a_checkpoint_name_too_long_is_one_line(capsys, tmp_path):
    code, err = bench_main(capsys, "--device", "cpu", "--loss-error", "--checkpoint",
                           str(tmp_path / LONG / "c.pt"))
    assert_one_line(code, err, "too long")


def test_bench_under_a_file_size_limit_of_zero_fails_at_the_start_in_one_line(no_benchmark, capsys, tmp_path):
    """Nothing can be written: --json's folder says so before the benchmark (in this process, whose
    tempfile folder is already known); without --json, torch's search for a temporary folder (tempfile,
    in a fresh process) is one line instead of a traceback."""
    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, old[1]))  # Python ignores SIGXFSZ: a write fails EFBIG
    try:
        code, err = bench_main(capsys, "--device", "cpu", "--json", str(tmp_path / "b.json"))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)
    assert_one_line(code, err, "--json", "File too large")
    p = subprocess.run([sys.executable, "-m", "full.bench", "--device", "cpu", "--net", "ncsnpp-tiny",
                        "--tables", "sample", "--rounds", "1"], cwd=ROOT, env=ENV, capture_output=True,
                       text=True, timeout=120, preexec_fn=_fsize_limit(0))
    assert_one_line(p.returncode, p.stderr, "temporary folder")
    assert "full.bench:" not in p.stdout  # the benchmark never started
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_bench_a_signal_mid_benchmark_is_one_line_and_writes_nothing(tmp_path, sig):
    p = popen(["-m", "full.bench", "--device", "cpu", "--net", "ncsnpp-tiny", "--tables", "train", "--rounds",
               "50", "--json", str(tmp_path / "b.json")])
    assert p.stdout.readline().startswith("full.bench:")  # its header: the benchmark is under way
    time.sleep(0.3)
    assert_stopped(p, sig, tmp_path)
    assert not list(tmp_path.iterdir())


def test_a_signal_is_passed_on_to_a_ddp_child_and_waited_for(tmp_path):
    """bench.child (the --ddp runs): an interrupt in the parent sends SIGTERM to the child and waits for its
    clean-up; a child past its time limit is stopped the same way, as a one-line error."""
    marker = tmp_path / "cleaned"
    code = ("import signal, sys, time, pathlib\n"
            "def bye(*a):\n"
            f"    pathlib.Path({str(marker)!r}).write_text('SIGTERM')\n"
            "    sys.exit(3)\n"
            "signal.signal(signal.SIGTERM, bye)\n"
            "print('ready', flush=True, file=sys.stderr)\n"
            "time.sleep(60)\n")

    def interrupt(*a):
        raise KeyboardInterrupt
    old = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.5)
        t0 = time.time()
        with pytest.raises(KeyboardInterrupt):
            bench.child([sys.executable, "-c", code], ENV, 60, "a child")
        assert marker.read_text() == "SIGTERM" and time.time() - t0 < 30
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    marker.unlink()
    with pytest.raises(cm.CMError, match="a child took more than 1 s"):
        bench.child([sys.executable, "-c", code], ENV, 1, "a child")
    assert marker.read_text() == "SIGTERM"


# ----------------------------------------------------------------------------------------------
# scripts/compare.py


def compare_main(capsys, monkeypatch, *argv) -> tuple[int | str, str]:
    def started(*a, **k):
        raise Started
    monkeypatch.setattr(compare.cm, "train", started)
    return call_main(compare.main, capsys, argv)


def test_compare_refuses_a_mode_given_twice(capsys, monkeypatch, tmp_path):
    toy = ["--dataset", "toy", "--out", str(tmp_path)]
    code, err = compare_main(capsys, monkeypatch, *toy, "--modes", "ct,ict,ct")
    assert_one_line(code, err, "--modes", "once")
    assert compare_main(capsys, monkeypatch, *toy, "--modes", "ct,ict") == ("started", "")


def test_compare_an_out_name_too_long_is_one_line(capsys, monkeypatch, tmp_path):
    code, err = compare_main(capsys, monkeypatch, "--dataset", "toy", "--modes", "ct", "--steps", "2",
                             "--out", str(tmp_path / LONG))
    assert_one_line(code, err, "too long")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_compare_a_signal_during_a_checkpoint_write_leaves_no_temporary(tmp_path, sig):
    """The signal comes while the run compare.py trains writes its checkpoint (its .tmp exists): that run's
    clean-up removes the temporary file, then compare.py exits with one line."""
    out = tmp_path / "cmp"
    p = popen(["scripts/compare.py", "--dataset", "toy", "--modes", "ct", "--steps", "3000", "--device",
               "cpu", "--out", str(out)])
    deadline = time.time() + 120
    while not (out.is_dir() and list(out.rglob(".*.tmp"))) and time.time() < deadline and p.poll() is None:
        time.sleep(0.002)
    assert p.poll() is None, p.communicate()
    assert_stopped(p, sig, out)


# ----------------------------------------------------------------------------------------------
# full.convert and full/diffusers_io.py


def convert_main(capsys, *argv) -> tuple[int | str, str]:
    return call_main(full.convert.main, capsys, argv)


@pytest.mark.parametrize("to, name, needle", [
    ("safetensors", "x.pt", "--to pt"),
    ("safetensors", "x", ".safetensors"),
    ("pt", "x.safetensors", "--to safetensors"),
    ("diffusers", "x.safetensors", "a folder"),
    ("diffusers", "x.pt", "a folder"),
])
def test_convert_refuses_an_out_suffix_that_contradicts_to(capsys, ct_export, tmp_path, to, name, needle):
    code, err = convert_main(capsys, ct_export, "--to", to, "--out", tmp_path / name)
    assert_one_line(code, err, "--out", needle)
    assert not list(tmp_path.iterdir())


def test_convert_writes_each_format_under_its_own_suffix(capsys, ct_export, tmp_path):
    for to, name in (("pt", "e.pt"), ("pt", "e"), ("safetensors", "e.safetensors")):
        assert convert_main(capsys, ct_export, "--to", to, "--out", tmp_path / name) == (0, "")
        assert checkpoints.load(tmp_path / name)["step"] == 0


@pytest.mark.parametrize("kind", ["edm", "ct"])
def test_convert_refuses_a_kind_that_a_full_file_would_ignore(capsys, ct_export, tmp_path, kind):
    """A full/ file's config names its mode: --kind, another one or the same, would change nothing."""
    code, err = convert_main(capsys, ct_export, "--kind", kind, "--out", tmp_path / "e.pt")
    assert_one_line(code, err, "--kind (run.teacher_kind) applies to a released", "a full/ checkpoint")
    assert not list(tmp_path.iterdir())
    assert convert_main(capsys, ct_export, "--out", tmp_path / "e.pt") == (0, "")


def test_convert_a_diffusers_out_name_too_long_says_so(capsys, ct_export, tmp_path):
    """Checked before the model (here one diffusers cannot take): the path's problem is the one named."""
    code, err = convert_main(capsys, ct_export, "--to", "diffusers", "--out", tmp_path / LONG)
    assert_one_line(code, err, "too long")


@pytest.mark.parametrize("argv, needle", [
    (["--resolution", str(2 ** 40)], "--resolution"),  # used to blame the JAX parameter tree
    (["--resolution", "48"], "--resolution"),
    (["--resolution", "4"], "--resolution"),
    (["--resolution", "64", "--attn", "128"], "--attn"),
    (["--attn", "12"], "--attn"),
    (["--attn", "64"], "--attn"),  # above the default resolution, 32
])
def test_convert_range_checks_resolution_and_attn_where_parsed(capsys, tmp_path, argv, needle):
    code, err = convert_main(capsys, FLAX, *argv, "--out", tmp_path / "e.pt")
    assert_one_line(code, err, needle, "power of two")
    assert not list(tmp_path.iterdir())


def test_convert_to_safetensors_under_a_file_size_limit_is_one_line_and_leaves_nothing(ct_export, tmp_path):
    out = tmp_path / "e.safetensors"  # the tiny-ct export's ~190,000 fp32 values: ~760 KB > 100 KB
    p = subprocess.run([sys.executable, "-m", "full.convert", str(ct_export), "--to", "safetensors", "--out",
                        str(out)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120,
                       preexec_fn=_fsize_limit(100 * 1024))
    assert_one_line(p.returncode, p.stderr, f"cannot write {out}", "File too large")
    assert not list(tmp_path.iterdir())


def test_a_failed_diffusers_folder_write_keeps_the_earlier_one_and_leaves_no_temporary(tmp_path, monkeypatch):
    from test_diffusers import cond_net, make_state, write_folder
    state = make_state(cond_net())
    out = write_folder(state, tmp_path / "cd_tiny")
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    real = diffusers_io._safetensors()

    class FullDisk:  # safetensors writing half its file, then failing as a full disk does
        class torch:
            @staticmethod
            def save_file(tensors, filename, metadata=None):
                Path(filename).write_bytes(b"half a safetensors file")
                raise Exception("Error while serializing: I/O error: No space left on device (os error 28)")
    monkeypatch.setattr(diffusers_io, "_safetensors", lambda: FullDisk)
    with pytest.raises(cm.CMError, match="No space left on device") as e:
        write_folder(make_state(cond_net(), seed=1), out)
    assert "\n" not in str(e.value)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cd_tiny"]
    monkeypatch.setattr(diffusers_io, "_safetensors", lambda: real)
    write_folder(make_state(cond_net(), seed=1), out)  # a write that succeeds replaces the folder whole
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == diffusers_io.PIPELINE
    assert (out / "unet" / diffusers_io.WEIGHTS).read_bytes() != before[Path("unet") / diffusers_io.WEIGHTS]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cd_tiny"]


def test_convert_removes_what_a_killed_conversion_to_its_out_left(capsys, ct_export, tmp_path):
    """kill -9 mid-write leaves atomic_write's .NAME.PID.tmp (a file; a folder for --to diffusers): the next
    conversion to that --out removes those of dead pids, and nothing else (a live writer's, another
    file's)."""
    dead = [subprocess.Popen([sys.executable, "-c", ""]) for _ in range(2)]
    for d in dead:
        d.wait()
    stale_file, stale_dir = (tmp_path / f".e.pt.{d.pid}.tmp" for d in dead)
    live, other = tmp_path / f".e.pt.{os.getppid()}.tmp", tmp_path / f".other.{dead[0].pid}.tmp"
    for p in (stale_file, live, other):
        p.write_bytes(b"x")
    (stale_dir / "unet").mkdir(parents=True)
    assert convert_main(capsys, ct_export, "--to", "pt", "--out", tmp_path / "e.pt") == (0, "")
    assert not stale_file.exists() and not stale_dir.exists() and live.exists() and other.exists()
