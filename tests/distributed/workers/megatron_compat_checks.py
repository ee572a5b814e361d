"""Each megatron CPU patch checked by equivalence, in one 2-process launch (megatron's import
alone costs ~3 s per process). Usage: megatron_compat_checks.py [check ...]; rank 0 reports
{check: measurements} and tests/distributed/test_megatron_compat_dist.py judges them."""

import functools
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    all_to_all,
    get_cuda_rng_tracker,
    model_parallel_cuda_manual_seed,
)
from megatron.core.transformer import TransformerConfig

from tests.dist import worker_setup, write_result
from trinityx_ds.parallel.megatron_compat import apply_cpu_patches

VOCAB, SEQ, BATCH = 128, 8, 2
POSITIONS = torch.arange(SEQ).expand(BATCH, SEQ)
RANK = None  # set in __main__


def parallel(tp=1, pp=1, ep=1):
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        expert_model_parallel_size=ep,
    )
    model_parallel_cuda_manual_seed(0)


def gather(t, dim):
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim)


def max_over_ranks(value):
    value = torch.tensor(float(value.detach()))
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value.item()


def gpt_config(**overrides):
    kwargs = dict(
        num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
        ffn_hidden_size=128, gated_linear_unit=True, activation_func=F.silu,
        add_bias_linear=False, normalization="RMSNorm", use_cpu_initialization=True,
        hidden_dropout=0.0, attention_dropout=0.0, tensor_model_parallel_size=2,
        pipeline_dtype=torch.float32, params_dtype=torch.float32,
    )  # fmt: skip
    return TransformerConfig(**{**kwargs, **overrides})


def gpt(config, spec=None, **kwargs):
    spec = spec or get_gpt_layer_local_spec(normalization="RMSNorm")
    return GPTModel(config, spec, VOCAB, SEQ, position_embedding_type="rope", **kwargs)


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def loss_and_grads(model):
    tokens, labels = batch()
    loss = model(tokens, POSITIONS, None, labels=labels).mean()
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters()}


def check_tp_linears():
    """ColumnParallelLinear -> RowParallelLinear at TP=2 equals two dense torch linears."""
    parallel(tp=2)
    config = gpt_config()
    init = functools.partial(torch.nn.init.normal_, std=0.02)  # megatron's default init
    col = ColumnParallelLinear(16, 32, config=config, init_method=init, gather_output=False)
    row = RowParallelLinear(
        32, 16, config=config, init_method=init, bias=True, input_is_parallel=True,
        skip_bias_add=False,
    )
    with torch.no_grad():  # biases start at zero: make them count (same values on both ranks)
        col.bias.copy_(torch.linspace(-0.1, 0.1, 32).chunk(2)[RANK])
        row.bias.copy_(torch.linspace(-0.1, 0.1, 16))
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
    out, _ = row(col(x)[0])
    (out**2).sum().backward()

    dense = {
        "w1": gather(col.weight.detach(), 0), "b1": gather(col.bias.detach(), 0),
        "w2": gather(row.weight.detach(), 1), "b2": row.bias.detach(),
    }  # fmt: skip
    dense = {k: v.clone().requires_grad_() for k, v in dense.items()}
    x_ref = x.detach().clone().requires_grad_()
    ref = F.linear(F.linear(x_ref, dense["w1"], dense["b1"]), dense["w2"], dense["b2"])
    (ref**2).sum().backward()
    return {
        "forward": max_over_ranks((out - ref).abs().max()),
        "grad_x": max_over_ranks((x.grad - x_ref.grad).abs().max()),
        "grad_w1": max_over_ranks((gather(col.weight.grad, 0) - dense["w1"].grad).abs().max()),
        "grad_b1": max_over_ranks((gather(col.bias.grad, 0) - dense["b1"].grad).abs().max()),
        "grad_w2": max_over_ranks((gather(row.weight.grad, 1) - dense["w2"].grad).abs().max()),
        "grad_b2": max_over_ranks((row.bias.grad - dense["b2"].grad).abs().max()),
    }


def check_sequence_parallel():
    """GPTModel at TP=2: sequence parallel changes neither the loss nor the summed grads."""
    parallel(tp=2)
    plain = gpt(gpt_config())
    sp = gpt(gpt_config(sequence_parallel=True))
    sp.load_state_dict(plain.state_dict())
    loss, grads = loss_and_grads(plain)
    sp_loss, sp_grads = loss_and_grads(sp)
    marked = sorted(n for n, p in sp.named_parameters() if getattr(p, "sequence_parallel", False))
    for name in marked:  # what megatron's finalize_model_grads does for these params
        dist.all_reduce(sp_grads[name], group=ps.get_tensor_model_parallel_group())
    return {
        "loss": loss,
        "sp_loss": sp_loss,
        "grad_diff": max_over_ranks(max((grads[n] - sp_grads[n]).abs().max() for n in grads)),
        "marked": marked,
    }


def check_rng_tracker():
    """Dropout under the tracker's fork: reproducible, per TP rank; outside it: same on all."""
    parallel(tp=2)
    x = torch.ones(256)

    def draws(fork):
        model_parallel_cuda_manual_seed(123)
        inside = None
        if fork:
            with get_cuda_rng_tracker().fork():
                inside = F.dropout(x, 0.5)
        return inside, F.dropout(x, 0.5)

    inside, outside = draws(fork=True)
    inside_again, outside_again = draws(fork=True)
    _, outside_without_fork = draws(fork=False)
    inside_all, outside_all = gather(inside[None], 0), gather(outside[None], 0)
    return {
        "inside_reproducible": bool(torch.equal(inside, inside_again)),
        "outside_reproducible": bool(torch.equal(outside, outside_again)),
        "fork_leaves_default_stream": bool(torch.equal(outside, outside_without_fork)),
        "inside_differs_across_tp": not torch.equal(inside_all[0], inside_all[1]),
        "outside_same_across_tp": bool(torch.equal(outside_all[0], outside_all[1])),
    }


def check_all_to_all():
    """Uneven all-to-all (rank 0 sends 1|2 rows, rank 1 sends 3|1), splits as lists or tensors.

    Row i of rank r holds 10 r + i, so the rows received name their origin; the backward pass
    must send each receiver's grad (here its row position + 1) back to the row's origin.
    """
    parallel(tp=2)
    group = ps.get_tensor_model_parallel_group()
    splits = [[1, 2], [3, 1]]  # splits[src][dst]: rows src sends to dst
    send = splits[RANK]
    recv = [splits[src][RANK] for src in range(2)]
    x = torch.tensor([[10.0 * RANK + i] * 2 for i in range(sum(send))])
    expected = [
        10.0 * src + i
        for src in range(2)
        for i in range(sum(splits[src][:RANK]), sum(splits[src][: RANK + 1]))
    ]
    out = {"expected": expected}
    for kind, wrap in (("lists", list), ("tensors", torch.tensor)):
        inp = x.clone().requires_grad_()
        y = all_to_all(group, inp, wrap(recv), wrap(send))
        (y * torch.arange(1.0, y.shape[0] + 1)[:, None]).sum().backward()
        received = [None, None]
        dist.all_gather_object(received, y[:, 0].tolist())
        position = {v: k + 1 for rows in received for k, v in enumerate(rows)}
        out[kind] = {
            "received": y[:, 0].tolist(),
            "grad": inp.grad[:, 0].tolist(),
            "expected_grad": [position[v] for v in x[:, 0].tolist()],
        }
    return out


def check_moe():
    """A GPTModel with 4 experts at EP=2 (alltoall dispatcher) equals the EP=1 model.

    Both ranks feed the same batch, so at EP=2 each expert sees the tokens of both ranks: its
    grad is twice the EP=1 grad until megatron's expert-data-parallel reduction (size 1 here).
    """
    spec = get_gpt_layer_local_spec(num_experts=4, moe_grouped_gemm=False, normalization="RMSNorm")
    moe = dict(
        tensor_model_parallel_size=1, num_moe_experts=4, moe_router_topk=2,
        moe_token_dispatcher_type="alltoall", moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
    )  # fmt: skip
    parallel(ep=1)
    full = gpt(gpt_config(**moe), spec)
    loss, grads = loss_and_grads(full)
    parallel(ep=2)
    sharded = gpt(gpt_config(expert_model_parallel_size=2, **moe), spec)
    to_full = {}
    for name in sharded.state_dict():
        prefix, expert, rest = name.partition("local_experts.")
        index, _, tail = rest.partition(".")
        to_full[name] = f"{prefix}{expert}{2 * RANK + int(index)}.{tail}" if expert else name
    sharded.load_state_dict({n: full.state_dict()[f] for n, f in to_full.items()})
    ep_loss, ep_grads = loss_and_grads(sharded)
    grad_diff = max(
        (g - grads[to_full[n]] * (2 if "local_experts" in n else 1)).abs().max()
        for n, g in ep_grads.items()
    )
    return {"loss": loss, "ep_loss": ep_loss, "grad_diff": max_over_ranks(grad_diff)}


def check_pipeline():
    """1F1B at PP=2 (one layer per stage) equals the no-pipelining schedule on one process."""
    num_microbatches = 2
    data = [batch(seed) for seed in range(num_microbatches)]

    def run(model):
        def forward_step(data_iterator, model):
            tokens, labels = next(data_iterator)
            output = model(tokens, POSITIONS, None, labels=labels)
            return output, lambda out: (out.mean(), {"loss": out.mean().detach().clone()})

        losses = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(data), model=[model],
            num_microbatches=num_microbatches, seq_length=SEQ, micro_batch_size=BATCH,
            forward_only=False,
        )  # fmt: skip
        return sum(d["loss"].item() for d in losses) / num_microbatches if losses else None

    untied = dict(share_embeddings_and_output_weights=False)
    parallel(tp=1, pp=1)
    full = gpt(gpt_config(tensor_model_parallel_size=1), **untied)
    loss = run(full)
    full_grads = {n: p.grad for n, p in full.named_parameters()}

    parallel(tp=1, pp=2)
    config = gpt_config(tensor_model_parallel_size=1, pipeline_model_parallel_size=2)
    first, last = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
    stage = gpt(config, pre_process=first, post_process=last, **untied)
    layer = f"layers.{ps.get_pipeline_model_parallel_rank()}."  # this stage's layer in `full`
    local_to_full = {n: n.replace("layers.0.", layer) for n in stage.state_dict()}
    stage.load_state_dict({n: full.state_dict()[f] for n, f in local_to_full.items()})
    pp_loss = run(stage)
    grad_diff = max(
        (p.grad - full_grads[local_to_full[n]]).abs().max() for n, p in stage.named_parameters()
    )
    grad_norm = torch.stack([p.grad.norm() for p in stage.parameters()]).norm()
    pp_losses = [None, None]
    dist.all_gather_object(pp_losses, pp_loss)
    return {
        "loss": loss,
        "pp_loss": pp_losses[1],
        "first_stage_loss": pp_losses[0],
        "grad_diff": max_over_ranks(grad_diff),
        "min_stage_grad_norm": -max_over_ranks(-grad_norm),
        "stage_layers": [len(stage.decoder.layers), config.num_layers],
    }


CHECKS = {
    "tp_linears": check_tp_linears,
    "sequence_parallel": check_sequence_parallel,
    "rng_tracker": check_rng_tracker,
    "all_to_all": check_all_to_all,
    "moe": check_moe,
    "pipeline": check_pipeline,
}

if __name__ == "__main__":
    worker_setup()
    dist.init_process_group("gloo")
    patches = apply_cpu_patches()
    RANK = dist.get_rank()
    names = sys.argv[1:] or list(CHECKS)
    write_result({"patches": patches, **{name: CHECKS[name]() for name in names}})
