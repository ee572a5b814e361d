"""The harness itself: results come back, hangs and failures end the test with their cause."""

from pathlib import Path

import pytest

pytestmark = pytest.mark.distributed

WORKERS = Path(__file__).parent / "workers"


def test_result_of_rank0_comes_back(run_dist):
    result = run_dist(WORKERS / "harness_ok.py", 2, timeout=60)
    assert result == {"sum": 1.0, "world_size": 2, "accelerator": "cpu"}


def test_hang_is_killed_by_watchdog_with_stacks(run_dist):
    with pytest.raises(pytest.fail.Exception) as failure:
        run_dist(WORKERS / "harness_hang.py", 2, timeout=20)
    assert 'File "' in str(failure.value)
    assert "harness_hang.py" in str(failure.value)


def test_exception_in_one_rank_fails_with_its_text(run_dist):
    with pytest.raises(pytest.fail.Exception) as failure:
        run_dist(WORKERS / "harness_raise.py", 2, timeout=20)
    assert "rank 1 failed on purpose" in str(failure.value)
