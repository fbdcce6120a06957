"""scripts/compare.py: one command trains the teacher once, CD and ECT from it, sCD from a teacher of its own
time scale, CT, iCT and sCT, and tabulates them."""
import importlib.util
import json
import pathlib

import pytest
import torch

_spec = importlib.util.spec_from_file_location(
    'compare', pathlib.Path(__file__).resolve().parents[1] / 'scripts' / 'compare.py'
)
compare = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compare)


def test_compare_tabulates_every_mode_from_one_teacher(tmp_path, capsys):
    tiny = ["--dataset", "toy", "--out", str(tmp_path), "--steps", "3", "--device", "cpu"]
    compare.main(tiny)
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [r["mode"] for r in rows] == ["cd", "ect", "ct", "ict", "sct", "scd"]
    assert all(r["steps"] == 3 for r in rows)
    assert [r["teacher_steps"] for r in rows] == [3, 3, 0, 0, 0, 3]  # CD, ECT, sCD distil a teacher
    teacher_s = {r["mode"]: r["sec"] - r["own_sec"] for r in rows}
    assert teacher_s["cd"] == teacher_s["ect"] > 0 and teacher_s["scd"] > 0  # charged their teacher's time
    assert all(teacher_s[m] == 0 for m in ("ct", "ict", "sct"))
    # CD and ECT share the one scale-100 teacher; sCD's student is its teacher's network, at scale 1
    teachers = {r["mode"]: r["teacher"] for r in rows}
    assert teachers["cd"] == teachers["ect"] != teachers["scd"]
    for m, scale in (("cd", 100), ("scd", 1)):
        assert torch.load(teachers[m], weights_only=True)["config"]["time_scale"] == scale
        assert torch.load(tmp_path / m / "ckpt.pt", weights_only=True)["config"]["time_scale"] == scale
    for r in rows:
        assert {"1-step", "2-step", compare.FLOOR} <= set(r["result"])
    assert ("teacher Heun, 18 levels (35 NFE)" in rows[0]["result"]) and not rows[2]["result"].keys() & {
        compare.TEACHER}
    table = (tmp_path / "table.md").read_text().splitlines()
    assert [line.split("|")[1].strip() for line in table[2:8]] == [
        "CD",
        "CT",
        "iCT",
        "ECT",
        "sCT",
        "sCD",
    ]  # the paper order
    assert (tmp_path / "teacher" / "ckpt.pt").is_file() and (tmp_path / "ect" / "ckpt.pt").is_file()
    assert "In all" in capsys.readouterr().out
    before = {p: p.read_bytes() for p in tmp_path.rglob("ckpt.pt")}
    with pytest.raises(SystemExit) as e:  # a second comparison into the same --out replaces nothing
        compare.main(tiny)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1 and len(err.splitlines()) == 1 and "--overwrite" in err and "teacher" in err
    assert {p: p.read_bytes() for p in tmp_path.rglob("ckpt.pt")} == before


def test_compare_refuses_unknown_modes(capsys):
    with pytest.raises(SystemExit) as e:
        compare.main(["--modes", "cd,edm"])
    assert e.value.code == 1 and "--modes" in capsys.readouterr().err
