"""A decoder run from a hidden state kept at layer `first`: the layers below hand it on instead of
computing it.

Two users share this mechanism: evaluation's `PrefixCache` (eval/prefix.py: every variant of a
run shares the frozen layers below the first expert layer, batch by batch) and DPO's reference
prefix in training (train/step.py `ReferencePrefix`: the policy forward of a micro-batch starts
where its reference forward reached the first expert layer). Both rely on the same fact: below the
first layer that carries experts, every variant computes the frozen backbone, so the hidden state
entering that layer is one tensor per batch of ids.

Only torch's hooks are used (a layer's `forward` replaced on the instance, a forward pre-hook to
keep a layer's input), so no megatron internals are touched. The layer list is this rank's
decoder layers: with pipeline parallelism the layers below may live on another stage, and the
callers refuse it.
"""
from __future__ import annotations

from typing import Callable

import torch


def first_expert_layer(blocks) -> int:
    """The decoder index of the lowest layer carrying a MoCaE block (0: none below it to share)."""
    return min((b.layer_id for b in blocks), default=0)


def layer_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states a megatron TransformerLayer is called with (by keyword or first)."""
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


def keep_input(layer: torch.nn.Module, sink: Callable[[torch.Tensor], None]):
    """Calls `sink(hidden)` with the input of every forward of `layer`; returns the hook's handle."""
    return layer.register_forward_pre_hook(lambda _m, args, kwargs: sink(layer_input(args, kwargs)),
                                           with_kwargs=True)


def feed_from(layers, first: int, kept: Callable[[], torch.Tensor | None]) -> Callable[[], None]:
    """While `kept()` returns a tensor, layers [0, first) of `layers` do not compute: the first of them
    returns a copy of it (a layer above that wrote into its input would otherwise change what is
    kept), the others pass it on; while it returns None they compute as always. Returns the
    function that restores them."""
    def skip(index: int, forward):
        def wrapped(*args, **kwargs):
            hidden = kept()
            if hidden is None:
                return forward(*args, **kwargs)
            return (hidden.clone() if index == 0 else layer_input(args, kwargs)), kwargs.get("context")
        return wrapped

    below = list(layers[:first])
    for i, layer in enumerate(below):
        layer.forward = skip(i, layer.forward)

    def restore():
        for layer in below:
            del layer.forward  # the instance attribute: the class's forward again

    return restore
