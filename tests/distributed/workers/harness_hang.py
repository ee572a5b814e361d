"""Rank 1 never joins the barrier: the watchdog must end the job and print stacks."""

import os
import time

import torch.distributed as dist

from tests.dist import worker_setup

if __name__ == "__main__":
    worker_setup()
    dist.init_process_group("gloo")
    if int(os.environ["RANK"]) == 1:
        time.sleep(3600)
    dist.barrier()
