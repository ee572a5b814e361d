"""Both ranks all-reduce their rank; rank 0 reports the sum and the launcher's environment."""

import os

import torch
import torch.distributed as dist

from tests.dist import worker_setup, write_result

if __name__ == "__main__":
    worker_setup()
    dist.init_process_group("gloo")
    total = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(total)
    write_result({"sum": total.item(), "world_size": dist.get_world_size(),
                  "accelerator": os.environ["DS_ACCELERATOR"]})
