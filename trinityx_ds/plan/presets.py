"""Published architecture numbers of the models users plan for, as HF config.json dicts.

Only what `ModelArch.from_hf_dict` reads; the numbers are those of the models' config.json
on the Hugging Face Hub, so a plan for a preset equals a plan for the downloaded folder.
"""
from __future__ import annotations

import json
from pathlib import Path

from trinityx_ds.model.arch import ModelArch


def _llama(hidden, ffn, layers, heads, kv_heads, vocab=32000, theta=10000.0, max_pos=4096, eps=1e-5, tied=False):
    return dict(model_type="llama", hidden_act="silu", hidden_size=hidden, intermediate_size=ffn,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                vocab_size=vocab, rope_theta=theta, max_position_embeddings=max_pos, rms_norm_eps=eps,
                tie_word_embeddings=tied)


def _qwen3(hidden, ffn, layers, heads, kv_heads):
    return dict(model_type="qwen3", hidden_act="silu", hidden_size=hidden, intermediate_size=ffn,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=128,
                vocab_size=151936, rope_theta=1000000.0, max_position_embeddings=40960, rms_norm_eps=1e-6,
                tie_word_embeddings=False, use_sliding_window=False, attention_bias=False)


_LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192}

PRESETS: dict[str, dict] = {
    "llama-2-7b": _llama(4096, 11008, 32, 32, 32),
    "llama-2-13b": _llama(5120, 13824, 40, 40, 40),
    "llama-2-70b": _llama(8192, 28672, 80, 64, 8),
    "mistral-7b": {**_llama(4096, 14336, 32, 32, 8, max_pos=32768), "model_type": "mistral",
                   "sliding_window": 4096},
    "llama-3-8b": _llama(4096, 14336, 32, 32, 8, vocab=128256, theta=500000.0, max_pos=8192),
    "llama-3-70b": _llama(8192, 28672, 80, 64, 8, vocab=128256, theta=500000.0, max_pos=8192),
    "llama-3.1-8b": {**_llama(4096, 14336, 32, 32, 8, vocab=128256, theta=500000.0, max_pos=131072),
                     "rope_scaling": dict(_LLAMA31_ROPE)},
    "llama-3.1-70b": {**_llama(8192, 28672, 80, 64, 8, vocab=128256, theta=500000.0, max_pos=131072),
                      "rope_scaling": dict(_LLAMA31_ROPE)},
    # Gemma-7B: head_dim 256 (16 x 256 = 4096 != hidden 3072), GeGLU, tied 256k vocabulary
    "gemma-7b": dict(model_type="gemma", hidden_act="gelu_pytorch_tanh", hidden_size=3072, intermediate_size=24576,
                     num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=16, head_dim=256,
                     vocab_size=256000, rope_theta=10000.0, max_position_embeddings=8192, rms_norm_eps=1e-6,
                     tie_word_embeddings=True),
    "qwen3-8b": _qwen3(4096, 12288, 36, 32, 8),
    "qwen3-32b": _qwen3(5120, 25600, 64, 64, 8),
    "smollm2-135m": _llama(576, 1536, 30, 9, 3, vocab=49152, theta=100000.0, max_pos=8192, tied=True),
    # model/tiny.py's TINY (the demo's generated model), spelled out: that module imports torch
    "tiny-llama": _llama(64, 128, 2, 4, 2, vocab=1001, max_pos=256, eps=1e-6),
}


class UnknownModel(ValueError):
    """`--model` is neither a preset nor an HF config."""


def load_arch(model: str) -> tuple[str, ModelArch]:
    """(display name, architecture) of a preset name, an HF folder or its config.json."""
    if model in PRESETS:
        return model, ModelArch.from_hf_dict(PRESETS[model])
    path = Path(model)
    if path.is_dir():
        return path.name, ModelArch.from_hf_dir(path)
    if path.is_file():
        return path.parent.name or path.name, ModelArch.from_hf_dict(json.loads(path.read_text()))
    raise UnknownModel(f"--model {model!r}: not a preset nor an HF config.json or folder; "
                       f"presets: {', '.join(PRESETS)}")
