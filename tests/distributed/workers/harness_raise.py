"""Rank 1 raises; rank 0 would wait for it forever in the all_reduce."""

import os

import torch
import torch.distributed as dist

from tests.dist import worker_setup

if __name__ == "__main__":
    worker_setup()
    dist.init_process_group("gloo")
    if int(os.environ["RANK"]) == 1:
        raise ValueError("rank 1 failed on purpose")
    dist.all_reduce(torch.ones(1))
