"""One optimizer step of a stage over its micro-batches, and the scalars it reports."""
from __future__ import annotations

import contextlib
import time

import torch
import torch.distributed as dist

from trinityx_ds.model.backbone import masked_mean_loss
from trinityx_ds.model.mocae import RoutingContext, set_router_loss_scale, set_routing_context
from trinityx_ds.model.prefix import feed_from, first_expert_layer, keep_input
from trinityx_ds.parallel.deepspeed_compat import backward_loss_scale
from trinityx_ds.parallel.device import on_rank_device, rank_device


class ReferencePrefix:
    """DPO's reference and policy forwards of one micro-batch share the frozen layers below the first
    expert layer: the reference forward (experts off, run first) keeps the hidden state entering
    that layer, and the policy forward starts there (model/prefix.py), the layers below handing it
    on. Exact, not approximate: below the first expert layer both forwards compute the frozen
    backbone on the same ids (no dropout there: the backbone's is 0), and nothing below trains, so
    the policy's backward ends at that layer either way. With experts on layers 20-29 of a 30-layer
    backbone (the efficacy runs), the policy forward skips two thirds of its layers.

    Nothing to share when experts start at layer 0; refused at PP > 1 by the run (training runs at
    PP = 1). Memory: one [S, B, H] tensor, for the length of a micro-batch."""

    def __init__(self, model, blocks):
        self.first = first_expert_layer(blocks)
        self._kept: torch.Tensor | None = None
        self._keeping = self._feeding = False
        self.shared = 0  # policy forwards that started at the first expert layer
        if self.first > 0:
            layers = model.decoder.layers
            keep_input(layers[self.first], self._keep)
            feed_from(layers, self.first, lambda: self._kept if self._feeding else None)

    def _keep(self, hidden: torch.Tensor) -> None:
        if self._keeping:
            self._kept = hidden.detach().clone()  # what the layers above do to their input stays theirs

    @contextlib.contextmanager
    def reference(self):
        """The reference forward: keeps its hidden state at the first expert layer."""
        self._keeping = self.first > 0
        try:
            yield
        finally:
            self._keeping = False

    @contextlib.contextmanager
    def policy(self):
        """The policy forward of the same micro-batch: from the kept hidden state, if any."""
        self._feeding = self._kept is not None
        self.shared += self._feeding
        try:
            yield
        finally:
            self._feeding, self._kept = False, None


def local_examples(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token example index renumbered 0..N-1 within the batch, and each example's task label.
    On the batch's device (train_step calls it on the CPU batch, before moving it)."""
    ex_BS = batch["example_id"]
    valid = ex_BS >= 0
    uniq, inv = torch.unique(ex_BS[valid], return_inverse=True)
    local = torch.full_like(ex_BS, -1)
    local[valid] = inv
    rows = torch.arange(ex_BS.shape[0], device=ex_BS.device).unsqueeze(1).expand_as(ex_BS)[valid]
    task_N = torch.full((len(uniq),), -1, dtype=torch.long, device=ex_BS.device)
    task_N[inv] = batch["task_label"][rows]
    return local, task_N


def record_routing(ctx: RoutingContext, stats: dict, names: list[str], grad_accum: int) -> None:
    """Adds one micro-batch's router losses (mean over layers) and per-layer top-1 shares, as
    tensors on the model's device: `host_scalars` reads them back once per step (a `.item()` per
    term and layer would stall the host's run-ahead hundreds of times per micro-batch at 80 layers)."""
    if not ctx.records:
        return
    n_layers = len(ctx.records)
    for layer, rec in ctx.records.items():
        for term, value in rec["losses"].items():
            key = f"router/{term}"
            stats[key] = stats.get(key, 0.0) + value.detach().float() / (n_layers * grad_accum)
        share_E = rec["share_E"].detach().float() / grad_accum
        for e in range(share_E.shape[0]):
            key = f"routing/layer{layer:02d}/{names[e]}"
            stats[key] = stats.get(key, 0.0) + share_E[e]


def host_scalars(stats: dict) -> dict[str, float]:
    """Every tensor of `stats` as a Python float, through one device-to-host copy."""
    keys = [k for k, v in stats.items() if torch.is_tensor(v)]
    if keys:
        values = torch.stack([stats[k].detach().float().reshape(()) for k in keys]).cpu().tolist()
        stats = {**stats, **dict(zip(keys, values))}
    return stats


def train_step(engine, blocks, big_batch: dict, *, stage: int, micro_batch: int, grad_accum: int,
               names: list[str], dp_group, dp: int, external=None, objective=None,
               prefix: ReferencePrefix | None = None) -> dict:
    """One optimizer step over `grad_accum` micro-batches of `big_batch`; returns the step's scalars
    (`_tokens`: this rank's token count). Stage 1 forces every token to its one expert; stage 2
    routes and adds the router losses. `external`: experts held outside the engine, stepped after
    the engine's last micro-batch. `objective` (train/objectives.py, stage 1): a preference loss
    over `micro_batch` pairs per micro-batch (2 rows each); None or sft: the LM loss. `prefix`: the
    reference forward's layers below the first expert layer shared with the policy forward.

    `big_batch` comes from the data loader on the CPU; each micro-batch is moved to the rank's
    device here (DeepSpeed's forward moves no inputs), and every scalar of the step stays there
    until one copy back at the end: the all-reduce over the data-parallel ranks needs device
    tensors under NCCL."""
    device = rank_device()
    stats: dict = {}
    task_sum = torch.zeros(len(names), device=device)
    task_cnt = torch.zeros(len(names), device=device)
    tokens = 0
    pairs = objective is not None and objective.pairs
    needs_reference = pairs and objective.needs_reference()
    rows = micro_batch * (2 if pairs else 1)
    pref: dict = {}
    reference_s = 0.0  # this rank's time in the reference forwards: what precomputing them would save
    for i in range(grad_accum):
        cpu_batch = {k: v[i * rows:(i + 1) * rows] for k, v in big_batch.items()}
        local_ex, task_N = local_examples(cpu_batch)  # on the CPU: the mask indexes a CPU arange
        batch = on_rank_device({**cpu_batch, "_local_ex": local_ex, "_task_N": task_N})
        ids, labels = batch["input_ids"], batch["labels"]
        ref_BS = None
        if needs_reference:
            # the reference policy: the same engine with the expert off (the frozen backbone)
            set_routing_context(blocks, RoutingContext(reference=True, compute_losses=False))
            t_ref = time.perf_counter()
            with torch.no_grad(), prefix.reference() if prefix else contextlib.nullcontext():
                ref_BS = engine(ids, labels)
            reference_s += time.perf_counter() - t_ref
        ctx = RoutingContext.from_batch(labels, batch["_local_ex"], batch["_task_N"],
                                        force_expert=0 if stage == 1 else None, compute_losses=stage == 2)
        set_routing_context(blocks, ctx)
        with prefix.policy() if prefix else contextlib.nullcontext():  # nothing kept: the whole forward
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
            row_loss = (token_loss_BS.detach().float() * valid).sum(1)
            task = batch["task_label"].clamp(min=0)
            task_sum.index_add_(0, task, row_loss)
            task_cnt.index_add_(0, task, valid.sum(1).float())
            tokens += int(ids.numel())
        stats["train/loss"] = stats.get("train/loss", 0.0) + loss.detach().float() / grad_accum
        record_routing(ctx, stats, names, grad_accum)
    if external is not None and external.trains:
        external.step()
    # what the data-parallel ranks optimise together, and the preference scalars over all their pairs
    keys = sorted(pref)
    summed = torch.stack([stats["train/loss"].reshape(()), *(pref[k].float().reshape(()) for k in keys)])
    dist.all_reduce(summed, group=dp_group)
    stats["train/loss"] = summed[0] / dp
    stats |= {k: v / dp for k, v in zip(keys, summed[1:])}
    if stage == 2:
        for t, name in enumerate(names):
            stats[f"_task_loss/{name}"] = task_sum[t] / task_cnt[t].clamp(min=1)
            stats[f"_task_cnt/{name}"] = task_cnt[t]
    stats = host_scalars(stats)  # the step's one device-to-host copy
    if stage == 2:
        for name in names:
            loss_t, count = stats.pop(f"_task_loss/{name}"), stats.pop(f"_task_cnt/{name}")
            if count > 0:
                stats[f"train/loss_{name}"] = loss_t
    if needs_reference:
        stats["time/reference_s"] = reference_s
    stats["_tokens"] = tokens
    return stats
