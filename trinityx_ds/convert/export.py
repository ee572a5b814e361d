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

This module is the command: every `trinityx` invocation (`--help` included) builds its parser, so it
imports nothing heavy. The export itself, `export_hf`, is convert/write.py's (torch, safetensors,
transformers), imported when the command runs.
"""
from __future__ import annotations

import json

from trinityx_ds.convert.adapters import ADAPTERS
from trinityx_ds.convert.export_spec import FORMATS
from trinityx_ds.storage.layout import CHECKPOINTS

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


def parse_bytes(text: str) -> int:
    """'5GB', '500MB', '64KB' or a plain number of bytes."""
    units = {"KB": 1024, "MB": 1024**2, "GB": 1024**3}
    for u, k in units.items():
        if text.upper().endswith(u):
            return int(float(text[: -len(u)]) * k)
    return int(text)


def cmd_export(args) -> int:
    from trinityx_ds.convert.write import export_hf

    out = export_hf(args.run, args.out, fmt=args.format, expert=args.expert, overwrite=args.overwrite,
                    max_shard_bytes=parse_bytes(args.max_shard_size), config=args.config)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    print(f"exported {args.run} -> {out} ({args.format}, {len(set(index['weight_map'].values()))} shards, "
          f"{index['metadata']['total_size'] / 1e6:.1f} MB)")
    if args.format == "peft":
        names = sorted(p.name for p in (out / ADAPTERS).iterdir() if p.is_dir())
        print(f"adapters: {', '.join(f'{n}={out / ADAPTERS / n}' for n in names)} (router: {out / ADAPTERS})")
    return 0
