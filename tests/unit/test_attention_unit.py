"""model/attention.py without a process group: which module each `model.attention` puts in the
spec, what `sdpa` refuses, and its output against the eager formula (GQA, causal, fp32)."""
import importlib.util
import math
from types import SimpleNamespace

import pytest
import torch

from trinityx_ds.model.arch import ModelArch
from trinityx_ds.model.attention import SDPAttention, layer_spec
from trinityx_ds.model.tiny import TINY

ARCH = ModelArch.from_hf_dict({"model_type": "llama", **TINY, "num_attention_heads": 6, "num_key_value_heads": 3,
                               "hidden_size": 48})
ONE_RANK = SimpleNamespace(tp=SimpleNamespace(size=lambda: 1))


def _core(attention):
    return layer_spec(ARCH, attention).submodules.self_attention.submodules.core_attention


def test_each_kind_puts_its_module_in_the_local_spec():
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    assert _core("sdpa") is SDPAttention and _core("eager") is DotProductAttention
    with pytest.raises(ValueError, match="model.attention: 'flash' — one of sdpa, eager, te"):
        layer_spec(ARCH, "flash")


@pytest.mark.skipif(importlib.util.find_spec("transformer_engine") is not None, reason="Transformer Engine installed")
def test_te_without_transformer_engine_is_refused():
    with pytest.raises(ValueError, match="Transformer Engine is not installed"):
        layer_spec(ARCH, "te")


def _module():
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.enums import AttnMaskType

    cfg = TransformerConfig(num_layers=1, hidden_size=48, num_attention_heads=6, num_query_groups=3, kv_channels=8,
                            attention_dropout=0.0, use_cpu_initialization=True)
    return SDPAttention(cfg, 1, AttnMaskType.causal, "self", pg_collection=ONE_RANK)


def test_sdpa_equals_the_eager_formula_with_gqa():
    g = torch.Generator().manual_seed(0)
    S, B, NP, NG, D = 7, 2, 6, 3, 8
    q, k, v = (torch.randn(S, B, n, D, generator=g, dtype=torch.float64) for n in (NP, NG, NG))
    got = _module()(q, k, v, None)
    kr, vr = (t.repeat_interleave(NP // NG, dim=2) for t in (k, v))
    scores = torch.einsum("sbnd,tbnd->bnst", q, kr) / math.sqrt(D)
    scores = scores.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), float("-inf"))
    want = torch.einsum("bnst,tbnd->sbnd", scores.softmax(-1), vr).reshape(S, B, NP * D)
    assert got.shape == (S, B, NP * D)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_sdpa_refuses_a_mask_rather_than_ignoring_it():
    q = torch.randn(4, 1, 6, 8)
    k = torch.randn(4, 1, 3, 8)
    with pytest.raises(ValueError, match="without a mask"):
        _module()(q, k, k, torch.ones(1, 1, 4, 4, dtype=torch.bool))


@pytest.mark.parametrize("mode,fields", [
    ("none", dict(recompute_granularity=None)),
    (False, dict(recompute_granularity=None)),
    ("full", dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)),
    (True, dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)),
    ("selective", dict(recompute_granularity="selective", recompute_modules=["core_attn"], recompute_num_layers=None)),
])
def test_activation_checkpointing_modes_as_megatron_reads_them(mode, fields):
    """What megatron's Attention reads: selective = `checkpoint_core_attention` (core_attn only)."""
    from trinityx_ds.model.backbone import transformer_config

    tc = transformer_config(ARCH, activation_checkpointing=mode)
    assert {k: getattr(tc, k) for k in fields} == fields


def test_selective_with_a_fused_kernel_is_refused():
    from trinityx_ds.model.backbone import build_backbone

    with pytest.raises(ValueError, match="'selective' — recomputes only the attention scores, which "
                                         "model.attention: sdpa never keeps"):
        build_backbone(ARCH, activation_checkpointing="selective", attention="sdpa", meta=True)
