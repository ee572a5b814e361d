"""One optimizer step of a stage over its micro-batches, and the scalars it reports."""
from __future__ import annotations

import time

import torch
import torch.distributed as dist

from trinityx_ds.model.backbone import masked_mean_loss
from trinityx_ds.model.mocae import RoutingContext, set_router_loss_scale, set_routing_context
from trinityx_ds.parallel.deepspeed_compat import backward_loss_scale


def local_examples(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token example index renumbered 0..N-1 within the batch, and each example's task label."""
    ex_BS = batch["example_id"]
    valid = ex_BS >= 0
    uniq, inv = torch.unique(ex_BS[valid], return_inverse=True)
    local = torch.full_like(ex_BS, -1)
    local[valid] = inv
    rows = torch.arange(ex_BS.shape[0]).unsqueeze(1).expand_as(ex_BS)[valid]
    task_N = torch.full((len(uniq),), -1, dtype=torch.long)
    task_N[inv] = batch["task_label"][rows]
    return local, task_N


def record_routing(ctx: RoutingContext, stats: dict, names: list[str], grad_accum: int) -> None:
    """Adds one micro-batch's router losses (mean over layers) and per-layer top-1 shares."""
    if not ctx.records:
        return
    n_layers = len(ctx.records)
    for layer, rec in ctx.records.items():
        for term, value in rec["losses"].items():
            key = f"router/{term}"
            stats[key] = stats.get(key, 0.0) + value.item() / (n_layers * grad_accum)
        for e, share in enumerate(rec["share_E"].tolist()):
            key = f"routing/layer{layer:02d}/{names[e]}"
            stats[key] = stats.get(key, 0.0) + share / grad_accum


def train_step(engine, blocks, big_batch: dict, *, stage: int, micro_batch: int, grad_accum: int,
               names: list[str], dp_group, dp: int, external=None, objective=None) -> dict:
    """One optimizer step over `grad_accum` micro-batches of `big_batch`; returns the step's scalars
    (`_tokens`: this rank's token count). Stage 1 forces every token to its one expert; stage 2
    routes and adds the router losses. `external`: experts held outside the engine, stepped after
    the engine's last micro-batch. `objective` (train/objectives.py, stage 1): a preference loss
    over `micro_batch` pairs per micro-batch (2 rows each); None or sft: the LM loss."""
    stats: dict[str, float] = {}
    task_sum, task_cnt = torch.zeros(len(names)), torch.zeros(len(names))
    tokens = 0
    pairs = objective is not None and objective.pairs
    needs_reference = pairs and objective.needs_reference()
    rows = micro_batch * (2 if pairs else 1)
    pref: dict[str, float] = {}
    reference_s = 0.0  # this rank's time in the reference forwards: what precomputing them would save
    for i in range(grad_accum):
        batch = {k: v[i * rows:(i + 1) * rows] for k, v in big_batch.items()}
        ids, labels = batch["input_ids"], batch["labels"]
        ref_BS = None
        if needs_reference:
            # the reference policy: the same engine with the expert off (the frozen backbone)
            set_routing_context(blocks, RoutingContext(reference=True, compute_losses=False))
            t_ref = time.perf_counter()
            with torch.no_grad():
                ref_BS = engine(ids, labels)
            reference_s += time.perf_counter() - t_ref
        local_ex, task_N = local_examples(batch)
        ctx = RoutingContext.from_batch(labels, local_ex, task_N, force_expert=0 if stage == 1 else None,
                                        compute_losses=stage == 2)
        set_routing_context(blocks, ctx)
        token_loss_BS = engine(ids, labels)
        if pairs:
            loss, micro = objective.loss(token_loss_BS, labels, ref_BS)
            for k, v in micro.items():
                pref[k] = pref.get(k, 0.0) + v / grad_accum
        else:
            loss = masked_mean_loss(token_loss_BS, labels)
        # the router losses enter the backward through _AttachLoss, not through `loss`: give them
        # what engine.backward gives `loss` (1 / grad_accum, times fp16's current loss scale, which
        # the optimizer divides out again), as megatron refreshes MoEAuxLossAutoScaler's scale
        set_router_loss_scale(backward_loss_scale(engine) / grad_accum)
        engine.backward(loss)
        engine.step()
        with torch.no_grad():
            valid = labels >= 0
            row_loss = (token_loss_BS.detach() * valid).sum(1)
            task = batch["task_label"].clamp(min=0)
            task_sum.index_add_(0, task, row_loss)
            task_cnt.index_add_(0, task, valid.sum(1).float())
            tokens += int(ids.numel())
        stats["train/loss"] = stats.get("train/loss", 0.0) + loss.detach() / grad_accum
        record_routing(ctx, stats, names, grad_accum)
    if external is not None and external.trains:
        external.step()
    # what the data-parallel ranks optimise together, and the preference scalars over all their pairs
    keys = sorted(pref)
    summed = torch.cat([stats["train/loss"].reshape(1).float(), torch.tensor([pref[k] for k in keys])])
    dist.all_reduce(summed, group=dp_group)
    stats["train/loss"] = summed[0].item() / dp
    stats |= {k: v / dp for k, v in zip(keys, summed[1:].tolist())}
    if stage == 2:
        for t, name in enumerate(names):
            if task_cnt[t] > 0:
                stats[f"train/loss_{name}"] = (task_sum[t] / task_cnt[t]).item()
    if needs_reference:
        stats["time/reference_s"] = reference_s
    stats["_tokens"] = tokens
    return stats
