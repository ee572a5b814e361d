"""The router losses' gradient carries DeepSpeed's fp16 loss scale.

The router losses join the backward through `_AttachLoss`, not through the LM loss that
`engine.backward` scales, so train_step must hand them the same factor (1 / grad_accum times the
engine's current loss scale), which the optimizer divides out of every gradient again. Without it,
fp16's unscaling leaves their gradient 2^16 times small. Tested with a stand-in engine whose
optimizer is a DeepSpeed ZeROOptimizer holding DeepSpeed's own DynamicLossScaler (what ZeRO 1-3
hold under fp16): a real CPU engine over this project's stage 2 gets scale 1.0 (its ZeRO optimizer
takes the fp32 router's dtype; tests/distributed/test_training.py), so it cannot show the bug.
"""
import pytest
import torch

from trinityx_ds.model.mocae import _AttachLoss, set_router_loss_scale
from trinityx_ds.parallel.deepspeed_compat import backward_loss_scale
from trinityx_ds.train import step as step_mod


def _zero_optimizer(scale: float):
    from deepspeed.runtime.base_optimizer import ZeROOptimizer
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler

    class FakeZeRO(ZeROOptimizer):  # only what DeepSpeedEngine.backward reads from a ZeRO optimizer
        def __init__(self):
            self.custom_loss_scaler, self.torch_autocast_gradscaler = False, None
            self.loss_scaler = DynamicLossScaler(init_scale=scale, scale_window=1000, min_scale=1.0,
                                                 delayed_shift=1, consecutive_hysteresis=False)

    return FakeZeRO()


class FakeEngine:
    """A router (weight w_EH) mixing two fixed 'experts' per token, an entropy router loss attached by
    _AttachLoss; backward as DeepSpeedEngine.backward does it (loss / grad_accum, then the ZeRO
    optimizer's `scale_if_loss`), gradients unscaled when the accumulated step ends."""

    def __init__(self, scale: float, grad_accum: int):
        g = torch.Generator().manual_seed(0)
        self.w_EH = torch.nn.Parameter(torch.randn(2, 8, generator=g))
        self.x_BSH = torch.randn(2, 5, 8, generator=g)
        self.optimizer, self.grad_accum, self.device = _zero_optimizer(scale), grad_accum, torch.device("cpu")

    def __call__(self, ids_BS, labels_BS):
        p_BSE = (self.x_BSH @ self.w_EH.T).softmax(-1)
        aux = (p_BSE * p_BSE.log()).sum(-1).mean()  # minus the routing entropy
        y_BSH = _AttachLoss.apply(self.x_BSH * (p_BSE @ torch.tensor([1.0, -2.0]))[..., None], aux)
        return (y_BSH ** 2).sum(-1)

    def backward(self, loss):
        self.optimizer.scale_if_loss(loss / self.grad_accum).backward()

    def step(self):
        pass

    def unscaled_grad(self):
        return self.w_EH.grad / backward_loss_scale(self)


def _router_grad(scale: float, monkeypatch) -> torch.Tensor:
    grad_accum = 2
    engine = FakeEngine(scale, grad_accum)
    batch = {"input_ids": torch.zeros(4, 5, dtype=torch.long), "labels": torch.zeros(4, 5, dtype=torch.long),
             "example_id": torch.arange(4).repeat_interleave(5).reshape(4, 5), "task_label": torch.zeros(4, dtype=torch.long)}
    monkeypatch.setattr(step_mod.dist, "all_reduce", lambda *a, **k: None)  # one process, no group
    set_router_loss_scale(1.0 / grad_accum)  # what the stage set once before this fix
    step_mod.train_step(engine, [], batch, stage=2, micro_batch=2, grad_accum=grad_accum, names=["a", "b"],
                        dp_group=None, dp=1)
    return engine.unscaled_grad()


def test_backward_loss_scale_reads_the_zero_optimizers_scaler():
    assert backward_loss_scale(FakeEngine(2.0 ** 16, 1)) == 2.0 ** 16
    assert backward_loss_scale(FakeEngine(1.0, 1)) == 1.0


def test_router_loss_gradient_carries_the_fp16_loss_scale(monkeypatch):
    """With the loss scaled by 2^16 and every gradient unscaled, the router's gradient equals the
    unscaled run's exactly (powers of two); before the fix it lost the router loss's share."""
    ref = _router_grad(1.0, monkeypatch)
    got = _router_grad(2.0 ** 16, monkeypatch)
    lm_only = _router_grad_without_router_loss(monkeypatch)
    assert (ref - lm_only).abs().max() > 1e-2  # the router loss is a real part of the gradient
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=0)


def _router_grad_without_router_loss(monkeypatch) -> torch.Tensor:
    monkeypatch.setattr(_AttachLoss, "backward", staticmethod(lambda ctx, g: (g, torch.zeros_like(ctx.saved_tensors[0]))))
    try:
        return _router_grad(1.0, monkeypatch)
    finally:
        monkeypatch.undo()


@pytest.fixture(autouse=True)
def _restore_scale():
    yield
    set_router_loss_scale(1.0)
