"""Small, seeded, randomly initialised Llama-family HF folders: the embedded default model for
the demo and the tests, made on the spot (nothing downloaded); and seeded MoCaE weights over such a
backbone (`mocae_source`) for the parity tests and the GPU check."""
from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from trinityx_ds.model.arch import ModelArch
from trinityx_ds.storage.resources import fixtures_dir
from trinityx_ds.storage.sources import DictSource, SafetensorsSource

TINY = dict(vocab_size=1001, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            tie_word_embeddings=False, rms_norm_eps=1e-6)
# make_tiny_model(out, **TINY_GEMMA): the tests' odd-sized members of the other families. Both have
# 3 KV groups (TP=2 pads one), a head_dim that is not hidden / heads, and a vocab that is no
# multiple of 2; Gemma ties its embeddings (as Gemma does), Qwen3 does not.
TINY_GEMMA = dict(model_type="gemma", hidden_size=48, num_attention_heads=6, num_key_value_heads=3, head_dim=16,
                  intermediate_size=96, tie_word_embeddings=True, hidden_act="gelu_pytorch_tanh")
TINY_QWEN3 = dict(model_type="qwen3", hidden_size=64, num_attention_heads=6, num_key_value_heads=3, head_dim=24,
                  vocab_size=1003, use_sliding_window=False)


def make_tiny_model(out: str | Path, model_type: str = "llama", seed: int = 0, tokenizer: bool = True,
                    **overrides) -> Path:
    """Writes config.json + model.safetensors of a tiny random model (GQA, odd vocab by default)
    and, unless asked not to, a tokenizer that fits its vocabulary."""
    out = Path(out)
    cfg = AutoConfig.for_model(model_type, **{**TINY, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # HF zero-initialises some biases; random ones exercise the mapping
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(out)
    if tokenizer:
        make_tiny_tokenizer(out, vocab_size=min(1000, cfg.vocab_size))
    return out


# What the tiny tokenizer is trained on: a fixed list, so a new fixture does not change the
# tokenizer (and every tiny test's token ids) under the tests that already exist.
TOKENIZER_TEXTS = ("README.md", "alpaca_3_malformed.jsonl", "alpaca_tiny.json", "alpaca_tiny.jsonl",
                   "beavertails_tiny.csv", "chat_tiny.jsonl", "hh_rlhf_tiny.jsonl", "self_instruct_tiny.jsonl",
                   "truthfulqa_tiny.csv", "truthfulqa_tiny.jsonl")


def make_tiny_tokenizer(out: str | Path, vocab_size: int = 1000) -> Path:
    """A byte-level BPE trained on the project's fixture texts (deterministic, offline), with
    bos/eos/pad tokens and no chat template (the data room's default template applies)."""
    fixtures = [fixtures_dir() / name for name in TOKENIZER_TEXTS]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train([str(f) for f in fixtures if f.is_file()], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(out)
    return Path(out)


def mocae_source(folder, cfg, seed: int = 0, zero_delta: bool = False, router_std: float = 0.5) -> DictSource:
    """HF-space weights of a MoCaE model: the backbone's tensors in `folder` plus seeded router and
    expert tensors for MoCaEConfig `cfg`, so models of any TP/EP layout load exactly the same
    function (the parity tests' and the GPU check's). `zero_delta`: experts equal to the backbone
    FFN (full) or with LoRA B = 0."""
    arch = ModelArch.from_hf_dir(folder)
    base = SafetensorsSource(folder)
    tensors = {k: base.read(k) for k in base.keys()}
    g = torch.Generator().manual_seed(seed)
    H, F, E = arch.hidden_size, arch.intermediate_size, cfg.num_experts
    rnd = lambda *shape, std=0.02: torch.randn(*shape, generator=g) * std  # noqa: E731
    for i in cfg.layer_ids(arch.num_layers):
        pre = f"model.layers.{i}.mlp."
        tensors[pre + "router.weight"] = rnd(E, H, std=router_std)
        tensors[pre + "router.log_temperature"] = torch.tensor([float(torch.tensor(cfg.temperature).log())])
        gamma = cfg.importance or [1.0] * E
        tensors[pre + "router.log_importance"] = torch.tensor(gamma).log()
        if cfg.normalize_output:
            tensors[pre + "post_norm.weight"] = 1 + rnd(H, std=0.1)
        for n in cfg.expert_names:
            ex = f"{pre}experts.{n}."
            for t in ("gate_proj", "up_proj", "down_proj"):
                fan_out, fan_in = (H, F) if t == "down_proj" else (F, H)
                if cfg.kind == "full":
                    tensors[ex + f"{t}.weight"] = tensors[pre + f"{t}.weight"] + (0 if zero_delta else rnd(fan_out, fan_in))
                elif t in cfg.lora_targets:
                    tensors[ex + f"{t}.lora_A.weight"] = rnd(cfg.lora_rank, fan_in, std=0.3)
                    tensors[ex + f"{t}.lora_B.weight"] = torch.zeros(fan_out, cfg.lora_rank) if zero_delta \
                        else rnd(fan_out, cfg.lora_rank, std=0.3)
    return DictSource(tensors)
