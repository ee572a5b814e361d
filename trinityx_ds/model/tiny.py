"""Small, seeded, randomly initialised Llama-family HF folders: the embedded default model for
the demo and the tests, made on the spot (nothing downloaded)."""
from __future__ import annotations

from pathlib import Path

import torch

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
    from transformers import AutoConfig, AutoModelForCausalLM

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
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    folder = Path(__file__).resolve().parents[1] / "fixtures" / "data"
    fixtures = [folder / name for name in TOKENIZER_TEXTS]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train([str(f) for f in fixtures if f.is_file()], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(out)
    return Path(out)
