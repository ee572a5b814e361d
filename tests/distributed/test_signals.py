"""Signals to the local launcher (`trinityx train ... --nproc 2`): SIGTERM and SIGINT (Ctrl-C)
reach every worker, which finishes its step, saves and exits; the launcher exits only after them,
with 128 + the signal's number, and no process of the run survives."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.dist import ROOT
from trinityx_ds.launch.torchrun import cpu_env
from trinityx_ds.storage.layout import CheckpointDir
from trinityx_ds.train.tiny_run import write_config

pytestmark = pytest.mark.distributed


def _interrupt(cfg: Path, metrics: Path, sig: int, after_lines: int) -> tuple[int, str, list]:
    """Starts the launcher, sends `sig` once `after_lines` steps are logged; (exit code, output,
    every process the launcher had started)."""
    env = cpu_env({"PYTHONPATH": str(ROOT)})
    proc = subprocess.Popen([sys.executable, "-m", "trinityx_ds.cli", "train", "experts", "--only", "harm",
                             "--config", str(cfg), "--nproc", "2"], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.time() + 240
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= after_lines):
            assert proc.poll() is None and time.time() < deadline, "the run ended or never started training"
            time.sleep(0.5)
        started = psutil.Process(proc.pid).children(recursive=True)
        assert len(started) >= 3  # torchrun's agent and two workers
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, out, started


def _alive(processes: list) -> list:
    out = []
    for p in processes:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def test_sigterm_and_sigint_save_and_leave_nothing_running(tmp_path):
    # harm trains with DPO: a preference run (pairs, the reference forward) is preempted and resumed
    cfg = write_config(tmp_path, **{"train.stage1": {"steps": 100000}, "train.checkpoint_every": 100000,
                                    "experts.objective": {"help": "sft", "harm": "dpo", "honest": "sft"}})
    harm = tmp_path / "out/stage1/harm"
    ckpt = CheckpointDir(harm / "checkpoints")
    rc, out, started = _interrupt(cfg, harm / "metrics.jsonl", signal.SIGTERM, after_lines=2)
    assert rc == 128 + signal.SIGTERM, out[-3000:]
    assert "preempted: checkpoint saved" in out and not _alive(started)
    first = ckpt.latest()
    assert first is not None and first[1]["step"] >= 2

    rc, out, started = _interrupt(cfg, harm / "metrics.jsonl", signal.SIGINT, after_lines=first[1]["step"] + 2)
    assert rc == 128 + signal.SIGINT, out[-3000:]
    assert f"at step {first[1]['step']}" in out and "preempted: checkpoint saved" in out and not _alive(started)
    assert ckpt.latest()[1]["step"] > first[1]["step"]  # Ctrl-C saved too
    logged = [line for line in (harm / "metrics.jsonl").read_text().splitlines() if '"dpo/loss"' in line]
    assert len(logged) >= first[1]["step"] + 2  # the resumed run went on with DPO's steps
