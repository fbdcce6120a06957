"""The notebooks run end to end (CM_NOTEBOOK_FAST=1: a few training steps), and the committed ones carry
the outputs of a real run. Each is executed from a copy in a temp dir, so the committed outputs stay."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
MIN_FIGURES = {"01_toy_tutorial": 4, "02_samples": 2, "03_editing": 7}  # plots each must draw


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One run folder for the module: 03_editing reuses the digits models of 02_samples when it can."""
    return tmp_path_factory.mktemp("notebook-runs")


def figures(nb) -> int:
    return sum(
        "image/png" in out.get("data", {}) for c in nb.cells if c.cell_type == "code" for out in c.outputs
    )


def test_all_notebooks_are_here():
    assert [p.stem for p in NOTEBOOKS] == list(MIN_FIGURES)


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_fast(path, tmp_path, runs):
    copy = tmp_path / path.name
    shutil.copy(path, copy)
    env = dict(os.environ, CM_NOTEBOOK_FAST="1", CM_REPO=str(ROOT), CM_NOTEBOOK_RUNS=str(runs),
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "jupyter", "nbconvert", "--to", "notebook", "--execute",
           "--ExecutePreprocessor.timeout=300", "--output", "executed.ipynb", str(copy)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=330)
    assert proc.returncode == 0, proc.stderr[-3000:]
    nb = nbformat.read(tmp_path / "executed.ipynb", as_version=4)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    assert figures(nb) >= MIN_FIGURES[path.stem]
    assert not list((ROOT / "notebooks").glob("runs*")), "a notebook wrote a run folder into notebooks/"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_has_outputs_and_is_small(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code), "commit the notebook executed (a real, non-fast run)"
    assert figures(nb) >= MIN_FIGURES[path.stem]
    assert path.stat().st_size < 1_000_000
    text = "".join(o.get("text", "") for c in code for o in c.outputs)
    assert "CM_NOTEBOOK_FAST" not in text and "Traceback" not in text
