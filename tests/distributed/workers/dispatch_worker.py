"""Expert-parallel dispatch/combine on gloo against a dense single-process reference.

Every rank builds all E experts from one seed and keeps its E/ep local ones; tokens and routing
differ per rank. Rank 0 reports the largest error over all ranks of the outputs and of the
gradients w.r.t. inputs, routing weights and local expert weights, per case.
"""

import copy

import torch
import torch.distributed as dist
from torch import nn

from tests.dist import worker_setup, write_result
from trinityx_ds.parallel.dispatch import run_experts

NUM_EXPERTS, HIDDEN, FFN = 6, 8, 16


def make_experts(num_experts: int = NUM_EXPERTS, seed: int = 0) -> nn.ModuleList:
    torch.manual_seed(seed)
    return nn.ModuleList(
        nn.Sequential(nn.Linear(HIDDEN, FFN), nn.Tanh(), nn.Linear(FFN, HIDDEN)) for _ in range(num_experts)
    )


def random_routing(num_tokens: int, k: int, gen: torch.Generator):
    """k distinct experts per token and positive weights summing to 1."""
    idx_TK = torch.rand(num_tokens, NUM_EXPERTS, generator=gen).argsort(dim=1)[:, :k]
    weight_TK = torch.rand(num_tokens, k, generator=gen).add(0.1).softmax(dim=1)
    return idx_TK, weight_TK


def dense_reference(x_TH, idx_TK, weight_TK, experts) -> torch.Tensor:
    """y_t = sum_k w_tk E_{idx_tk}(x_t), every expert run on every token: no dispatch at all."""
    out_ETH = torch.stack([expert(x_TH) for expert in experts])
    picked_TKH = out_ETH[idx_TK, torch.arange(x_TH.shape[0])[:, None]]
    return (weight_TK[..., None] * picked_TKH).sum(1)


def _gather(t: torch.Tensor) -> torch.Tensor:
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, t.detach())
    return torch.cat(parts)


def _max_err(a, b) -> float:
    return (a - b).abs().max().item() if a.numel() else 0.0


def check(local_experts, ref_experts, x_TH, idx_TK, weight_TK, grad_TH, lo, hi) -> tuple[float, bool]:
    """Forward + backward distributed and dense; (largest error on this rank, whether every
    local expert got a gradient, i.e. ran even without tokens)."""
    rank, counts = dist.get_rank(), [None] * dist.get_world_size()
    dist.all_gather_object(counts, x_TH.shape[0])
    start = sum(counts[:rank])
    rows = slice(start, start + x_TH.shape[0])
    for module in (local_experts, ref_experts):
        module.zero_grad(set_to_none=True)

    x_TH, weight_TK = x_TH.clone().requires_grad_(), weight_TK.clone().requires_grad_()
    y_TH = run_experts(x_TH, idx_TK, weight_TK, local_experts, NUM_EXPERTS, dist.group.WORLD)
    (y_TH * grad_TH).sum().backward()

    ref_x = _gather(x_TH).requires_grad_()
    ref_w = _gather(weight_TK).requires_grad_()
    ref_y = dense_reference(ref_x, _gather(idx_TK), ref_w, ref_experts)
    (ref_y * _gather(grad_TH)).sum().backward()

    errs = [_max_err(y_TH, ref_y[rows]), _max_err(x_TH.grad, ref_x.grad[rows]),
            _max_err(weight_TK.grad, ref_w.grad[rows])]
    all_grads = True
    for mine, ref in zip(local_experts.parameters(), ref_experts[lo:hi].parameters()):
        all_grads &= mine.grad is not None
        errs.append(_max_err(mine.grad, ref.grad) if mine.grad is not None else float("inf"))
    return max(errs), all_grads


def main():
    worker_setup()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    local = NUM_EXPERTS // world
    lo, hi = rank * local, (rank + 1) * local
    ref_experts = make_experts()
    local_experts = copy.deepcopy(ref_experts[lo:hi])
    num_tokens = [7, 4, 0][rank]  # the third rank, if any, has no tokens of its own
    gen = torch.Generator().manual_seed(100 + rank)
    x_TH, grad_TH = torch.randn(num_tokens, HIDDEN, generator=gen), torch.randn(num_tokens, HIDDEN, generator=gen)

    result = {}
    for k in (1, 2, NUM_EXPERTS):
        idx_TK, weight_TK = random_routing(num_tokens, k, gen)
        result[f"random_k{k}"] = check(local_experts, ref_experts, x_TH, idx_TK, weight_TK, grad_TH, lo, hi)
    for k in (1, 2):  # every token on experts 0..k-1, all held by rank 0: the rest get nothing
        idx_TK = torch.arange(k).expand(num_tokens, k)
        _, weight_TK = random_routing(num_tokens, k, gen)
        for step in range(3):
            result[f"starved_k{k}_step{step}"] = check(
                local_experts, ref_experts, x_TH, idx_TK, weight_TK, grad_TH, lo, hi
            )

    # an EP group of one rank: no communication, and bit-identical to no group at all
    solo = [dist.new_group([r]) for r in range(world)][rank]
    idx_TK, weight_TK = random_routing(num_tokens, 2, gen)
    with torch.no_grad():
        alone = run_experts(x_TH, idx_TK, weight_TK, ref_experts, NUM_EXPERTS, solo)
        local_path = run_experts(x_TH, idx_TK, weight_TK, ref_experts, NUM_EXPERTS, None)

    out = {"world_size": world, "solo_group_identical": bool(torch.equal(alone, local_path))}
    for case, (err, all_grads) in result.items():
        stats = torch.tensor([err, float(not all_grads)], dtype=torch.float64)
        dist.all_reduce(stats, op=dist.ReduceOp.MAX)
        out[case] = {"max_err": stats[0].item(), "every_expert_has_grad": stats[1].item() == 0}
    solo_ok = torch.tensor([int(out["solo_group_identical"])])
    dist.all_reduce(solo_ok, op=dist.ReduceOp.MIN)
    out["solo_group_identical"] = bool(solo_ok.item())
    write_result(out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
