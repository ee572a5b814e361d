"""Shared pytest set-up: import paths and the `run_dist` fixture (see tests/dist.py)."""

import os
import sys
from pathlib import Path

# The suite is a CPU suite, also on a machine with GPUs: its exact equalities (DP1 = DP2, resume
# = uninterrupted) are CPU facts, and a test must not take a GPU path by accident
# (GPU_READINESS finding 25). The GPU's own checks are tools/gpu_check.sh.
os.environ["CUDA_VISIBLE_DEVICES"] = ""
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest

TESTS = Path(__file__).resolve().parent
for path in (TESTS.parent, TESTS):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from tests.dist import run_dist as _run_dist  # noqa: E402


@pytest.fixture
def run_dist():
    """`run_dist(script, nproc, *args, timeout=180) -> dict`: see tests/dist.py."""
    return _run_dist
