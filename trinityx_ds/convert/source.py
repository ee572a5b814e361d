"""`ExportSource`: what one export reads (the backbone's arch, HF-named tensors read one at a
time, the MoCaE settings, and which file holds each tensor). Its own module: the readers that build
one (convert/inputs.py) and the writers that consume it (formats.py, adapters.py, card.py) both
need the type, and neither may import the other both ways."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from trinityx_ds.errors import CheckpointError
from trinityx_ds.model.arch import ModelArch
from trinityx_ds.model.mocae_spec import EXPERTS, POST_NORM, ROUTER, MoCaEConfig, expert_of, mocae_role
from trinityx_ds.storage.sources import MissingTensor, SafetensorsSource

# the MoCaE roles a model holds (routing_ema is training state: checkpoints keep it, exports never)
MODEL_ROLES = (ROUTER, EXPERTS, POST_NORM)


@dataclass
class ExportSource:
    """What one export reads: the backbone's arch, HF-named tensors, and the MoCaE settings.

    `mocae_files` maps every MoCaE tensor the source holds to the file it came from: the export
    must account for each one (the count that catches silently dropped experts)."""

    arch: ModelArch
    src: object  # TensorSource
    origin: Path
    moe: MoCaEConfig | None = None  # None for a plain backbone
    mocae_files: dict[str, str] = field(default_factory=dict)
    tokenizer_dirs: list[Path] = field(default_factory=list)  # later ones win
    validation: dict | None = None
    homes: dict[str, str] = field(default_factory=dict)  # "router" / expert name -> its file
    layout: dict[str, tuple] = field(default_factory=dict)  # name -> shape the model expects
    reads: set[str] = field(default_factory=set)

    def where(self, name: str) -> str:
        """The file that holds (or should hold) tensor `name`."""
        if name in self.mocae_files:
            return self.mocae_files[name]
        role = mocae_role(name)
        if role == EXPERTS:
            return self.homes.get(expert_of(name), str(self.origin))
        if role in MODEL_ROLES:  # the router and the post-mix norm live in the router's file
            return self.homes.get("router", str(self.origin))
        return str(self.origin)

    def release(self) -> None:
        """Unmaps the safetensors files read so far (reopened on the next read). Tensors keep their
        own mapping, so written shards' pages leave memory: without this, every file stays mapped
        and the process's resident size grows to the whole model."""
        stack = [self.src]
        while stack:
            src = stack.pop()
            stack += getattr(src, "sources", [])
            if isinstance(src, SafetensorsSource):
                src.close()

    def read(self, name: str) -> torch.Tensor:
        self.reads.add(name)
        where = self.where(name)
        try:
            t = self.src.read(name)
        except MissingTensor:
            raise CheckpointError(f"{where}: tensor {name!r} is missing") from None
        want = self.layout.get(name)
        if want is not None and tuple(t.shape) != want:
            raise CheckpointError(f"{where}: tensor {name!r} has shape {tuple(t.shape)}, the model needs {want}")
        return t
