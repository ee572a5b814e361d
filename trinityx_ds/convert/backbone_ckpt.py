"""The starting checkpoint written by `trinityx import-hf`: one safetensors file of megatron-named
TP shards per rank, plus `trinityx_meta.json` and the tokenizer files.

A plain per-rank safetensors layout (not a DeepSpeed checkpoint) because it is the *input* of
training: it must be readable without a process group, and resliceable to another TP by
`UnshardedSource`. Training checkpoints are DeepSpeed's own.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from trinityx_ds.convert.llama import LlamaAdapter
from trinityx_ds.convert.sources import CheckpointError, MissingTensor, SafetensorsSource, UnshardedSource
from trinityx_ds.model.arch import ModelArch

META = "trinityx_meta.json"
FORMAT = "trinityx-backbone"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "chat_template.jinja", "generation_config.json")


def shard_file(folder: Path, rank: int) -> Path:
    return folder / f"tp_rank_{rank:02d}.safetensors"


def backbone_param_names(arch: ModelArch) -> list[str]:
    """The megatron parameter names of a whole (PP=1) backbone, in model order."""
    names = ["embedding.word_embeddings.weight"]
    per_layer = ["input_layernorm.weight", "self_attention.linear_qkv.weight", "self_attention.linear_proj.weight",
                 "pre_mlp_layernorm.weight", "mlp.linear_fc1.weight", "mlp.linear_fc2.weight"]
    if arch.qkv_bias:
        per_layer.insert(2, "self_attention.linear_qkv.bias")
    for i in range(arch.num_layers):
        names += [f"decoder.layers.{i}.{s}" for s in per_layer]
    names.append("decoder.final_layernorm.weight")
    if not arch.tie_word_embeddings:
        names.append("output_layer.weight")
    return names


def copy_tokenizer(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def import_hf(hf_dir: str | Path, out_dir: str | Path, tp: int, dtype: str = "fp32", overwrite: bool = False) -> Path:
    """Converts a local HF folder into a TP-sharded starting checkpoint, rank by rank.

    Written into a temporary sibling folder and renamed at the end, so a crash leaves no
    half-written checkpoint behind. Peak memory is one rank's shard.
    """
    from trinityx_ds.model.backbone import DTYPES  # megatron: imported only when converting

    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    arch = ModelArch.from_hf_dir(hf_dir)
    adapter = LlamaAdapter(arch, tp)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir}: already exists (pass --overwrite to replace it)")
    src = SafetensorsSource(hf_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    names = backbone_param_names(arch)
    for rank in range(tp):
        shard = {n: adapter.shard(n, src, rank).to(DTYPES[dtype]).contiguous() for n in names}
        save_file(shard, shard_file(tmp, rank), metadata={"format": FORMAT, "tp_rank": str(rank)})
        del shard
    meta = {"format": FORMAT, "version": 1, "tp": tp, "dtype": dtype, "source": str(hf_dir.resolve()),
            "padded_vocab_size": adapter.padded_vocab, "hf_config": arch.hf_config, "arch": arch.to_dict()}
    (tmp / META).write_text(json.dumps(meta, indent=2))
    copy_tokenizer(hf_dir, tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def read_meta(folder: str | Path) -> dict:
    path = Path(folder) / META
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file (not a checkpoint written by `trinityx import-hf`)")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


class ShardedCheckpoint:
    """Reads our per-rank checkpoint; `hf_view()` sees it as HF tensors for any other TP."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.meta = read_meta(self.folder)
        self.arch = ModelArch.from_dict(self.meta["arch"])
        self.tp = int(self.meta["tp"])
        self._handles: dict[int, object] = {}

    def shard(self, rank: int, name: str) -> torch.Tensor:
        if rank not in self._handles:
            path = shard_file(self.folder, rank)
            if not path.is_file():
                raise CheckpointError(f"{path}: no such file (checkpoint has tp={self.tp})")
            try:
                self._handles[rank] = safe_open(path, framework="pt")
            except Exception as e:
                raise CheckpointError(f"{path}: unreadable safetensors file ({e})") from None
        f = self._handles[rank]
        if name not in f.keys():
            raise MissingTensor(f"{shard_file(self.folder, rank)}: tensor {name!r} is missing")
        return f.get_tensor(name)

    def hf_view(self) -> UnshardedSource:
        return UnshardedSource(LlamaAdapter(self.arch, self.tp), self.shard)


def open_source(path: str | Path):
    """(arch, TensorSource) for an HF folder or one of our checkpoints."""
    path = Path(path)
    if (path / META).is_file():
        ckpt = ShardedCheckpoint(path)
        return ckpt.arch, ckpt.hf_view()
    return ModelArch.from_hf_dir(path), SafetensorsSource(path)


@torch.no_grad()
def load_weights(model: torch.nn.Module, src, arch: ModelArch, tp: int, tp_rank: int, moe_cfg=None) -> list[str]:
    """Copies this rank's slice of every backbone (and, with `moe_cfg`, MoCaE) tensor of `model`
    from `src`, an HF-named TensorSource. Router temperature and priors are buffers: loaded too.

    Returns the names it found no source for (e.g. MoCaE tensors when loading a plain backbone),
    so the caller decides how to initialise them. Shapes are checked, naming the tensor.
    """
    from trinityx_ds.convert.mocae_adapter import MoCaEAdapter

    adapters = [LlamaAdapter(arch, tp)] + ([MoCaEAdapter(moe_cfg, tp)] if moe_cfg is not None else [])
    layers = getattr(getattr(model, "decoder", None), "layers", None)
    offset = layers[0].layer_number - 1 if layers is not None and len(layers) else 0
    foreign = []
    for name, tensor in model.state_dict(keep_vars=True).items():
        if name.endswith("_extra_state") or ".routing_ema." in name:
            continue
        value = None
        for adapter in adapters:
            try:
                value = adapter.shard(name, src, tp_rank, layer_offset=offset)
                break
            except KeyError:  # not this adapter's tensor
                continue
            except MissingTensor:  # this adapter's, but the source has none: leave it to the caller
                break
        if value is None:
            foreign.append(name)
            continue
        if tuple(value.shape) != tuple(tensor.shape):
            raise CheckpointError(f"tensor {name!r}: shape {tuple(value.shape)} in the checkpoint, "
                                  f"{tuple(tensor.shape)} in the model")
        tensor.copy_(value)
    return foreign
