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
