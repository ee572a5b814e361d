"""State-dict adapter for the MoCaE parts of a layer (router, LoRA or full experts, post-mix
norm) between HF-style names, one tensor per expert, and megatron TP shards.

HF-side names (per layer i, expert name n):
  model.layers.i.mlp.router.{weight,bias,log_temperature,log_importance}
  model.layers.i.mlp.experts.n.{gate_proj,up_proj,down_proj}.lora_A.weight / .lora_B.weight  (lora)
  model.layers.i.mlp.experts.n.{gate_proj,up_proj,down_proj}.weight                         (full)
  model.layers.i.mlp.post_norm.weight
  model.layers.i.mlp.routing_ema.{ema_LE,updates_L}   (training state only: checkpoints' universal copies)
The base FFN of LoRA experts keeps Llama's names (model.layers.i.mlp.gate_proj.weight, ...).
"""
from __future__ import annotations

import re

import torch

from trinityx_ds.model.llama_adapter import TensorSource, _split

_MLP = re.compile(r"^decoder\.layers\.(\d+)\.mlp\.(.+)$")
_ROUTER = ("weight", "bias", "log_temperature", "log_importance")


class MoCaEAdapter:
    """Maps one model's MoCaE parameters between per-expert HF tensors and megatron TP shards."""

    def __init__(self, cfg, tp: int):
        self.cfg, self.tp = cfg, tp

    def hf_prefix(self, layer: int) -> str:
        return f"model.layers.{layer}.mlp."

    def shard(self, name: str, src: TensorSource, rank: int, layer_offset: int = 0) -> torch.Tensor:
        """The tensor for megatron parameter/buffer `name` on TP rank `rank`; KeyError if not ours."""
        m = _MLP.match(name)
        if not m:
            raise KeyError(name)
        layer, rest = int(m.group(1)) + layer_offset, m.group(2)
        pre = self.hf_prefix(layer)
        if rest.startswith("router.") and rest.split(".", 1)[1] in _ROUTER:
            return src.read(pre + rest)
        if rest == "post_norm.weight" or rest.startswith("routing_ema."):
            return src.read(pre + rest)
        lora = re.fullmatch(r"experts\.(gate_proj|up_proj|down_proj)_(A|B)", rest)
        if lora:
            target, ab = lora.groups()
            return torch.stack([self._lora(src, f"{pre}experts.{n}.{target}.lora_{ab}.weight", target, ab, rank)
                                for n in self.cfg.expert_names])
        full = re.fullmatch(r"experts\.local\.(\d+)\.linear_fc([12])\.weight", rest)
        if full:
            e, fc = int(full.group(1)), full.group(2)
            base = f"{pre}experts.{self.cfg.expert_names[e]}."
            if fc == "2":
                n = src.shape(base + "down_proj.weight")[1]
                return src.read(base + "down_proj.weight", 1, *_split(n, self.tp, rank))
            n = src.shape(base + "gate_proj.weight")[0]
            lo, hi = _split(n, self.tp, rank)
            return torch.cat([src.read(base + "gate_proj.weight", 0, lo, hi), src.read(base + "up_proj.weight", 0, lo, hi)])
        raise KeyError(name)

    def _lora(self, src: TensorSource, hf: str, target: str, ab: str, rank: int) -> torch.Tensor:
        # gate/up: B [F, r] split by rows; down: A [r, F] split by columns; the rest replicated
        if (target, ab) in (("gate_proj", "B"), ("up_proj", "B")):
            return src.read(hf, 0, *_split(src.shape(hf)[0], self.tp, rank))
        if (target, ab) == ("down_proj", "A"):
            return src.read(hf, 1, *_split(src.shape(hf)[1], self.tp, rank))
        return src.read(hf)

    def unshard(self, layer: int, shard, names: list[str]):
        """Yields (HF name, full tensor) for the MoCaE tensors of `layer` among megatron `names`
        (this layer's names as found in the TP-rank-0 shard), reading `shard(rank, name)`."""
        pre, mpre, ranks = self.hf_prefix(layer), f"decoder.layers.{layer}.mlp.", range(self.tp)
        for name in names:
            rest = name[len(mpre):]
            if rest.startswith(("router.", "routing_ema.")) or rest == "post_norm.weight":
                yield pre + rest, shard(0, name)
                continue
            lora = re.fullmatch(r"experts\.(gate_proj|up_proj|down_proj)_(A|B)", rest)
            if lora:
                target, ab = lora.groups()
                if (target, ab) in (("gate_proj", "B"), ("up_proj", "B")):
                    full = torch.cat([shard(r, name) for r in ranks], 1)
                elif (target, ab) == ("down_proj", "A"):
                    full = torch.cat([shard(r, name) for r in ranks], 2)
                else:
                    full = shard(0, name)
                for e, n in enumerate(self.cfg.expert_names):
                    yield f"{pre}experts.{n}.{target}.lora_{ab}.weight", full[e].contiguous()
                continue
            m = re.fullmatch(r"experts\.local\.(\d+)\.linear_fc([12])\.weight", rest)
            if m:
                base = f"{pre}experts.{self.cfg.expert_names[int(m.group(1))]}."
                if m.group(2) == "2":
                    yield base + "down_proj.weight", torch.cat([shard(r, name) for r in ranks], 1)
                else:
                    halves = [shard(r, name).chunk(2) for r in ranks]
                    yield base + "gate_proj.weight", torch.cat([g for g, _ in halves]).contiguous()
                    yield base + "up_proj.weight", torch.cat([u for _, u in halves]).contiguous()
