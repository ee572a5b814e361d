"""What a MoCaE block is made of, without building one (no megatron, no process group): its
config `MoCaEConfig`, the one table that maps it to the run config and to the exported HF
config, and the roles of its tensors by name.

Tensor roles: every MoCaE tensor, megatron- or HF-named, sits under `.mlp.<role>.` of its layer:
  router        the calibrated router (weight, bias, log_temperature, log_importance)
  experts       LoRA deltas or full FFNs (megatron: stacked over experts; HF: one per expert,
                `.mlp.experts.<name>.`)
  post_norm     the optional post-mix RMSNorm
  routing_ema   the EMA of earlier routing (training state: checkpoints, never exports)
Everything that asks "is this tensor an expert / the router?" asks `mocae_role`.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

from trinityx_ds.config.schema import RouterLossConfig

ROUTER, EXPERTS, POST_NORM, ROUTING_EMA = "router", "experts", "post_norm", "routing_ema"
ROLES = (ROUTER, EXPERTS, POST_NORM, ROUTING_EMA)


def mocae_role(name: str) -> str | None:
    """The MoCaE part tensor `name` (megatron or HF) belongs to; None for a backbone tensor."""
    for role in ROLES:
        if f".mlp.{role}." in name:
            return role
    return None


def expert_of(hf_name: str) -> str | None:
    """The expert an HF-named expert tensor belongs to (model.layers.i.mlp.experts.<name>.…)."""
    if mocae_role(hf_name) != EXPERTS:
        return None
    return hf_name.split(f".mlp.{EXPERTS}.", 1)[1].split(".", 1)[0]


def expert_tensors(names, expert: str) -> list[str]:
    """The HF names among `names` that belong to `expert`."""
    return [n for n in names if expert_of(n) == expert]


PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def expert_shapes(arch, cfg: "MoCaEConfig", name: str) -> dict[str, tuple[int, ...]]:
    """HF name -> shape of every tensor of expert `name` under `cfg`: what its stage-1 file must
    hold (LoRA A/B per target, or whole gate/up/down projections)."""
    out = {}
    for layer in cfg.layer_ids(arch.num_layers):
        pre = f"model.layers.{layer}.mlp.{EXPERTS}.{name}."
        for target in PROJECTIONS:
            fan_in, fan_out = (arch.intermediate_size, arch.hidden_size) if target == "down_proj" \
                else (arch.hidden_size, arch.intermediate_size)
            if cfg.kind == "full":
                out[f"{pre}{target}.weight"] = (fan_out, fan_in)
            elif target in cfg.lora_targets:
                out[f"{pre}{target}.lora_A.weight"] = (cfg.lora_rank, fan_in)
                out[f"{pre}{target}.lora_B.weight"] = (fan_out, cfg.lora_rank)
    return out


# MoCaEConfig field -> its key in the run config (RunConfig), the one place the two are paired
RUN_KEYS = {
    "expert_names": "experts.names", "kind": "experts.kind", "layers": "experts.layers",
    "lora_rank": "experts.lora.rank", "lora_alpha": "experts.lora.alpha", "lora_dropout": "experts.lora.dropout",
    "lora_targets": "experts.lora.targets", "temperature": "router.temperature",
    "temperature_mode": "router.temperature_mode", "importance": "router.importance", "top_k": "router.top_k",
    "renormalize": "router.renormalize", "normalize_output": "router.normalize_output",
    "loss_weights": "router.losses",
}
# the fields an exported TrinityX HF config carries (`mocae` in config.json): what inference needs
HF_FIELDS = ("expert_names", "kind", "layers", "lora_rank", "lora_alpha", "lora_targets", "temperature",
             "importance", "top_k", "renormalize", "normalize_output")


@dataclass
class MoCaEConfig:
    expert_names: list[str] = field(default_factory=lambda: ["help", "harm", "honest"])
    kind: str = "lora"  # lora | full
    layers: str | list[int] = "all"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
    temperature: float = 0.7
    temperature_mode: str = "fixed"
    importance: list[float] | None = None
    top_k: int | str = 1
    renormalize: bool = True
    normalize_output: bool = False
    loss_weights: RouterLossConfig = field(default_factory=RouterLossConfig)

    def __post_init__(self):
        assert set(RUN_KEYS) == {f.name for f in fields(self)}, "RUN_KEYS must name every MoCaEConfig field"
        self.lora_targets = tuple(self.lora_targets)

    @property
    def num_experts(self) -> int:
        return len(self.expert_names)

    def layer_ids(self, num_layers: int) -> list[int]:
        return list(range(num_layers)) if self.layers == "all" else sorted(self.layers)

    def one_expert(self, name: str) -> "MoCaEConfig":
        """The block of one expert alone (stage 1 trains it; eval scores it): every token goes to
        it, so the routing settings that weigh experts against each other do not apply."""
        return replace(self, expert_names=[name], top_k=1, importance=None)

    @classmethod
    def from_run_config(cls, cfg) -> "MoCaEConfig":
        def get(key):
            value = cfg
            for part in key.split("."):
                value = getattr(value, part)
            return list(value) if isinstance(value, list) else value

        return cls(**{f: get(key) for f, key in RUN_KEYS.items()})

    def to_run_sections(self, only=HF_FIELDS) -> dict:
        """The run-config sections (`experts`, `router`) that give back these fields."""
        out: dict = {}
        for f in only:
            *path, leaf = RUN_KEYS[f].split(".")
            node = out
            for part in path:
                node = node.setdefault(part, {})
            value = getattr(self, f)
            node[leaf] = list(value) if isinstance(value, (list, tuple)) else value
        return out

    def hf_dict(self) -> dict:
        """The `mocae` entry of an exported TrinityX config.json (top_k as a number)."""
        out = {f: getattr(self, f) for f in HF_FIELDS}
        out["expert_names"], out["lora_targets"] = list(self.expert_names), list(self.lora_targets)
        out["top_k"] = self.num_experts if self.top_k == "all" else int(self.top_k)
        return out

    @classmethod
    def from_hf_dict(cls, mocae: dict) -> "MoCaEConfig":
        return cls(**{f: mocae[f] for f in HF_FIELDS if f in mocae})
