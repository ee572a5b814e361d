"""Make megatron-core 0.16.1 run on CPU under gloo, without patching torch itself.

megatron-core calls CUDA directly in a few places (docs FEASIBILITY.md, F1-F7). Each `Patch`
fixes one construct in one upstream file by the narrowest means: giving that module a `torch`
whose CUDA device is the CPU (`_cpu_torch`), or replacing one function. `Patch.still_needed()`
looks for the construct in the installed source, so a megatron bump that fixes it upstream fails
tests/unit/test_megatron_compat.py and tells us to drop the patch.

The other megatron private name we use sits here too, behind `rope_apply_scaling`; its test is in
tests/unit/test_compat.py.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib
import inspect
import re
import types
from dataclasses import dataclass
from typing import Callable

import torch

_FACTORIES = ("empty", "zeros", "ones", "full", "tensor", "arange")


def _cpu_device(device):
    """Map a CUDA device spec ("cuda", "cuda:1", torch.device("cuda")) to the CPU."""
    if isinstance(device, (str, torch.device)) and torch.device(device).type == "cuda":
        return torch.device("cpu")
    return device


def _on_cpu(factory):
    def make(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        return factory(*args, **kwargs)

    return make


class _CpuStream:
    """CPU work is synchronous: a stream (or event) has nothing to wait for."""

    def wait_stream(self, stream):
        pass

    def record_event(self, event=None):
        return self

    def synchronize(self):
        pass


_STREAM = _CpuStream()


@functools.cache
def _cpu_torch() -> types.ModuleType:
    """A copy of the `torch` namespace in which CUDA means the CPU, for one module's globals.

    A module whose attributes are copied (torch.compile'd megatron functions that read the
    `torch` global still trace), falling back to torch for names torch gains later.
    """
    cuda = types.ModuleType("torch.cuda")
    cuda.__dict__.update(torch.cuda.__dict__)
    cuda.__getattr__ = lambda name: getattr(torch.cuda, name)
    cuda.current_device = lambda: torch.device("cpu")
    cuda.manual_seed = torch.manual_seed
    cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    cuda.Stream = cuda.current_stream = lambda *args, **kwargs: _STREAM
    cuda.stream = lambda stream=None: contextlib.nullcontext()
    cuda.synchronize = lambda device=None: None
    proxy = types.ModuleType("torch")
    proxy.__dict__.update(torch.__dict__)
    proxy.__getattr__ = lambda name: getattr(torch, name)
    proxy.cuda = cuda
    for name in _FACTORIES:
        setattr(proxy, name, _on_cpu(getattr(torch, name)))
    return proxy


def _use_cpu_torch(module: types.ModuleType) -> None:
    module.torch = _cpu_torch()


def _cpu_rng_tracker(random: types.ModuleType) -> None:
    """The CUDA RNG tracker tracks states of the CPU default generator instead.

    `torch` covers `torch.cuda.manual_seed/get_rng_state` in `add` and
    `model_parallel_cuda_manual_seed`; the helpers below replace `_lazy_call`s that never run
    without CUDA. `fork` is replaced because upstream warns whenever the CPU state changes inside
    it, which here is every fork that draws a random number.
    """
    random.torch = _cpu_torch()
    random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    random._set_cuda_rng_state = lambda new_state, *args, **kwargs: torch.set_rng_state(new_state)

    @contextlib.contextmanager
    def fork(self, name=random._MODEL_PARALLEL_RNG_TRACKER_NAME):
        if name not in self.states_:
            raise Exception(f"cuda rng state {name} is not added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)

    random.CudaRNGStatesTracker.fork = fork


def _define_te_general_gemm(moe_utils: types.ModuleType) -> None:
    """Upstream only defines `te_general_gemm` when Transformer Engine imports; None = fallback."""
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def _split_sizes_as_lists(mappings: types.ModuleType) -> None:
    """gloo's all_to_all_single takes split sizes as lists only; on CPU the MoE dispatcher
    hands over tensors (it converts them only when they are on the GPU)."""
    forward = mappings._AllToAll.forward

    def as_list(sizes):
        return sizes.tolist() if hasattr(sizes, "tolist") else sizes

    def forward_with_lists(ctx, group, input, output_split_sizes, input_split_sizes):
        return forward(ctx, group, input, as_list(output_split_sizes), as_list(input_split_sizes))

    mappings._AllToAll.forward = staticmethod(forward_with_lists)


def _sequence_parallel_torch_norm(torch_norm: types.ModuleType) -> None:
    """Build torch norms under sequence parallelism: their weights stay replicated, each TP rank
    sees a slice of the sequence, so the grads are partial and must be summed over TP. Megatron's
    `finalize_model_grads` does that for params marked `sequence_parallel=True`; mark them."""
    wrapped = torch_norm.WrappedTorchNorm
    build = wrapped.__new__

    def new(cls, config, *args, **kwargs):
        if not config.sequence_parallel:
            return build(cls, config, *args, **kwargs)
        config = copy.copy(config)
        config.sequence_parallel = False
        norm = build(cls, config, *args, **kwargs)
        for param in norm.parameters():
            param.sequence_parallel = True
        return norm

    wrapped.__new__ = staticmethod(new)


@dataclass(frozen=True)
class Patch:
    """One fix (`fix` = its id in FEASIBILITY.md) of one CUDA-only construct in one file."""

    fix: str
    file: str  # upstream file, relative to site-packages
    construct: str  # regex for the CUDA-only construct in that file
    apply: Callable[[types.ModuleType], None]

    @property
    def name(self) -> str:
        return f"{self.fix}:{self.file}"

    def module(self) -> types.ModuleType:
        return importlib.import_module(self.file.removesuffix(".py").replace("/", "."))

    def still_needed(self) -> bool:
        """Whether the installed upstream source still has the construct this patch covers."""
        return re.search(self.construct, inspect.getsource(self.module())) is not None


# FEASIBILITY.md also lists moe/experts.py under F1: its only current_device() calls are in
# GroupedMLP, which needs the CUDA-only grouped_gemm package and refuses to build before them.
_CURRENT_DEVICE = r"torch\.cuda\.current_device\(\)"
_CUDA_LITERAL = r"device=[\"']cuda[\"']"
PATCHES = (
    Patch("F1", "megatron/core/tensor_parallel/layers.py", _CURRENT_DEVICE, _use_cpu_torch),
    Patch("F1", "megatron/core/tensor_parallel/mappings.py", _CURRENT_DEVICE, _use_cpu_torch),
    Patch(
        "F1",
        "megatron/core/models/common/embeddings/rotary_pos_embedding.py",
        _CURRENT_DEVICE,
        _use_cpu_torch,
    ),
    Patch("F1", "megatron/core/transformer/moe/router.py", _CURRENT_DEVICE, _use_cpu_torch),
    # Not in FEASIBILITY.md's list; pipeline send/recv buffers (and torch.cuda.synchronize).
    Patch(
        "F1",
        "megatron/core/pipeline_parallel/p2p_communication.py",
        _CURRENT_DEVICE,
        _use_cpu_torch,
    ),
    Patch(
        "F2",
        "megatron/core/tensor_parallel/random.py",
        r"torch\.cuda\.(manual_seed|get_rng_state)\(",
        _cpu_rng_tracker,
    ),
    Patch(
        "F3",
        "megatron/core/transformer/moe/token_dispatcher.py",
        r"torch\.cuda\.Stream\(\)",
        _use_cpu_torch,
    ),
    # Used unguarded, yet never assigned outside the Transformer Engine import.
    Patch(
        "F4",
        "megatron/core/transformer/moe/moe_utils.py",
        r"(?s)\A(?!.*te_general_gemm = None).*te_general_gemm is not None",
        _define_te_general_gemm,
    ),
    Patch(
        "F5",
        "megatron/core/tensor_parallel/mappings.py",
        r"all_to_all_single\(\s*output,\s*input,\s*output_split_sizes=output_split_sizes,",
        _split_sizes_as_lists,
    ),
    Patch(
        "F6",
        "megatron/core/transformer/torch_norm.py",
        r"assert not config\.sequence_parallel",
        _sequence_parallel_torch_norm,
    ),
    Patch("F7", "megatron/core/pipeline_parallel/schedules.py", _CUDA_LITERAL, _use_cpu_torch),
    Patch("F7", "megatron/core/optimizer/optimizer.py", _CUDA_LITERAL, _use_cpu_torch),
    Patch("F7", "megatron/core/utils.py", _CUDA_LITERAL, _use_cpu_torch),
    # Not in FEASIBILITY.md's list, same construct: the causal mask built when attention_mask=None.
    Patch("F7", "megatron/core/transformer/utils.py", _CUDA_LITERAL, _use_cpu_torch),
)

_applied: list[str] = []


# Not a CPU workaround: sequence parallelism through torch norms, which megatron's local spec
# uses for RMSNorm on every device (the 70B recipe's SP at TP 4 cannot build without it).
DEVICE_INDEPENDENT = ("F6",)


def apply_cpu_patches() -> list[str]:
    """Patch megatron-core for CPU; return the names of the patches in effect.

    Idempotent (a second call changes nothing and returns the same names); with CUDA present it
    applies only the DEVICE_INDEPENDENT ones.
    """
    cuda = torch.cuda.is_available()
    for patch in PATCHES:
        if cuda and patch.fix not in DEVICE_INDEPENDENT:
            continue
        if patch.name not in _applied:
            patch.apply(patch.module())
            _applied.append(patch.name)
    return list(_applied)


def rope_apply_scaling(rot, *, factor: float, low_freq_factor: float, high_freq_factor: float,
                       original_max_position_embeddings: int) -> None:
    """Rescale a RotaryEmbedding's `inv_freq` by Llama 3's rope scaling ("rope_type": "llama3").

    megatron-core builds it only through `rope_scaling=True`, with every parameter but `factor`
    fixed at Llama 3.1's values; its private `RotaryEmbedding._apply_scaling` takes them all, so
    a checkpoint's own values (Llama 3.2's factor 32, ...) are applied through it."""
    rot.inv_freq = rot._apply_scaling(
        rot.inv_freq, factor=factor, low_freq_factor=low_freq_factor, high_freq_factor=high_freq_factor,
        original_max_position_embeddings=original_max_position_embeddings)


def preallocate_static_kv_cache(decoder, context, device, dtype) -> None:
    """Fill a `StaticInferenceContext`'s per-layer KV buffers on `device`.

    megatron-core's `Attention._allocate_memory` allocates them on `torch.cuda.current_device()`,
    which fails on a CPU-only torch; it only allocates for a layer whose `layer_number` has no
    entry in `key_value_memory_dict`, so buffers put there first, of the shape it would make
    ([max_seq, max_batch, query groups per partition, head dim]), are the ones it uses."""
    for layer in decoder.layers:
        attn = layer.self_attention
        shape = (context.max_sequence_length, context.max_batch_size, attn.num_query_groups_per_partition,
                 attn.hidden_size_per_attention_head)
        context.key_value_memory_dict[attn.layer_number] = (torch.empty(shape, device=device, dtype=dtype),
                                                           torch.empty(shape, device=device, dtype=dtype))
