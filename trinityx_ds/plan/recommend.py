"""Plans of whole runs (stage 1 and stage 2 on one layout) and the search for the fastest that fits."""
from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, replace

from trinityx_ds.model.arch import ModelArch
from trinityx_ds.plan.layout import GIB, Cluster, Layout, layout_problems
from trinityx_ds.plan.memory import Memory, stage_memory
from trinityx_ds.plan.params import MoCaEPlan, backbone_params, per_rank_params, stage_moe, trainable_params
from trinityx_ds.plan.presets import load_arch
from trinityx_ds.plan.throughput import Throughput, stage_throughput

MICRO_BATCHES = (1, 2, 4, 8)


@dataclass(frozen=True)
class StagePlan:
    stage: int
    trainable: int  # whole model
    memory: Memory  # worst pipeline stage
    throughput: Throughput


@dataclass(frozen=True)
class Plan:
    model: str
    arch: ModelArch
    moe: MoCaEPlan
    layout: Layout
    cluster: Cluster
    stages: tuple[StagePlan, ...]

    @property
    def fits(self) -> bool:
        return all(s.memory.fits for s in self.stages)

    @property
    def step_s(self) -> float:
        """Ranking key: one step of every planned stage."""
        return sum(s.throughput.step_s for s in self.stages)

    @property
    def worst(self) -> StagePlan:
        return max(self.stages, key=lambda s: s.memory.over)

    def refusal(self) -> str:
        w = self.worst
        m, dom = w.memory, w.memory.dominant
        return (f"does not fit: stage {w.stage} needs {m.total / GIB:.1f} GiB per GPU of {m.capacity / GIB:.0f} GiB "
                f"({m.over / GIB:.1f} GiB over); largest term: {dom.name} {dom.value / GIB:.1f} GiB = {dom.formula}")

    def to_dict(self) -> dict:
        lay, world = self.layout, self.cluster.world
        return {
            "model": self.model,
            "cluster": asdict(self.cluster) | {"world": world},
            "layout": asdict(lay) | {"dp": lay.dp(world)},
            "moe": asdict(self.moe),
            "params": {
                "backbone": backbone_params(self.arch),
                "per_rank": {f"stage_{s.stage}": {
                    f"pp_rank_{r}": per_rank_params(self.arch, lay.tp, lay.pp, r, *stage_moe(self.moe, s.stage, lay.ep))
                    for r in range(lay.pp)} for s in self.stages},
            },
            "fits": self.fits,
            "step_s_all_stages": self.step_s,
            "stages": [{
                "stage": s.stage, "trainable": s.trainable, "fits": s.memory.fits, "pp_rank": s.memory.pp_rank,
                "memory_gib": {t.name: t.value / GIB for t in s.memory.terms},
                "memory_formulas": {t.name: t.formula for t in s.memory.terms},
                "total_gib": s.memory.total / GIB, "capacity_gib": s.memory.capacity / GIB,
                "over_gib": max(0.0, s.memory.over / GIB), "dominant": s.memory.dominant.name,
                "cpu_gib_per_node": s.memory.cpu_bytes_per_node / GIB,
                "throughput": {k: v for k, v in asdict(s.throughput).items() if k != "comm"}
                | {"comm_s": {t.name: t.value for t in s.throughput.comm},
                   "comm_formulas": {t.name: t.formula for t in s.throughput.comm}},
            } for s in self.stages],
        }


def plan_layout(model: str, arch: ModelArch, moe: MoCaEPlan, lay: Layout, cluster: Cluster,
                stages: tuple[int, ...] = (1, 2)) -> Plan:
    """Memory and speed of `lay` for each stage; ValueError if the layout cannot run at all."""
    problems = layout_problems(arch, moe, lay, cluster)
    if problems:
        raise ValueError(f"layout {lay.describe(cluster.world)}: " + "; ".join(problems))
    return Plan(model, arch, moe, lay, cluster, tuple(
        StagePlan(st, sum(trainable_params(arch, 1, 1, 0, moe, st).values()),
                  stage_memory(arch, moe, lay, cluster, st), stage_throughput(arch, moe, lay, cluster, st))
        for st in stages))


def candidate_layouts(arch: ModelArch, moe: MoCaEPlan, cluster: Cluster, base: Layout, global_batch: int,
                      fixed: dict) -> list[Layout]:
    """Every runnable layout; `fixed` pins Layout fields (grad_accum pinned: global_batch ignored)."""
    pow2 = [2**i for i in range(cluster.gpus_per_node.bit_length()) if 2**i <= cluster.gpus_per_node]
    axes = {
        "tp": pow2,
        "pp": [p for p in range(1, arch.num_layers + 1) if arch.num_layers % p == 0 and cluster.world % p == 0],
        "ep": [e for e in range(1, moe.num_experts + 1) if moe.num_experts % e == 0] if moe.kind == "full" else [1],
        "zero": [1, 2, 3],
        "offload": [False, True],
        "micro_batch": list(MICRO_BATCHES),
        "act_ckpt": ["none", "full"] + (["selective"] if base.scores_kept else []),
        # SP moves no more bytes than TP's all-reduces and keeps less: listed after "off", so it is
        # chosen only where it pays (a layout that fits only with it, or a larger micro-batch)
        "sequence_parallel": [False, True],
    }
    axes |= {k: [v] for k, v in fixed.items() if k in axes}
    out = []
    for values in itertools.product(*axes.values()):
        lay = replace(base, **dict(zip(axes, values)))
        if cluster.world % (lay.tp * lay.pp) or (lay.sequence_parallel and lay.tp == 1):
            continue
        if "grad_accum" not in fixed:
            per_step = lay.micro_batch * lay.dp(cluster.world)
            if global_batch % per_step:
                continue
            lay = replace(lay, grad_accum=global_batch // per_step)
        if not layout_problems(arch, moe, lay, cluster):
            out.append(lay)
    return out


@dataclass(frozen=True)
class Recommendation:
    best: Plan | None  # fastest that fits
    top: tuple[Plan, ...]  # fastest fitting plans, best first
    closest: Plan | None  # least over, when none fits
    considered: int


def recommend(model: str | ModelArch, nodes: int, gpus_per_node: int, gpu_mem_gib: float, *,
              moe: MoCaEPlan = MoCaEPlan(), seq_len: int = 4096, global_batch: int = 128,
              fixed: dict | None = None, stages: tuple[int, ...] = (1, 2), top: int = 5,
              base: Layout | None = None, **cluster_kw) -> Recommendation:
    """Enumerates layouts (TP powers of two within a node, PP dividing the layers, ZeRO 1/2/3,
    offload, micro-batch, checkpointing, EP for full experts), keeps those that fit with the
    margin and ranks them by step time (one step of each planned stage) at the same global batch."""
    name, arch = load_arch(model) if isinstance(model, str) else ("custom", model)
    cluster = Cluster(nodes=nodes, gpus_per_node=gpus_per_node, gpu_mem_gib=gpu_mem_gib, **cluster_kw)
    base = replace(base or Layout(), seq_len=seq_len)
    plans = [plan_layout(name, arch, moe, lay, cluster, stages)
             for lay in candidate_layouts(arch, moe, cluster, base, global_batch, fixed or {})]
    fits = {p.layout for p in plans if p.fits}
    # offload only costs time: keep it where the same layout does not fit without it
    needed = [p for p in plans if p.fits and not (p.layout.offload and replace(p.layout, offload=False) in fits)]
    fitting = sorted(needed, key=lambda p: p.step_s)
    closest = None if fitting else min(plans, key=lambda p: p.worst.memory.over, default=None)
    return Recommendation(fitting[0] if fitting else None, tuple(fitting[:top]), closest, len(plans))
