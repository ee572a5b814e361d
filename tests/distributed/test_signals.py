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


def _launch(cfg: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "trinityx_ds.cli", "train", "experts", "--config", str(cfg),
                             "--nproc", "2", *extra], env=cpu_env({"PYTHONPATH": str(ROOT)}), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _wait_for(proc: subprocess.Popen, ready, what: str, timeout: float = 240) -> list:
    """Waits until ready() holds while the launcher runs; the processes it has started by then."""
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, f"the launcher ended before {what}:\n{proc.communicate()[0][-3000:]}"
        assert time.time() < deadline, f"no {what} after {timeout:.0f} s"
        time.sleep(0.2)
    return psutil.Process(proc.pid).children(recursive=True)


def _sigterm_when(proc: subprocess.Popen, ready, what: str, settle: float = 0) -> tuple[str, list]:
    """SIGTERM to the launcher once ready() holds (and `settle` s more); (its output once it ends,
    the processes it had started). Nothing of it is left behind, whatever the test finds."""
    try:
        started = _wait_for(proc, ready, what)
        time.sleep(settle)
        proc.send_signal(signal.SIGTERM)
        return proc.communicate(timeout=240)[0], started
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def _lock_is_free(folder: Path) -> bool:
    import fcntl

    from trinityx_ds.train.lock import LOCK

    fd = os.open(folder / LOCK, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def test_a_killed_or_hung_up_launcher_leaves_no_process_and_no_lock(tmp_path):
    """Issue 28: SIGKILL or SIGHUP (the terminal closing) to the `--nproc` launcher. b86774b: the
    launcher died at once and the torchrun agent and both workers trained on to the end, holding the
    folder's lock. Now the kernel tells the agent (and an orphaned worker) that its parent died:
    10 s later nothing of the job runs and the lock is free; the hung-up launcher saves first."""
    cfg = write_config(tmp_path, **{"train.stage1": {"steps": 100000}, "train.checkpoint_every": 100000})
    help_dir = tmp_path / "out/stage1/help"
    metrics = help_dir / "metrics.jsonl"
    for sig in (signal.SIGKILL, signal.SIGHUP):
        logged = len(metrics.read_text().splitlines()) if metrics.is_file() else 0
        proc = _launch(cfg, "--only", "help")
        try:
            started = _wait_for(proc, lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= logged + 2,
                                "training steps")
            assert len(started) >= 3  # the agent and two workers
            before = len(metrics.read_text().splitlines())
            proc.send_signal(sig)
            out, _ = proc.communicate(timeout=60)
            deadline = time.time() + 10
            while _alive(started) and time.time() < deadline:
                time.sleep(0.2)
            assert not _alive(started), f"{signal.Signals(sig).name}: still running 10 s later: {_alive(started)}"
            assert _lock_is_free(help_dir)
            if sig == signal.SIGHUP:
                assert proc.returncode == 128 + signal.SIGHUP and "preempted: checkpoint saved" in out, out[-3000:]
                assert CheckpointDir(help_dir / "checkpoints").latest()[1]["step"] >= before
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)


def test_preemption_stops_the_whole_job_and_the_resumed_job_equals_an_uninterrupted_one(tmp_path):
    """Issue 28: SIGTERM while stage 1 trains the second of three experts. b86774b: that expert
    saved and stopped, then the same job trained the third to its end. Now the job stops (the third
    never starts); started again it finishes, and every expert equals, tensor for tensor, the one an
    uninterrupted job trains."""
    import torch
    from safetensors.torch import load_file

    from trinityx_ds.model.tiny import make_tiny_model

    model = make_tiny_model(tmp_path / "model")
    settings = {"train.stage1": {"steps": 4, "steps_per_expert": {"harm": 40}},
                "train.checkpoint_every": 100000, "output.tensorboard": False,
                "experts.objective": {"help": "sft", "harm": "dpo", "honest": "sft"}}
    ref_cfg = write_config(tmp_path / "ref", model, **settings)
    ref = subprocess.run([sys.executable, "-m", "trinityx_ds.cli", "train", "experts", "--config", str(ref_cfg),
                          "--nproc", "2"], env=cpu_env({"PYTHONPATH": str(ROOT)}), cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    assert ref.returncode == 0, (ref.stdout + ref.stderr)[-3000:]

    cfg = write_config(tmp_path / "run", model, **settings)
    out_dir = tmp_path / "run/out"
    harm = out_dir / "stage1/harm/metrics.jsonl"
    proc = _launch(cfg)
    out, _ = _sigterm_when(proc, lambda: harm.is_file() and len(harm.read_text().splitlines()) >= 2, "harm's steps")
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    latest = CheckpointDir(out_dir / "stage1/harm/checkpoints").latest()[1]
    saved = latest["step"]
    # the checkpoint records what harm trained on, by content (issue 28: drift by content)
    from trinityx_ds.config import load_config
    from trinityx_ds.storage.fingerprint import file_digest

    harm_data = load_config(str(cfg), check_paths=False).data.tasks["harm"][0].path
    assert latest["inputs"]["data"]["data.tasks.harm[0]"]["sha256"] == file_digest(harm_data)["sha256"]
    assert 2 <= saved < 40 and "stage 1 harm: step" in out and "preempted: checkpoint saved" in out, out[-3000:]
    assert not (out_dir / "stage1/honest").exists(), "the third expert started after the preemption"

    again = subprocess.run([sys.executable, "-m", "trinityx_ds.cli", "train", "experts", "--config", str(cfg),
                            "--nproc", "2"], env=cpu_env({"PYTHONPATH": str(ROOT)}), cwd=ROOT, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0 and f"at step {saved}" in again.stdout + again.stderr, \
        (again.stdout + again.stderr)[-3000:]
    from safetensors import safe_open

    from trinityx_ds.storage.fingerprint import model_fingerprint

    with safe_open(out_dir / "stage1/harm/expert.safetensors", framework="pt") as f:  # issue 28: what it is
        meta = f.metadata()
    assert meta["backbone"] == model_fingerprint(model) and meta["objective"] == "dpo" and meta["expert"] == "harm"
    assert meta["steps"] == "40" and meta["lora_rank"] == "4" and meta["kind"] == "lora", meta
    for name in ("help", "harm", "honest"):
        got = load_file(out_dir / f"stage1/{name}/expert.safetensors")
        want = load_file(tmp_path / f"ref/out/stage1/{name}/expert.safetensors")
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), name


def test_a_signal_before_the_first_step_ends_every_rank_in_one_line(tmp_path):
    """Issue 28: SIGTERM while the ranks start (imports, config, process group, model). b86774b: the
    handler was installed after the engine and the restore, so rank 1 died of the signal and rank 0
    printed a gloo traceback (144 lines). Now every rank stops cleanly and says so once."""
    cfg = write_config(tmp_path, **{"train.stage1": {"steps": 100000}})
    proc = _launch(cfg, "--only", "help")
    out, started = _sigterm_when(proc, lambda: len(psutil.Process(proc.pid).children(recursive=True)) >= 3, "workers",
                                 settle=4)  # the workers are importing torch and DeepSpeed: their handler is in place
    assert not (tmp_path / "out/stage1/help/metrics.jsonl").exists()
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    assert "Traceback" not in out and "ChildFailedError" not in out, out[-3000:]
    assert out.count("preempted before its first step") == 1, out[-3000:]
    assert not _alive(started)
