"""Router regularisers of one MoCaE layer, each returned on its own so training can log it.

All terms are fp32 scalars over the valid tokens (mask_T true; None = all valid) and are 0, not
NaN, when no token is valid. Logs use probabilities clamped at the smallest normal fp32, so a
probability that underflowed to 0 contributes 0 with a finite gradient.

Every sum over tokens goes through `reduce` (identity by default). Under sequence parallelism a
TP rank holds only its own slice of the tokens; the MoCaE block passes megatron's
reduce-from-TP-region (all-reduce forward, identity backward), so every term is the one over all
tokens, equal on every rank, and each rank's backward gives the exact gradient for its own
tokens: every token counts exactly once (megatron's MoE aux losses do the same with their
`sequence_partition_group`).
"""

from __future__ import annotations

from typing import Callable


import torch
import torch.distributed as dist
from torch import nn

from trinityx_ds.config.schema import RouterLossConfig  # the coefficients (paper defaults); 0 = logged only
from trinityx_ds.model.router import RouterOutput

_TINY = torch.finfo(torch.float32).tiny
Reduce = Callable[[torch.Tensor], torch.Tensor]


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def _log(p: torch.Tensor) -> torch.Tensor:
    return p.clamp_min(_TINY).log()


def _valid(mask_T: torch.Tensor | None, like_TE: torch.Tensor) -> torch.Tensor:
    """Float weights [T]: 1 for valid tokens, 0 for padding."""
    if mask_T is None:
        return like_TE.new_ones(like_TE.shape[0], dtype=torch.float32)
    return mask_T.reshape(-1).to(torch.float32)


def _masked_mean(value_T: torch.Tensor, valid_T: torch.Tensor, reduce: Reduce = _same) -> torch.Tensor:
    num_den = reduce(torch.stack([(value_T * valid_T).sum(), valid_T.sum()]))
    return num_den[0] / num_den[1].clamp_min(1)


def mean_probs(probs_TE: torch.Tensor, mask_T: torch.Tensor | None, reduce: Reduce = _same) -> torch.Tensor:
    """pbar_E: the batch-mean routing distribution over valid tokens (zeros if none)."""
    valid_T = _valid(mask_T, probs_TE)
    sums = reduce(torch.cat([(probs_TE.float() * valid_T[:, None]).sum(0), valid_T.sum()[None]]))
    return sums[:-1] / sums[-1].clamp_min(1)


def entropy_loss(probs_TE: torch.Tensor, mask_T: torch.Tensor | None, reduce: Reduce = _same) -> torch.Tensor:
    """Mean per-token entropy H(p_t): minimising it makes each token's routing decisive."""
    probs_TE = probs_TE.float()
    return _masked_mean(-(probs_TE * _log(probs_TE)).sum(-1), _valid(mask_T, probs_TE), reduce)


def _kl(p_E: torch.Tensor, q_E: torch.Tensor) -> torch.Tensor:
    return (p_E * (_log(p_E) - _log(q_E))).sum()


def kl_uniform_loss(probs_TE: torch.Tensor, mask_T: torch.Tensor | None, reduce: Reduce = _same) -> torch.Tensor:
    """KL(pbar || uniform) of the batch-mean routing: balanced expert usage on average.

    Applied to the batch mean, not per token: per token, KL(p_t || u) = log E - H(p_t), so it
    would only push the entropy term the other way. On the mean it leaves each token free to be
    decisive (low H(p_t)) while the batch as a whole uses all experts.
    """
    pbar_E = mean_probs(probs_TE, mask_T, reduce)
    return _kl(pbar_E, torch.full_like(pbar_E, 1 / pbar_E.numel()))


def kl_prev_loss(pbar_E: torch.Tensor, prev_E: torch.Tensor) -> torch.Tensor:
    """KL(pbar || prev): keeps routing from drifting fast away from earlier steps (prev is an
    EMA of their batch means, treated as a constant). 0 for an all-masked batch (pbar = 0)."""
    return _kl(pbar_E.float(), prev_E.detach().float())


def _token_example(valid_T: torch.Tensor, example_id_T: torch.Tensor) -> torch.Tensor:
    """Each token's example index, 0 for invalid tokens (their weight is 0 wherever it is used)."""
    return torch.where(valid_T > 0, example_id_T.reshape(-1), 0).long()


def _example_sums(values_TX: torch.Tensor, valid_T: torch.Tensor, example_id_T: torch.Tensor, num_examples: int,
                  reduce: Reduce) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example, the sum of `values_TX` [T, X] over its valid tokens [N, X] and their count [N],
    summed over every rank that holds a slice of the tokens (`reduce`) in one collective."""
    rows_TX1 = torch.cat([values_TX * valid_T[:, None], valid_T[:, None]], dim=1)
    sums_NX1 = rows_TX1.new_zeros(num_examples, rows_TX1.shape[1]).index_add(
        0, _token_example(valid_T, example_id_T), rows_TX1)
    sums_NX1 = reduce(sums_NX1)
    return sums_NX1[:, :-1], sums_NX1[:, -1]


def task_ce_loss(
    probs_TE: torch.Tensor,
    mask_T: torch.Tensor | None,
    example_id_T: torch.Tensor,
    task_label_N: torch.Tensor,
    reduce: Reduce = _same,
) -> torch.Tensor:
    """H3Fusion-style supervision: -log pbar_n[label_n], pbar_n = example n's mean routing.

    example_id_T in [0, N) says which example each token belongs to (anything for padding);
    label_n is the expert of the example's task (0 helpful, 1 harmless, 2 honest) or < 0 for
    none. Averaged over examples with a label and at least one valid token.
    """
    probs_TE = probs_TE.float()
    label_N = task_label_N.reshape(-1).long()
    sum_NE, count_N = _example_sums(probs_TE, _valid(mask_T, probs_TE), example_id_T, label_N.numel(), reduce)
    pbar_N = (sum_NE / count_N.clamp_min(1)[:, None]).gather(1, label_N.clamp_min(0)[:, None])[:, 0]
    return _masked_mean(-_log(pbar_N), ((label_N >= 0) & (count_N > 0)).float())


def task_token_ce_loss(
    probs_TE: torch.Tensor,
    mask_T: torch.Tensor | None,
    example_id_T: torch.Tensor,
    task_label_N: torch.Tensor,
    reduce: Reduce = _same,
) -> torch.Tensor:
    """Token-level supervision: mean over examples of mean_t -log p_t[label_n], t over example n's
    valid tokens (arguments as `task_ce_loss`).

    Why a second form: top-1 routing sends each token to its own argmax, so what the fused model
    computes on an example is decided token by token, while -log pbar_n is satisfied by a mean
    that some of the example's tokens never agree with (0.70 on the help expert left 15% of help
    examples, and more of their tokens, with another expert in the 12-07 efficacy run). Here every
    token pays for its own probability; examples keep equal weight, as in `task_ce_loss`, so long
    responses do not drown short ones.
    """
    probs_TE = probs_TE.float()
    valid_T = _valid(mask_T, probs_TE)
    label_N = task_label_N.reshape(-1).long()
    label_T = label_N.clamp_min(0)[_token_example(valid_T, example_id_T)]
    nll_T1 = -_log(probs_TE.gather(1, label_T[:, None]))
    sum_N1, count_N = _example_sums(nll_T1, valid_T, example_id_T, label_N.numel(), reduce)
    return _masked_mean(sum_N1[:, 0] / count_N.clamp_min(1), ((label_N >= 0) & (count_N > 0)).float())


def load_balance_loss(
    probs_TE: torch.Tensor, topk_idx_TK: torch.Tensor, mask_T: torch.Tensor | None, reduce: Reduce = _same
) -> torch.Tensor:
    """Switch-Transformer balance E * sum_i f_i P_i: f_i = share of routed (token, slot)
    assignments on expert i (no gradient), P_i = mean probability; 1 when perfectly balanced."""
    probs_TE = probs_TE.float()
    num_experts, k = probs_TE.shape[1], topk_idx_TK.shape[1]
    valid_T = _valid(mask_T, probs_TE)
    routed_E = valid_T.new_zeros(num_experts).index_add(
        0, topk_idx_TK.reshape(-1), valid_T.repeat_interleave(k)
    )
    routed_E = reduce(routed_E)
    f_E = routed_E / routed_E.sum().clamp_min(1)
    return num_experts * (f_E * mean_probs(probs_TE, mask_T, reduce)).sum()


def z_loss(logits_TE: torch.Tensor, mask_T: torch.Tensor | None, reduce: Reduce = _same) -> torch.Tensor:
    """ST-MoE z-loss: mean (logsumexp z_t)^2, keeps raw router logits small."""
    logits_TE = logits_TE.float()
    return _masked_mean(logits_TE.logsumexp(-1).square(), _valid(mask_T, logits_TE), reduce)


class RoutingEMA(nn.Module):
    """EMA of each layer's batch-mean routing, the `prev` of kl_prev_loss.

    Buffers (so checkpoints carry them and a resumed run continues identically): ema_LE and
    updates_L, the number of batches folded in per layer (0 = no EMA yet). Updates and the
    "first step" check stay on the device: no host synchronisation. With `group` (the
    data-parallel group) each update folds in the token-weighted mean over the group's ranks, so
    every rank holds the same EMA: DeepSpeed saves buffers from data-parallel rank 0 only, and a
    resumed run must continue what every rank had.
    """

    def __init__(self, num_layers: int, num_experts: int, decay: float = 0.9, group=None):
        super().__init__()
        if not 0 <= decay < 1:
            raise ValueError(f"decay={decay} must be in [0, 1)")
        self.decay, self.group = decay, group
        self.register_buffer("ema_LE", torch.zeros(num_layers, num_experts))
        self.register_buffer("updates_L", torch.zeros(num_layers, dtype=torch.long))

    def prev(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(ema_E, has_prev): a copy of the layer's EMA (later updates leave it alone) and a bool
        scalar tensor, false until the first update."""
        return self.ema_LE[layer].clone(), self.updates_L[layer] > 0

    @torch.no_grad()
    def update(self, layer: int, pbar_E: torch.Tensor, tokens: torch.Tensor | None = None) -> None:
        """Fold in a batch mean over `tokens` valid tokens; the first one initialises the EMA; an
        all-masked one (pbar = 0, on every rank of the group) is skipped."""
        pbar_E = pbar_E.detach().to(self.ema_LE)
        if self.group is not None:
            n = (tokens if tokens is not None else torch.ones(())).to(pbar_E).reshape(1)
            sums = torch.cat([pbar_E * n, n])
            dist.all_reduce(sums, group=self.group)
            pbar_E = sums[:-1] / sums[-1].clamp_min(1)
        seen = pbar_E.sum() > 0
        first = self.updates_L[layer] == 0
        blended_E = torch.where(first, pbar_E, self.decay * self.ema_LE[layer] + (1 - self.decay) * pbar_E)
        self.ema_LE[layer] = torch.where(seen, blended_E, self.ema_LE[layer])
        self.updates_L[layer] += seen.long()


def _task_term(probs_TE, mask_T, example_id_T, task_label_N, weights: RouterLossConfig, reduce: Reduce):
    """task_ce as the config asks. weights.task_level: -log of the example's mean routing, or the
    mean of every token's -log. weights.task_tokens: over the response's tokens (mask_T), over every
    token of the example (not padding), or "both": the mean of a response term and a prompt term
    (the example's other tokens), so a short answer keeps half the weight however long its prompt
    and chat template are; the response term alone where no example has a prompt token."""
    loss = task_token_ce_loss if weights.task_level == "token" else task_ce_loss
    example_T = example_id_T.reshape(-1) >= 0
    if weights.task_tokens == "all":
        return loss(probs_TE, example_T, example_id_T, task_label_N, reduce)
    response = loss(probs_TE, mask_T, example_id_T, task_label_N, reduce)
    if weights.task_tokens != "both" or mask_T is None:
        return response
    prompt_T = example_T & ~mask_T.reshape(-1).bool()
    prompt = loss(probs_TE, prompt_T, example_id_T, task_label_N, reduce)
    has_prompt = reduce(prompt_T.sum().float()) > 0
    return torch.where(has_prompt, (response + prompt) / 2, response)


def router_losses(
    out: RouterOutput,
    mask_T: torch.Tensor | None,
    example_id_T: torch.Tensor | None,
    task_label_N: torch.Tensor | None,
    weights: RouterLossConfig,
    ema: RoutingEMA | None,
    layer: int,
    reduce: Reduce = _same,
) -> dict[str, torch.Tensor]:
    """Every term of one layer (unweighted) plus "total" = their weighted sum.

    Terms with weight 0 are computed under no_grad, for logging only. kl_prev is 0 on the
    layer's first batch (no EMA yet) and without `ema`; task_ce is 0 without labels. The EMA is
    updated with this batch's mean afterwards: call once per layer and micro-batch, outside
    recomputed (activation-checkpointed) regions, or the EMA advances twice. `reduce`: the sum over
    every rank that holds a slice of the tokens (sequence parallelism), see the module's docstring.
    """
    probs_TE = out.probs_TE
    pbar_E = mean_probs(probs_TE, mask_T, reduce)
    terms = {
        "entropy": lambda: entropy_loss(probs_TE, mask_T, reduce),
        "kl_uniform": lambda: kl_uniform_loss(probs_TE, mask_T, reduce),
        "load_balance": lambda: load_balance_loss(probs_TE, out.topk_idx_TK, mask_T, reduce),
        "z_loss": lambda: z_loss(out.logits_TE, mask_T, reduce),
    }
    if ema is not None:
        prev_E, has_prev = ema.prev(layer)
        terms["kl_prev"] = lambda: kl_prev_loss(pbar_E, prev_E) * has_prev
    if task_label_N is not None and example_id_T is not None:
        terms["task_ce"] = lambda: _task_term(probs_TE, mask_T, example_id_T, task_label_N, weights, reduce)

    zero = probs_TE.new_zeros((), dtype=torch.float32)
    result = {name: zero for name in ("entropy", "kl_prev", "kl_uniform", "task_ce", "load_balance", "z_loss")}
    total = zero
    for name, term in terms.items():
        weight = getattr(weights, name)
        with torch.set_grad_enabled(torch.is_grad_enabled() and weight != 0):
            result[name] = term()
        if weight != 0:
            total = total + weight * result[name]
    if ema is not None:
        ema.update(layer, pbar_E, reduce(_valid(mask_T, probs_TE).sum()))
    result["total"] = total
    return result
