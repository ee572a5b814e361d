"""Process groups of a run, in the one order that works: distributed init, megatron's TP/PP/DP
state, then DeepSpeed's expert-parallel groups (derived from megatron's), then seeds.

Expert-parallel ranks are carved out of the data-parallel ranks (Megatron/DeepSpeed E+M+D
layout): an EP group holds ranks with the same TP rank and different DP ranks, so each EP
rank brings its own tokens and all-to-all exchanges them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from trinityx_ds.parallel import deepspeed_compat
from trinityx_ds.parallel.env import init_distributed
from trinityx_ds.parallel.megatron_compat import apply_cpu_patches


@dataclass(frozen=True)
class ParallelDims:
    world_size: int
    tp: int
    pp: int
    dp: int
    ep: int
    rank: int
    tp_rank: int
    dp_rank: int

    @property
    def ep_group_name(self) -> str:
        return f"ep_size_{self.ep}"


def init_parallel(tp: int = 1, pp: int = 1, ep: int = 1, seed: int = 1234) -> ParallelDims:
    """Initialises every group this rank takes part in; callable once per process."""
    apply_cpu_patches()
    if not dist.is_initialized():
        init_distributed()
    world = dist.get_world_size()
    if world % (tp * pp):
        raise ValueError(f"parallel: tp({tp}) x pp({pp}) = {tp * pp} does not divide world size {world}")
    dp = world // (tp * pp)
    if dp % ep:
        raise ValueError(f"parallel.ep: {ep} — must divide the data-parallel size {dp}")
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    if ep > 1:
        deepspeed_compat.set_mpu(parallel_state)  # DeepSpeed derives its DP and EP groups from megatron's
        deepspeed_compat.ensure_expert_groups(ep, parallel_state)
    model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)
    return ParallelDims(world_size=world, tp=tp, pp=pp, dp=dp, ep=ep, rank=dist.get_rank(),
                        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
                        dp_rank=parallel_state.get_data_parallel_rank())


def expert_parallel_group(dims: ParallelDims):
    """This rank's EP group (None without expert parallelism)."""
    if dims.ep == 1:
        return None
    return deepspeed_compat.expert_parallel_group(dims.ep_group_name)


def destroy_parallel() -> None:
    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


class DeepSpeedMPU:
    """megatron-core's parallel state under the names DeepSpeed's `mpu` argument expects.

    DeepSpeed still calls the pre-core Megatron API (get_model_parallel_*); its "model parallel"
    group is where TP-sharded gradients are summed for the global norm: our TP group (PP=1).
    """

    def __getattr__(self, name):
        aliases = {
            "get_model_parallel_group": parallel_state.get_tensor_model_parallel_group,
            "get_model_parallel_rank": parallel_state.get_tensor_model_parallel_rank,
            "get_model_parallel_world_size": parallel_state.get_tensor_model_parallel_world_size,
            "get_pipe_parallel_group": parallel_state.get_pipeline_model_parallel_group,
            "get_pipe_parallel_world_size": parallel_state.get_pipeline_model_parallel_world_size,
        }
        if name in aliases:
            return aliases[name]
        return getattr(parallel_state, name)
