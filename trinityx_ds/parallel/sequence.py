"""Sequence parallelism inside the MoCaE block: megatron's SP mappings, named for what the block
does with them.

Under `model.sequence_parallel` (TP > 1) the tokens between the tensor-parallel regions are split
over the TP group along the sequence: a block receives [S/tp, B, H], this rank's contiguous slice
of megatron's [S, B] token order. Megatron's own linears do the rest of the standard pattern
(the column-parallel fc1 all-gathers its input, the row-parallel fc2 reduce-scatters its output);
what the MoCaE block adds runs on the sequence-sharded tokens with these mappings:
- `sum_grad_over_tp`: a replicated parameter (router, LoRA's replicated factors, post-mix norm)
  used on this rank's tokens only. Its gradient is a partial sum over this rank's tokens; the backward
  all-reduces it over TP inside autograd (megatron's copy-to-TP mapping, made safe for
  non-contiguous gradients), so every rank holds the whole gradient before
  any optimizer sees it (megatron does the same after backward for its SP norm weights, in
  `finalize_model_grads`; ZeRO's gradient hooks take a gradient the moment it is produced, so
  here it must already be whole).
- `token_sum`: a sum over tokens that must count every token of the TP group once (router
  losses, routing shares): all-reduce forward, identity backward.
- `gather_tokens` / `scatter_tokens` / `reduce_scatter_tokens`: between the sharded tokens and the
  whole TP group's tokens; `partial_grad` says whether what follows a gather is TP-partial (its
  gradient is summed over TP, a reduce-scatter) or replicated on every TP rank (its gradient is
  whole everywhere: each rank keeps its own slice).
"""
from __future__ import annotations

import torch
from megatron.core import parallel_state, tensor_parallel


class _SumGradOverTP(torch.autograd.Function):
    """Identity forward; backward: the gradient summed over the TP group.

    megatron's copy_to_tensor_model_parallel_region does the same in principle, but its backward
    all-reduces `grad.contiguous()` and returns `grad`: a gradient autograd hands over
    non-contiguous (a parameter's, from a transposed matmul: LoRA's down B) is reduced in a copy
    and returned unreduced (measured: each rank kept its own partial sum)."""

    @staticmethod
    def forward(ctx, param):
        return param.view_as(param)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        if parallel_state.get_tensor_model_parallel_world_size() > 1:
            torch.distributed.all_reduce(grad, group=parallel_state.get_tensor_model_parallel_group())
        return grad


def sum_grad_over_tp(t: torch.Tensor) -> torch.Tensor:
    """Identity forward, gradient all-reduced over TP: megatron's copy-to-TP-region, safe for any
    gradient. A replicated parameter used on this rank's tokens (SP), or an activation replicated
    across TP that meets TP-sharded weights (LoRA's low-rank activations, mixing weights). At TP = 1
    there is nothing to sum: `t` itself, no autograd node and no copy of its gradient."""
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return t
    return _SumGradOverTP.apply(t)


def active(mlp) -> bool:
    """Whether the FFN `mlp` (megatron's, or a MoCaE block holding its linears) was built for
    sequence parallelism: its tokens are this rank's slice of the sequence."""
    return bool(getattr(mlp.linear_fc1, "sequence_parallel", False))


def token_sum(partial: torch.Tensor) -> torch.Tensor:
    """This rank's sum over its tokens -> the sum over the TP group's tokens (same on every rank);
    the backward is the identity: each rank's tokens get the gradient of the whole sum."""
    return tensor_parallel.reduce_from_tensor_model_parallel_region(partial)


def gather_tokens(local_T: torch.Tensor, partial_grad: bool = True) -> torch.Tensor:
    """[T/tp, ...] -> [T, ...] in token order (also for integer tensors, which carry no gradient)."""
    return tensor_parallel.gather_from_sequence_parallel_region(local_T, tensor_parallel_output_grad=partial_grad)


def scatter_tokens(full_T: torch.Tensor) -> torch.Tensor:
    """[T, ...] (the same on every TP rank) -> this rank's [T/tp, ...]; backward all-gathers."""
    return tensor_parallel.scatter_to_sequence_parallel_region(full_T)


def reduce_scatter_tokens(partial_T: torch.Tensor) -> torch.Tensor:
    """[T, ...] TP-partial sums -> this rank's [T/tp, ...] of their sum; backward all-gathers."""
    return tensor_parallel.reduce_scatter_to_sequence_parallel_region(partial_T)


def local_tokens(full_T: torch.Tensor | None) -> torch.Tensor | None:
    """This rank's rows of a per-token tensor given for the whole sequence ([S*B] order): a
    contiguous 1/tp of them, the slice megatron's scatter gives this rank."""
    if full_T is None:
        return None
    tp, rank = (parallel_state.get_tensor_model_parallel_world_size(),
                parallel_state.get_tensor_model_parallel_rank())
    n = full_T.shape[0] // tp
    return full_T[rank * n:(rank + 1) * n]
