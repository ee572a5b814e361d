"""Expert-parallel token exchange: send each routed token to the rank holding its expert, back.

E experts are spread over an EP group of size ep (rank r holds experts [r*E/ep, (r+1)*E/ep)).
`dispatch` sorts the (token, slot) assignments by expert, exchanges per-expert counts, then the
tokens; `combine` sends expert outputs back and sums them with the routing weights.

Every rank runs the same collectives whatever the routing: a rank or an expert that gets no
tokens still exchanges zero-size splits and its experts still run on empty tensors (see
`run_experts`), so their parameters join the backward pass — skipping them is how MoE under
ZeRO-3 hangs (ZeRO-3 gathers an expert's parameters collectively when it is called).
With no group (or a group of one) nothing is communicated and the arithmetic is the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.distributed as dist


class _AllToAll(torch.autograd.Function):
    """Variable-split all_to_all_single along dim 0; its backward is the reverse exchange.

    Split sizes are python lists (gloo takes nothing else). Written here rather than using
    torch.distributed.nn.functional.all_to_all_single, which is deprecated in torch 2.13.
    """

    @staticmethod
    def forward(ctx, x, recv_splits: list[int], send_splits: list[int], group):
        ctx.recv_splits, ctx.send_splits, ctx.group = recv_splits, send_splits, group
        out = x.new_empty((sum(recv_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return _AllToAll.apply(grad, ctx.send_splits, ctx.recv_splits, ctx.group), None, None, None


@dataclass
class DispatchContext:
    """What `combine` needs to undo `dispatch`."""

    unsort_A: torch.Tensor  # sorted assignment -> its (token, slot) position t*K + k
    group: dist.ProcessGroup | None = None  # None: everything stayed local
    send_splits: list[int] | None = None  # rows sent to each rank
    recv_splits: list[int] | None = None  # rows received from each rank
    by_expert_R: torch.Tensor | None = None  # received rows in local-expert order


def _ep_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def dispatch(
    x_TH: torch.Tensor, topk_idx_TK: torch.Tensor, num_experts: int, group: dist.ProcessGroup | None = None
) -> tuple[list[torch.Tensor], DispatchContext]:
    """Route each token to its K experts. Returns one input tensor per local expert (possibly
    empty, [0, H]) with the rows it must process, and the context for `combine`."""
    ep = _ep_size(group)
    if num_experts % ep:
        raise ValueError(f"{num_experts} experts cannot be spread evenly over {ep} ranks")
    local = num_experts // ep
    top_k = topk_idx_TK.shape[1]
    expert_A = topk_idx_TK.reshape(-1)
    order_A = torch.argsort(expert_A, stable=True)
    x_AH = x_TH[order_A // top_k]  # assignment a = t*K + slot belongs to token a // K
    count_E = torch.bincount(expert_A, minlength=num_experts)
    if ep == 1:
        return list(x_AH.split(count_E.tolist())), DispatchContext(torch.argsort(order_A))

    recv_count_E = torch.empty_like(count_E)
    dist.all_to_all_single(recv_count_E, count_E, group=group)
    recv_count_RL = recv_count_E.view(ep, local)  # from source rank r, for local expert l
    send_splits = count_E.view(ep, local).sum(1).tolist()
    recv_splits = recv_count_RL.sum(1).tolist()
    x_RH = _AllToAll.apply(x_AH, recv_splits, send_splits, group)
    # rows arrive grouped by source rank, then expert: regroup by expert (stable keeps rank order)
    local_ids = torch.arange(local, device=x_RH.device).repeat(ep)
    expert_R = torch.repeat_interleave(local_ids, recv_count_RL.reshape(-1))
    by_expert_R = torch.argsort(expert_R, stable=True)
    inputs = list(x_RH[by_expert_R].split(recv_count_RL.sum(0).tolist()))
    return inputs, DispatchContext(torch.argsort(order_A), group, send_splits, recv_splits, by_expert_R)


def combine(
    expert_outputs: Sequence[torch.Tensor], ctx: DispatchContext, topk_weight_TK: torch.Tensor
) -> torch.Tensor:
    """y_t = sum_k w_tk * E_{idx_tk}(x_t), from each local expert's outputs (same order as its
    inputs). The weighted sum is taken in fp32 and returned in the experts' dtype."""
    y_RH = torch.cat(list(expert_outputs))
    if ctx.group is not None:
        y_RH = y_RH[torch.argsort(ctx.by_expert_R)]
        y_RH = _AllToAll.apply(y_RH, ctx.send_splits, ctx.recv_splits, ctx.group)
    t, k = topk_weight_TK.shape
    y_TKH = y_RH[ctx.unsort_A].view(t, k, y_RH.shape[1])
    return (y_TKH.float() * topk_weight_TK.float()[..., None]).sum(1).to(y_RH.dtype)


def run_experts(
    x_TH: torch.Tensor,
    topk_idx_TK: torch.Tensor,
    topk_weight_TK: torch.Tensor,
    local_experts: Sequence[Callable[[torch.Tensor], torch.Tensor]],
    num_experts: int,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """dispatch, every local expert on its rows (empty ones included), combine."""
    inputs, ctx = dispatch(x_TH, topk_idx_TK, num_experts, group)
    if len(inputs) != len(local_experts):
        raise ValueError(f"{len(local_experts)} local experts, but this rank holds {len(inputs)}")
    return combine([expert(rows) for expert, rows in zip(local_experts, inputs)], ctx, topk_weight_TK)
