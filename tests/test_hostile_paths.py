"""Hostile paths behind every entry point's path-taking flags: a FIFO given directly (as an input, a
reference statistics file, a checkpoint, an edit reference or mask, the run folder's `.lock`), a path
component longer than the file system allows (ENAMETOOLONG), and writes of samples, edits and statistics
that fail half way (a full disk) over earlier good files, or whose clean-up meets a read-only file system.

Each one is a one-line refusal (status 1) that returns within seconds: nothing blocks on a FIFO, no
earlier file is lost, no temporary file is left."""
import errno
import os
import stat
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_images import _png_header_only, deadline
from test_reliability import TOY, assert_one_line, run_main

import cm

LONG = "n" * 300  # NAME_MAX is 255 on the usual Linux file systems


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("hostile-paths")
    code, err = run_main("cm.py", [*TOY, "--mode", "ct", "--steps", "2", "--no-report",
                                   "--out", str(d / "cm")])
    assert code == 0, err
    code, err = run_main("full.train", ["--preset", "tiny-ct", "opt.steps=1", "run.sample_every=0",
                                        "run.device=cpu", f"run.out={str(d / 'full')!r}"])
    assert code == 0, err
    Image.fromarray(np.full((8, 8), 200, np.uint8)).save(d / "ref.png")
    imgs = np.random.default_rng(0).integers(0, 256, (8, 8, 8, 3), dtype=np.uint8)
    np.savez(d / "imgs.npz", imgs)
    np.savez(d / "stats.npz", mu=np.zeros(4), sigma=np.eye(4), n=4)
    return dict(cm=d / "cm" / "ckpt.pt", export=d / "full" / "export.pt", ref=d / "ref.png",
                imgs=d / "imgs.npz", stats=d / "stats.npz")


def fifo_cases(f: dict, fifo: Path, out: Path) -> list:
    s = ["--checkpoint", str(f["export"]), "--out", str(out / "s"), "--device", "cpu"]
    return [
        ("cm.py", ["--checkpoint", str(fifo), "--out", str(out / "c")]),
        ("cm.py", [*TOY, "--mode", "cd", "--teacher", str(fifo), "--out", str(out / "t")]),
        ("full.sample", ["--checkpoint", str(fifo), "--out", str(out / "s"), "--device", "cpu"]),
        ("full.sample", [*s, "--edit", "denoise", "--reference", str(fifo)]),
        ("full.sample", [*s, "--edit", "inpaint", "--reference", str(f["ref"]), "--mask", str(fifo)]),
        ("full.evaluate", [str(fifo), "--ref", str(f["stats"]), "--device", "cpu"]),
        ("full.evaluate", [str(f["imgs"]), "--ref", str(fifo), "--device", "cpu"]),
        ("full.evaluate", ["--make-ref", str(fifo), "--out", str(out / "ref.npz"), "--device", "cpu"]),
        ("full.convert", [str(fifo), "--out", str(out / "e.pt")]),
    ]


def test_a_fifo_given_directly_is_refused_unopened(files, tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    for name, argv in fifo_cases(files, fifo, tmp_path):
        with deadline(30):
            code, err = run_main(name, argv)
        assert_one_line(code, err)
        assert "pipe" in err, (name, argv, err)


def test_hostile_edit_references_and_masks_are_one_line(files, tmp_path):
    """A decompression bomb, a 0x0 image, a truncated PNG, and an npz whose header declares 10^7 images or
    0x0 ones, given as an edit's --reference or --mask: one line naming the file, within seconds."""
    bomb, zero, cut, big, flat = (tmp_path / n for n in ("bomb.png", "zero.png", "cut.png", "big.npz",
                                                          "flat.npz"))
    _png_header_only(bomb, 2**16, 2**16)
    _png_header_only(zero, 0, 0)
    cut.write_bytes(files["ref"].read_bytes()[:40])
    np.savez(flat, np.zeros((3, 0, 0, 3), np.uint8))
    with zipfile.ZipFile(big, "w") as z, z.open("arr_0.npy", "w") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False,
                                                 "shape": (10**7, 64, 64, 3)})
    s = ["--checkpoint", str(files["export"]), "--out", str(tmp_path / "s"), "--device", "cpu"]
    cases = [[*s, "--edit", "denoise", "--sigmas", "0.5", "--reference", str(p)]
             for p in (bomb, zero, cut, big, flat)]
    cases += [[*s, "--edit", "inpaint", "--reference", str(files["ref"]), "--mask", str(p)]
              for p in (bomb, zero, cut)]
    for argv in cases:
        with deadline(30):
            code, err = run_main("full.sample", argv)
        assert_one_line(code, err)
        assert Path(argv[-1]).name in err, (argv, err)
    assert not (tmp_path / "s").exists() or not any((tmp_path / "s").iterdir())


@pytest.mark.parametrize("entry", ["cm.py", "full.train"])
def test_a_fifo_named_lock_is_refused_without_blocking(tmp_path, entry):
    out = tmp_path / "run"
    out.mkdir()
    os.mkfifo(out / ".lock")
    argv = ([*TOY, "--mode", "ct", "--steps", "2", "--out", str(out)] if entry == "cm.py" else
            ["--preset", "tiny-ct", "opt.steps=1", "run.device=cpu", f"run.out={str(out)!r}"])
    with deadline(30):
        code, err = run_main(entry, argv)
    assert_one_line(code, err, ".lock")
    assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing else written


def too_long_cases(f: dict, tmp: Path) -> list:
    long = tmp / LONG
    return [
        ("cm.py", [*TOY, "--mode", "ct", "--steps", "2", "--out", str(long)]),
        ("cm.py", ["--checkpoint", str(long / "ckpt.pt")]),
        ("cm.py", ["--checkpoint", str(f["cm"]), "--out", str(long)]),
        ("full.train", ["--preset", "tiny-ct", "opt.steps=1", "run.device=cpu", f"run.out={str(long)!r}"]),
        ("full.sample", ["--checkpoint", str(long / "export.pt"), "--device", "cpu"]),
        ("full.sample", ["--checkpoint", str(f["export"]), "--out", str(long), "--device", "cpu"]),
        ("full.evaluate", [str(long), "--ref", str(f["stats"]), "--device", "cpu"]),
        ("full.evaluate", ["--make-ref", str(f["imgs"]), "--out", str(long / "r.npz"), "--device", "cpu"]),
        ("full.bench", ["--device", "cpu", "--json", str(long / "b.json")]),
        ("full.convert", [str(long / "ckpt.pt"), "--out", str(tmp / "e.pt")]),
        ("full.convert", [str(f["export"]), "--out", str(long / "e.pt")]),
    ]


def test_a_path_component_too_long_is_one_line_in_every_entry_point(files, tmp_path):
    for name, argv in too_long_cases(files, tmp_path):
        code, err = run_main(name, argv)
        assert code == 1, (name, argv, err)
        assert_one_line(code, err)
        assert "too long" in err.lower(), (name, argv, err)


def half_write_then_full_disk(fh, *a, **k):
    fh.write(b"PK\x03\x04 half an npz")
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_failed_write_of_samples_edits_or_statistics_keeps_the_earlier_file(files, tmp_path, monkeypatch):
    """samples.npz, edit-*.npz and --make-ref statistics are replaced only by a complete new file: a write
    that fails half way leaves the earlier file byte for byte and no temporary file."""
    s = ["--checkpoint", str(files["export"]), "--out", str(tmp_path), "--device", "cpu", "--num", "4"]
    runs = [("full.sample", s, tmp_path / "samples.npz"),
            ("full.sample", [*s, "--edit", "denoise", "--sigmas", "0.5", "--reference", str(files["ref"])],
             tmp_path / "edit-denoise.npz"),
            ("full.evaluate", ["--make-ref", str(files["imgs"]), "--out", str(tmp_path / "ref.npz"),
                               "--device", "cpu"], tmp_path / "ref.npz")]
    from test_evaluate import StandIn  # no Inception weights here: a small fixed feature network

    import full.evaluate
    monkeypatch.setattr(full.evaluate, "make_extractor", lambda device=None, weights_path=None: StandIn())
    for name, argv, made in runs:
        code, err = run_main(name, argv)
        assert code == 0, (name, err)
        before = made.read_bytes()
        with monkeypatch.context() as m:
            m.setattr(np, "savez", half_write_then_full_disk)
            code, err = run_main(name, argv)
        assert_one_line(code, err, f"cannot write {made}", "No space left")
        assert made.read_bytes() == before, made
        assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_atomic_write_on_a_file_system_turned_read_only(tmp_path, monkeypatch):
    """The write fails and so does the clean-up of its temporary file (EROFS): still one CMError, the
    earlier file intact; the temporary file is left for the next run's start to remove."""
    path = tmp_path / "samples.npz"
    path.write_bytes(b"good")

    def refuse(self, *a, **k):
        raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr(Path, "unlink", refuse)
    with pytest.raises(cm.CMError, match="cannot write .*samples.npz: No space left") as e:
        cm.atomic_write(path, lambda fh: half_write_then_full_disk(fh))
    assert "\n" not in str(e.value)
    assert path.read_bytes() == b"good"


def test_an_output_that_is_the_input_is_refused_and_the_input_kept(files, tmp_path, monkeypatch):
    """full.convert of a resume checkpoint onto itself turned it into an export (the run could not go
    on), --make-ref of an npz onto itself replaced the images by their statistics; each exited 0. Now one
    line and the input byte for byte, also through a link to it and for a folder holding it."""
    import shutil

    from test_evaluate import StandIn

    import full.evaluate
    monkeypatch.setattr(full.evaluate, "make_extractor", lambda device=None, weights_path=None: StandIn())
    run = tmp_path / "run"
    shutil.copytree(files["export"].parent, run)
    ckpt = sorted(run.glob("ckpt-*.pt"))[-1]
    imgs = shutil.copy(files["imgs"], tmp_path / "imgs.npz")
    (tmp_path / "link.pt").symlink_to(ckpt)
    cases = [("full.convert", [str(ckpt), "--out", str(ckpt)], ckpt),
             ("full.convert", [str(ckpt), "--out", str(tmp_path / "link.pt")], ckpt),
             ("full.convert", [str(ckpt), "--to", "diffusers", "--out", str(run)], ckpt),
             ("full.evaluate", ["--make-ref", str(imgs), "--out", str(imgs), "--device", "cpu"], imgs)]
    for name, argv, src in cases:
        before = Path(src).read_bytes()
        code, err = run_main(name, argv)
        assert_one_line(code, err, "writing it would destroy what is read")
        assert Path(src).read_bytes() == before


def test_atomic_write_keeps_a_link_and_refuses_a_fifo_or_device(files, tmp_path):
    """The rename used to put a regular file in the place of whatever was there: a link lost its link (now
    its target gets the new file), a FIFO or device node was replaced (as root, --json /dev/null would have
    replaced the machine's /dev/null; now one line, nothing written)."""
    target = tmp_path / "real.json"
    target.write_text("old")
    (tmp_path / "link.json").symlink_to(target)
    cm.atomic_write(tmp_path / "link.json", lambda fh: fh.write(b"new"))
    assert (tmp_path / "link.json").is_symlink() and target.read_text() == "new"
    (tmp_path / "dangling.json").symlink_to(tmp_path / "made.json")
    cm.atomic_write(tmp_path / "dangling.json", lambda fh: fh.write(b"x"))
    assert (tmp_path / "dangling.json").is_symlink() and (tmp_path / "made.json").read_text() == "x"
    fifo = tmp_path / "f.pt"
    os.mkfifo(fifo)
    with pytest.raises(cm.CMError, match="not a regular file"):
        cm.atomic_write(fifo, lambda fh: fh.write(b"x"))
    code, err = run_main("full.convert", [str(files["export"]), "--out", str(fifo)])
    assert_one_line(code, err, "not a regular file")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


STDOUT_CASES = [["-m", "full.presets"], ["-m", "full.train", "--preset", "tiny-ct", "--print-config"],
                ["cm.py", "--print-config"], ["-m", "full.networks"]]


@pytest.mark.parametrize("sink", ["full device", "closed pipe"])
@pytest.mark.parametrize("argv", STDOUT_CASES, ids=lambda a: " ".join(a[:2]))
def test_a_standard_output_that_refuses_writes_is_one_line(argv, sink):
    """`| head` that has gone (EPIPE) or stdout on a full device (ENOSPC) was a traceback, or Python's
    'Exception ignored' at exit: now the one line on stderr and status 1."""
    import subprocess
    import sys

    from test_reliability import ENV, ROOT
    if sink == "full device":
        if not os.path.exists("/dev/full"):
            pytest.skip("no /dev/full")
        with open("/dev/full", "w") as out:
            p = subprocess.run([sys.executable, *argv], cwd=ROOT, env=ENV, stdout=out, stderr=subprocess.PIPE,
                               text=True, timeout=300)
        code, err = p.returncode, p.stderr
    else:
        p = subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        p.stdout.close()  # the reader is gone before the first write
        err = p.stderr.read()
        code = p.wait(timeout=300)
    assert_one_line(code, err, "cannot write to the standard output")


def test_a_path_stdout_cannot_encode_is_printed_escaped(files, tmp_path):
    """PYTHONIOENCODING=ascii and a non-ASCII --out: the file was written, then the 'wrote' line was a
    UnicodeEncodeError traceback and status 1, so a script would discard good output."""
    import subprocess
    import sys

    from test_reliability import ENV, ROOT
    out = tmp_path / "é.pt"
    p = subprocess.run([sys.executable, "-m", "full.convert", str(files["export"]), "--out", str(out)],
                       cwd=ROOT, env=ENV | {"PYTHONIOENCODING": "ascii"}, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
    assert out.is_file() and "\\xe9.pt" in p.stdout
