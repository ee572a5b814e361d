"""dist_env reads each launcher's variables; nothing set means a single process."""

import os
import subprocess

import pytest

from trinityx_ds.parallel import env as env_mod
from trinityx_ds.parallel.env import DistEnv, dist_env

LAUNCH_VARS = (
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR",
    "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NODEID",
    "SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE", "SLURM_JOB_NODELIST", "SLURM_JOB_ID",
)  # fmt: skip


@pytest.fixture
def setenv(monkeypatch):
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)

    def set_(**values):
        for name, value in values.items():
            monkeypatch.setenv(name, str(value))

    return set_


def test_single_process_when_nothing_is_set(setenv):
    denv = dist_env()
    assert (denv.rank, denv.world_size, denv.local_rank, denv.local_world_size) == (0, 1, 0, 1)
    assert denv.launcher == "single" and denv.master_addr == "127.0.0.1" and denv.master_port > 0


def test_torchrun(setenv):
    setenv(RANK=3, WORLD_SIZE=4, LOCAL_RANK=1, LOCAL_WORLD_SIZE=2, MASTER_ADDR="n1", MASTER_PORT=12)
    assert dist_env() == DistEnv(3, 4, 1, 2, "n1", 12, "torchrun")


def test_deepspeed_launcher(setenv):
    setenv(RANK=2, WORLD_SIZE=4, LOCAL_RANK=0, LOCAL_SIZE=2, MASTER_ADDR="n2", MASTER_PORT=29500)
    assert dist_env() == DistEnv(2, 4, 0, 2, "n2", 29500, "deepspeed")


def test_rank_wins_over_slurm_under_srun_torchrun(setenv):
    setenv(SLURM_PROCID=0, SLURM_NTASKS=2, RANK=5, WORLD_SIZE=8, LOCAL_RANK=1,
           LOCAL_WORLD_SIZE=4, MASTER_ADDR="n1", MASTER_PORT=1)
    assert dist_env().launcher == "torchrun" and dist_env().rank == 5


def test_srun_with_scontrol(setenv, monkeypatch):
    setenv(SLURM_PROCID=3, SLURM_NTASKS=4, SLURM_LOCALID=1, SLURM_NTASKS_PER_NODE=2,
           SLURM_JOB_NODELIST="gpu[07-08]", SLURM_JOB_ID=123)
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, "gpu07\ngpu08\n", "")

    monkeypatch.setattr(env_mod.subprocess, "run", fake_run)
    assert dist_env() == DistEnv(3, 4, 1, 2, "gpu07", 20123, "slurm")
    assert calls == [["scontrol", "show", "hostnames", "gpu[07-08]"]]


def test_srun_master_addr_from_env_skips_scontrol(setenv, monkeypatch):
    setenv(SLURM_PROCID=0, SLURM_NTASKS=1, MASTER_ADDR="head", MASTER_PORT=4000,
           SLURM_JOB_NODELIST="x1")
    monkeypatch.setattr(env_mod.subprocess, "run", lambda *a, **k: pytest.fail("scontrol called"))
    denv = dist_env()
    assert (denv.master_addr, denv.master_port, denv.local_world_size) == ("head", 4000, 1)


@pytest.mark.parametrize(
    "nodelist, first",
    [
        ("node[03-05,9],gpu1", "node03"),
        ("hostA,hostB", "hostA"),
        ("gpu-a[3,5]", "gpu-a3"),
        ("solo", "solo"),
    ],
)
def test_first_host_without_scontrol(nodelist, first, monkeypatch):
    def missing(*args, **kwargs):
        raise FileNotFoundError("scontrol")

    monkeypatch.setattr(env_mod.subprocess, "run", missing)
    assert env_mod._first_host(nodelist) == first


@pytest.mark.parametrize(
    "spec, node, count", [("2(x3),1", 2, 2), ("2(x3),1", 3, 1), ("4", 0, 4), ("3,1", 1, 1)]
)
def test_slurm_tasks_per_node(setenv, spec, node, count):
    setenv(SLURM_PROCID=0, SLURM_NTASKS=7, SLURM_TASKS_PER_NODE=spec, SLURM_NODEID=node,
           MASTER_ADDR="h")
    assert dist_env().local_world_size == count


@pytest.fixture
def gpus(monkeypatch):
    """torch sees `n` GPUs (no GPU is touched: set_device is recorded, not called)."""
    import torch

    from trinityx_ds.parallel import device

    bound = []

    def see(n):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "set_device", bound.append)
        monkeypatch.setattr(device, "_bound", None)
        return bound
    return see


def test_local_job_refuses_two_ranks_on_one_gpu(gpus, capsys):
    """GPU_READINESS finding 8: `--nproc 2` on a one-GPU box put both ranks on cuda:0 (NCCL:
    duplicate GPU). Refused in one line; the demo falls back to the CPU with a notice; one rank
    per GPU runs with the GPUs, and at TP > 1 with CUDA_DEVICE_MAX_CONNECTIONS=1 (finding 18)."""
    from trinityx_ds.launch.torchrun import CPU_ENV, LaunchError, local_job_env

    gpus(1)
    with pytest.raises(LaunchError, match=r"^--nproc 2: this machine shows 1 GPU\(s\) and each process needs its own"):
        local_job_env(2)
    env = local_job_env(2, cpu_fallback=True)
    assert all(env[k] == v for k, v in CPU_ENV.items())
    assert "running on CPU" in capsys.readouterr().err
    gpus(2)
    assert local_job_env(2, tp=2) == {**os.environ, "CUDA_DEVICE_MAX_CONNECTIONS": "1"}
    assert local_job_env(2, tp=1) == dict(os.environ)
    gpus(0)
    assert local_job_env(4)["DS_ACCELERATOR"] == "cpu"


@pytest.mark.parametrize("visible,local_id,index", [(8, 3, 3), (1, 3, 0)])
def test_local_rank_is_the_device_index_used(setenv, gpus, monkeypatch, visible, local_id, index):
    """GPU_READINESS finding 9: DeepSpeed's engine binds cuda:LOCAL_RANK itself. Where srun shows each
    task only its own GPU (one visible), b86774b exported LOCAL_RANK=SLURM_LOCALID (3: invalid
    device ordinal); the rank's device index is exported instead, and it is the one bound."""
    import deepspeed

    from trinityx_ds.parallel import env as env_mod

    setenv(SLURM_PROCID=3, SLURM_NTASKS=4, SLURM_LOCALID=local_id, SLURM_JOB_NODELIST="n1", MASTER_ADDR="n1",
           MASTER_PORT=1234)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):  # absent, and recorded as such (a delenv of an
        monkeypatch.setenv(name, "")                     # absent name is not), so what init_distributed
        monkeypatch.delenv(name)                         # exports is undone after the test
    bound = gpus(visible)
    monkeypatch.setattr(deepspeed, "init_distributed", lambda **kw: None)
    env_mod.init_distributed()
    assert os.environ["LOCAL_RANK"] == str(index) and bound == [index]
