"""The MoCaE block: the FFN of every chosen layer becomes calibrated-router-fused HHH experts.

    y = [post-mix RMSNorm] ( sum_{i in top-k(p)} w_i E_i(h) ),  p = softmax(z(h)/T + log gamma)

The block sits where megatron's MLP sat (the layer adds y to the residual). Router regularisers
are computed inside the block and attached to its output by `_AttachLoss` (megatron's
MoEAuxLossAutoScaler pattern): their gradient then flows in the same backward pass as the LM
loss, also when activation checkpointing recomputes the layer. Logging values are recorded in
the `RoutingContext` the training loop sets before each forward.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from torch import nn

from trinityx_ds.model.experts import FullExperts, LoRAExperts
from trinityx_ds.model.router import CalibratedRouter
from trinityx_ds.model.mocae_spec import MoCaEConfig
from trinityx_ds.model.router_losses import RoutingEMA, router_losses
from trinityx_ds.parallel import sequence as seq
from trinityx_ds.parallel.torch_compat import in_backward


@dataclass
class RoutingContext:
    """Per-forward inputs of the router losses and what the blocks record for logging.

    Token tensors are flattened in megatron's [S, B] order, as the blocks see them.
    """

    mask_T: torch.Tensor | None = None
    example_id_T: torch.Tensor | None = None
    task_label_N: torch.Tensor | None = None
    force_expert: int | None = None  # every token to this expert (stage 1, single-expert eval)
    reference: bool = False  # every expert off: the frozen backbone's FFN (DPO's reference policy)
    compute_losses: bool = True
    records: dict[int, dict] = field(default_factory=dict)  # layer -> {"losses", "share_E", "probs_TE"}
    keep_probs: bool = False

    @classmethod
    def from_batch(cls, labels_BS: torch.Tensor | None = None, example_id_BS: torch.Tensor | None = None,
                   task_label_N: torch.Tensor | None = None, **kw) -> "RoutingContext":
        """Response-token mask from the (shifted) labels, example ids per token (< 0: padding), a
        task label per example."""
        sb = (lambda t: None if t is None else t.transpose(0, 1).reshape(-1))  # noqa: E731
        mask = None if labels_BS is None else sb(labels_BS >= 0)
        return cls(mask_T=mask, example_id_T=sb(example_id_BS), task_label_N=task_label_N, **kw)


class _AttachLoss(torch.autograd.Function):
    """Returns y unchanged; in backward gives `loss` the gradient `scale` so it is optimised with
    the LM loss: what DeepSpeed's backward multiplies the LM loss by, 1 / grad-accum steps times
    fp16's current loss scale (set before each backward by train/step.py from the engine; without
    the loss scale, fp16's unscaling would leave the router losses' gradient 2^16 times small)."""

    scale = 1.0

    @staticmethod
    def forward(ctx, y, loss):
        ctx.save_for_backward(loss)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        (loss,) = ctx.saved_tensors
        return grad_y, torch.full_like(loss, _AttachLoss.scale)


def set_router_loss_scale(scale: float) -> None:
    _AttachLoss.scale = scale


class MoCaEBlock(nn.Module):
    """Replaces megatron's MLP in one layer. `linear_fc1`/`linear_fc2` keep the base FFN's names
    (LoRA kind), so backbone checkpoints load unchanged."""

    def __init__(self, base_mlp, cfg: MoCaEConfig, layer_id: int, hidden: int, eps: float, ep_group=None,
                 local_expert_ids: list[int] | None = None):
        super().__init__()
        self.cfg, self.layer_id = cfg, layer_id
        self.ctx: RoutingContext | None = None
        E = cfg.num_experts
        self.router = CalibratedRouter(hidden, E, temperature=cfg.temperature, temperature_mode=cfg.temperature_mode,
                                       importance=cfg.importance, top_k=cfg.top_k, renormalize=cfg.renormalize)
        dp_group = (parallel_state.get_data_parallel_group()
                    if parallel_state.get_data_parallel_world_size() > 1 else None)
        self.routing_ema = RoutingEMA(1, E, decay=cfg.loss_weights.ema_decay, group=dp_group)
        dtype = base_mlp.linear_fc1.weight.dtype
        self._base: tuple[nn.Module, ...] = ()  # megatron's own MLP over the same fc1/fc2 (LoRA kind)
        if cfg.kind == "lora":
            self.linear_fc1, self.linear_fc2 = base_mlp.linear_fc1, base_mlp.linear_fc2
            self._base = (base_mlp,)  # a tuple is not registered: its fc1/fc2 are this block's children
            ffn_local = base_mlp.linear_fc2.weight.shape[1]
            self.experts = LoRAExperts(E, hidden, ffn_local, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout,
                                       cfg.lora_targets, dtype=dtype, activation=base_mlp.config.activation_func)
        else:
            ids = list(range(E)) if local_expert_ids is None else local_expert_ids
            self.experts = FullExperts(base_mlp.config, E, ids, ep_group)
            self.experts.upcycle(base_mlp)
        self.post_norm = nn.RMSNorm(hidden, eps=eps, dtype=dtype) if cfg.normalize_output else None
        self._outside: tuple[nn.Module, ...] = ()  # the experts, when held outside the module tree
        # sequence parallelism: the backbone's FFN linears were built for it (parallel/sequence.py)
        self.sequence_parallel = seq.active(base_mlp)

    def place_experts_outside(self) -> nn.Module:
        """Takes the experts out of this block's module tree (parameters, state_dict, ZeRO's
        partitioning) and keeps computing with them: stage 2's EP-placed `full` experts, which a
        ZeRO-3 engine would partition as if they were replicated. Returns them."""
        experts = self.experts
        del self.experts  # nn.Module unregisters a child on delattr
        self._outside = (experts,)  # a tuple is not registered as a child
        return experts

    @property
    def expert_module(self) -> nn.Module:
        """The experts, in the module tree or held outside it."""
        return self._outside[0] if self._outside else self.experts

    def outside_experts(self) -> nn.Module | None:
        return self._outside[0] if self._outside else None

    def forward(self, hidden_SBH: torch.Tensor, *args, **kwargs):
        """hidden_SBH: [S, B, H], or this rank's [S/tp, B, H] under sequence parallelism, where the
        router, the LoRA paths and the post-mix norm run on this rank's tokens only and the router
        losses and shares still count every token of the sequence once (parallel/sequence.py)."""
        S, B, H = hidden_SBH.shape
        x_TH = hidden_SBH.reshape(S * B, H)
        ctx = self.ctx or RoutingContext(compute_losses=False)
        if ctx.reference:
            # The backbone exactly: megatron's MLP forward over the frozen fc1/fc2, no router, no delta,
            # so a DPO reference needs neither a second model nor any extra weight memory.
            if not self._base:
                raise ValueError("a reference forward (experts off) needs experts.kind: lora")
            return self._base[0](hidden_SBH)
        sp = self.sequence_parallel
        if ctx.force_expert is not None:
            # one expert on every token (stage 1, one expert's evaluation): the router is not asked,
            # and LoRA experts are told their weight is 1 rather than multiplied by ones
            out = None
            idx_TK = torch.full((S * B, 1), ctx.force_expert, dtype=torch.long, device=x_TH.device)
            w_TK = None if self.cfg.kind == "lora" else torch.ones(S * B, 1, dtype=torch.float32, device=x_TH.device)
        else:
            out = self.router(x_TH, shared=seq.sum_grad_over_tp if sp else None)
            idx_TK, w_TK = out.topk_idx_TK, out.topk_weight_TK
        if self.cfg.kind == "lora":
            y_TH = self.expert_module(x_TH, self, idx_TK, w_TK)  # gathers what it needs under SP itself
        elif sp:
            # Whole FFN experts: the TP group's tokens on every TP rank, dispatched over EP as
            # without SP (megatron's MoE dispatchers also gather over TP first); the experts'
            # computation is replicated over TP, so each rank keeps its slice of the gradients.
            y_TH = seq.scatter_tokens(self.expert_module(
                seq.gather_tokens(x_TH, partial_grad=False), seq.gather_tokens(idx_TK),
                seq.gather_tokens(w_TK, partial_grad=False)))
        else:
            y_TH = self.expert_module(x_TH, idx_TK, w_TK)
        if self.post_norm is not None:
            y_TH = (F.rms_norm(y_TH, (H,), seq.sum_grad_over_tp(self.post_norm.weight), self.post_norm.eps) if sp
                    else self.post_norm(y_TH))
        if ctx.force_expert is None and self.ctx is not None:
            recompute = in_backward()
            local = seq.local_tokens if sp else (lambda t: t)  # noqa: E731
            mask_T = local(ctx.mask_T)
            losses = {}
            if ctx.compute_losses:
                losses = router_losses(out, mask_T, local(ctx.example_id_T), ctx.task_label_N, self.cfg.loss_weights,
                                       None if recompute else self.routing_ema, 0,
                                       **({"reduce": seq.token_sum} if sp else {}))
                if losses["total"].requires_grad:
                    y_TH = _AttachLoss.apply(y_TH, losses["total"])
            if not recompute:
                self._record(ctx, out, losses, mask_T)
        return y_TH.reshape(S, B, H), None

    @torch.no_grad()
    def _record(self, ctx: RoutingContext, out, losses, mask_T: torch.Tensor | None) -> None:
        """Losses, the top-1 shares over the valid tokens and (keep_probs) the probabilities of
        every token, in token order: under SP gathered from the TP group's slices."""
        mask = mask_T if mask_T is not None else torch.ones(out.probs_TE.shape[0], dtype=torch.bool,
                                                                  device=out.probs_TE.device)
        top1 = out.topk_idx_TK[:, 0][mask]
        counts = torch.cat([torch.bincount(top1, minlength=self.cfg.num_experts).float(), mask.sum().float()[None]])
        if self.sequence_parallel:
            counts = seq.token_sum(counts)
        share = counts[:-1] / counts[-1].clamp_min(1)
        rec = {"losses": {k: v.detach() for k, v in losses.items()}, "share_E": share}
        if ctx.keep_probs:
            probs, logits = out.probs_TE.detach(), out.logits_TE.detach()
            if self.sequence_parallel:
                probs, logits = seq.gather_tokens(probs), seq.gather_tokens(logits)
            rec["probs_TE"], rec["logits_TE"] = probs, logits
        ctx.records[self.layer_id] = rec


def attach_mocae(model, cfg: MoCaEConfig, ep_group=None) -> list[MoCaEBlock]:
    """Swaps the MLP of each chosen layer of this rank's (pipeline stage of the) backbone."""
    E = cfg.num_experts
    local_ids = None
    if cfg.kind == "full" and ep_group is not None:
        ep, r = dist.get_world_size(ep_group), dist.get_rank(ep_group)
        if E % ep:
            raise ValueError(f"parallel.ep: {ep} — must divide the number of experts ({E})")
        local_ids = list(range(r * E // ep, (r + 1) * E // ep))
    chosen = set(cfg.layer_ids(model.arch.num_layers))
    blocks = []
    for layer in model.decoder.layers:
        gid = layer.layer_number - 1
        if gid in chosen:
            layer.mlp = MoCaEBlock(layer.mlp, cfg, gid, model.arch.hidden_size, model.arch.rms_norm_eps,
                                   ep_group=ep_group, local_expert_ids=local_ids)
            blocks.append(layer.mlp)
    return blocks


def set_routing_context(blocks: list[MoCaEBlock], ctx: RoutingContext | None) -> None:
    for b in blocks:
        b.ctx = ctx
