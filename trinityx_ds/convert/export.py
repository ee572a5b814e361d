"""`trinityx export-hf`: a run, a training checkpoint or a TrinityX folder as a Hugging Face folder.

Formats (convert/formats.py): `trinityx` (the whole MoCaE model, loadable with
AutoModelForCausalLM once trinityx_ds is imported, or anywhere with trust_remote_code), `dense`
(one expert merged into a plain Llama/Mistral/Qwen2), `mixtral` (only where Mixtral computes
exactly what TrinityX computes; otherwise `ExportRefused` names the setting that prevents it) and
`peft` (the plain backbone, each LoRA expert a PEFT adapter, the router beside them:
convert/adapters.py; `trinityx route` picks an adapter per request, convert/route.py).
Inputs (convert/inputs.py): a training output dir, a training checkpoint of any layout (through
its universal copy), a TrinityX HF folder, or an import-hf checkpoint (backbone only: a plain
model). The way back, a TrinityX folder into a run to train on: convert/import_back.py.

Everything is read through HF-named tensor sources one tensor at a time and written in
safetensors shards of at most `max_shard_bytes`, one shard in memory at a time, into a temporary
folder renamed into place at the end (storage/atomic.staged_dir): a failed export leaves nothing.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from trinityx_ds.convert.adapters import ADAPTERS, write_adapters
from trinityx_ds.convert.backbone_ckpt import copy_tokenizer
from trinityx_ds.convert.card import model_card
from trinityx_ds.convert.formats import AUTO_MAP, FORMATS, ExportRefused, _plan
from trinityx_ds.convert.inputs import open_export_source
from trinityx_ds.convert.source import ExportSource
from trinityx_ds.errors import CheckpointError
from trinityx_ds.storage.atomic import staged_dir
from trinityx_ds.storage.layout import CHECKPOINTS, VALIDATION
from trinityx_ds.storage.shards import DEFAULT_SHARD_BYTES, ShardWriter, parse_bytes

# AUTO_MAP and ExportRefused are formats.py's, named here too for the callers of the export
__all__ = ["AUTO_MAP", "FORMATS", "ExportRefused", "export_hf", "add_export_arguments", "cmd_export"]

HF_MODEL_DIR = Path(__file__).parent / "hf_model"
MODEL_FILES = ("configuration_trinityx.py", "modeling_trinityx.py")  # the remote code AUTO_MAP names


def export_hf(run_or_ckpt: str | Path, out_dir: str | Path, fmt: str = "trinityx", expert: str | None = None,
              overwrite: bool = False, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
              config: str | Path | None = None) -> Path:
    """Writes an HF folder at `out_dir` (see module docstring); returns it.

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
    from transformers import GenerationConfig

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


# ---------------------------------------------------------------------------------------- CLI
def add_export_arguments(p) -> None:
    p.add_argument("run", help=f"training output dir (output.dir), training checkpoint (a run's {CHECKPOINTS}/ folder "
                              "= its latest complete tag, or a step%%08d tag dir; any TP/EP/ZeRO layout), "
                              "TrinityX HF folder, or import-hf checkpoint")
    p.add_argument("out", help="HF folder to write")
    p.add_argument("--format", choices=FORMATS, default="trinityx",
                   help="trinityx (MoCaE model), dense (one expert merged), mixtral (where exact), peft (backbone + "
                        "one PEFT LoRA adapter per expert + router, for vLLM's --lora-modules and `trinityx route`)")
    p.add_argument("--expert", default=None, help="the expert of --format dense")
    p.add_argument("--config", default=None, help="run config (default: the one saved with the checkpoint; for an "
                                                  "output dir, its latest checkpoint's, stage 2's first, else its "
                                                  "config.yaml)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard [5GB]")
    p.add_argument("--overwrite", action="store_true")


def cmd_export(args) -> int:
    out = export_hf(args.run, args.out, fmt=args.format, expert=args.expert, overwrite=args.overwrite,
                    max_shard_bytes=parse_bytes(args.max_shard_size), config=args.config)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    print(f"exported {args.run} -> {out} ({args.format}, {len(set(index['weight_map'].values()))} shards, "
          f"{index['metadata']['total_size'] / 1e6:.1f} MB)")
    if args.format == "peft":
        names = sorted(p.name for p in (out / ADAPTERS).iterdir() if p.is_dir())
        print(f"adapters: {', '.join(f'{n}={out / ADAPTERS / n}' for n in names)} (router: {out / ADAPTERS})")
    return 0
