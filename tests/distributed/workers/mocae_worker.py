"""Worker for the MoCaE tests. argv: MODE TINY_DIR [JSON options].

zero_delta : experts at zero delta (LoRA B = 0, full = copies of the FFN) -> logits == backbone.
math       : one block (TP=1) against hand-written p-weighted sums of forced single experts.
generate   : KV-cached greedy generation against the uncached loop (the same tokens).
loss_rows  : token_losses (the labelled positions only through the output layer) against the full
             logits scored everywhere: losses and router/expert gradients.
parallel   : logits, loss and HF-space gradients of router and experts at this run's TP/EP on
             the global batch split over data-parallel ranks; rank 0 writes them (or compares
             with a reference file) so TP x EP can be checked against TP=1 x EP=1.
starved    : every token routed to expert 0, 3 SGD steps across EP ranks.
"""
import json
import sys

from tests.dist import worker_setup, write_result

worker_setup()

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from megatron.core import parallel_state as ps  # noqa: E402

from trinityx_ds.model.arch import ModelArch  # noqa: E402
from trinityx_ds.model.backbone import masked_mean_loss, vocab_parallel_token_losses  # noqa: E402
from trinityx_ds.eval.generate import generate_batch, generate_batch_uncached  # noqa: E402
from trinityx_ds.model.build import build_model  # noqa: E402
from trinityx_ds.model.mocae import MoCaEConfig, RoutingContext, set_routing_context  # noqa: E402
from trinityx_ds.model.mocae_adapter import MoCaEAdapter  # noqa: E402
from trinityx_ds.model.tiny import mocae_source  # noqa: E402
from trinityx_ds.model.weights import load_weights  # noqa: E402
from trinityx_ds.parallel.groups import init_parallel  # noqa: E402

mode, folder = sys.argv[1], sys.argv[2]
opt = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
dims = init_parallel(tp=opt.get("tp", 1), ep=opt.get("ep", 1), seed=5)
arch = ModelArch.from_hf_dir(folder)
B, S = 2, 12


def make(cfg, src):
    model, blocks = build_model(arch, dims, cfg)
    missing = load_weights(model, src, arch, dims.tp, dims.tp_rank, moe_cfg=cfg)
    assert missing == [], missing
    return model, blocks


def global_batch(n_dp):
    ids = torch.randint(0, arch.vocab_size, (n_dp * B, S), generator=torch.Generator().manual_seed(11))
    labels = ids.roll(-1, 1)
    labels[:, -1] = -100
    return ids, labels


if mode == "zero_delta":
    out = {}
    for kind in ("lora", "full"):
        for top_k in (1, "all"):
            cfg = MoCaEConfig(kind=kind, top_k=top_k)
            src = mocae_source(folder, cfg, zero_delta=True)
            model, blocks = make(None, src)
            ids, _ = global_batch(1)
            with torch.no_grad():
                ref = model.logits(ids)
            model, blocks = make(cfg, src)
            with torch.no_grad():
                got = model.logits(ids)
            out[f"{kind}/top{top_k}"] = (got - ref).abs().max().item()
    write_result(out)

elif mode == "math":
    out = {}
    for kind in ("lora", "full"):
        for top_k, renorm in ((1, True), (2, True), (2, False), (3, True)):
            cfg = MoCaEConfig(kind=kind, top_k=top_k, renormalize=renorm, layers=[0])
            model, blocks = make(cfg, mocae_source(folder, cfg, seed=1))
            block = blocks[0]
            h_SBH = torch.randn(S, B, arch.hidden_size, generator=torch.Generator().manual_seed(3))
            with torch.no_grad():
                got, _ = block(h_SBH)
                experts = []
                for e in range(3):
                    block.ctx = RoutingContext(force_expert=e, compute_losses=False)
                    experts.append(block(h_SBH)[0].reshape(S * B, -1))
                block.ctx = None
                p_TE = block.router(h_SBH.reshape(S * B, -1)).probs_TE
                E_TEH = torch.stack(experts, 1)
                order = p_TE.argsort(dim=-1, descending=True, stable=True)[:, :top_k]
                mask_TE = torch.zeros_like(p_TE).scatter(1, order, 1.0)
                w_TE = p_TE * mask_TE
                if renorm:
                    w_TE = w_TE / w_TE.sum(-1, keepdim=True)
                want = (w_TE.unsqueeze(-1) * E_TEH).sum(1)  # hand-written sum_i w_i E_i(h)
            # relative to the output's scale: the LoRA path mixes before the down projection
            out[f"{kind}/top{top_k}/renorm={renorm}"] = ((got.reshape(S * B, -1) - want).abs().max()
                                                         / want.abs().max()).item()
            out[f"{kind}/experts_differ"] = (E_TEH[:, 0] - E_TEH[:, 1]).abs().max().item()
    write_result(out)

elif mode == "generate":
    # KV-cached generation (megatron's static inference context) against re-running every sequence:
    # the same greedy tokens for prompts of different lengths, routed LoRA and full experts, both
    # core attentions, and an EOS that ends one row early
    out = {}
    prompts = [[int(t) for t in torch.randint(3, arch.vocab_size, (n,), generator=torch.Generator().manual_seed(n))]
               for n in (3, 9, 5)]
    for kind, top_k, attention in (("lora", 2, "sdpa"), ("lora", 1, "eager"), ("full", 2, "sdpa")):
        cfg = MoCaEConfig(kind=kind, top_k=top_k, layers=[1])
        model, blocks = build_model(arch, dims, cfg, attention=attention)
        assert load_weights(model, mocae_source(folder, cfg, seed=1), arch, dims.tp, dims.tp_rank, moe_cfg=cfg) == []
        model.eval()
        free = generate_batch_uncached(model, prompts, max_new_tokens=12, eos_ids=set(), pad=0)
        eos = {free[0][3]}  # row 0 ends at its 4th token; the others where (if) they draw it
        case = f"{kind}/top{top_k}/{attention}"
        for name, ids in (("free", set()), ("eos", eos)):
            out[f"{case}/{name}"] = {
                "cached": generate_batch(model, prompts, max_new_tokens=12, eos_ids=ids, pad=0),
                "uncached": generate_batch_uncached(model, prompts, max_new_tokens=12, eos_ids=ids, pad=0)}
    write_result(out)

elif mode == "loss_rows":
    # token_losses sends only the labelled positions through the output layer: the same losses and
    # router/expert gradients as the full [S, B, V] logits scored everywhere and masked
    cfg = MoCaEConfig(kind="lora", top_k=2)
    model, blocks = make(cfg, mocae_source(folder, cfg, seed=1))
    for n, p in model.named_parameters():
        p.requires_grad_(".mlp.router." in n or ".mlp.experts." in n)
    ids, labels = global_batch(1)
    labels[:, :5] = -100  # a prompt
    labels[0, 8:] = -100  # a shorter row

    def losses_and_grads(fn):
        model.zero_grad(set_to_none=True)
        loss_BS = fn()
        masked_mean_loss(loss_BS, labels).backward()
        return loss_BS.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    got, got_g = losses_and_grads(lambda: model.token_losses(ids, labels))
    want, want_g = losses_and_grads(lambda: vocab_parallel_token_losses(
        model.local_logits(ids).float().contiguous(), labels.t().contiguous()).t())
    write_result({"loss_diff": (got - want).abs().max().item(), "masked_zero": bool((got[labels < 0] == 0).all()),
                  "names_equal": got_g.keys() == want_g.keys(), "n_grads": len(got_g),
                  "grad_diff": max((got_g[n] - want_g[n]).abs().max().item() for n in got_g),
                  "loss_mean": got[labels >= 0].mean().item()})

elif mode in ("parallel", "starved"):
    cfg = MoCaEConfig(kind=opt.get("kind", "full"), top_k=opt.get("top_k", 2),
                      expert_names=[f"e{i}" for i in range(opt.get("experts", 3))],
                      importance=opt.get("importance"), renormalize=opt.get("renormalize", True))
    model, blocks = make(cfg, mocae_source(folder, cfg, seed=2, router_std=0.0 if mode == "starved" else 0.5))
    trainable = {n: p for n, p in model.named_parameters() if ".mlp.router." in n or ".mlp.experts." in n}
    for n, p in model.named_parameters():
        p.requires_grad_(n in trainable)
    ids, labels = global_batch(opt.get("global_dp", dims.dp))  # the reference sees every rank's batch
    dp_rank, per = ps.get_data_parallel_rank(), ids.shape[0] // dims.dp
    ids, labels = ids[dp_rank * per:(dp_rank + 1) * per], labels[dp_rank * per:(dp_rank + 1) * per]
    held = sorted({int(n.split(".local.")[1].split(".")[0]) for n in trainable if ".local." in n})
    steps = 3 if mode == "starved" else 1
    opt_ = torch.optim.SGD(trainable.values(), lr=0.1)
    losses = []
    for _ in range(steps):
        ctx = RoutingContext.from_batch(labels)
        ctx.compute_losses = False
        set_routing_context(blocks, ctx)
        loss = model.token_losses(ids, labels).sum()  # a sum: DP ranks' gradients add up to the global one
        loss.backward()
        total = loss.detach().clone()
        dist.all_reduce(total, group=ps.get_data_parallel_group())
        losses.append(total.item())
        shares = {l: r["share_E"].tolist() for l, r in ctx.records.items()}
        if mode == "starved":
            opt_.step()
            opt_.zero_grad()
    result = {"losses": losses, "held_experts": held, "shares": shares, "rank": dims.rank,
              "expert_params": sum(p.numel() for n, p in trainable.items() if ".experts." in n)}
    if mode == "parallel":
        # HF-space gradients: sum each tensor's gradient over the ranks with the same TP rank
        # (data-parallel copies of the router, expert-data-parallel copies of experts), then unshard.
        mine = {n: (p.detach(), p.grad.detach()) for n, p in trainable.items()}
        every = [None] * dims.world_size
        dist.all_gather_object(every, (dims.tp_rank, mine))
        if dims.rank == 0:
            def view(which):
                def shard(r, name):
                    vals = [m[name][which] for tr, m in every if tr == r and name in m]
                    return vals[0] if which == 0 else torch.stack(vals).sum(0)
                return shard
            adapter = MoCaEAdapter(cfg, dims.tp)
            names0 = sorted({n for tr, m in every if tr == 0 for n in m})
            grads, params = {}, {}
            for layer in cfg.layer_ids(arch.num_layers):
                names = [n for n in names0 if n.startswith(f"decoder.layers.{layer}.")]
                grads.update({k: v for k, v in adapter.unshard(layer, view(1), names)})
                params.update({k: v for k, v in adapter.unshard(layer, view(0), names)})
        with torch.no_grad():
            logits = model.logits(ids)
        gathered = [None] * dims.world_size
        dist.all_gather_object(gathered, (dp_rank, logits))
        if dims.rank == 0:
            logits_all = torch.cat([lg for _, lg in sorted({d: lg for d, lg in gathered}.items())])
            state = {"grads": grads, "params": params, "logits": logits_all, "loss": losses[0]}
            if opt.get("save"):
                torch.save(state, opt["save"])
            if opt.get("compare"):
                ref = torch.load(opt["compare"], weights_only=True)
                result["max_grad_diff"] = max((grads[k] - ref["grads"][k]).abs().max().item() for k in ref["grads"])
                result["max_param_diff"] = max((params[k] - ref["params"][k]).abs().max().item() for k in ref["params"])
                result["grad_names_equal"] = sorted(grads) == sorted(ref["grads"])
                result["n_grads"] = len(grads)
                result["logits_diff"] = (logits_all - ref["logits"]).abs().max().item()
                result["loss_diff"] = abs(losses[0] - ref["loss"])
    per_rank = [None] * dims.world_size
    every_expert = {n: list(p.shape) for n, p in model.named_parameters() if ".experts." in n}
    dist.all_gather_object(per_rank, {"held": held, "expert_params": result["expert_params"], "tp_rank": dims.tp_rank,
                                      "all_expert_numel": sum(p.numel() for n, p in model.named_parameters()
                                                              if ".experts." in n),
                                      "expert_shapes": sorted({tuple(v) for v in every_expert.values()}),
                                      "arch": [arch.num_layers, arch.hidden_size, arch.intermediate_size]})
    result["per_rank"] = per_rank
    write_result(result)
