"""Worker for the core-attention test. argv: TINY_DIR JSON{"tp"}.

At this run's TP, builds the MoCaE model (LoRA and full experts, top-2, router losses on) with
`eager`, with `sdpa`, and with each under activation recomputation (`model.activation_checkpointing`:
full for both, the router losses riding the recomputed layers; selective, core attention only, for
eager, the one attention it is allowed with), all from the same weights, runs one forward and
backward with every parameter trainable, and reports the largest differences in logits, loss and
every gradient over all ranks (fp32), which attention module each build holds, and how often the
core attention ran per layer in the training step (2 where it was recomputed).
"""
import json
import sys

from tests.dist import worker_setup, write_result

worker_setup()

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from trinityx_ds.model.arch import ModelArch  # noqa: E402
from trinityx_ds.model.build import build_model  # noqa: E402
from trinityx_ds.model.mocae import (  # noqa: E402
    MoCaEConfig,
    RoutingContext,
    set_router_loss_scale,
    set_routing_context,
)
from trinityx_ds.model.tiny import mocae_source  # noqa: E402
from trinityx_ds.model.weights import load_weights  # noqa: E402
from trinityx_ds.parallel.groups import init_parallel  # noqa: E402

folder, opt = sys.argv[1], json.loads(sys.argv[2])
dims = init_parallel(tp=opt["tp"], seed=5)
arch = ModelArch.from_hf_dir(folder)
B, S = 2, 16
ids = torch.randint(0, arch.vocab_size, (B, S), generator=torch.Generator().manual_seed(11))
labels = ids.roll(-1, 1)
labels[:, -1] = -100
labels[0, :3] = -100  # a prompt: masked out of the loss and of the router losses' token mask
set_router_loss_scale(1.0)


def run(attention: str, cfg: MoCaEConfig, recompute: str = "none") -> dict:
    model, blocks = build_model(arch, dims, cfg, attention=attention, activation_checkpointing=recompute)
    layer0 = model.decoder.layers[0].self_attention
    calls = []
    hook = layer0.core_attention.register_forward_hook(lambda *a: calls.append(1))
    missing = load_weights(model, mocae_source(folder, cfg, seed=2), arch, dims.tp, dims.tp_rank, moe_cfg=cfg)
    assert missing == [], missing
    for p in model.parameters():
        p.requires_grad_(True)
    ctx = RoutingContext.from_batch(labels)
    set_routing_context(blocks, ctx)
    loss = model.token_losses(ids, labels).sum() / (labels >= 0).sum()
    loss.backward()
    hook.remove()
    assert ctx.records, "router losses were not computed"
    with torch.no_grad():
        set_routing_context(blocks, RoutingContext(compute_losses=False))
        logits = model.logits(ids)
    core = type(model.decoder.layers[0].self_attention.core_attention).__name__
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    n_params = sum(1 for _ in model.parameters())
    return {"loss": loss.detach(), "logits": logits, "grads": grads, "core": core, "n_params": n_params,
            "core_calls": len(calls), "selective": bool(layer0.checkpoint_core_attention)}


def largest_diff(a: dict, b: dict) -> float:
    return max((a["grads"][n] - b["grads"][n]).abs().max().item() for n in a["grads"])


out = {"tp": dims.tp, "heads": [arch.num_heads, arch.num_kv_heads, arch.padded_heads(dims.tp), arch.padded_kv_heads(dims.tp)]}
for kind in ("lora", "full"):
    cfg = MoCaEConfig(kind=kind, top_k=2)
    eager, sdpa = run("eager", cfg), run("sdpa", cfg)
    recomputed = {"sdpa full": run("sdpa", cfg, "full"), "eager full": run("eager", cfg, "full"),
                  "eager selective": run("eager", cfg, "selective")}
    assert all(sorted(r["grads"]) == sorted(eager["grads"]) for r in (sdpa, *recomputed.values()))
    diffs = torch.tensor([
        (eager["logits"] - sdpa["logits"]).abs().max().item(),
        (eager["loss"] - sdpa["loss"]).abs().item(),
        max((eager["grads"][n] - sdpa["grads"][n]).abs().max().item() for n in eager["grads"]),
        max(g.abs().max().item() for g in eager["grads"].values()),
        # under recomputation: the same function, recomputed in backward, against the same attention
        *(largest_diff(r, sdpa if name.startswith("sdpa") else eager) for name, r in recomputed.items()),
    ])
    dist.all_reduce(diffs, op=dist.ReduceOp.MAX)
    n_grads = torch.tensor([len(eager["grads"]), eager["n_params"]])
    dist.all_reduce(n_grads, op=dist.ReduceOp.MIN)
    out[kind] = {"logits": diffs[0].item(), "loss": diffs[1].item(), "grad": diffs[2].item(),
                 "grad_scale": diffs[3].item(), "n_grads": int(n_grads[0]), "n_params": int(n_grads[1]),
                 "recompute_grad": {name: diffs[4 + i].item() for i, name in enumerate(recomputed)},
                 "core_calls": {name: r["core_calls"] for name, r in {"none": eager, **recomputed}.items()},
                 "selective": {name: r["selective"] for name, r in {"none": eager, **recomputed}.items()},
                 "core": [eager["core"], sdpa["core"]],
                 "router_grad": max(eager["grads"][n].abs().max().item() for n in eager["grads"] if ".router." in n)}
write_result(out)
