"""`trinityx import-hf`: a local HF folder into the TP-sharded starting checkpoint that training
reads (the format and its reader: model/weights.py)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from safetensors.torch import save_file

from trinityx_ds.model.arch import ArchError, ModelArch
from trinityx_ds.model.llama_adapter import LlamaAdapter
from trinityx_ds.model.weights import DTYPES, FORMAT, META, ORIGINALS, backbone_param_names, shard_file
from trinityx_ds.storage.sources import SafetensorsSource

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "chat_template.jinja", "generation_config.json")


def copy_tokenizer(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def import_hf(hf_dir: str | Path, out_dir: str | Path, tp: int, dtype: str = "fp32", overwrite: bool = False) -> Path:
    """Converts a local HF folder into a TP-sharded starting checkpoint, rank by rank.

    Written into a temporary sibling folder and renamed at the end, so a crash leaves no
    half-written checkpoint behind. Peak memory is one rank's shard.
    """
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    try:
        arch = ModelArch.from_hf_dir(hf_dir)
    except ArchError as e:  # one line naming the folder and the field, before anything is written
        raise ArchError(f"{hf_dir}: {e}" if str(e).startswith("config.json") else str(e)) from None
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
    folded = adapter.folded_names()
    if folded:  # Gemma: the fold may not give w back bit for bit; keep it (model/weights.py)
        save_file({n: src.read(n).to(DTYPES[dtype]).contiguous() for n in folded}, tmp / ORIGINALS)
    meta = {"format": FORMAT, "version": 1, "tp": tp, "dtype": dtype, "source": str(hf_dir.resolve()),
            "padded_vocab_size": adapter.padded_vocab, "hf_config": arch.hf_config, "arch": arch.to_dict()}
    (tmp / META).write_text(json.dumps(meta, indent=2))
    copy_tokenizer(hf_dir, tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


