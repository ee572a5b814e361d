"""Expert-parallel dispatch/combine: equal to a dense reference, and no hang when starved."""

from pathlib import Path

import pytest
import torch

from tests.distributed.workers.dispatch_worker import NUM_EXPERTS, dense_reference, make_experts, random_routing
from trinityx_ds.parallel.dispatch import combine, dispatch, run_experts

WORKER = Path(__file__).parent / "workers" / "dispatch_worker.py"


@pytest.mark.parametrize("k", [1, 2, NUM_EXPERTS])
def test_local_path_equals_dense_reference(k):
    experts = make_experts()
    gen = torch.Generator().manual_seed(k)
    x_TH = torch.randn(9, 8, generator=gen, requires_grad=True)
    idx_TK, weight_TK = random_routing(9, k, gen)
    y_TH = run_experts(x_TH, idx_TK, weight_TK, experts, NUM_EXPERTS)
    torch.testing.assert_close(y_TH, dense_reference(x_TH, idx_TK, weight_TK, experts), atol=1e-6, rtol=1e-5)


def test_local_path_runs_experts_without_tokens():
    experts = make_experts()
    inputs, ctx = dispatch(torch.randn(4, 8), torch.zeros(4, 1, dtype=torch.long), NUM_EXPERTS)
    assert [len(rows) for rows in inputs] == [4, 0, 0, 0, 0, 0]
    outputs = [expert(rows) for expert, rows in zip(experts, inputs)]
    combine(outputs, ctx, torch.ones(4, 1)).sum().backward()
    assert all(p.grad is not None for p in experts.parameters())  # zeros, but present
    no_tokens = torch.zeros(0, 2, dtype=torch.long)
    empty = run_experts(torch.randn(0, 8), no_tokens, torch.ones(0, 2), experts, NUM_EXPERTS)
    assert empty.shape == (0, 8)


@pytest.mark.distributed
@pytest.mark.parametrize("nproc", [2, 3])
def test_expert_parallel_equals_dense_reference(run_dist, nproc):
    result = run_dist(WORKER, nproc, timeout=90)
    assert result.pop("world_size") == nproc
    assert result.pop("solo_group_identical")
    assert len(result) == 3 + 6  # random k = 1, 2, E; starved k = 1, 2, three steps each
    for case, stats in result.items():
        assert stats["max_err"] <= 1e-5, (case, stats)
        assert stats["every_expert_has_grad"], case
