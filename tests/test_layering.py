"""The shape of the code: cm.py stands alone, full/ builds on it in one-way layers, and full/ takes every
formula from cm.py instead of writing it again."""
import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import cm
import full.checkpoints
import full.model
import full.sample
import full.train

ROOT = Path(__file__).resolve().parents[1]

# Lower layers never import higher ones; within a layer the imports form no cycle.
LAYERS = [["cm"],
          ["full", "full.files", "full.networks"],
          ["full.config", "full.model", "full.data", "full.dist"],
          ["full.presets", "full.released", "full.released.guided_diffusion", "full.released.edm_pickle",
           "full.released.flax", "full.released.hub", "full.released.__main__", "full.diffusers_io"],
          ["full.checkpoints", "full.evaluate"],
          ["full.train", "full.sample", "full.edit", "full.bench", "full.convert",
           "full.plot_log"],
          ["scripts.compare", "scripts.gpu_check", "scripts.make_jax_fixture"]]
LAYER = {m: i for i, names in enumerate(LAYERS) for m in names}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    files = [ROOT / "cm.py", *sorted((ROOT / "full").rglob("*.py")), *sorted((ROOT / "scripts").glob("*.py"))]
    return {module_name(p): p for p in files}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Every project module `path` imports, at any depth (inside functions, under if, in try)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:  # `import full.train` names full.train; `from x import f` x
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    mods = project_modules()
    return {m: imports_of(p, set(mods)) - {m} for m, p in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == "open":
                return stack[stack.index(n):] + [n]
            if n not in state and (c := visit(n)):
                return c
        state[m] = "done"
        stack.pop()
        return None
    for m in sorted(graph):
        if m not in state and (c := visit(m)):
            return c
    return None


def test_cm_imports_nothing_of_the_project():
    assert import_graph()["cm"] == set()


def test_import_graph_has_no_cycle_and_goes_one_way():
    graph = import_graph()
    assert set(graph) <= set(LAYER), f"modules without a layer: {sorted(set(graph) - set(LAYER))}"
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"
    for m, deps in graph.items():
        for d in deps:
            assert LAYER[d] <= LAYER[m], f"{m} (layer {LAYER[m]}) imports the higher {d} (layer {LAYER[d]})"


def test_the_graph_reader_sees_hidden_imports(tmp_path):
    """The checks above would fail on an import hidden in a function: the reader sees it."""
    (tmp_path / "x.py").write_text("def f():\n    from full import train\n    import cm\n")
    assert imports_of(tmp_path / "x.py", {"cm", "full", "full.train"}) == {"cm", "full", "full.train"}
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_cm_copied_alone_imports_silently_trains_samples_and_resumes(tmp_path):
    """cm.py alone in an empty folder (the project's packages made unimportable): `import cm` prints
    nothing; toy CT and digits iCT train a few steps, digits CD trains its own teacher first; grids and
    checkpoints are written, a resume continues, --checkpoint writes grids."""
    shutil.copy(ROOT / "cm.py", tmp_path / "cm.py")
    block = "import sys; sys.modules['full'] = None; sys.modules['scripts'] = None; "
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", CM_CACHE=str(tmp_path / "cache"))

    def py(code):
        r = subprocess.run([sys.executable, "-c", block + code], cwd=tmp_path, capture_output=True, text=True,
                           env=env, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        return r
    r = py("import cm")
    assert r.stdout == "" and r.stderr == ""
    tiny = "'--channels', '16', '--batch-size', '16', '--ckpt-every', '2', '--no-report', '--device', 'cpu'"
    py(f"import cm; cm.main(['--dataset', 'toy', '--mode', 'ct', '--steps', '3', {tiny}])")
    py(f"import cm; cm.main(['--dataset', 'toy', '--mode', 'ct', '--steps', '5', '--resume', "
       f"'--allow-config-change', {tiny}])")
    py(f"import cm; cm.main(['--mode', 'ict', '--steps', '3', {tiny}])")
    py(f"import cm; cm.main(['--mode', 'cd', '--steps', '2', '--teacher-steps', '2', {tiny}])")
    runs = tmp_path / "runs"
    assert cm.read_weights_only(runs / "toy-ct" / "ckpt.pt")["step"] == 5
    for run, step in (("toy-ct", 5), ("digits-ict", 3), ("digits-cd", 2), ("digits-cd/teacher", 2)):
        how = ("heun",) if run.endswith("teacher") else ("1-step", "2-step")
        assert all((runs / run / cm.grid_name(h, step)).is_file() for h in how), run
    py("import cm; cm.main(['--checkpoint', 'runs/digits-cd/ckpt.pt', '--out', 'grids'])")
    assert (tmp_path / "grids" / cm.grid_name("1-step", 2)).is_file()


USED = {
    full.train: [
        "schedule",
        "recipe_loss",
        "keeps_target_copy",
        "make_metric",
        "ema_update",
        "ema_warmup_rate",
        "CMError",
        "RunFolder",
        "atomic_write",
        "SharedDropout",
        "autocast",
        "generate",
        "save_grid",
    ],
    full.sample: ["generate", "ts_to_sigmas", "check_levels", "CMError", "save_grid", "atomic_write"],
    full.model: ["ConsistencyFunction"],
    full.checkpoints: [
        "save_checkpoint",
        "read_weights_only",
        "checkpoint_kind",
        "ConsistencyFunction",
        "CMError",
    ],
}


def test_formulas_are_cm_objects():
    for module, names in USED.items():
        for name in names:
            assert getattr(module, name) is getattr(cm, name), f"{module.__name__}.{name} is not cm.{name}"
    import full.config
    assert full.config.RunConfig().cm.__class__ is cm.CMConfig  # one math config


# Fragments that only a re-derivation would contain (the grid, scalings, c_noise, curricula, EMA, samplers).
FORBIDDEN = [r"\*\*\s*\(1\s*/\s*rho\)", r"sigma_data\s*\*\*\s*2\s*/", r"sigma_data\s*\*\*\s*2\s*\+",
             r"\.log\(\)\s*/\s*4", r"0\.25\s*\*.*log", r"math\.ceil\(math\.sqrt", r"\.lerp_\(",
             r"tau\s*\*\*\s*2\s*-\s*sigma_min", r"-\s*sigma_min\)\s*\*\*\s*2", r"math\.log\(mu0\)",
             r"\(x\s*-\s*denoised\)\s*/", r"\(1\s*\+\s*\w+\)\s*/\s*\(10\s*\+",  # EMA warm-up
             r"torch\.erf\(", r"2\s*\*\*\s*\(?k\s*//", r"sigmoid\(-", r"1\s*/\s*\(t_next\s*-\s*t\)",
             r"1\s*/\s*\(t\s*-\s*r\)", r"k\s*//\s*\w*stage_steps"]


def test_no_formula_is_rederived_in_full():
    for path in sorted((ROOT / "full").rglob("*.py")):
        code = "\n".join(line.split("#")[0] for line in path.read_text().splitlines())
        code = re.sub(r'"""[\s\S]*?"""', "", code)  # docstrings may state the formulas
        for pattern in FORBIDDEN:
            assert not re.search(pattern, code), f"{path.name} re-derives a cm.py formula: {pattern}"
