"""Reading a backbone into this rank's model: the starting checkpoint `trinityx import-hf` writes
(one safetensors file of megatron-named TP shards per rank, `trinityx_meta.json`, the tokenizer)
or a plain HF folder, both seen as HF-named tensor sources, and copied into the model's TP shards
by the state-dict adapters.

A plain per-rank safetensors layout (not a DeepSpeed checkpoint) because it is the *input* of
training: it must be readable without a process group, and resliceable to another TP by
`UnshardedSource`. Training checkpoints are DeepSpeed's own. The writer is convert/backbone_ckpt.py.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from trinityx_ds.config.families import sliding_window_problem
from trinityx_ds.errors import CheckpointError
from trinityx_ds.model.arch import ArchError, ModelArch
from trinityx_ds.model.llama_adapter import LlamaAdapter
from trinityx_ds.model.mocae_adapter import MoCaEAdapter
from trinityx_ds.model.mocae_spec import ROUTING_EMA, mocae_role
from trinityx_ds.storage.layout import IMPORT_META as META
from trinityx_ds.storage.sources import ChainSource, DictSource, MissingTensor, SafetensorsSource, UnshardedSource

FORMAT = "trinityx-backbone"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # a checkpoint's, a model's
# the HF tensors the adapter's fold changes (Gemma's (1 + w) norms), as the HF folder held them
ORIGINALS = "hf_originals.safetensors"


def shard_file(folder: Path, rank: int) -> Path:
    return folder / f"tp_rank_{rank:02d}.safetensors"


def backbone_param_names(arch: ModelArch) -> list[str]:
    """The megatron parameter names of a whole (PP=1) backbone, in model order."""
    names = ["embedding.word_embeddings.weight"]
    per_layer = ["input_layernorm.weight", "self_attention.linear_qkv.weight", "self_attention.linear_proj.weight",
                 "pre_mlp_layernorm.weight", "mlp.linear_fc1.weight", "mlp.linear_fc2.weight"]
    if arch.qkv_bias:
        per_layer.insert(2, "self_attention.linear_qkv.bias")
    if arch.qk_norm:
        at = per_layer.index("self_attention.linear_proj.weight")
        per_layer[at:at] = ["self_attention.q_layernorm.weight", "self_attention.k_layernorm.weight"]
    for i in range(arch.num_layers):
        names += [f"decoder.layers.{i}.{s}" for s in per_layer]
    names.append("decoder.final_layernorm.weight")
    if not arch.tie_word_embeddings:
        names.append("output_layer.weight")
    return names


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

    def hf_view(self):
        """HF tensors rebuilt from the shards; Gemma's norm weights as the HF folder held them
        (ORIGINALS) wherever they still fold to the shards' weights, which unfolding alone cannot
        always give back bit for bit (model/llama_adapter.py)."""
        adapter = LlamaAdapter(self.arch, self.tp)
        view = UnshardedSource(adapter, self.shard)
        path = self.folder / ORIGINALS
        if not path.is_file():
            return view
        try:
            originals = load_file(path)
        except Exception as e:
            raise CheckpointError(f"{path}: unreadable safetensors file ({e})") from None
        kept = {n: t for n, t in originals.items() if n in adapter.folded_names()
                and adapter.hf_equal(n, t, view.read(n)) and t.dtype == view.read(n).dtype}
        return ChainSource([DictSource(kept), view]) if kept else view


def open_source(path: str | Path):
    """(arch, TensorSource) for an HF folder or one of our checkpoints."""
    path = Path(path)
    if (path / META).is_file():
        ckpt = ShardedCheckpoint(path)
        return ckpt.arch, ckpt.hf_view()
    return ModelArch.from_hf_dir(path), SafetensorsSource(path)


def check_model_folders(folders, tp: int, seq_len: int | None = None, key: str = "data.max_seq_len") -> None:
    """Refuses, in one line naming the folder and the field, a model (HF folder or import-hf
    checkpoint) the backbone would not reproduce (config/families.py), a TP it cannot split, or a
    sliding window shorter than `seq_len`. What `parity` and `eval` run before any process starts,
    so no rank dies with a traceback."""
    for folder in folders:
        path = Path(folder)
        try:
            if (path / META).is_file():
                hf = read_meta(path).get("hf_config") or {}
                arch = ModelArch.from_hf_dict(hf) if hf else ModelArch.from_dict(read_meta(path)["arch"])
            else:
                arch = ModelArch.from_hf_dir(path)
            arch.check_tp(tp)
            problem = sliding_window_problem(arch.hf_config, seq_len, key=key) if seq_len else None
            if problem:
                raise ArchError(problem)
        except ArchError as e:
            raise ArchError(f"{folder}: {e}" if not str(e).startswith(str(folder)) else str(e)) from None


@torch.no_grad()
def load_weights(model: torch.nn.Module, src, arch: ModelArch, tp: int, tp_rank: int, moe_cfg=None) -> list[str]:
    """Copies this rank's slice of every backbone (and, with `moe_cfg`, MoCaE) tensor of `model`
    from `src`, an HF-named TensorSource. Router temperature and priors are buffers: loaded too.

    Returns the names it found no source for (e.g. MoCaE tensors when loading a plain backbone),
    so the caller decides how to initialise them. Shapes are checked, naming the tensor.
    """
    adapters = [LlamaAdapter(arch, tp)] + ([MoCaEAdapter(moe_cfg, tp)] if moe_cfg is not None else [])
    layers = getattr(getattr(model, "decoder", None), "layers", None)
    offset = layers[0].layer_number - 1 if layers is not None and len(layers) else 0
    foreign = []
    for name, tensor in model.state_dict(keep_vars=True).items():
        if name.endswith("_extra_state") or mocae_role(name) == ROUTING_EMA:  # training state, not weights
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
