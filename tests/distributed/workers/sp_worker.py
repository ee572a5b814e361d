"""Worker for the sequence-parallel test. argv: TINY_DIR JSON{"ep", "configs": [{MoCaEConfig fields}]}.

At TP=2 (x DP=ep when the experts are placed by EP), builds each MoCaE model twice from the same
weights, with `sequence_parallel` off and on, and runs two forward/backward passes (the second
with a routing EMA, so kl_prev is live) with every router loss on, task labels and a masked
prompt; or ("force") as stage 1 trains one expert: every token to it, no router losses. Reports, as the largest difference over all ranks: logits, loss, every MoCaE gradient
(router, experts, post-mix norm), every router-loss value (relative to its size beyond 1) and the
routing shares of every layer.
Each data-parallel rank brings its own tokens (EP's all-to-all then exchanges real work).
"""
import json
import sys
from dataclasses import replace

from tests.dist import worker_setup, write_result

worker_setup()

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from trinityx_ds.config.schema import RouterLossConfig  # noqa: E402
from trinityx_ds.model.arch import ModelArch  # noqa: E402
from trinityx_ds.model.build import build_model  # noqa: E402
from trinityx_ds.model.mocae import (  # noqa: E402
    MoCaEConfig,
    RoutingContext,
    set_router_loss_scale,
    set_routing_context,
)
from trinityx_ds.model.mocae_spec import EXPERTS, mocae_role  # noqa: E402
from trinityx_ds.model.tiny import mocae_source  # noqa: E402
from trinityx_ds.model.weights import load_weights  # noqa: E402
from trinityx_ds.parallel.groups import init_parallel  # noqa: E402

folder, opt = sys.argv[1], json.loads(sys.argv[2])
dims = init_parallel(tp=2, ep=opt["ep"], seed=5)
arch = ModelArch.from_hf_dir(folder)
B, S = 2, 16
g = torch.Generator().manual_seed(11 + dims.dp_rank)  # each data-parallel rank its own tokens
BATCHES = []
for _ in range(2):  # two batches: the second one's routing differs from the EMA of the first (kl_prev > 0)
    ids = torch.randint(0, arch.vocab_size, (B, S), generator=g)
    labels = ids.roll(-1, 1)
    labels[:, -1] = -100
    labels[0, :5] = -100  # a prompt: out of the loss and of the router losses' token mask
    BATCHES.append((ids, labels))
example_id = torch.arange(B)[:, None].expand(B, S)
task_label = torch.tensor([0, 2])
ALL_LOSSES = RouterLossConfig(entropy=0.1, kl_prev=0.05, kl_uniform=0.05, task_ce=0.2, load_balance=0.01,
                              z_loss=0.001)
set_router_loss_scale(1.0)


def run(cfg: MoCaEConfig, sp: bool, force: bool = False) -> dict:
    model, blocks = build_model(arch, dims, cfg, sequence_parallel=sp)
    assert all(b.sequence_parallel == sp for b in blocks)
    missing = load_weights(model, mocae_source(folder, cfg, seed=2), arch, dims.tp, dims.tp_rank, moe_cfg=cfg)
    assert missing == [], missing
    for n, p in model.named_parameters():
        # stage 1 (forced) trains the experts only; routed: the router, the experts and the post-mix norm
        p.requires_grad_(mocae_role(n) == EXPERTS if force else mocae_role(n) is not None)
    records, losses = [], []
    for ids, labels in BATCHES:  # the second pass has a routing EMA: kl_prev is live
        ctx = (RoutingContext.from_batch(labels, example_id, task_label) if not force
               else RoutingContext(force_expert=0, compute_losses=False))
        set_routing_context(blocks, ctx)
        loss = model.token_losses(ids, labels).sum() / (labels >= 0).sum()
        loss.backward()
        losses.append(loss.detach())
        records.append(ctx.records)
    with torch.no_grad():
        set_routing_context(blocks, RoutingContext(compute_losses=False))
        logits = model.logits(BATCHES[0][0])
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    trainable = sum(1 for p in model.parameters() if p.requires_grad)
    return {"loss": torch.stack(losses), "logits": logits, "grads": grads, "records": records,
            "trainable": trainable, "ema": torch.stack([b.routing_ema.ema_LE for b in blocks])}


def compare(cfg: MoCaEConfig, force: bool) -> dict:
    off, on = run(cfg, False, force), run(cfg, True, force)
    assert sorted(off["grads"]) == sorted(on["grads"]), (sorted(off["grads"]), sorted(on["grads"]))
    # relative beyond 1: z_loss (squared log-sum-exp) is ~100 here, summed in another order under SP
    router_loss = max([((a["losses"][k] - b["losses"][k]).abs() / a["losses"][k].abs().clamp_min(1)).item()
                       for ra, rb in zip(off["records"], on["records"]) for layer, a in ra.items()
                       for b in [rb[layer]] for k in a["losses"]], default=0.0)
    share = max([(a["share_E"] - rb[layer]["share_E"]).abs().max().item()
                 for ra, rb in zip(off["records"], on["records"]) for layer, a in ra.items()], default=0.0)
    kl_prev = min([r["losses"]["kl_prev"].item() for r in off["records"][1].values()], default=0.0)
    diffs = torch.tensor([
        (off["logits"] - on["logits"]).abs().max().item(),
        (off["loss"] - on["loss"]).abs().max().item(),
        max((off["grads"][n] - on["grads"][n]).abs().max().item() for n in off["grads"]),
        max([(off["grads"][n] - on["grads"][n]).abs().max().item() for n in off["grads"] if ".router." in n],
            default=0.0),
        router_loss, share, (off["ema"] - on["ema"]).abs().max().item(),
    ])
    dist.all_reduce(diffs, op=dist.ReduceOp.MAX)
    counts = torch.tensor([len(off["grads"]), off["trainable"], len(on["grads"]), on["trainable"]])
    dist.all_reduce(counts, op=dist.ReduceOp.MIN)
    out = {"logits": diffs[0].item(), "loss": diffs[1].item(), "grad": diffs[2].item(),
           "router_grad": diffs[3].item(), "router_loss": diffs[4].item(), "share": diffs[5].item(),
           "ema": diffs[6].item(), "counts": counts.tolist(), "kl_prev": kl_prev,
           "grad_scale": max(g.abs().max().item() for g in off["grads"].values()),
           "router_grad_scale": max([g.abs().max().item() for n, g in off["grads"].items() if ".router." in n],
                                    default=0.0)}
    if not force:
        first = off["records"][0][min(off["records"][0])]
        out |= {"task_ce": first["losses"]["task_ce"].item(), "share_E": first["share_E"].tolist()}
    return out


out = {"dims": [dims.tp, dims.dp, dims.ep]}
for c in opt["configs"]:
    name, force = c.pop("name"), c.pop("force", False)
    losses = replace(ALL_LOSSES, task_tokens=c.pop("task_tokens", "response"), task_level=c.pop("task_level", "example"))
    out[name] = compare(MoCaEConfig(**c, loss_weights=losses), force)
write_result(out)
