"""The part of the forward pass every evaluated variant shares, computed once per batch.

Every variant of a run (backbone, each expert alone, uniform, H3Fusion-style, TrinityX) runs the
same frozen backbone layers below the first layer that carries experts. On SmolLM2-135M with
experts in layers 20-29 that is two thirds of the layers, and the held-out benchmark
(experiments/heldout.evaluate) runs seven variants over identical batches: the suites batch
deterministically (eval/shard.dp_map: longest first, the same split over the data-parallel
ranks), so the hidden states entering the first expert layer are the same tensor for every
variant. `PrefixCache` keeps that tensor per batch the first time a batch is seen, and on every
later pass of the same token ids feeds it to that layer, the layers below returning at once.

Exact, not approximate: the kept tensor is what those layers computed for those ids, and the
layers above see the same input as without the cache (tests/distributed/test_eval_prefix.py
compares every per-item figure of five variants, cache on and off, for equality).

Memory: one [S, B, H] tensor per batch on this rank, in the model's dtype (the efficacy
benchmark: about 0.5 GB per rank). The hooks are torch's (a pre-hook on the embedding to read the
ids, a pre-hook on the first expert layer to keep its input, the layers below wrapped: model/prefix.py,
shared with DPO's reference prefix in training), so no megatron internals are touched; pipeline
parallelism is refused (the layers below may live on another stage), as is a model in training
mode (the cache holds no graph).
"""
from __future__ import annotations

import hashlib
from typing import Callable

import torch
from megatron.core import parallel_state as ps

from trinityx_ds.model.prefix import feed_from, keep_input


class PrefixCache:
    """Hidden states entering layer `first` of the decoder, by batch of token ids; survives the
    models it is attached to, one after another (`attach` returns the function that detaches)."""

    def __init__(self):
        self.store: dict[tuple, torch.Tensor] = {}
        self.first: int | None = None
        self.hits = self.misses = 0
        self._key: tuple | None = None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.store.values())

    def stats(self) -> dict:
        return {"layer": self.first, "batches": len(self.store), "hits": self.hits, "misses": self.misses,
                "mib": round(self.nbytes / 2**20, 1)}

    def attach(self, model: torch.nn.Module, first: int) -> Callable[[], None]:
        """Serve `model`'s layers [0, first) from the cache. `first` must be the same for every
        model attached (the layers below it must be the same function of the ids)."""
        if first <= 0:
            return lambda: None  # experts from the first layer on: nothing is shared
        if ps.model_parallel_is_initialized() and ps.get_pipeline_model_parallel_world_size() > 1:
            raise ValueError("eval prefix cache: not with pipeline parallelism (evaluate at pp=1)")
        if model.training:
            raise ValueError("eval prefix cache: the model must be in eval mode")
        if self.first is not None and first != self.first:
            raise ValueError(f"eval prefix cache: filled at layer {self.first}, asked for layer {first}")
        self.first = first
        layers = model.decoder.layers
        if len(layers) <= first:
            raise ValueError(f"eval prefix cache: layer {first} of a {len(layers)}-layer decoder")

        def read_ids(_module, args, kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            data = ids.detach().cpu().contiguous()
            self._key = (tuple(data.shape), hashlib.blake2b(data.numpy().tobytes(), digest_size=16).hexdigest())

        def keep(hidden):
            if self._key is None:
                raise RuntimeError("eval prefix cache: a decoder pass without an embedding pass")
            if self._key not in self.store:
                self.store[self._key] = hidden.detach().clone()
                self.misses += 1
            else:
                self.hits += 1
            self._key = None

        handles = [model.embedding.register_forward_pre_hook(read_ids, with_kwargs=True),
                   keep_input(layers[first], keep)]
        restore = feed_from(layers, first, lambda: self.store.get(self._key))

        def detach():
            for h in handles:
                h.remove()
            restore()

        return detach
