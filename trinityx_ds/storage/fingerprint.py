"""What a run's inputs are, by content: the drift check's evidence that a resumed run reads the
data and the backbone its checkpoint was trained on (train/drift.py compares them).

- A data file: its size and SHA-256, streamed (a data file is read whole by every start anyway).
  The name alone says nothing: another file under the same name, with other rows, resumed
  silently before (issue 28).
- A model folder: a sampled fingerprint, not a full hash (a 70B backbone is 140 GB; hashing it on
  every start would take minutes): per weight or config file, its name, its size, and SHA-256 of
  its first, middle and last MiB. A safetensors file starts with its header (every tensor's name,
  dtype, shape and offset), so another architecture or layout changes the first sample, and
  fine-tuned weights change every sample. Two folders equal byte for byte outside those 3 MiB per
  file would be taken as one: no training run produces that.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

CHUNK = 1 << 20
MODEL_FILES = ("*.safetensors", "*.bin", "*.pt", "*.json")  # weights, shards, their indexes and configs


def file_digest(path: str | Path) -> dict:
    """{"bytes", "sha256"} of a whole file, read in 1 MiB chunks."""
    path, h = Path(path), hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return {"bytes": path.stat().st_size, "sha256": h.hexdigest()}


def sampled_digest(path: str | Path) -> str:
    """SHA-256 of a file's size and its first, middle and last MiB (the whole file when smaller)."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        for start in sorted({0, max(size // 2 - CHUNK // 2, 0), max(size - CHUNK, 0)}):
            f.seek(start)
            h.update(f.read(CHUNK))
    return h.hexdigest()


def model_fingerprint(folder: str | Path) -> str:
    """One digest of a model folder (an HF folder or an imported checkpoint): see the module doc.
    The folder's name and place do not count (runs move)."""
    folder = Path(folder)
    files = sorted({p for pattern in MODEL_FILES for p in folder.rglob(pattern) if p.is_file()})
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.relative_to(folder)}\0{sampled_digest(p)}\n".encode())
    return h.hexdigest()
