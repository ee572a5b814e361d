"""The export itself (convert/export.py is its command): an `ExportSource` written as a Hugging
Face folder in one of the formats (convert/formats.py), shard by shard, with its config, tokenizer,
generation config, model code (trinityx) and model card."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from transformers import GenerationConfig

from trinityx_ds.convert.adapters import write_adapters
from trinityx_ds.convert.backbone_ckpt import copy_tokenizer
from trinityx_ds.convert.card import model_card
from trinityx_ds.convert.formats import _plan
from trinityx_ds.convert.inputs import open_export_source
from trinityx_ds.convert.source import ExportSource
from trinityx_ds.errors import CheckpointError
from trinityx_ds.storage.atomic import staged_dir
from trinityx_ds.storage.layout import VALIDATION
from trinityx_ds.storage.shards import DEFAULT_SHARD_BYTES, ShardWriter

HF_MODEL_DIR = Path(__file__).parent / "hf_model"
MODEL_FILES = ("configuration_trinityx.py", "modeling_trinityx.py")  # the remote code AUTO_MAP names


def export_hf(run_or_ckpt: str | Path, out_dir: str | Path, fmt: str = "trinityx", expert: str | None = None,
              overwrite: bool = False, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
              config: str | Path | None = None) -> Path:
    """Writes an HF folder at `out_dir` (see convert/export.py's docstring); returns it.

    `config`: the run config when a training output dir holds none (default: the one saved
    with the run's latest checkpoint)."""
    with staged_dir(out_dir, overwrite) as tmp:
        s = open_export_source(run_or_ckpt, config)
        hf_config, tensors, required = _plan(s, fmt, expert)
        writer = ShardWriter(tmp, max_shard_bytes, on_flush=s.release)
        for name, tensor in tensors:
            writer.add(name, tensor)
        writer.close()
        if fmt == "peft":  # read before the count below: the adapters and router hold the MoCaE tensors
            write_adapters(tmp, s, str(Path(out_dir).resolve()))
        missing = sorted(required - s.reads)
        if missing:
            raise CheckpointError(f"{s.where(missing[0])}: {len(missing)} of {len(required)} expert/router tensors "
                                  f"would be left out of the export (the model has no place for them), "
                                  f"e.g. {missing[0]!r}")
        _write_side_files(tmp, s, hf_config, fmt, expert)
    return Path(out_dir)


def _write_side_files(tmp: Path, s: ExportSource, config, fmt: str, expert: str | None) -> None:
    """Config, tokenizer, generation config, the model code (trinityx), stage 2's report, README."""
    config.save_pretrained(tmp)
    for d in s.tokenizer_dirs:
        if d.is_dir():
            copy_tokenizer(d, tmp)
    if not (tmp / "generation_config.json").is_file():
        GenerationConfig.from_model_config(config).save_pretrained(tmp)
    if fmt == "trinityx" and s.moe is not None:
        for f in MODEL_FILES:
            shutil.copy2(HF_MODEL_DIR / f, tmp / f)
        if s.validation:
            (tmp / VALIDATION).write_text(json.dumps(s.validation, indent=2))
    (tmp / "README.md").write_text(model_card(s, fmt, expert))
