"""State-dict adapter between Hugging Face Llama-family names/layouts and megatron-core GPTModel
(local spec) TP shards.

Both directions meet in one neutral format: HF names with full, unpadded tensors. The HF side is
read through `TensorSource` (a safetensors folder or a checkpoint of ours), by slices, so a rank
reads only the rows or columns it owns.

Families: Qwen3's q_norm / k_norm are megatron's q_layernorm / k_layernorm (one head_dim vector,
replicated over TP). Gemma's RMSNorms multiply by (1 + w); megatron's RMSNorm multiplies by its
weight, so the weight holds 1 + w ("folded" at import, in fp32: the very multiplier transformers
computes, `1.0 + w.float()`) and w = weight - 1 comes back at export ("unfolded"). What is exact,
in fp32 (tests/unit/test_families.py):
- fold: the megatron weight equals transformers' multiplier bit for bit, so the two compute alike;
- unfold: by Sterbenz' lemma weight - 1 is exact for every weight in [0.5, 2^24], and a folded
  weight below 0.5 came from a w in [-2, -0.5] where 1 + w was exact, so fold(unfold(weight)) ==
  weight for every folded fp32 w >= -2: the exported model multiplies by the same (1 + w), bit
  for bit, and import -> export -> import is the identity on megatron weights;
- w itself comes back bit for bit only where 1 + w is representable (every w in [-2, -0.5], and
  w that are multiples of 2^-23 below 1); other w come back rounded to the fold's precision
  (|error| <= 2^-24), a w the model never computed with. `hf_equal` is the exactness test.
  An import-hf checkpoint therefore also keeps the original w (`folded_names`, a few vectors per
  layer; model/weights.py), and its HF view returns those wherever they still fold to the weights
  it holds: an export from it, and the parity reference, get the HF folder's bits back.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Protocol

import torch

from trinityx_ds.model.arch import ModelArch, padded_vocab_size


class TensorSource(Protocol):
    """Reads HF-named tensors, or a contiguous slice of one along one dimension."""

    def shape(self, name: str) -> tuple[int, ...]: ...

    def read(self, name: str, dim: int = 0, start: int | None = None, stop: int | None = None) -> torch.Tensor: ...


_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
# megatron local-spec suffix -> (HF suffix, how it is split across TP)
_LAYER_MAP = {
    "input_layernorm.weight": ("input_layernorm.weight", "replicated"),
    "self_attention.linear_qkv.weight": (None, "qkv"),
    "self_attention.linear_qkv.bias": (None, "qkv"),
    "self_attention.linear_proj.weight": ("self_attn.o_proj.weight", "row"),
    "self_attention.q_layernorm.weight": ("self_attn.q_norm.weight", "replicated"),  # Qwen3
    "self_attention.k_layernorm.weight": ("self_attn.k_norm.weight", "replicated"),
    "pre_mlp_layernorm.weight": ("post_attention_layernorm.weight", "replicated"),
    "mlp.linear_fc1.weight": (None, "fc1"),
    "mlp.linear_fc2.weight": ("mlp.down_proj.weight", "row"),
}
_GLOBAL_MAP = {
    "embedding.word_embeddings.weight": ("model.embed_tokens.weight", "vocab"),
    "decoder.final_layernorm.weight": ("model.norm.weight", "replicated"),
    "output_layer.weight": ("lm_head.weight", "vocab"),
}


# Gemma's (1 + w) norms, by HF suffix; Qwen3's q/k norms are plain RMSNorms in every family
_FOLDED = ("input_layernorm.weight", "post_attention_layernorm.weight", "model.norm.weight")


def fold_norm(w: torch.Tensor) -> torch.Tensor:
    """Gemma HF weight w -> megatron RMSNorm weight: transformers' multiplier `1.0 + w.float()`."""
    return 1.0 + w.float()


def unfold_norm(weight: torch.Tensor) -> torch.Tensor:
    """megatron RMSNorm weight -> Gemma HF weight, in the weight's dtype (exactness: module doc)."""
    return (weight.float() - 1.0).to(weight.dtype)


def _hf_layer(i: int, suffix: str) -> str:
    return f"model.layers.{i}.{suffix}"


def _read_padded(src: TensorSource, name: str, dim: int, start: int, stop: int, real: int) -> torch.Tensor:
    """Rows/columns [start, stop) along `dim`, zero past `real` (padded vocab or query groups)."""
    t = src.read(name, dim, min(start, real), min(stop, real))
    missing = stop - start - t.shape[dim]
    if missing == 0:
        return t
    pad_shape = list(t.shape)
    pad_shape[dim] = missing
    return torch.cat([t, t.new_zeros(pad_shape)], dim)


def _split(n: int, tp: int, rank: int) -> tuple[int, int]:
    size = n // tp
    return rank * size, (rank + 1) * size


class LlamaAdapter:
    """Maps one model's parameters between the neutral HF format and megatron TP shards."""

    def __init__(self, arch: ModelArch, tp: int):
        arch.check_tp(tp)
        self.arch, self.tp = arch, tp
        self.padded_vocab = padded_vocab_size(arch.vocab_size, tp)
        self.padded_groups = arch.padded_kv_heads(tp)
        self.padded_heads = arch.padded_heads(tp)

    # ---------------------------------------------------------------- HF -> megatron shard
    def shard(self, name: str, src: TensorSource, rank: int, layer_offset: int = 0) -> torch.Tensor:
        """The tensor for megatron parameter `name` on TP rank `rank`, read from `src` by slices.

        `layer_offset` turns a pipeline stage's local layer numbers into global ones.
        """
        a, tp = self.arch, self.tp
        if name in _GLOBAL_MAP:
            hf, kind = _GLOBAL_MAP[name]
            if hf == "lm_head.weight" and a.tie_word_embeddings:
                hf = "model.embed_tokens.weight"
            return self._folded(hf, self._read(src, hf, kind, rank))
        m = _LAYER.match(name)
        if not m or m.group(2) not in _LAYER_MAP:
            raise KeyError(f"{name}: no Hugging Face counterpart in the Llama adapter")
        i, suffix = int(m.group(1)) + layer_offset, m.group(2)
        hf, kind = _LAYER_MAP[suffix]
        if kind == "qkv":
            part = suffix.rsplit(".", 1)[1]  # weight or bias
            return self._qkv_shard(src, i, part, rank)
        if kind == "fc1":
            f0, f1 = _split(a.intermediate_size, tp, rank)
            gate = src.read(_hf_layer(i, "mlp.gate_proj.weight"), 0, f0, f1)
            up = src.read(_hf_layer(i, "mlp.up_proj.weight"), 0, f0, f1)
            return torch.cat([gate, up], 0)
        return self._folded(hf, self._read(src, _hf_layer(i, hf), kind, rank))

    def _folded(self, hf: str, t: torch.Tensor) -> torch.Tensor:
        """Gemma's norm weights as megatron multiplies by them (fp32); any other tensor as read."""
        return fold_norm(t) if self.arch.norm_plus_one and hf.endswith(_FOLDED) else t

    def _unfolded(self, hf: str, t: torch.Tensor) -> torch.Tensor:
        return unfold_norm(t) if self.arch.norm_plus_one and hf.endswith(_FOLDED) else t

    def folded_names(self) -> list[str]:
        """The HF tensors the fold changes (Gemma's norm weights; none for other families): what an
        import-hf checkpoint also keeps as they were, so its HF view gives them back bit for bit."""
        return [n for n in self.hf_names() if self.arch.norm_plus_one and n.endswith(_FOLDED)]

    def hf_equal(self, hf: str, a: torch.Tensor, b: torch.Tensor) -> bool:
        """Whether two HF tensors make transformers compute bit-identically: equal, or for Gemma's
        norms equal multipliers 1 + w (fp32), which is all the fold keeps (module doc)."""
        if self.arch.norm_plus_one and hf.endswith(_FOLDED):
            return torch.equal(fold_norm(a), fold_norm(b))
        return torch.equal(a, b)

    def _read(self, src: TensorSource, hf: str, kind: str, rank: int) -> torch.Tensor:
        a = self.arch
        if kind == "replicated":
            return src.read(hf)
        if kind == "row":
            if hf.endswith("o_proj.weight"):  # input columns follow the (padded) heads
                return _read_padded(src, hf, 1, *_split(self.padded_heads * a.head_dim, self.tp, rank), a.num_heads * a.head_dim)
            return src.read(hf, 1, *_split(src.shape(hf)[1], self.tp, rank))
        assert kind == "vocab"
        return _read_padded(src, hf, 0, *_split(self.padded_vocab, self.tp, rank), a.vocab_size)

    def _qkv_shard(self, src: TensorSource, layer: int, part: str, rank: int) -> torch.Tensor:
        # megatron interleaves per query group: [q heads of group g, k of g, v of g] for each g.
        a = self.arch
        d, hpg = a.head_dim, a.num_heads // a.num_kv_heads
        g0, g1 = _split(self.padded_groups, self.tp, rank)
        name = lambda p: _hf_layer(layer, f"self_attn.{p}_proj.{part}")  # noqa: E731
        q = _read_padded(src, name("q"), 0, g0 * hpg * d, g1 * hpg * d, a.num_heads * d)
        k = _read_padded(src, name("k"), 0, g0 * d, g1 * d, a.num_kv_heads * d)
        v = _read_padded(src, name("v"), 0, g0 * d, g1 * d, a.num_kv_heads * d)
        tail = q.shape[1:]
        groups = g1 - g0
        return torch.cat([q.reshape(groups, hpg * d, *tail), k.reshape(groups, d, *tail),
                          v.reshape(groups, d, *tail)], 1).reshape(-1, *tail)

    # ---------------------------------------------------------------- megatron shards -> HF
    def hf_names(self) -> list[str]:
        a = self.arch
        names = ["model.embed_tokens.weight"]
        for i in range(a.num_layers):
            names += [_hf_layer(i, s) for s in (
                "input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
                "self_attn.v_proj.weight", "self_attn.o_proj.weight", "post_attention_layernorm.weight",
                "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")]
            if a.qkv_bias:
                names += [_hf_layer(i, f"self_attn.{p}_proj.bias") for p in "qkv"]
            if a.qk_norm:
                names += [_hf_layer(i, f"self_attn.{p}_norm.weight") for p in "qk"]
        names.append("model.norm.weight")
        if not a.tie_word_embeddings:
            names.append("lm_head.weight")
        return names

    def unshard(self, shard: Callable[[int, str], torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
        """Yields (HF name, full tensor) one at a time, from `shard(tp_rank, megatron_name)`.

        One tensor is materialised at a time, so a 70B export streams through bounded memory.
        """
        a, tp = self.arch, self.tp
        ranks = range(tp)
        d, hpg = a.head_dim, a.num_heads // a.num_kv_heads
        yield "model.embed_tokens.weight", torch.cat([shard(r, "embedding.word_embeddings.weight") for r in ranks])[: a.vocab_size]
        for i in range(a.num_layers):
            pre = f"decoder.layers.{i}."
            yield _hf_layer(i, "input_layernorm.weight"), self._unfolded("input_layernorm.weight",
                                                                         shard(0, pre + "input_layernorm.weight"))
            for part in ("weight", "bias") if a.qkv_bias else ("weight",):
                qkv = torch.cat([shard(r, pre + f"self_attention.linear_qkv.{part}") for r in ranks])
                tail = qkv.shape[1:]
                qkv = qkv.reshape(self.padded_groups, (hpg + 2) * d, *tail)[: a.num_kv_heads]
                q, k, v = qkv.split([hpg * d, d, d], 1)
                for p, t in zip("qkv", (q, k, v)):
                    yield _hf_layer(i, f"self_attn.{p}_proj.{part}"), t.reshape(-1, *tail).contiguous()
            if a.qk_norm:
                for p in "qk":
                    yield _hf_layer(i, f"self_attn.{p}_norm.weight"), shard(0, pre + f"self_attention.{p}_layernorm.weight")
            yield _hf_layer(i, "self_attn.o_proj.weight"), torch.cat(
                [shard(r, pre + "self_attention.linear_proj.weight") for r in ranks], 1)[:, : a.num_heads * d].contiguous()
            yield _hf_layer(i, "post_attention_layernorm.weight"), self._unfolded(
                "post_attention_layernorm.weight", shard(0, pre + "pre_mlp_layernorm.weight"))
            fc1 = [shard(r, pre + "mlp.linear_fc1.weight").chunk(2, 0) for r in ranks]
            yield _hf_layer(i, "mlp.gate_proj.weight"), torch.cat([g for g, _ in fc1]).contiguous()
            yield _hf_layer(i, "mlp.up_proj.weight"), torch.cat([u for _, u in fc1]).contiguous()
            yield _hf_layer(i, "mlp.down_proj.weight"), torch.cat(
                [shard(r, pre + "mlp.linear_fc2.weight") for r in ranks], 1)
        yield "model.norm.weight", self._unfolded("model.norm.weight", shard(0, "decoder.final_layernorm.weight"))
        if not a.tie_word_embeddings:
            yield "lm_head.weight", torch.cat([shard(r, "output_layer.weight") for r in ranks])[: a.vocab_size]
