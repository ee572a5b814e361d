"""Which device this rank computes on: the one owner of that decision.

`bind(local_rank)` picks the GPU of a rank, calls `torch.cuda.set_device` and records it; it runs
once per process, before any process group (parallel/env.init_distributed) or, in a process
without one, before a model is built. Every other module asks `rank_device()` for the device of
its tensors and collectives: training batches and step scalars, the preemption and divergence
flags (created on the device: NCCL has no CPU tensors), the evaluation model, the stage-2
validation's inputs.

Why flags on the device and not a `cpu:gloo,cuda:nccl` process group: the mixed group opens a
second set of connections (gloo over TCP, every rank to every rank at 512 GPUs) for a handful of
scalars per step, and it hides the mistake this module exists to prevent, a CPU tensor entering a
collective, behind a silent slow path. Object collectives (`gather_object`, ...) work over NCCL
once `set_device` has run: torch moves their bytes to the current device itself; their tensors
are moved to CPU by the sender (train/gather.py), so rank 0 never unpickles a peer's CUDA tensor.

Tests run the whole suite on CPU. `placed_on(torch.device("meta"))` makes `rank_device()` answer
a device that is not the host's, so a CPU tensor meeting the model's tensors raises there as it
would on a GPU (tests/devices.py, tests/distributed/test_devices.py).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

_bound: int | None = None  # the CUDA device index this process bound
_placed: torch.device | None = None  # tests: the device rank_device() answers instead


def bind(local_rank: int) -> torch.device:
    """Binds this process to its device (once; later calls return the bound one): the GPU of local
    rank `local_rank` among the GPUs this process sees. Where a launcher shows each task only its
    own GPU (srun --gpus-per-task, per-task CUDA_VISIBLE_DEVICES), that is index 0 for every task."""
    global _bound
    if not torch.cuda.is_available():
        return torch.device("cpu")
    if _bound is None:
        _bound = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(_bound)
    return torch.device("cuda", _bound)


def rank_device() -> torch.device:
    """The device of this rank's model, batches, step scalars and collectives."""
    if _placed is not None:
        return _placed
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device() if _bound is None else _bound)
    return torch.device("cpu")


def on_rank_device(batch: dict) -> dict:
    """The tensors of `batch` on the rank's device (non-blocking from pinned memory where possible)."""
    device = rank_device()
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


@contextlib.contextmanager
def placed_on(device: torch.device | str) -> Iterator[torch.device]:
    """Tests: `rank_device()` answers `device` inside the block (e.g. "meta" on a CPU machine)."""
    global _placed
    before, _placed = _placed, torch.device(device)
    try:
        yield _placed
    finally:
        _placed = before
