"""Reading the universal copy inside a training checkpoint (TAG/universal/): the stage's MoCaE
tensors and their optimizer moments, full fp32 and HF-named, as safetensors shards with an index.

Here, not in train/, because its readers need no process group and no DeepSpeed: `trinityx
export-hf` exports from it, and a resumed run at another layout loads from it. The writer, which
gathers the tensors from DeepSpeed's partitions, is train/universal.py.
"""
from __future__ import annotations

from pathlib import Path

from trinityx_ds.errors import CheckpointError
from trinityx_ds.storage.layout import CheckpointDir
from trinityx_ds.storage.sources import SafetensorsSource

INDEX = "model.safetensors.index.json"
# the optimizer moment `key` of tensor X is written as "optimizer.<key>.X": training state, not the model
OPTIMIZER_PREFIX = "optimizer."


def open_universal(tag_dir: str | Path) -> SafetensorsSource:
    """The universal copy of checkpoint tag `tag_dir` as an HF-named tensor source."""
    tag_dir = Path(tag_dir)
    folder = CheckpointDir(tag_dir.parent).universal_dir(tag_dir.name)
    if not (folder / INDEX).is_file():
        raise CheckpointError(f"{folder}: no universal copy ({INDEX}) in this checkpoint")
    return SafetensorsSource(folder)
