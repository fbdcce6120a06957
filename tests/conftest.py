import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# The test networks are tiny: one thread runs them fastest, and OpenMP threads spinning against other
# processes on a 2-core machine made them up to 100x slower. Subprocesses inherit the variable.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)

# CI has 2 cores and no GPU: keep property tests quick and free of wall-clock deadlines.
settings.register_profile("ci", max_examples=25, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped on CPU-only machines)")
    config.addinivalue_line("markers", "slow: end-to-end runs of a few seconds to a minute")


def pytest_collection_modifyitems(config, items):
    import torch
    # `python scripts/gpu_check.py --dry-run` runs tests/test_gpu.py on the CPU, so it cannot rot
    if torch.cuda.is_available() or os.environ.get("CM_GPU_CHECK_DEVICE") == "cpu":
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
