"""Parameter counts, exactly as megatron (local spec) and the MoCaE blocks allocate them.

Per TP rank of one decoder layer (d = head_dim, padded heads nh and groups ng, see
`ModelArch.padded_kv_heads`): two RMSNorms 2H (replicated); linear_qkv (nh + 2 ng) d / tp x H
(+ the same as bias with qkv_bias); linear_proj H x nh d / tp (+ 2 d: Qwen3's q/k norms); linear_fc1 2F/tp x H (SwiGLU's
gate|up fused); linear_fc2 H x F/tp. Embedding and output layer: padded vocab / tp x H; the
embedding lives on the first pipeline stage, the final norm and the output layer on the last
(no output weight where tied embeddings share the first stage's). Layers split evenly by PP.

MoCaE, per chosen layer (model/mocae.py, model/experts.py): router E x H fp32 (+E bias, +1
learnable log-temperature, +H post-mix norm), replicated over TP; LoRA experts, all E on every
rank, per target: gate/up A [r, H] replicated + B [F/tp, r], down A [r, F/tp] + B [H, r]
replicated; full experts replace the dense FFN: E/ep experts per EP rank, each 3 H F / tp.
Each stage builds its own blocks (`stage_moe`): stage 1 one expert, stage 2 all of them.
`plan/verify.py` builds the real model on the meta device and checks these counts exactly.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from trinityx_ds.model.arch import ModelArch, padded_vocab_size

TARGETS = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class MoCaEPlan:
    """The MoCaE numbers that cost parameters, memory or FLOPs (a light mirror of MoCaEConfig)."""

    kind: Literal["lora", "full"] = "lora"
    num_experts: int = 3
    lora_rank: int = 8
    lora_targets: tuple[str, ...] = TARGETS
    top_k: int = 1
    layers: tuple[int, ...] | None = None  # None: every layer
    router_bias: bool = False
    learnable_temperature: bool = False
    normalize_output: bool = False
    train_experts_in_stage2: bool = False

    @classmethod
    def from_mocae_config(cls, cfg, train_experts_in_stage2: bool = False) -> MoCaEPlan:
        """From `trinityx_ds.model.mocae.MoCaEConfig` (read by attribute: no torch import here)."""
        top_k = cfg.num_experts if cfg.top_k == "all" else int(cfg.top_k)
        return cls(kind=cfg.kind, num_experts=cfg.num_experts, lora_rank=cfg.lora_rank,
                   lora_targets=tuple(cfg.lora_targets), top_k=top_k,
                   layers=None if cfg.layers == "all" else tuple(cfg.layers),
                   learnable_temperature=cfg.temperature_mode == "learnable",
                   normalize_output=cfg.normalize_output, train_experts_in_stage2=train_experts_in_stage2)

    @classmethod
    def from_run_config(cls, cfg) -> MoCaEPlan:
        """From a run config's `experts`, `router` and `train` sections (`config.schema.RunConfig`)."""
        e, r = cfg.experts, cfg.router
        return cls(kind=e.kind, num_experts=len(e.names), lora_rank=e.lora.rank, lora_targets=tuple(e.lora.targets),
                   top_k=len(e.names) if r.top_k == "all" else r.top_k,
                   layers=None if e.layers == "all" else tuple(e.layers),
                   learnable_temperature=r.temperature_mode == "learnable", normalize_output=r.normalize_output,
                   train_experts_in_stage2=cfg.train.train_experts_in_stage2)

    def chosen(self, num_layers: int) -> set[int]:
        return set(range(num_layers)) if self.layers is None else set(self.layers)

    def routed(self, stage: int) -> int:
        """Experts each token runs: stage 1 forces one expert, stage 2 routes top-k."""
        return 1 if stage == 1 else self.top_k

    def router_params(self, hidden: int) -> int:
        return (self.num_experts * hidden + self.num_experts * self.router_bias + self.learnable_temperature
                + hidden * self.normalize_output)

    def lora_params(self, hidden: int, ffn_local: int) -> int:
        """One expert's LoRA on one TP rank: r (H + F/tp) per target."""
        return len(self.lora_targets) * self.lora_rank * (hidden + ffn_local)


def stage_moe(moe: MoCaEPlan, stage: int, ep: int) -> tuple[MoCaEPlan, int]:
    """The MoCaE blocks one stage builds, and their EP size.

    Stage 1 trains one expert per run (train/stages.py): its blocks hold that expert alone, with a
    one-expert router and no expert parallelism. Stage 2 builds every expert, placed by EP.
    """
    if stage == 1:
        return replace(moe, num_experts=1, top_k=1), 1
    return moe, ep


def stage_layers(arch: ModelArch, pp: int, pp_rank: int) -> range:
    if arch.num_layers % pp:
        raise ValueError(f"parallel.pp: {pp} — must divide the number of layers ({arch.num_layers})")
    n = arch.num_layers // pp
    return range(pp_rank * n, (pp_rank + 1) * n)


def attention_params(arch: ModelArch, tp: int) -> int:
    """linear_qkv (+ bias) and linear_proj of one layer on one TP rank, and Qwen3's q/k RMSNorms
    (one head_dim vector each, replicated)."""
    q, kv = arch.padded_heads(tp) * arch.head_dim, arch.padded_kv_heads(tp) * arch.head_dim
    qkv_rows = (q + 2 * kv) // tp
    return (qkv_rows * arch.hidden_size + qkv_rows * arch.qkv_bias + arch.hidden_size * q // tp
            + 2 * arch.head_dim * arch.qk_norm)


def ffn_params(arch: ModelArch, tp: int) -> int:
    """linear_fc1 (gate|up) + linear_fc2 of one dense FFN, or one full expert, on one TP rank."""
    return 3 * arch.hidden_size * arch.intermediate_size // tp


def vocab_params(arch: ModelArch, tp: int) -> int:
    return padded_vocab_size(arch.vocab_size, tp) // tp * arch.hidden_size


def per_rank_params(arch: ModelArch, tp: int, pp: int, pp_rank: int, moe_cfg: MoCaEPlan | None = None,
                    ep: int = 1) -> dict[str, int]:
    """Parameters megatron + MoCaE allocate on one (TP, PP, EP) rank, by group."""
    arch.check_tp(tp)
    layers = stage_layers(arch, pp, pp_rank)
    chosen = moe_cfg.chosen(arch.num_layers) & set(layers) if moe_cfg else set()
    first, last = pp_rank == 0, pp_rank == pp - 1
    dense_ffn = len(layers) - (len(chosen) if moe_cfg and moe_cfg.kind == "full" else 0)
    out = {
        "embedding": vocab_params(arch, tp) if first else 0,
        "layers": len(layers) * (2 * arch.hidden_size + attention_params(arch, tp)) + dense_ffn * ffn_params(arch, tp),
        "final_norm": arch.hidden_size if last else 0,
        "output": vocab_params(arch, tp) if last and not (arch.tie_word_embeddings and first) else 0,
        "router": 0,
        "experts": 0,
    }
    if moe_cfg:
        out["router"] = len(chosen) * moe_cfg.router_params(arch.hidden_size)
        out["experts"] = len(chosen) * expert_params(arch, tp, moe_cfg, ep)
    return out


def expert_params(arch: ModelArch, tp: int, moe: MoCaEPlan, ep: int = 1) -> int:
    """All experts one rank holds in one chosen layer."""
    if moe.kind == "lora":
        return moe.num_experts * moe.lora_params(arch.hidden_size, arch.intermediate_size // tp)
    if moe.num_experts % ep:
        raise ValueError(f"parallel.ep: {ep} — must divide the number of experts ({moe.num_experts})")
    return moe.num_experts // ep * ffn_params(arch, tp)


def backbone_params(arch: ModelArch) -> int:
    """The HF model's parameter count (no TP padding)."""
    return sum(per_rank_params(arch, 1, 1, 0).values())


def trainable_params(arch: ModelArch, tp: int, pp: int, pp_rank: int, moe: MoCaEPlan, stage: int,
                     ep: int = 1) -> dict[str, int]:
    """Trainable parameters on one rank, split by ZeRO partition group (dense: DP, experts: DP/EP).

    Stage 1 trains its one expert (LoRA deltas, or one full FFN, per chosen layer) inside the
    ZeRO engine. Stage 2 trains the router, plus the experts with `train_experts_in_stage2`;
    full experts are placed by EP there (the "experts" group).
    """
    moe, ep = stage_moe(moe, stage, ep)
    chosen = len(moe.chosen(arch.num_layers) & set(stage_layers(arch, pp, pp_rank)))
    experts = chosen * expert_params(arch, tp, moe, ep)
    if stage == 1:
        return {"dense": experts, "experts": 0}
    router = chosen * moe.router_params(arch.hidden_size)
    trained = experts if moe.train_experts_in_stage2 else 0
    if moe.kind == "full":
        return {"dense": router, "experts": trained}
    return {"dense": router + trained, "experts": 0}


def zero_parts(arch: ModelArch, moe: MoCaEPlan, tp: int, pp: int, pp_rank: int, ep: int, dp: int,
               stage: int) -> list[tuple[int, int, int]]:
    """(trainable, all, partition group size) parameters of one rank: what the engine partitions
    over DP, and stage 2's EP-placed full experts, which live outside the engine (docs/DESIGN.md)
    and so are not partitioned at all: each rank keeps its own experts whole."""
    moe_s, ep_s = stage_moe(moe, stage, ep)
    groups = per_rank_params(arch, tp, pp, pp_rank, moe_s, ep_s)
    train = trainable_params(arch, tp, pp, pp_rank, moe, stage, ep)
    placed = groups["experts"] if moe.kind == "full" and stage == 2 else 0
    return [(train["dense"], sum(groups.values()) - placed, dp), (train["experts"], placed, 1)]


def largest_module(arch: ModelArch, tp: int, moe: MoCaEPlan | None, ep: int = 1) -> int:
    """Largest set of parameters one module owns directly (what ZeRO-3 gathers at once)."""
    q, kv = arch.padded_heads(tp) * arch.head_dim, arch.padded_kv_heads(tp) * arch.head_dim
    sizes = [vocab_params(arch, tp), (q + 2 * kv) // tp * arch.hidden_size, arch.hidden_size * q // tp,
             2 * arch.hidden_size * arch.intermediate_size // tp]
    if moe and moe.kind == "lora":
        sizes.append(expert_params(arch, tp, moe, ep))  # LoRAExperts registers every A/B itself
    return max(sizes)
