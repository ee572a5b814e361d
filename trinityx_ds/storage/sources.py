"""Tensor sources that read HF-named tensors by slices: an HF safetensors folder, or one of our
sharded checkpoints seen through the adapter (so any TP layout can be re-sliced to any other)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from trinityx_ds.errors import CheckpointError


class MissingTensor(CheckpointError):
    """A tensor the source does not hold (the caller decides whether that is an error)."""


def _narrow(t: torch.Tensor, dim: int, start: int | None, stop: int | None) -> torch.Tensor:
    if start is None and stop is None:
        return t
    start = start or 0
    return t.narrow(dim, start, (t.shape[dim] if stop is None else stop) - start)


class SafetensorsSource:
    """An HF folder: `model.safetensors` or shards listed in `model.safetensors.index.json`."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        single = self.folder / "model.safetensors"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif single.is_file():
            with safe_open(single, framework="pt") as f:
                weight_map = {k: single.name for k in f.keys()}
        else:
            raise CheckpointError(f"{self.folder}: no model.safetensors or model.safetensors.index.json "
                                  "(only safetensors weights are read)")
        self.weight_map = weight_map
        self._handles: dict[str, object] = {}

    @classmethod
    def from_file(cls, path: str | Path) -> "SafetensorsSource":
        """One safetensors file (e.g. a stage-1 expert), read like a folder."""
        path = Path(path)
        src = cls.__new__(cls)
        src.folder = path.parent
        try:
            with safe_open(path, framework="pt") as f:
                src.weight_map = {k: path.name for k in f.keys()}
        except Exception as e:
            raise CheckpointError(f"{path}: unreadable safetensors file ({e})") from None
        src._handles = {}
        return src

    def _file(self, name: str):
        if name not in self.weight_map:
            raise MissingTensor(f"{self.folder}: tensor {name!r} is missing")
        fname = self.weight_map[name]
        if fname not in self._handles:
            path = self.folder / fname
            if not path.is_file():
                raise CheckpointError(f"{path}: no such file (listed for tensor {name!r})")
            try:
                self._handles[fname] = safe_open(path, framework="pt")
            except Exception as e:  # safetensors raises its own error types for truncated headers
                raise CheckpointError(f"{path}: unreadable safetensors file ({e})") from None
        return self._handles[fname]

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def close(self) -> None:
        """Unmaps the files read so far; the next read reopens them (tensors read keep their own
        mapping)."""
        self._handles.clear()

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._file(name).get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        """The tensor's dtype as safetensors names it ("F32", "BF16", "F16", "I64", ...), unread."""
        return self._file(name).get_slice(name).get_dtype()

    def metadata(self) -> dict[str, str]:
        """The header metadata of the file(s) (a single file's, or the first shard's), {} if none."""
        first = next(iter(self.weight_map), None)
        return dict(self._file(first).metadata() or {}) if first is not None else {}

    def read(self, name: str, dim: int = 0, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        sl = self._file(name).get_slice(name)
        index = [slice(None)] * len(sl.get_shape())
        if start is not None or stop is not None:
            index[dim] = slice(start, stop)
        try:
            return sl[tuple(index)]
        except Exception as e:
            raise CheckpointError(f"{self.folder / self.weight_map[name]}: tensor {name!r} unreadable ({e})") from None


class UnshardedSource:
    """HF view of a TP-sharded checkpoint: each HF tensor is rebuilt from its shards on demand
    (one at a time, cached until the next name), then sliced. A name the adapter does not produce
    is refused at once: streaming the whole model to find that out made every lookup of an expert
    tensor in a ChainSource cost two passes over the backbone."""

    def __init__(self, adapter, shard):
        self._stream = None
        self._adapter, self._shard = adapter, shard
        self._names = frozenset(adapter.hf_names())
        self._cache: dict[str, torch.Tensor] = {}

    def _full(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise MissingTensor(f"tensor {name!r} is not produced by the checkpoint's adapter")
        if name not in self._cache:
            self._cache.clear()
            # The adapter yields HF tensors in a fixed order; restart the stream when asked out of order.
            for _ in range(2):
                if self._stream is None:
                    self._stream = self._adapter.unshard(self._shard)
                for hf_name, tensor in self._stream:
                    if hf_name == name:
                        self._cache[name] = tensor
                        return tensor
                self._stream = None
            raise AssertionError(f"{name!r} is in the adapter's names but not in its stream")
        return self._cache[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._full(name).shape)

    def read(self, name: str, dim: int = 0, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        return _narrow(self._full(name), dim, start, stop)


class DictSource:
    """HF-named tensors held in memory (tests, and tensors computed on the fly)."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._get(name).shape)

    def _get(self, name: str) -> torch.Tensor:
        if name not in self.tensors:
            raise MissingTensor(f"tensor {name!r} is missing")
        return self.tensors[name]

    def read(self, name: str, dim: int = 0, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        return _narrow(self._get(name), dim, start, stop)


class ChainSource:
    """The first source that has a tensor wins: backbone + expert files + init values."""

    def __init__(self, sources: list):
        self.sources = sources

    def _owner(self, name: str):
        for src in self.sources:
            try:
                src.shape(name)
                return src
            except MissingTensor:
                continue
        raise MissingTensor(f"tensor {name!r} is missing")

    def shape(self, name: str) -> tuple[int, ...]:
        return self._owner(name).shape(name)

    def read(self, name: str, dim: int = 0, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        return self._owner(name).read(name, dim, start, stop)


class PrefixedSource:
    """The tensors of `src` named `prefix` + NAME, read as NAME: an optimizer moment of a universal
    checkpoint copy ("optimizer.exp_avg." + HF name) re-sliced by the adapter like its parameter."""

    def __init__(self, src, prefix: str):
        self.src, self.prefix = src, prefix

    def shape(self, name: str) -> tuple[int, ...]:
        return self.src.shape(self.prefix + name)

    def read(self, name: str, dim: int = 0, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        return self.src.read(self.prefix + name, dim, start, stop)
