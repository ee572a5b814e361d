"""Safetensors shards with an index, written one shard in memory at a time: what HF exports and the
universal copy inside every training checkpoint are made of."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

DEFAULT_SHARD_BYTES = 5 * 1024**3


class ShardWriter:
    """Safetensors shards of at most `max_bytes` (a larger tensor goes alone), one in memory."""

    def __init__(self, folder: Path, max_bytes: int, on_flush=None):
        self.folder, self.max_bytes, self.on_flush = folder, max_bytes, on_flush
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = self.total_bytes = 0
        self.shards: list[list[str]] = []
        self.names: set[str] = set()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.names:
            raise ValueError(f"tensor {name!r} written twice")
        self.names.add(name)
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max_bytes:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        path = self.folder / f"shard-{len(self.shards):05d}.safetensors"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0
        if self.on_flush is not None:
            self.on_flush()

    def close(self) -> dict[str, str]:
        """Names shards model-0000i-of-0000N and writes model.safetensors.index.json; the weight map."""
        if self.pending:
            self._flush()
        n, weight_map = len(self.shards), {}
        for i, names in enumerate(self.shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.folder / f"shard-{i:05d}.safetensors", self.folder / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return weight_map
