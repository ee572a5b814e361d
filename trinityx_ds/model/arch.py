"""Architecture numbers of a Llama-family model (Llama, Mistral, Qwen2, Qwen3, Gemma), read from a
Hugging Face config.

One neutral description shared by the backbone builder, the HF adapters and the planner,
so none of them parses HF configs on its own.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from trinityx_ds.config.families import hf_config_problems, hidden_act, sliding_window, sliding_window_problem


class ArchError(ValueError):
    """An HF config this project cannot reproduce exactly."""


@dataclass(frozen=True)
class ModelArch:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    qkv_bias: bool = False
    max_position_embeddings: int = 4096
    rope_scaling: dict | None = None
    sliding_window: int | None = None
    # the family's differences from Llama, each reproduced exactly (model/backbone.py, llama_adapter.py):
    hidden_act: str = "silu"  # gated MLP activation: silu (SwiGLU) or gelu_pytorch_tanh (Gemma's GeGLU)
    qk_norm: bool = False  # Qwen3: RMSNorm over each head's q and k before RoPE (megatron's qk_layernorm)
    norm_plus_one: bool = False  # Gemma: RMSNorms multiply by (1 + w); megatron's weight holds 1 + w
    embedding_scale: bool = False  # Gemma: embeddings times sqrt(hidden), rounded to the model's dtype
    hf_config: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_hf_dict(cls, cfg: dict) -> "ModelArch":
        problems = hf_config_problems(cfg)  # the one rule (config/families.py), also read before launch
        if problems:
            raise ArchError(problems[0])
        model_type = cfg["model_type"]
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        rope_params = cfg.get("rope_parameters") or {}
        rope_scaling = cfg.get("rope_scaling") or None
        if rope_params.get("rope_type", "default") != "default":
            rope_scaling = dict(rope_params)
        if rope_scaling is not None:
            kind = rope_scaling.get("rope_type", rope_scaling.get("type"))
            if kind == "default":
                rope_scaling = None
        theta = cfg.get("rope_theta", rope_params.get("rope_theta", 10000.0))
        gemma = model_type == "gemma"
        return cls(
            model_type=model_type,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", gemma)),
            qkv_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            rope_scaling=rope_scaling,
            sliding_window=sliding_window(cfg),
            hidden_act=hidden_act(cfg),
            qk_norm=model_type == "qwen3",
            norm_plus_one=gemma,
            embedding_scale=gemma,
            hf_config=dict(cfg),
        )

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> "ModelArch":
        cfg_file = Path(path) / "config.json"
        if not cfg_file.is_file():
            raise ArchError(f"{cfg_file}: no such file (an HF model folder needs config.json)")
        return cls.from_hf_dict(json.loads(cfg_file.read_text()))

    def check_seq_len(self, seq_len: int) -> None:
        # Windowed attention is not reproduced; it is exact only while sequences fit in the window.
        problem = sliding_window_problem({"model_type": self.model_type, "use_sliding_window": True,
                                          "sliding_window": self.sliding_window}, seq_len)
        if problem:
            raise ArchError(problem)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelArch":
        return cls(**d)

    def check_tp(self, tp: int) -> None:
        if self.intermediate_size % tp:
            raise ArchError(f"parallel.tp: {tp} — must divide model intermediate_size ({self.intermediate_size})")

    def padded_kv_heads(self, tp: int) -> int:
        """KV groups rounded up to a multiple of TP.

        megatron needs whole query groups per TP rank; SmolLM2 (9 heads, 3 groups) at TP=2 has
        none. Extra groups get zero q/k/v rows and zero o_proj columns: their attention output
        is 0 and so are all their gradients, so the padded model computes exactly the original.
        """
        return -(-self.num_kv_heads // tp) * tp

    def padded_heads(self, tp: int) -> int:
        return self.padded_kv_heads(tp) * (self.num_heads // self.num_kv_heads)


def padded_vocab_size(vocab_size: int, tp: int, multiple: int = 1) -> int:
    """Vocab rounded up so each TP rank holds an equal slice (megatron's requirement)."""
    step = tp * multiple
    return -(-vocab_size // step) * step
