"""TrinityX for transformers: a Llama, Mistral, Qwen2, Qwen3 or Gemma decoder (transformers' own
model class for `base_model_type`: Gemma's (1 + w) norms and scaled embeddings, Qwen3's q/k norms
come with it) whose chosen layers' MLP is a
mixture of HHH experts under a calibrated router (MoCaE), computing what the training model's
`MoCaEBlock` computes:

    y = [post-mix RMSNorm] ( sum_{i in top-k(p)} w_i E_i(h) ),  p = softmax(z(h)/T + log gamma)

The router runs in fp32 (ties in p go to the lowest expert index, as the training model's stable
sort does). LoRA experts share the base FFN:
    y = (sum_i w_i a_i) W_down^T + sum_i w_i s (a_i A_down,i^T) B_down,i^T,
    a_i = act(x W_gate^T + s (x A_gate,i^T) B_gate,i^T) * (x W_up^T + s (x A_up,i^T) B_up,i^T),
act the base model's `hidden_act` (silu: SwiGLU; gelu_pytorch_tanh: Gemma's GeGLU), for LoRA and
full experts alike. Parameter names are the HF-side names of trinityx_ds.model.mocae_adapter.

Standalone (torch and transformers only): exported folders carry this file, so
`trust_remote_code=True` works where trinityx_ds is not installed.
"""
import importlib
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_trinityx import TrinityXConfig

_BASE = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3", "gemma": "Gemma"}


def _base_module(model_type: str):
    # imported on use: keeps this module importable while transformers itself is still loading
    return importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")


def _base_model_class(model_type: str):
    return getattr(_base_module(model_type), _BASE[model_type] + "Model")



class TrinityXRouter(nn.Module):
    """Calibrated top-k router; weight, log T and log gamma stay fp32 whatever the model dtype.
    Starts neutral (zero weight: p = normalised gamma), as the training router does."""

    def __init__(self, hidden: int, mocae: dict):
        super().__init__()
        num_experts = len(mocae["expert_names"])
        gamma = mocae["importance"] or [1.0] * num_experts
        self.top_k, self.renormalize = int(mocae["top_k"]), bool(mocae["renormalize"])
        self.weight = nn.Parameter(torch.zeros(num_experts, hidden, dtype=torch.float32))
        self.register_buffer("log_temperature", torch.full((1,), math.log(mocae["temperature"])))
        self.register_buffer("log_importance", torch.tensor(gamma, dtype=torch.float32).log())

    def forward(self, x_TH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(x_TH.device.type, enabled=False):
            logits_TE = F.linear(x_TH.float(), self.weight.float())
            probs_TE = (logits_TE / self.log_temperature.float().exp() + self.log_importance.float()).softmax(-1)
            weight_TK, idx_TK = probs_TE.sort(dim=-1, descending=True, stable=True)
            weight_TK, idx_TK = weight_TK[:, : self.top_k], idx_TK[:, : self.top_k]
            if self.renormalize:
                weight_TK = weight_TK / weight_TK.sum(dim=-1, keepdim=True)
        return idx_TK, weight_TK


class TrinityXLoRA(nn.Module):
    """One low-rank delta: s * B(A(x)), PEFT's lora_A / lora_B names."""

    def __init__(self, fan_in: int, fan_out: int, rank: int, scale: float):
        super().__init__()
        self.scale = scale
        self.lora_A = nn.Linear(fan_in, rank, bias=False)
        self.lora_B = nn.Linear(rank, fan_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_B(self.scale * self.lora_A(x))


def _ffn(hidden: int, ffn: int) -> dict:
    return {"gate_proj": nn.Linear(hidden, ffn, bias=False), "up_proj": nn.Linear(hidden, ffn, bias=False),
            "down_proj": nn.Linear(ffn, hidden, bias=False)}


class TrinityXMoCaE(nn.Module):
    """Replaces one layer's MLP. Keeps the base FFN's gate/up/down_proj (the LoRA experts' base;
    for full experts the FFN new experts upcycle from, unused in the forward pass)."""

    def __init__(self, config: TrinityXConfig):
        super().__init__()
        m, H, Fd = config.mocae, config.hidden_size, config.intermediate_size
        self.config, self.kind, self.names = config, m["kind"], list(m["expert_names"])
        self.act_fn = ACT2FN[config.hidden_act]
        for name, layer in _ffn(H, Fd).items():
            self.add_module(name, layer)
        self.router = TrinityXRouter(H, m)
        experts = {}
        for name in self.names:
            if self.kind == "lora":
                s, r = m["lora_alpha"] / m["lora_rank"], m["lora_rank"]
                shapes = {"gate_proj": (H, Fd), "up_proj": (H, Fd), "down_proj": (Fd, H)}
                experts[name] = nn.ModuleDict({t: TrinityXLoRA(*shapes[t], r, s) for t in m["lora_targets"]})
            else:
                experts[name] = nn.ModuleDict(_ffn(H, Fd))
        self.experts = nn.ModuleDict(experts)
        self.post_norm = nn.RMSNorm(H, eps=config.rms_norm_eps) if m["normalize_output"] else None

    def forward(self, hidden_BSH: torch.Tensor) -> torch.Tensor:
        x_TH = hidden_BSH.reshape(-1, hidden_BSH.shape[-1])
        forced = self.config.forced_index()
        if forced is None:
            idx_TK, w_TK = self.router(x_TH)
        else:
            idx_TK = torch.full((x_TH.shape[0], 1), forced, dtype=torch.long, device=x_TH.device)
            w_TK = torch.ones(x_TH.shape[0], 1, dtype=torch.float32, device=x_TH.device)
        y_TH = self._lora(x_TH, idx_TK, w_TK) if self.kind == "lora" else self._full(x_TH, idx_TK, w_TK)
        if self.post_norm is not None:
            y_TH = self.post_norm(y_TH)
        return y_TH.reshape(hidden_BSH.shape)

    def _routed(self, idx_TK, w_TK, dtype):
        """(expert index, its tokens, their weights [N, 1]) for every expert with tokens."""
        for e in range(len(self.names)):
            tok, k = (idx_TK == e).nonzero(as_tuple=True)
            if tok.numel():
                yield e, tok, w_TK[tok, k].to(dtype).unsqueeze(-1)

    def _lora(self, x_TH, idx_TK, w_TK):
        gate_TF, up_TF = self.gate_proj(x_TH), self.up_proj(x_TH)
        mix_TF, extra_TH = torch.zeros_like(gate_TF), torch.zeros_like(x_TH)
        for e, tok, w in self._routed(idx_TK, w_TK, x_TH.dtype):
            ex, x = self.experts[self.names[e]], x_TH[tok]
            g = gate_TF[tok] + ex["gate_proj"](x) if "gate_proj" in ex else gate_TF[tok]
            u = up_TF[tok] + ex["up_proj"](x) if "up_proj" in ex else up_TF[tok]
            a = self.act_fn(g) * u
            mix_TF = mix_TF.index_add(0, tok, w * a)
            if "down_proj" in ex:
                extra_TH = extra_TH.index_add(0, tok, w * ex["down_proj"](a))
        return self.down_proj(mix_TF) + extra_TH

    def _full(self, x_TH, idx_TK, w_TK):
        y_TH = torch.zeros_like(x_TH)
        for e, tok, w in self._routed(idx_TK, w_TK, x_TH.dtype):
            ex, x = self.experts[self.names[e]], x_TH[tok]
            y_TH = y_TH.index_add(0, tok, w * ex["down_proj"](self.act_fn(ex["gate_proj"](x)) * ex["up_proj"](x)))
        return y_TH


class TrinityXForCausalLM(PreTrainedModel, GenerationMixin):
    """The base model type's decoder (attention, RoPE, KV cache, masks: transformers' own) with
    `TrinityXMoCaE` as the MLP of every MoCaE layer, and an LM head."""

    config_class = TrinityXConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer",
                         "GemmaDecoderLayer"]
    _keep_in_fp32_modules_strict = ["router"]
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True

    def __init__(self, config: TrinityXConfig):
        super().__init__(config)
        self.model = _base_model_class(config.base_model_type)(config)
        for i in config.mocae_layers():
            self.model.layers[i].mlp = TrinityXMoCaE(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_decoder(self):
        return self.model

    def _init_weights(self, module):
        """transformers' initialisation, plus what Gemma's own `_init_weights` adds and this class
        would otherwise miss: the non-persistent sqrt(hidden) embedding scale, which a model built
        on the meta device (every `from_pretrained`) gets only from here."""
        super()._init_weights(module)
        if hasattr(module, "scalar_embed_scale") and isinstance(getattr(module, "embed_scale", None), torch.Tensor):
            init.constant_(module.embed_scale, module.scalar_embed_scale)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                labels=None, use_cache=None, logits_to_keep=0, **kwargs) -> CausalLMOutputWithPast:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                         inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
        hidden = out.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=out.cache, hidden_states=out.hidden_states,
                                      attentions=out.attentions)
