"""Shared pytest set-up: import paths and the `run_dist` fixture (see tests/dist.py)."""

import sys
from pathlib import Path

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
