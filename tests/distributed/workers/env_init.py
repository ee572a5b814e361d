"""init_distributed under torchrun: the env it read, and deepspeed.comm usable right away."""

import dataclasses

import deepspeed.comm
import torch
import torch.distributed as dist

from tests.dist import worker_setup, write_result
from trinityx_ds.parallel.env import init_distributed

if __name__ == "__main__":
    worker_setup()
    denv = init_distributed()
    group = deepspeed.comm.new_group([0, 1])  # what deepspeed.utils.groups does before initialize
    total = torch.ones(1)
    dist.all_reduce(total, group=group)
    write_result({
        "env": dataclasses.asdict(denv),
        "backend": dist.get_backend(),
        "world_size": dist.get_world_size(),
        "deepspeed_comm": deepspeed.comm.is_initialized(),
        "sum": total.item(),
    })  # fmt: skip
