"""Distributed test harness: run a worker script under torchrun on CPU, get rank 0's result.

Test side: `run_dist(script, nproc, *args)`. Worker side: call `worker_setup(timeout)` first, so a
hang dumps every rank's stack and exits before the outer timeout, then `write_result(dict)` on
rank 0. One rank that fails while the others wait would hang them: the watchdog turns that into
a failing test with stacks instead of a stuck CI job.
"""

from __future__ import annotations

import atexit
import faulthandler
import json
import os
import tempfile
from pathlib import Path

import pytest

from trinityx_ds.launch.torchrun import cpu_env, launch_torchrun

ROOT = Path(__file__).resolve().parents[1]

RESULT_ENV = "TRINITYX_TEST_RESULT"
TIMEOUT_ENV = "TRINITYX_TEST_TIMEOUT"


def run_dist(script: str | Path, nproc: int, *args, timeout: float = 180) -> dict:
    """Launch `script` in `nproc` CPU processes; fail the test on a non-zero exit or a timeout.

    Returns the JSON that rank 0 passed to `write_result` ({} if none).
    """
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        env = cpu_env(
            {
                RESULT_ENV: str(result),
                TIMEOUT_ENV: str(timeout),
                # workers run as scripts: make `tests` and `trinityx_ds` importable
                "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.getenv("PYTHONPATH")])),
            }
        )
        try:
            proc = launch_torchrun([script, *args], nproc, timeout, env=env, cwd=ROOT)
        except TimeoutError as exc:
            pytest.fail(str(exc), pytrace=False)
        if proc.returncode != 0:
            pytest.fail(
                f"{Path(script).name} exited with {proc.returncode}; output tail:\n"
                f"{proc.stdout[-4000:]}",
                pytrace=False,
            )
        return json.loads(result.read_text()) if result.exists() else {}


def worker_setup(timeout: float | None = None) -> None:
    """Arm the watchdog: dump all threads' stacks and exit 10 s before the launcher's timeout.

    Also destroys the process group at exit: with torch 2.13, a gloo process left alive at
    interpreter exit aborts ("terminate called without an active exception") about half the time.
    """
    timeout = timeout or float(os.environ.get(TIMEOUT_ENV, 180))
    faulthandler.dump_traceback_later(max(timeout - 10, 1), exit=True)
    atexit.register(_destroy_process_group)


def _destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def allow_cpu_fp16() -> None:
    """Let DeepSpeed's fp16 path run on a CPU whose oneDNN has no fp16 kernels.

    DeepSpeed's CPU accelerator answers `is_fp16_supported()` from
    `torch.ops.mkldnn._is_mkldnn_fp16_supported()`, False on CPUs without native fp16 units (AMD
    EPYC with AVX-512 and bf16 but no AVX512-FP16), and its engine then refuses fp16 ("Type fp16 is
    not supported on your device"). torch's own CPU kernels still compute in fp16 there (slower),
    so the maths DeepSpeed adds under fp16 (loss scaling, fp32 masters, overflow skips) runs the
    same; the tests that check that maths say yes for the accelerator. A user's run is refused
    before launch instead (train/preflight.py: device_problems)."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu":
        type(accelerator).is_fp16_supported = lambda self: True


def write_result(result: dict) -> None:
    """Rank 0 hands `result` back to `run_dist`."""
    if int(os.environ.get("RANK", "0")) == 0:
        Path(os.environ[RESULT_ENV]).write_text(json.dumps(result))
