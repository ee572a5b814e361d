"""The torch 2.13 internals we rely on, in one place.

tests/unit/test_compat.py checks each one against the installed torch, so a version bump that
removes or changes one fails there, naming the construct and the function here to fix.
"""

from __future__ import annotations

import torch


def in_backward() -> bool:
    """True while autograd's engine runs a backward pass on this thread: where activation
    checkpointing (megatron's full recompute, torch.utils.checkpoint) recomputes a layer's forward.

    torch has no public test for it; `torch._C._current_graph_task_id()` is -1 outside a graph
    task (backward), its id inside one."""
    return torch._C._current_graph_task_id() != -1


def mkldnn_fp16_supported() -> bool:
    """Whether oneDNN has fp16 kernels on this CPU: what DeepSpeed's CPU accelerator asks before
    its engine accepts fp16 (`CPU_Accelerator.is_fp16_supported`). torch has no public query;
    `torch.ops.mkldnn._is_mkldnn_fp16_supported` is the one DeepSpeed itself calls."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):
        return False
