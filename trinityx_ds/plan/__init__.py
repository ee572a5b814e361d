"""Capacity planning: will a layout fit the GPUs, how fast will it go, which layout is fastest.

Everything is arithmetic on architecture numbers (nothing is built or allocated), so a plan for
a 70B model on 128 GPUs takes well under a second on a laptop. The exception, verify.py (each rank
of a layout built on the meta device: torch, megatron, DeepSpeed), is imported when its names are
first used: `trinityx plan` without `--verify`, and `trinityx --help`, stay without them.
"""
from trinityx_ds.plan.cli import add_plan_arguments, cmd_plan, format_plan
from trinityx_ds.plan.layout import Cluster, Layout, Term, ZeroBuffers, layout_problems
from trinityx_ds.plan.memory import Memory, activations, layer_activations, model_states, stage_memory
from trinityx_ds.plan.params import (MoCaEPlan, backbone_params, largest_module, per_rank_params, stage_moe,
                                     trainable_params)
from trinityx_ds.plan.presets import PRESETS, UnknownModel, load_arch
from trinityx_ds.plan.recommend import Plan, Recommendation, StagePlan, plan_layout, recommend
from trinityx_ds.plan.throughput import Throughput, flops_per_token, stage_throughput

__all__ = [
    "PRESETS", "Cluster", "Layout", "Memory", "MoCaEPlan", "Plan", "RankCount", "Recommendation", "StagePlan", "Term",
    "Throughput", "UnknownModel", "ZeroBuffers", "activations", "add_plan_arguments", "backbone_params",
    "cmd_plan", "flops_per_token", "format_plan", "largest_module", "layer_activations", "layout_problems",
    "load_arch", "model_states", "per_rank_params", "plan_layout", "recommend", "stage_memory",
    "stage_moe", "stage_throughput", "trainable_params", "verify_layout",
]


def __getattr__(name: str):
    if name not in ("RankCount", "verify_layout"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from trinityx_ds.plan import verify

    return getattr(verify, name)
