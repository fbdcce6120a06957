"""full/ imports every formula from cm.py and never re-derives one (README, "The paper-scale backend")."""
import re
from pathlib import Path

import cm
import full.checkpoints
import full.model
import full.sample
import full.train

ROOT = Path(__file__).resolve().parents[1]

USED = {
    full.train: ["ct_loss", "cd_loss", "edm_loss", "karras_sigmas", "ct_num_steps", "ct_target_rate",
                 "ema_update", "ema_warmup_rate", "ts_to_sigmas", "METRICS", "CMError", "RunFolder",
                 "atomic_write", "ict_num_steps", "gap_weight", "lognormal_index_probs", "ect_loss",
                 "SharedDropout"],
    full.sample: ["sample_onestep", "sample_multistep", "sample_heun", "ts_to_sigmas", "CMError"],
    full.model: ["ConsistencyFunction"],
    full.checkpoints: ["save_checkpoint", "read_weights_only", "checkpoint_kind", "ConsistencyFunction", "CMError"],
}


def test_formulas_are_cm_objects():
    for module, names in USED.items():
        for name in names:
            assert getattr(module, name) is getattr(cm, name), f"{module.__name__}.{name} is not cm.{name}"


# Fragments that only a re-derivation would contain (the grid, scalings, c_noise, curricula, EMA, samplers).
FORBIDDEN = [r"\*\*\s*\(1\s*/\s*rho\)", r"sigma_data\s*\*\*\s*2\s*/", r"sigma_data\s*\*\*\s*2\s*\+",
             r"\.log\(\)\s*/\s*4", r"0\.25\s*\*.*log", r"math\.ceil\(math\.sqrt", r"\.lerp_\(",
             r"tau\s*\*\*\s*2\s*-\s*sigma_min", r"-\s*sigma_min\)\s*\*\*\s*2", r"math\.log\(mu0\)",
             r"\(x\s*-\s*denoised\)\s*/", r"\(1\s*\+\s*\w+\)\s*/\s*\(10\s*\+",  # EMA warm-up
             r"torch\.erf\(", r"2\s*\*\*\s*\(?k\s*//", r"sigmoid\(-", r"1\s*/\s*\(t_next\s*-\s*t\)",
             r"1\s*/\s*\(t\s*-\s*r\)"]


def test_no_formula_is_rederived_in_full():
    for path in sorted((ROOT / "full").glob("*.py")):
        code = "\n".join(line.split("#")[0] for line in path.read_text().splitlines())
        code = re.sub(r'"""[\s\S]*?"""', "", code)  # docstrings may state the formulas
        for pattern in FORBIDDEN:
            assert not re.search(pattern, code), f"{path.name} re-derives a cm.py formula: {pattern}"


def test_common_is_plumbing_that_cm_reexports():
    """full/common.py never imports cm (cm imports it: a cycle otherwise), and each name moved there from
    cm.py is the same object under both names (so full/, the notebooks and the tests may use either)."""
    import subprocess
    import sys

    import full.common
    code = "import full.common, sys; assert 'cm' not in sys.modules, 'full.common imported cm'"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    moved = ["CMError", "exit_on", "SIGMA_MAX_LIMIT", "check_math", "uint8_to_unit", "LPIPS", "PiqLPIPS",
             "CKPT_FORMAT", "KINDS", "atomic_write", "save_checkpoint", "checkpoint_kind",
             "read_weights_only", "load_checkpoint", "RunFolder", "changed_fields", "pick_device",
             "grid_name", "save_grid", "energy_distance", "fid_score", "distance_table", "check_levels",
             "finished", "restore", "add_field_flags", "under_autocast",
             "out_folder"]
    for name in moved:
        assert getattr(cm, name) is getattr(full.common, name), f"cm.{name} is not full.common.{name}"
