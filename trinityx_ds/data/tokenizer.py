"""The one rule for a run's tokenizer: where it lives, and which id pads a batch. Training,
validation and evaluation all ask here."""
from __future__ import annotations

from pathlib import Path

from trinityx_ds.storage.layout import import_origin


def tokenizer_dir(model_path: str | Path, explicit: str | Path | None = None) -> str:
    """Where the tokenizer lives: `model.tokenizer` when given, else the model folder when it holds
    one, else the HF folder an imported checkpoint was made from."""
    if explicit:
        return str(explicit)
    if Path(model_path, "tokenizer_config.json").is_file():
        return str(model_path)
    return str(import_origin(model_path))


def load_tokenizer(model_path: str | Path, explicit: str | Path | None = None):
    from transformers import AutoTokenizer  # heavy: only when a tokenizer is wanted

    return AutoTokenizer.from_pretrained(tokenizer_dir(model_path, explicit), local_files_only=True)


def pad_id(tokenizer) -> int:
    """The pad token, else EOS (Llama-family tokenizers often have no pad token): what every batch
    is right-padded with (the padded positions carry no label)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
