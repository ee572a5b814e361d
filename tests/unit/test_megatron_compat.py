"""The megatron CPU patches: each still covers an upstream construct; applying them is idempotent.

A failing `still_needed` after a megatron bump means upstream fixed that construct: drop the
patch from trinityx_ds/parallel/megatron_compat.py (and this list's expectations).
"""

import pytest
import torch

from trinityx_ds.parallel import megatron_compat
from trinityx_ds.parallel.megatron_compat import PATCHES, apply_cpu_patches

cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="patches apply on CPU only")


@pytest.mark.parametrize("patch", PATCHES, ids=lambda p: p.name)
def test_upstream_still_has_the_construct(patch):
    assert patch.still_needed(), f"{patch.name}: upstream fixed it, drop this patch"


def test_names_are_unique_and_cover_f1_to_f7():
    names = [p.name for p in PATCHES]
    assert len(set(names)) == len(names)
    assert {p.fix for p in PATCHES} == {f"F{i}" for i in range(1, 8)}


@cpu_only
def test_applying_twice_is_harmless():
    from megatron.core.tensor_parallel import layers, mappings, random
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    first = apply_cpu_patches()
    patched = (layers.torch, mappings._AllToAll.forward, random.CudaRNGStatesTracker.fork,
               random._set_cuda_rng_state, WrappedTorchNorm.__new__)  # fmt: skip
    assert apply_cpu_patches() == first == [p.name for p in PATCHES]
    again = (layers.torch, mappings._AllToAll.forward, random.CudaRNGStatesTracker.fork,
             random._set_cuda_rng_state, WrappedTorchNorm.__new__)  # fmt: skip
    assert all(a is b for a, b in zip(patched, again))
    assert layers.torch is not torch  # megatron's modules got a proxy; torch itself is untouched
    assert torch.cuda.current_device is not layers.torch.cuda.current_device


def test_only_device_independent_patches_when_cuda_is_available(monkeypatch):
    """With CUDA, F6 (sequence parallelism through torch norms: the local spec's RMSNorm on every
    device) still applies; the CPU workarounds do not (GPU_READINESS finding 7: on b86774b nothing
    was applied, and the 70B recipe's SP could not build on a GPU)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(megatron_compat, "_applied", [])
    applied = apply_cpu_patches()
    assert applied and {name.split(":")[0] for name in applied} == {"F6"}, applied


def test_cpu_torch_maps_cuda_to_cpu_only():
    proxy = megatron_compat._cpu_torch()
    assert proxy.zeros(2, device="cuda").device.type == "cpu"
    assert proxy.tensor([1.0], device=torch.device("cuda", 0)).device.type == "cpu"
    assert proxy.empty(1, device=proxy.cuda.current_device()).device.type == "cpu"
    assert proxy.ones(1, device="meta").device.type == "meta"
    assert proxy.Tensor is torch.Tensor and proxy.float32 is torch.float32
    assert proxy.cuda.is_available() is False
    with proxy.cuda.stream(proxy.cuda.Stream()):
        proxy.cuda.current_stream().record_event().synchronize()


@cpu_only
def test_fp32_optimizer_steps_on_cpu():
    """F7 optimizer.py: megatron's FP32Optimizer wraps a torch optimizer unchanged."""
    apply_cpu_patches()
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.optimizer.optimizer import FP32Optimizer

    weight = torch.nn.Parameter(torch.ones(3))
    weight.grad = torch.tensor([1.0, 2.0, 3.0])
    config = OptimizerConfig(lr=0.5, clip_grad=0.0)  # megatron's clipping is GPU-only
    optimizer = FP32Optimizer(torch.optim.SGD([weight], lr=0.5), config, lambda _: None)
    assert optimizer.get_loss_scale().item() == 1.0
    assert optimizer.step()[0]
    assert weight.tolist() == [0.5, 0.0, -0.5]
