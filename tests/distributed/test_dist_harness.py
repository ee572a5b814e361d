"""The harness and launcher: results come back; hangs, failures and timeouts end with a cause."""

import re
from pathlib import Path

import psutil
import pytest

from tests.dist import ROOT
from trinityx_ds.launch.torchrun import cpu_env, launch_torchrun

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


def test_launcher_timeout_kills_every_process():
    with pytest.raises(TimeoutError) as timeout:
        launch_torchrun([WORKERS / "harness_sleep.py"], 2, timeout=10, env=cpu_env(), cwd=ROOT)
    pids = [int(pid) for pid in re.findall(r"worker pid=(\d+)", str(timeout.value))]
    assert len(pids) == 2, str(timeout.value)
    psutil.wait_procs([p for p in map(_process, pids) if p], timeout=5)
    assert not any(map(_process, pids))


def _process(pid):
    """The process `pid` if it still runs (a zombie awaiting its reaper counts as gone)."""
    try:
        proc = psutil.Process(pid)
        return proc if proc.status() != psutil.STATUS_ZOMBIE else None
    except psutil.NoSuchProcess:
        return None


def test_init_distributed_under_torchrun(run_dist):
    result = run_dist(WORKERS / "env_init.py", 2, timeout=120)  # a first DeepSpeed op build: ~30 s
    assert result["env"]["launcher"] == "torchrun"
    assert (result["env"]["rank"], result["env"]["world_size"]) == (0, 2)
    assert result["backend"] == "gloo" and result["world_size"] == 2
    assert result["deepspeed_comm"] and result["sum"] == 2.0
