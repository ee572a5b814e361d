"""Core attention by config (`model.attention`): the one module of a layer whose memory grows with
the square of the sequence.

- `sdpa` (default): `SDPAttention` below, torch's `scaled_dot_product_attention`. Causal by
  `is_causal` (no [s, s] mask tensor), GQA by `enable_gqa` (K/V are never repeated to the query
  heads), so no [b, heads, s, s] score tensor is kept for backward: torch picks a flash or
  memory-efficient kernel on GPU and its flash kernel on CPU, each with a softmax accumulated in
  fp32 whatever the input dtype (what `attention_softmax_in_fp32` asks of the eager module).
- `eager`: megatron's local-spec `DotProductAttention` (baddbmm, fp32 softmax, bmm), kept as the
  reference the tests hold `sdpa` to.
- `te`: Transformer Engine's `TEDotProductAttention` in the same local spec (so every weight keeps
  its name and the adapters need nothing), only where Transformer Engine imports; the config check
  refuses it elsewhere, before any process group.

Padded query groups (model/arch.py) need nothing here: their q, k and v rows are zero, so their
scores are 0, the softmax uniform over the causal prefix, and the output the mean of zero values.
"""
from __future__ import annotations

import importlib.util
import math
from typing import Optional

import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

KINDS = ("sdpa", "eager", "te")


class SDPAttention(MegatronModule):
    """megatron's core-attention interface (q [sq, b, np, hn], k/v [sk, b, ng, hn] -> [sq, b, np*hn])
    over `torch.nn.functional.scaled_dot_product_attention`.

    Causal self-attention only: the backbone passes no mask (right padding needs none: the labels
    mask it), and a mask handed in is refused rather than silently ignored.
    """

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, cp_comm_type: Optional[str] = None,
                 pg_collection=None):
        super().__init__(config=config)
        unsupported = {
            "context_parallel_size": config.context_parallel_size != 1,
            "softmax_type": config.softmax_type != "vanilla",
            "window_size": config.window_size is not None,
            "attn_mask_type": attn_mask_type != AttnMaskType.causal,
        }
        bad = [k for k, v in unsupported.items() if v]
        if bad:
            raise ValueError(f"model.attention: 'sdpa' — causal full attention only; this layer asks for "
                             f"{', '.join(bad)} (use model.attention: eager)")
        tp = pg_collection.tp.size() if pg_collection is not None else \
            parallel_state.get_tensor_model_parallel_world_size()
        self.layer_number = max(1, layer_number)
        self.heads_per_partition = config.num_attention_heads // tp
        self.groups_per_partition = config.num_query_groups // tp
        # apply_query_key_layer_scaling divides the scale by the layer number and the eager softmax
        # multiplies it back: the product is 1/sqrt(hn) either way
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if attention_mask is not None or attention_bias is not None or packed_seq_params is not None:
            raise ValueError("model.attention: 'sdpa' — causal attention without a mask, bias or packed "
                             "sequences (use model.attention: eager for those)")
        sq, b = query.shape[0], query.shape[1]
        # megatron's KV-cached decoding (eval/generate.py) asks for no mask once the prompt is cached:
        # one new position attends to every cached key, which is what causal means for it
        causal = attn_mask_type in (None, AttnMaskType.causal)
        if not causal and not (attn_mask_type == AttnMaskType.no_mask and sq == 1):
            raise ValueError(f"model.attention: 'sdpa' — causal attention, or one cached decoding position; "
                             f"asked for {attn_mask_type} over {sq} queries")
        # [s, b, n, hn] -> [b, n, s, hn]: views; the kernel reads the strides
        q_BNSD, k_BGSD, v_BGSD = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        out_BNSD = F.scaled_dot_product_attention(
            q_BNSD, k_BGSD, v_BGSD, is_causal=causal, scale=self.softmax_scale,
            dropout_p=self.dropout_p if self.training else 0.0,
            enable_gqa=self.heads_per_partition != self.groups_per_partition)
        return out_BNSD.permute(2, 0, 1, 3).reshape(sq, b, -1)


def te_available() -> bool:
    """Whether Transformer Engine can be imported (without importing it)."""
    return importlib.util.find_spec("transformer_engine") is not None


def layer_spec(arch, attention: str = "sdpa"):
    """megatron's local GPT layer spec with the core attention `attention` asks for."""
    if attention not in KINDS:
        raise ValueError(f"model.attention: {attention!r} — one of {', '.join(KINDS)}")
    spec = get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=arch.qk_norm)
    if attention == "sdpa":
        spec.submodules.self_attention.submodules.core_attention = SDPAttention
    elif attention == "te":
        if not te_available():
            raise ValueError("model.attention: 'te' — Transformer Engine is not installed (use sdpa)")
        from megatron.core.extensions.transformer_engine import TEDotProductAttention  # optional: TE

        spec.submodules.self_attention.submodules.core_attention = TEDotProductAttention
    return spec


def needs_mask(attention: str) -> bool:
    """Whether the core attention takes megatron's dense causal mask (eager) or builds causality
    itself (sdpa, te: a [1, 1, s, s] tensor never allocated)."""
    return attention == "eager"
