"""What a plan is about: the cluster, one layout of a run on it, and DeepSpeed's buffer defaults."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from trinityx_ds.config.schema import recompute_mode
from trinityx_ds.model.arch import ModelArch
from trinityx_ds.plan.params import MoCaEPlan

GIB = 2**30


@dataclass(frozen=True)
class Term:
    """One line of a plan: bytes per GPU (memory) or exposed seconds per step (time)."""

    name: str
    value: float
    formula: str


@dataclass(frozen=True)
class Cluster:
    """Hardware numbers; every default is a documented H100 SXM / NDR InfiniBand figure.

    nvlink_gbs / ib_gbs are NCCL bus bandwidths (GB/s, as nccl-tests reports them) a group
    reaches inside one node (NVLink 4, ~360 of 450 GB/s) or across nodes (one 400 Gb/s NDR
    NIC per GPU, ~40 of 50 GB/s). context_gib: CUDA context, NCCL communicators and cuBLAS
    workspaces per process; margin: fragmentation, as a fraction of the allocated tensors.
    """

    nodes: int = 1
    gpus_per_node: int = 8
    gpu_mem_gib: float = 80.0
    context_gib: float = 2.0
    margin: float = 0.10
    peak_tflops: float = 989.0  # H100 SXM bf16 dense
    mfu: float = 0.40
    nvlink_gbs: float = 360.0
    ib_gbs: float = 40.0
    pcie_gbs: float = 25.0  # host <-> GPU, offload traffic
    cpu_adam_gparams: float = 1.0  # DeepSpeedCPUAdam, 1e9 params/s per GPU's process

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    def bandwidth(self, span: int) -> float:
        """Bytes/s of a group whose ranks lie within `span` consecutive global ranks."""
        return (self.nvlink_gbs if span <= self.gpus_per_node else self.ib_gbs) * 1e9


@dataclass(frozen=True)
class Layout:
    """Megatron's E+M+D layout (world = tp x pp x dp, ep divides dp; rank order tp, dp, pp)
    plus the DeepSpeed and batch settings that move memory or time."""

    tp: int = 1
    pp: int = 1
    ep: int = 1
    zero: int = 3
    offload: bool = False
    micro_batch: int = 1
    grad_accum: int = 1
    # model.activation_checkpointing: none | full | selective (core attention only, eager only);
    # a bool still means full / none and is normalised to the string
    act_ckpt: Literal["none", "full", "selective"] = "none"
    seq_len: int = 4096
    sequence_parallel: bool = False
    # model.attention: sdpa and te are fused kernels (no s x s scores kept), eager keeps them
    attention: Literal["sdpa", "eager", "te"] = "sdpa"

    def __post_init__(self):
        object.__setattr__(self, "act_ckpt", recompute_mode(self.act_ckpt))

    @property
    def scores_kept(self) -> bool:
        """Whether the core attention keeps its [b, heads, s, s] scores for backward (eager only)."""
        return self.attention == "eager"

    def dp(self, world: int) -> int:
        return world // (self.tp * self.pp)

    def describe(self, world: int) -> str:
        return (f"tp {self.tp}, pp {self.pp}, dp {self.dp(world)}, ep {self.ep}, ZeRO-{self.zero}"
                f"{' + CPU offload' if self.offload else ''}, micro-batch {self.micro_batch}, grad-accum "
                f"{self.grad_accum}, act-ckpt {self.act_ckpt}, seq {self.seq_len}, "
                f"{self.attention} attention{', sequence parallel' if self.sequence_parallel else ''}")


@dataclass(frozen=True)
class ZeroBuffers:
    """DeepSpeed 0.19.8 zero_optimization defaults (runtime/zero/config.py), in elements.

    ZeRO-1/2/3 allocate one bf16 reduce bucket of reduce_bucket_size (contiguous_gradients;
    a second one only with overlap_comm in ZeRO-1/2, off by default); ZeRO-3 prefetches up to
    stage3_prefetch_bucket_size and keeps gathered what is reused within stage3_max_reuse_distance.
    """

    reduce_bucket_size: int = 500_000_000
    prefetch_bucket_size: int = 50_000_000
    max_reuse_distance: int = 1_000_000_000


def layout_problems(arch: ModelArch, moe: MoCaEPlan, lay: Layout, cluster: Cluster) -> list[str]:
    """Why `lay` cannot run at all (memory aside); empty when it can."""
    out, world = [], cluster.world
    if world % (lay.tp * lay.pp):
        return [f"tp {lay.tp} x pp {lay.pp} does not divide {world} GPUs"]
    dp = lay.dp(world)
    rules = [
        (arch.intermediate_size % lay.tp == 0, f"tp {lay.tp} must divide intermediate_size {arch.intermediate_size}"),
        (arch.num_layers % lay.pp == 0, f"pp {lay.pp} must divide the {arch.num_layers} layers"),
        (lay.pp == 1 or lay.zero <= 1, "pipeline parallelism needs ZeRO-1: DeepSpeed's pipeline engine refuses 2/3"),
        (lay.zero in (1, 2, 3), f"ZeRO stage {lay.zero}: planned for 1, 2 or 3"),
        (lay.ep == 1 or moe.kind == "full", "expert parallelism needs full experts (LoRA experts are replicated)"),
        (dp % lay.ep == 0, f"ep {lay.ep} must divide dp {dp}"),
        (moe.num_experts % lay.ep == 0, f"ep {lay.ep} must divide the {moe.num_experts} experts"),
        (1 <= moe.top_k <= moe.num_experts, f"top-k {moe.top_k} must be in 1..{moe.num_experts}"),
        (min(lay.micro_batch, lay.grad_accum, lay.seq_len) >= 1, "micro-batch, grad-accum and seq-len must be >= 1"),
        (lay.act_ckpt != "selective" or lay.scores_kept,
         f"selective checkpointing recomputes only attention scores, which {lay.attention} attention never keeps"),
    ]
    out += [msg for ok, msg in rules if not ok]
    if arch.sliding_window is not None and lay.seq_len > arch.sliding_window:
        out.append(f"seq-len {lay.seq_len} exceeds the model's sliding_window {arch.sliding_window}")
    return out
