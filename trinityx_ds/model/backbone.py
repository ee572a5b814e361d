"""The backbone: a megatron-core GPTModel (local layer spec, its core attention chosen by
`model.attention`: model/attention.py) built from Llama-family architecture numbers (Llama,
Mistral, Qwen2, Qwen3, Gemma), with the padded vocabulary masked out of logits and losses.

What each family needs beyond Llama, all from megatron's own config and spec: Qwen2's qkv bias
(`add_qkv_bias`), Qwen3's per-head q/k RMSNorm (`qk_layernorm`), an explicit head_dim
(`kv_channels`), Gemma's GeGLU (`activation_func` + `gated_linear_unit`). Gemma's (1 + w) RMSNorm
weights are folded into the weights by the adapter (model/llama_adapter.py); its sqrt(hidden)
embedding scale is the one thing megatron has no setting for: a forward hook on the embedding.
"""
from __future__ import annotations

import contextlib
import functools
import weakref

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer import TransformerConfig

from trinityx_ds.config.schema import recompute_mode
from trinityx_ds.model.arch import ModelArch, padded_vocab_size
from trinityx_ds.model.attention import layer_spec, needs_mask
from trinityx_ds.model.weights import DTYPES
from trinityx_ds.parallel.megatron_compat import rope_apply_scaling


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """transformers' `gelu_pytorch_tanh` (Gemma's GeGLU), by name so configs stay picklable."""
    return F.gelu(x, approximate="tanh")


ACTIVATIONS = {"silu": F.silu, "gelu_pytorch_tanh": gelu_tanh}


def activation(arch: ModelArch):
    """The gated MLP's activation: what megatron's MLP, the LoRA experts and full experts all run."""
    return ACTIVATIONS[arch.hidden_act]


def recompute_settings(activation_checkpointing: bool | str) -> dict:
    """megatron's recompute fields for `model.activation_checkpointing` (a bool still means full/none).

    full: every layer's input kept, the layer recomputed in backward (uniform, 1 layer per unit).
    selective: megatron's `recompute_granularity="selective"` with `recompute_modules=["core_attn"]`:
    `Attention` wraps only its core attention in `tensor_parallel.checkpoint`, so Q, K, V are kept
    and the [b, heads, s, s] scores and probabilities are recomputed (only while training).
    """
    mode = recompute_mode(activation_checkpointing)
    if mode == "full":
        return {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
    if mode == "selective":
        return {"recompute_granularity": "selective", "recompute_modules": ["core_attn"]}
    return {}


def transformer_config(arch: ModelArch, *, tp: int = 1, pp: int = 1, dtype: str = "fp32",
                       sequence_parallel: bool = False, activation_checkpointing: bool | str = "none",
                       init_weights: bool = True, cpu_init: bool = False) -> TransformerConfig:
    """A TransformerConfig that computes exactly what transformers' Llama/Mistral/Qwen2/Qwen3/Gemma compute.

    activation_checkpointing: none | full | selective (`recompute_settings`).
    cpu_init: megatron's CPU-initialisation path even with a GPU; it allocates on the default
    device, so it is the path that honours `torch.device("meta")`.
    """
    torch_dtype = DTYPES[dtype]
    recompute = recompute_settings(activation_checkpointing)
    return TransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        num_attention_heads=arch.padded_heads(tp),
        num_query_groups=arch.padded_kv_heads(tp),
        kv_channels=arch.head_dim,
        ffn_hidden_size=arch.intermediate_size,
        gated_linear_unit=True,
        activation_func=activation(arch),
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        qk_layernorm=arch.qk_norm,
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_norm_eps,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        sequence_parallel=sequence_parallel and tp > 1,
        params_dtype=torch_dtype,
        pipeline_dtype=torch_dtype,
        bf16=dtype == "bf16",
        fp16=dtype == "fp16",
        use_cpu_initialization=cpu_init or not torch.cuda.is_available(),
        perform_initialization=init_weights,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        attention_softmax_in_fp32=True,
        apply_query_key_layer_scaling=False,
        **recompute,
    )


def causal_mask(seq_len: int, device) -> torch.Tensor:
    """megatron's boolean mask (True = masked), [1, 1, S, S]. Passed explicitly: megatron's default
    builder allocates on CUDA. Right-padded batches need nothing more (labels mask the padding)."""
    return torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).triu(1)[None, None]


def _scale_embeddings(module, inputs, embeddings_SBH: torch.Tensor) -> torch.Tensor:
    """Gemma's input scale, as transformers applies it: sqrt(hidden) rounded to fp32, then to the
    embeddings' dtype (bf16: 55.5 for Gemma-7B, not 55.43), times the looked-up rows.

    A hook on megatron's embedding module (whose output is [S, B, H], already scattered for
    sequence parallelism: the scale is elementwise, so either way is exact); the output layer
    reads the unscaled weight, as Gemma's tied lm_head does.
    """
    hidden = embeddings_SBH.shape[-1]
    scale = torch.tensor(hidden ** 0.5, dtype=torch.float32).to(embeddings_SBH.dtype)
    return embeddings_SBH * scale.to(embeddings_SBH.device)


class Backbone(GPTModel):
    """GPTModel plus what a Llama user expects: true-vocab logits and response-token losses.

    The vocabulary is padded to a multiple of TP; padded columns are set to -inf before any
    softmax so logits, losses and gradients equal the unpadded HF model's.
    """

    def __init__(self, arch: ModelArch, config: TransformerConfig, *, pre_process: bool = True,
                 post_process: bool = True, attention: str = "sdpa"):
        rope = arch.rope_scaling or {}
        kind = rope.get("rope_type", rope.get("type"))
        super().__init__(
            config=config,
            transformer_layer_spec=layer_spec(arch, attention),
            vocab_size=padded_vocab_size(arch.vocab_size, config.tensor_model_parallel_size),
            max_sequence_length=arch.max_position_embeddings,
            pre_process=pre_process,
            post_process=post_process,
            share_embeddings_and_output_weights=arch.tie_word_embeddings,
            position_embedding_type="rope",
            rotary_base=int(arch.rope_theta) if float(arch.rope_theta).is_integer() else arch.rope_theta,
            seq_len_interpolation_factor=float(rope["factor"]) if kind == "linear" else None,
            parallel_output=True,
        )
        self.arch, self.attention = arch, attention
        if arch.embedding_scale and pre_process:
            self.embedding.register_forward_hook(_scale_embeddings)
        # token_losses: which [S*B] rows reach the output layer, and the labels they are scored on
        self._loss_rows: tuple[torch.Tensor | None, torch.Tensor] | None = None
        if post_process:
            # by weak reference: the output layer's hook must not keep its model alive
            self.output_layer.register_forward_pre_hook(functools.partial(_keep_loss_rows, weakref.ref(self)),
                                                        with_kwargs=True)
        if kind == "llama3":
            rope_apply_scaling(self.rotary_pos_emb, factor=rope["factor"], low_freq_factor=rope["low_freq_factor"],
                               high_freq_factor=rope["high_freq_factor"],
                               original_max_position_embeddings=rope["original_max_position_embeddings"])

    def _mask_padded_vocab(self, logits_SBV: torch.Tensor) -> torch.Tensor:
        local_v = logits_SBV.shape[-1]
        start = parallel_state.get_tensor_model_parallel_rank() * local_v
        n_real = self.arch.vocab_size - start
        if n_real >= local_v:
            return logits_SBV
        return logits_SBV.float().index_fill(-1, torch.arange(max(n_real, 0), local_v, device=logits_SBV.device),
                                             float("-inf"))

    def forward(self, input_ids_BS: torch.Tensor, labels_BS: torch.Tensor | None = None) -> torch.Tensor:
        """Per-token losses [B, S] given shifted labels, else full-vocab logits [B, S, vocab].

        What a DeepSpeed engine calls; megatron's own forward stays reachable as GPTModel.forward.
        """
        return self.logits(input_ids_BS) if labels_BS is None else self.token_losses(input_ids_BS, labels_BS)

    def local_logits(self, input_ids_BS: torch.Tensor) -> torch.Tensor:
        """This TP rank's vocab slice of the logits, [S, B, V/tp], padded columns at -inf."""
        # GPTModel returns [B, S, V/tp] when labels is None; keep megatron's [S, B, V] for losses.
        mask = causal_mask(input_ids_BS.shape[1], input_ids_BS.device) if needs_mask(self.attention) else None
        logits_BSV = GPTModel.forward(self, input_ids_BS, position_ids=None, attention_mask=mask)
        return self._mask_padded_vocab(logits_BSV.transpose(0, 1))

    def logits(self, input_ids_BS: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits [B, S, vocab], gathered across TP (for evaluation and tests)."""
        local_SBV = self.local_logits(input_ids_BS)
        full_SBV = tensor_parallel.gather_from_tensor_model_parallel_region(local_SBV)
        return full_SBV[..., : self.arch.vocab_size].transpose(0, 1)

    def token_losses(self, input_ids_BS: torch.Tensor, labels_BS: torch.Tensor) -> torch.Tensor:
        """Per-token cross-entropy [B, S] (labels already shifted; -100 = ignored, loss 0).

        Only the positions with a label reach the output layer (a prompt's positions, padding and
        each row's last position are never scored), and the logits stay in megatron's [S, B, V]
        order: megatron's own loss path (`GPTModel.forward` with labels, which calls
        `compute_language_model_loss` below) instead of the [B, S, V] logits `local_logits` copies
        out twice. On SmolLM2-135M the output layer is a sixth of a step's matmuls, so a batch whose
        prompts are half its tokens saves about a twelfth of the step (docs/DESIGN.md, "Step
        speed"). Under sequence parallelism the output layer gathers the sequence itself: every
        position goes through it there.
        """
        labels_SB = labels_BS.transpose(0, 1)
        keep_N = None
        if not getattr(self.output_layer, "sequence_parallel", False):
            valid_T = (labels_SB >= 0).reshape(-1)
            keep_N = valid_T.nonzero().squeeze(1)
            if keep_N.numel() == valid_T.numel():
                keep_N = None  # every position is scored: nothing to select
        mask = causal_mask(input_ids_BS.shape[1], input_ids_BS.device) if needs_mask(self.attention) else None
        self._loss_rows = (keep_N, labels_SB)
        try:
            # megatron only hands `labels` to compute_language_model_loss, which reads _loss_rows instead
            return GPTModel.forward(self, input_ids_BS, position_ids=None, attention_mask=mask, labels=labels_BS)
        finally:
            self._loss_rows = None

    def compute_language_model_loss(self, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """megatron's loss hook: [B, S] losses from the output layer's [S, B, V/tp] logits, or from its
        [N, 1, V/tp] logits of the kept rows (`_keep_loss_rows`), scattered back to [B, S]."""
        if self._loss_rows is None:
            raise RuntimeError("Backbone: losses are computed by token_losses(ids, labels)")
        keep_N, labels_SB = self._loss_rows
        local = self._mask_padded_vocab(logits).float().contiguous()
        if keep_N is None:
            return vocab_parallel_token_losses(local, labels_SB.contiguous()).transpose(0, 1)
        S, B = labels_SB.shape
        loss_N1 = vocab_parallel_token_losses(local, labels_SB.reshape(-1)[keep_N].unsqueeze(1))
        loss_T = loss_N1.new_zeros(S * B).index_put((keep_N,), loss_N1.squeeze(1))
        return loss_T.view(S, B).transpose(0, 1)


def _keep_loss_rows(backbone: weakref.ref, output_layer, args: tuple, kwargs: dict):
    """Forward pre-hook of the output layer: under `Backbone.token_losses` with rows to keep, its
    input [S, B, H] becomes the kept rows [N, 1, H] (the rows megatron's [S, B] order numbers)."""
    model = backbone()
    rows = model._loss_rows if model is not None else None
    if rows is None or rows[0] is None:
        return None
    hidden_SBH = args[0]
    kept_N1H = hidden_SBH.reshape(-1, hidden_SBH.shape[-1]).index_select(0, rows[0]).unsqueeze(1)
    return (kept_N1H, *args[1:]), kwargs


def vocab_parallel_token_losses(local_SBV: torch.Tensor, labels_SB: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy [S, B] from this TP rank's fp32 vocab slice of the logits (labels
    shifted; < 0 ignored, loss 0). megatron's kernel shifts `local_SBV` in place: read it before."""
    loss_SB = tensor_parallel.vocab_parallel_cross_entropy(local_SBV, labels_SB.clamp(min=0))
    return loss_SB.masked_fill(labels_SB < 0, 0.0)


def build_backbone(arch: ModelArch, *, tp: int = 1, pp: int = 1, dtype: str = "fp32",
                   sequence_parallel: bool = False, activation_checkpointing: bool | str = "none",
                   init_weights: bool = True, meta: bool = False, attention: str = "sdpa") -> Backbone:
    """Builds this rank's part of the backbone; megatron's parallel state must be initialised.

    attention: the core attention (`model.attention`: sdpa, eager or te; model/attention.py).
    activation_checkpointing: none | full | selective; selective only with eager attention (the
    fused kernels keep no scores for it to drop: the run config refuses it, and so does this).

    meta: shapes only, nothing allocated (a 70B layout checked on a laptop, plan/verify.py).
    """
    if recompute_mode(activation_checkpointing) == "selective" and attention != "eager":
        raise ValueError(f"model.activation_checkpointing: 'selective' — recomputes only the attention scores, "
                         f"which model.attention: {attention} never keeps; use none or full, or eager attention")
    config = transformer_config(arch, tp=tp, pp=pp, dtype=dtype, sequence_parallel=sequence_parallel,
                                activation_checkpointing=activation_checkpointing,
                                init_weights=init_weights and not meta, cpu_init=meta)
    with torch.device("meta") if meta else contextlib.nullcontext():
        return Backbone(arch, config,
                        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=True),
                        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=True),
                        attention=attention)


def masked_mean_loss(token_loss_BS: torch.Tensor, labels_BS: torch.Tensor) -> torch.Tensor:
    """Mean over response tokens (labels >= 0), the SFT loss the experts are trained with."""
    n_tokens = (labels_BS >= 0).sum().clamp(min=1)
    return token_loss_BS.sum() / n_tokens
