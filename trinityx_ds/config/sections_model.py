"""The sections that describe the model: `model` (the backbone), `experts` and `router`.

Each states its own invariants in `problems(at)` (see schema.py); a rule that spans sections
(e.g. preference objectives need pair data) is RunConfig's.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Literal

from trinityx_ds.config.rules import need, problem

MlpProj = Literal["gate_proj", "up_proj", "down_proj"]
Objective = Literal["sft", "dpo", "simpo", "cpo"]
PREFERENCE_OBJECTIVES = ("dpo", "simpo", "cpo")

Recompute = Literal["none", "full", "selective"]
RECOMPUTE = ("none", "full", "selective")


def recompute_mode(value: bool | str) -> str:
    """`model.activation_checkpointing` as one of RECOMPUTE: YAML written when it was a bool keeps
    its meaning (true = full, false = none), and so does code that still passes a bool."""
    if isinstance(value, bool):
        return "full" if value else "none"
    if value not in RECOMPUTE:
        raise ValueError(problem("model.activation_checkpointing", value, "one of " + ", ".join(RECOMPUTE)))
    return value


@dataclass
class ModelConfig:
    hf_path: str | None = None
    checkpoint: str | None = None
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    sequence_parallel: bool = False
    # what backward recomputes instead of keeping (megatron's recompute_granularity):
    #   none: keep every activation; full: keep each layer's input, recompute the whole layer
    #   (uniform, 1 layer); selective: recompute only the core attention (its [b, heads, s, s]
    #   scores and probabilities; megatron's "selective" with recompute_modules ["core_attn"]),
    #   eager attention only: sdpa and te run fused kernels that keep no scores, so selective would
    #   only repeat the attention forward; refused there (megatron warns the same for TE's fused one).
    # true / false (the old bool) are read as full / none and normalised to the string.
    activation_checkpointing: Recompute | bool = "none"
    tokenizer: str | None = None
    # core attention (model/attention.py): torch SDPA (no [b, heads, s, s] scores), megatron's eager
    # reference, or Transformer Engine's where it is installed
    attention: Literal["sdpa", "eager", "te"] = "sdpa"

    def __post_init__(self):
        if isinstance(self.activation_checkpointing, bool):
            self.activation_checkpointing = recompute_mode(self.activation_checkpointing)

    def problems(self, at: str) -> list[str]:
        out: list[str] = []
        need(out, recompute_mode(self.activation_checkpointing) != "selective" or self.attention == "eager",
             f"{at}.activation_checkpointing", "selective",
             f"recomputes only the attention scores, which {at}.attention: {self.attention} (a fused kernel) "
             f"never keeps, so it would save nothing; use none or full, or {at}.attention: eager")
        if self.attention == "te":  # find_spec, not transformer_engine itself: a config check starts no CUDA
            need(out, importlib.util.find_spec("transformer_engine") is not None, f"{at}.attention", self.attention,
                 "Transformer Engine is not installed here; use sdpa (the default) or eager")
        if self.hf_path is None and self.checkpoint is None:
            out.append(problem(f"{at}.hf_path", None, f"set exactly one of {at}.hf_path (HF folder) "
                                                     f"or {at}.checkpoint (folder from `trinityx import-hf`)"))
        elif self.hf_path is not None and self.checkpoint is not None:
            out.append(problem(f"{at}.checkpoint", self.checkpoint, f"set exactly one of {at}.hf_path "
                                                                    f"or {at}.checkpoint, not both"))
        return out


@dataclass
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[MlpProj] = field(default_factory=lambda: ["gate_proj", "up_proj", "down_proj"])

    def problems(self, at: str) -> list[str]:
        out: list[str] = []
        need(out, self.rank >= 1, f"{at}.rank", self.rank, "an int >= 1")
        need(out, self.alpha > 0, f"{at}.alpha", self.alpha, "a number > 0")
        need(out, 0 <= self.dropout < 1, f"{at}.dropout", self.dropout, "a number in [0, 1)")
        need(out, bool(self.targets) and len(set(self.targets)) == len(self.targets), f"{at}.targets",
             self.targets, "a non-empty list of unique names among gate_proj, up_proj, down_proj")
        return out


@dataclass
class ExpertsConfig:
    names: list[str] = field(default_factory=lambda: ["help", "harm", "honest"])
    kind: Literal["lora", "full"] = "lora"
    layers: Literal["all"] | list[int] = "all"
    lora: LoraConfig = field(default_factory=LoraConfig)
    # stage 1's loss: one name for every expert or one per expert (train/objectives.py)
    objective: Objective | dict[str, Objective] = "sft"

    def objective_of(self, name: str) -> str:
        return self.objective if isinstance(self.objective, str) else self.objective.get(name, "sft")

    def problems(self, at: str) -> list[str]:
        out: list[str] = []
        need(out, len(self.names) >= 2, f"{at}.names", self.names, "at least 2 expert names")
        dups = sorted({n for n in self.names if self.names.count(n) > 1})
        need(out, not dups, f"{at}.names", self.names, f"names must be unique (repeated: {', '.join(dups)})")
        for i, name in enumerate(self.names):
            need(out, name.isidentifier(), f"{at}.names[{i}]", name, "an identifier (letters, digits, _)")
        if self.layers != "all":
            need(out, bool(self.layers), f"{at}.layers", self.layers, '"all" or a non-empty list of layer indices')
            need(out, len(set(self.layers)) == len(self.layers), f"{at}.layers", self.layers,
                 "layer indices must be unique")
            for i, layer in enumerate(self.layers):
                need(out, layer >= 0, f"{at}.layers[{i}]", layer, "a layer index >= 0")
        if isinstance(self.objective, dict):
            missing = [n for n in self.names if n not in self.objective]
            need(out, not missing, f"{at}.objective", self.objective,
                 f"one objective per expert (sft, dpo, simpo or cpo); missing: {', '.join(missing)}")
            for name in self.objective:
                need(out, name in self.names, f"{at}.objective.{name}", name,
                     f"not an expert; experts.names is {', '.join(self.names)}")
        preference = [n for n in self.names if self.objective_of(n) in PREFERENCE_OBJECTIVES]
        need(out, not preference or self.kind == "lora", f"{at}.objective", self.objective,
             "dpo, simpo and cpo need experts.kind: lora (DPO's reference is the backbone with the LoRA delta "
             "off; a full expert replaces the FFN it would need)")
        return out + self.lora.problems(f"{at}.lora")


@dataclass
class RouterLossConfig:
    entropy: float = 0.1
    kl_prev: float = 0.01
    kl_uniform: float = 0.05
    task_ce: float = 0.01
    load_balance: float = 0.0
    z_loss: float = 0.0
    ema_decay: float = 0.9
    # the tokens task_ce averages an example's routing over: its response (the tokens the LM loss
    # scores), or all of it, prompt included: what each expert was trained with (stage 1 applies
    # an expert to every token) and what a router that picks one adapter per request reads
    # `both`: the mean of a response term and a prompt term, so a short answer is not outweighed by
    # its prompt and the chat template's tokens (which every task shares)
    task_tokens: Literal["response", "all", "both"] = "response"
    # what task_ce scores: each example's mean routing (H3Fusion's -log pbar_n[label]), or each of
    # its tokens' own (the mean of -log p_t[label]: what top-1 routing acts on, token by token)
    task_level: Literal["example", "token"] = "example"

    def problems(self, at: str) -> list[str]:
        out: list[str] = []
        for name in ("entropy", "kl_prev", "kl_uniform", "task_ce", "load_balance", "z_loss"):
            value = getattr(self, name)
            need(out, value >= 0, f"{at}.{name}", value, "a loss weight >= 0")
        need(out, 0 <= self.ema_decay < 1, f"{at}.ema_decay", self.ema_decay, "a number in [0, 1)")
        return out


@dataclass
class RouterConfig:
    temperature: float = 0.7
    temperature_mode: Literal["fixed", "learnable", "fitted"] = "fixed"
    importance: list[float] | None = None
    top_k: int | Literal["all"] = 1
    renormalize: bool = True
    normalize_output: bool = False
    losses: RouterLossConfig = field(default_factory=RouterLossConfig)

    def problems(self, at: str, num_experts: int | None) -> list[str]:
        """`num_experts` is None when experts.names is itself broken: skip the checks that count them."""
        out: list[str] = []
        need(out, self.temperature > 0, f"{at}.temperature", self.temperature, "a number > 0")
        if self.importance is not None:
            need(out, num_experts is None or len(self.importance) == num_experts, f"{at}.importance", self.importance,
                 f"one weight per expert ({num_experts}), or null for all 1.0")
            for i, gamma in enumerate(self.importance):
                need(out, gamma > 0, f"{at}.importance[{i}]", gamma, "a number > 0")
        need(out, self.top_k == "all" or 1 <= self.top_k and (num_experts is None or self.top_k <= num_experts),
             f"{at}.top_k", self.top_k, f'an int in 1..{num_experts or "N"} or "all"')
        return out + self.losses.problems(f"{at}.losses")

