"""Stage 2's validation: is the routing task-adaptive and calibrated on held-out examples?

Each held-out example's routing distribution is the mean over its response tokens and over the
MoCaE layers; its argmax is the router's task prediction, scored against the example's task
label with accuracy, ECE and Brier (calibration room). Every rank evaluates the same examples:
the held-out sets are small, and ZeRO-3/TP collectives stay in step.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from trinityx_ds.calibration import calibration_report
from trinityx_ds.data.dataset import collate
from trinityx_ds.model.mocae import RoutingContext, set_routing_context
from trinityx_ds.parallel.device import on_rank_device


@torch.no_grad()
def routing_probs(engine, blocks, dataset, micro_batch: int, pad_id: int,
                  pad_to_multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example routing probabilities [N, E], per-layer mean logits [L, N, E] and top-1 shares
    [N, E]: the fraction of the example's response tokens whose argmax is each expert, averaged
    over layers (what top-1 routing acts on, token by token)."""
    probs, logits, shares = [], [], []
    for i in range(0, len(dataset), micro_batch):
        rows = dataset[i:i + micro_batch]
        batch = on_rank_device(collate([dict(zip(rows, v)) for v in zip(*rows.values())], pad_id, pad_to_multiple))
        ctx = RoutingContext.from_batch(batch["labels"], compute_losses=False, keep_probs=True)
        set_routing_context(blocks, ctx)
        engine(batch["input_ids"], batch["labels"])
        B, S = batch["labels"].shape
        mask_BS = (batch["labels"] >= 0).float()
        n_B = mask_BS.sum(1).clamp(min=1).unsqueeze(-1)
        per_layer_p, per_layer_z, per_layer_s = [], [], []
        for rec in ctx.records.values():  # tokens are in megatron's [S, B] order
            p_BSE = rec["probs_TE"].reshape(S, B, -1).transpose(0, 1)
            z_BSE = rec["logits_TE"].reshape(S, B, -1).transpose(0, 1)
            top1_BSE = torch.nn.functional.one_hot(p_BSE.argmax(-1), p_BSE.shape[-1]).to(p_BSE)
            per_layer_p.append((p_BSE * mask_BS.unsqueeze(-1)).sum(1) / n_B)
            per_layer_z.append((z_BSE * mask_BS.unsqueeze(-1)).sum(1) / n_B)
            per_layer_s.append((top1_BSE * mask_BS.unsqueeze(-1)).sum(1) / n_B)
        # to the CPU once per batch: the calibration maths runs in fp64 there, against CPU labels
        probs.append(torch.stack(per_layer_p).mean(0).cpu())
        logits.append(torch.stack(per_layer_z).cpu())
        shares.append(torch.stack(per_layer_s).mean(0).cpu())
    set_routing_context(blocks, None)
    return torch.cat(probs), torch.cat(logits, dim=1), torch.cat(shares)


def routing_report(engine, model, blocks, held_out: dict, names: list[str], micro_batch: int, pad_id: int,
                   out_file: Path | None = None, pad_to_multiple: int = 1) -> dict:
    """The calibration report of the router's task predictions on `held_out` ({task name: its
    held-out rows}), per task accuracy included; written as JSON to `out_file` when given."""
    model.eval()
    probs, labels, shares = [], [], []
    for task_id, name in enumerate(names):
        held = held_out[name]
        if len(held):
            p, _, share = routing_probs(engine, blocks, held, micro_batch, pad_id, pad_to_multiple)
            probs.append(p)
            shares.append(share)
            labels.append(torch.full((len(p),), task_id))
    model.train()
    probs_NE, labels_N, share_NE = torch.cat(probs).double(), torch.cat(labels), torch.cat(shares).double()
    report = calibration_report(probs_NE, labels_N)
    report["per_task_accuracy"] = {name: (probs_NE[labels_N == t].argmax(-1) == t).double().mean().item()
                                   for t, name in enumerate(names) if (labels_N == t).any()}
    # per task: the mean share of an example's response tokens (and layers) whose top-1 is its own expert
    report["per_task_token_accuracy"] = {name: share_NE[labels_N == t, t].mean().item()
                                         for t, name in enumerate(names) if (labels_N == t).any()}
    if out_file is not None:
        Path(out_file).write_text(json.dumps(report, indent=2))
    return report
