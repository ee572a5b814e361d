"""Which Hugging Face model families the backbone reproduces exactly, and every setting of a
supported family that it does not: one rule, plain dict checks (no torch), shared by the run-config
check (`trinityx config validate`, `train`), `ModelArch.from_hf_dict` (import-hf, parity, eval,
export) and the pre-launch checks of `parity` and `eval`, so every entry point refuses the same
config with the same line, before any process group starts.

Each problem is one line, `config.json <field>: <value> — <what is supported>`.
"""
from __future__ import annotations

# HF model_type values the backbone reproduces exactly (model/arch.py maps each onto megatron)
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "gemma", "qwen3")

# families users try next, with what keeps them out (said in the refusal, so nobody has to guess)
_WHY_NOT = {
    "gemma2": "Gemma-2's attention/final logit soft-capping and alternating sliding windows are not reproduced",
    "gemma3": "Gemma-3's alternating local/global attention and per-layer RoPE are not reproduced",
    "gemma3_text": "Gemma-3's alternating local/global attention and per-layer RoPE are not reproduced",
    "qwen3_moe": "Qwen3-MoE's routed expert FFNs are not reproduced (dense qwen3 is)",
    "qwen2_moe": "Qwen2-MoE's routed expert FFNs are not reproduced (dense qwen2 is)",
    "mixtral": "Mixtral's routed expert FFNs are not reproduced (dense mistral is)",
}

# the gated activation of each family's MLP: SwiGLU, or Gemma's GeGLU with the tanh GELU
# ("gelu" is the legacy spelling of Gemma's releases; transformers reads it as gelu_pytorch_tanh)
ACTIVATIONS = {"llama": ("silu",), "mistral": ("silu",), "qwen2": ("silu",), "qwen3": ("silu",),
               "gemma": ("gelu_pytorch_tanh", "gelu")}


def _line(field: str, value, supported: str) -> str:
    return f"config.json {field}: {value!r} — {supported}"


def hidden_act(cfg: dict) -> str:
    """The activation transformers will run for this config (Gemma's legacy "gelu" is the tanh GELU)."""
    default = "gelu_pytorch_tanh" if cfg.get("model_type") == "gemma" else "silu"
    act = cfg.get("hidden_act") or default
    return "gelu_pytorch_tanh" if cfg.get("model_type") == "gemma" and act == "gelu" else act


def hf_config_problems(cfg: dict) -> list[str]:
    """Every setting of an HF config.json the backbone would not compute exactly; [] when it would.

    A sliding window is not a problem here, on every layer or on some (Qwen2/Qwen3's
    `max_window_layers`): attention is exact while sequences fit in the window, so the sequence
    length is checked against it where it is known (`sliding_window_problem`).
    """
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        why = f" ({_WHY_NOT[model_type]})" if model_type in _WHY_NOT else ""
        return [_line("model_type", model_type, f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}{why}")]
    out = []
    act = cfg.get("hidden_act") or ACTIVATIONS[model_type][0]
    if act not in ACTIVATIONS[model_type]:
        out.append(_line("hidden_act", act, f"{model_type} supports {' or '.join(ACTIVATIONS[model_type])} only"))
    if cfg.get("mlp_bias"):
        out.append(_line("mlp_bias", True, "MLPs without bias only"))
    if cfg.get("attention_bias") and model_type in ("gemma", "qwen3"):
        # both put a bias on o_proj too; megatron's add_qkv_bias covers q/k/v only
        out.append(_line("attention_bias", True, f"{model_type} without attention bias only"))
    for field in ("attn_logit_softcapping", "final_logit_softcapping"):
        if cfg.get(field) is not None:
            out.append(_line(field, cfg[field], "no logit soft-capping (Gemma-1 has none; Gemma-2 is not supported)"))
    if cfg.get("use_bidirectional_attention"):
        out.append(_line("use_bidirectional_attention", True, "causal attention only"))
    pre_attn = cfg.get("query_pre_attn_scalar")
    head_dim = cfg.get("head_dim") or (cfg.get("hidden_size", 0) // max(int(cfg.get("num_attention_heads") or 1), 1))
    if pre_attn is not None and pre_attn != head_dim:
        out.append(_line("query_pre_attn_scalar", pre_attn, f"must equal head_dim ({head_dim}): 1/sqrt(head_dim) scaling only"))
    for key in ("rope_scaling", "rope_parameters"):
        rope = cfg.get(key) or {}
        kind = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
        if kind not in ("default", "llama3", "linear"):
            out.append(_line(f"{key}.rope_type", kind, "supported: default, llama3, linear"))
    return out


def sliding_window(cfg: dict) -> int | None:
    """The attention window transformers applies to this config, or None (full attention)."""
    model_type = cfg.get("model_type")
    if not cfg.get("use_sliding_window", model_type == "mistral"):
        return None
    window = cfg.get("sliding_window")
    return int(window) if window else None


def sliding_window_problem(cfg: dict, seq_len: int, key: str = "data.max_seq_len") -> str | None:
    """Windowed attention is not reproduced: exact only while sequences fit in the window."""
    window = sliding_window(cfg)
    if window is not None and seq_len > window:
        return f"{key}: {seq_len!r} — must not exceed the model's sliding_window ({window}): windowed attention is not reproduced"
    return None
