"""A second device on a CPU machine, for the tests that catch a tensor left on the wrong device.

The suite runs on CPU only, where every tensor is on the one device and a CUDA run's classic
crash ("Expected all tensors to be on the same device", NCCL's "No backend type associated with
device type cpu") cannot happen. Here the model's device is PyTorch's `meta` device
(`parallel.device.placed_on("meta")`): meta tensors have shapes and no values, and torch refuses to
mix them with CPU tensors in exactly the cases CUDA refuses (0-dim CPU scalars excepted, as for
CUDA). So the code paths of training, validation, evaluation and checkpointing run on a "GPU"
whose tensors a CPU tensor cannot meet:

- `MetaReadsAsZeros`: reading a meta tensor back to the host (`.item()`, `.cpu()`, `.tolist()`)
  gives zeros of the right shape, where a GPU would give values: what the code does with the
  values after that is host-side and tested elsewhere;
- `checked_collectives`: every tensor collective asserts that its tensors are on the rank's
  device (what NCCL requires of a GPU job) and, for meta tensors, does nothing else;
- `bincount` (no meta kernel: its length depends on the values) gives `minlength` zeros;
- boolean-mask indexing (a data-dependent shape) takes every element as selected
  (`meta_nonzero_assume_all_nonzero`, set by `on_meta`), which keeps the shapes consistent;
- `to_rank_device_like_megatron`: megatron's rotary embedding keeps `inv_freq` as a plain
  attribute and moves it to the current GPU itself in its first forward on CUDA
  (rotary_pos_embedding.get_freqs_non_repeated); the CPU patches map "current GPU" to the CPU, so
  the test does that move.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from trinityx_ds.parallel.device import rank_device

TENSOR_COLLECTIVES = ("all_reduce", "broadcast", "all_gather_into_tensor", "reduce_scatter_tensor", "all_to_all_single",
                      "reduce", "all_gather")


class MetaReadsAsZeros(TorchDispatchMode):
    """Host reads of meta tensors give zeros; everything else runs as usual."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        src = args[0] if args and torch.is_tensor(args[0]) else None
        if src is not None and src.device.type == "meta":
            if func is torch.ops.aten._local_scalar_dense.default:
                return False if src.dtype == torch.bool else 0
            if func is torch.ops.aten.bincount.default:  # no meta kernel (its length depends on values)
                weights = args[1] if len(args) > 1 else kwargs.get("weights")
                minlength = args[2] if len(args) > 2 else kwargs.get("minlength", 0)
                if weights is not None and weights.device != src.device:
                    raise RuntimeError(f"bincount: weights on {weights.device}, input on {src.device}")
                dtype = torch.long if weights is None else torch.promote_types(weights.dtype, torch.float64)
                return torch.zeros(minlength, dtype=dtype, device=src.device)
            if func is torch.ops.aten._to_copy.default:
                device = torch.device(kwargs.get("device") or "meta")
                if device.type != "meta":
                    return torch.zeros(src.shape, dtype=kwargs.get("dtype") or src.dtype, device=device)
        return func(*args, **kwargs)


class CollectiveLog:
    def __init__(self):
        self.calls: list[tuple[str, str]] = []  # (collective, device)


@contextlib.contextmanager
def checked_collectives():
    """Tensor collectives assert their tensors are on `rank_device()`; yields the log of calls."""
    log = CollectiveLog()
    real = {name: getattr(dist, name) for name in TENSOR_COLLECTIVES}

    def check(name):
        def collective(*args, **kwargs):
            tensors = [a for a in args if torch.is_tensor(a)]
            tensors += [t for a in args if isinstance(a, (list, tuple)) for t in a if torch.is_tensor(t)]
            want = rank_device()
            for t in tensors:
                assert t.device == want, f"dist.{name} got a tensor on {t.device}, the rank's device is {want}"
            log.calls.append((name, str(want)))
            if want.type == "meta":
                return None
            return real[name](*args, **kwargs)
        return collective

    try:
        for name in TENSOR_COLLECTIVES:
            setattr(dist, name, check(name))
        yield log
    finally:
        for name, fn in real.items():
            setattr(dist, name, fn)


@contextlib.contextmanager
def on_meta():
    """The rank's device is `meta` inside the block (see the module doc); yields the collectives' log."""
    from torch.fx.experimental import _config as fx_config

    from trinityx_ds.parallel.device import placed_on

    before = fx_config.meta_nonzero_assume_all_nonzero
    fx_config.meta_nonzero_assume_all_nonzero = True
    try:
        with placed_on("meta"), MetaReadsAsZeros(), checked_collectives() as log:
            yield log
    finally:
        fx_config.meta_nonzero_assume_all_nonzero = before


def to_rank_device_like_megatron(model: torch.nn.Module) -> None:
    """What megatron's rotary embedding does by itself on CUDA (see the module doc)."""
    for module in model.modules():
        inv = getattr(module, "inv_freq", None)
        if torch.is_tensor(inv) and inv.device != rank_device():
            module.inv_freq = inv.to(rank_device())


def devices_of(model: torch.nn.Module) -> set[str]:
    """Every device a parameter or buffer of `model` is on."""
    return {str(t.device) for t in [*model.parameters(), *model.buffers()]}
