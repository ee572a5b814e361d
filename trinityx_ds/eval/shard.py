"""Data-parallel evaluation: every DP rank runs its share of fixed batches, results meet on all ranks.

The batches are cut from the items in the caller's order, the same way for any number of
processes, and batch b runs on DP rank b % dp: each item is computed in the same batch with the
same padding whatever the layout, so DP=2 reproduces DP=1 bit for bit. Ranks with fewer batches
repeat their first one and drop the result, so every rank runs the same number of forward passes
(TP ranks and expert-parallel all-to-alls stay in step).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch.distributed as dist
from megatron.core import parallel_state as ps
from tqdm import tqdm


def _dp() -> tuple[int, int]:
    if not (dist.is_initialized() and ps.model_parallel_is_initialized()):
        return 1, 0
    return ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()


def dp_map(items: Sequence, fn: Callable[[list], list], batch_size: int, desc: str = "eval") -> list:
    """[*fn(batch) for every batch of `items`] in item order, on every rank; fn returns one result
    per item. Collective: every rank calls it with the same items. Progress bar on rank 0."""
    dp, rank = _dp()
    batches = [list(items[i:i + batch_size]) for i in range(0, len(items), batch_size)]
    mine = {}
    steps = math.ceil(len(batches) / dp)
    show = not dist.is_initialized() or dist.get_rank() == 0
    for step in tqdm(range(steps), desc=desc, disable=not show or steps == 0, dynamic_ncols=True):
        b = step * dp + rank
        if b < len(batches):
            mine[b] = fn(batches[b])
        else:
            fn(batches[0])  # padding: keeps this rank's collectives in step with the others
    if dp > 1:
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine)
        for part in every:
            mine.update(part)
    return [r for b in range(len(batches)) for r in mine[b]]
