"""The way back from an export: `trinityx import-hf` of a TrinityX HF folder writes a training
output dir (RunLayout) that training, evaluation and export read like any run's, so an exported
model can be trained further or re-exported bit for bit.

    OUT/backbone/                       import-hf checkpoint of the base model at the asked TP
    OUT/stage1/<expert>/expert.safetensors
    OUT/stage2/router.safetensors       (and validation.json when the folder has one)
    OUT/config.yaml                     a run config; its data.tasks paths are placeholders
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from trinityx_ds.config import config_from_dict, save_config
from trinityx_ds.convert.backbone_ckpt import copy_tokenizer, import_hf
from trinityx_ds.convert.formats import _base_config, _dtype
from trinityx_ds.convert.inputs import ExportSource, open_export_source
from trinityx_ds.errors import CheckpointError
from trinityx_ds.model.assemble import nonfinite
from trinityx_ds.model.mocae_spec import EXPERTS, expert_tensors, mocae_role
from trinityx_ds.model.weights import DTYPES, META
from trinityx_ds.storage.atomic import save_safetensors, staged_dir
from trinityx_ds.storage.fingerprint import model_fingerprint
from trinityx_ds.storage.layout import RunLayout

BACKBONE = "backbone"  # OUT/backbone: the run config's model.checkpoint


def import_trinityx(hf_dir: str | Path, out_dir: str | Path, tp: int = 1, overwrite: bool = False) -> Path:
    """A TrinityX HF folder as a starting point for training: OUT/backbone (import-hf checkpoint at
    `tp`), OUT/stage1/<expert>/expert.safetensors, OUT/stage2/router.safetensors (the layout of a
    training output dir) and OUT/config.yaml, a run config whose data.tasks paths are placeholders."""
    hf_dir, out = Path(hf_dir), Path(out_dir)
    with staged_dir(out, overwrite) as tmp:
        s = open_export_source(hf_dir)
        if s.moe is None:
            raise CheckpointError(f"{hf_dir}/config.json: model_type is not 'trinityx' (use `trinityx import-hf`)")
        dtype = {v: k for k, v in DTYPES.items()}[_dtype(s)]
        run = RunLayout(tmp)
        _import_backbone(s, hf_dir, tmp / BACKBONE, tp, dtype)
        # what the imported files are: the backbone they now sit on (its fingerprint, as a trained
        # expert records it: stage 2 and export check it), and where they came from
        meta = {"backbone": model_fingerprint(tmp / BACKBONE), "kind": s.moe.kind, "imported_from": str(hf_dir)}
        for n in s.moe.expert_names:  # one expert in memory at a time
            tensors = _checked({k: s.read(k) for k in expert_tensors(s.mocae_files, n)}, s)
            save_safetensors(tensors, run.expert_file(n), {**meta, "trinityx": "expert", "expert": n})
            s.release()
        save_safetensors(_checked({k: s.read(k) for k in s.mocae_files if mocae_role(k) != EXPERTS}, s),
                         run.router_file, {**meta, "trinityx": "stage2", "experts": json.dumps(s.moe.expert_names)})
        if s.validation:
            run.validation_file.write_text(json.dumps(s.validation, indent=2))
        cfg = {"name": hf_dir.name or "trinityx",
               "model": {"checkpoint": str((out / BACKBONE).resolve()), "dtype": dtype},
               **s.moe.to_run_sections(),
               "data": {"tasks": {n: [{"path": f"REPLACE_ME/{n}.jsonl"}] for n in s.moe.expert_names}},
               "output": {"dir": str(out.resolve())}}
        save_config(config_from_dict(cfg, check_paths=False), str(run.config_file))
    return out


def _checked(tensors: dict, s: ExportSource) -> dict:
    """`tensors` once each is a floating-point tensor of finite values; else CheckpointError naming
    the file and the tensor (an int64 or NaN expert reached the HF export before, issue 28)."""
    for k, t in tensors.items():
        if not t.is_floating_point():
            raise CheckpointError(f"{s.where(k)}: tensor {k!r} is {t.dtype}, not a floating-point tensor")
        problem = nonfinite(s.where(k), k, t)
        if problem:
            raise CheckpointError(problem)
    return tensors


def _import_backbone(s: ExportSource, hf_dir: Path, out: Path, tp: int, dtype: str) -> None:
    """import_hf on a view of the folder: a base config.json and an index naming the original shard
    files, so the backbone is re-sliced without copying it first."""
    with tempfile.TemporaryDirectory(dir=out.parent) as view:
        view = Path(view)
        _base_config(s, dtype=str(DTYPES[dtype]).removeprefix("torch.")).save_pretrained(view)
        weight_map = {k: str((hf_dir / f).resolve()) for k, f in s.src.weight_map.items() if k not in s.mocae_files}
        (view / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        for d in s.tokenizer_dirs:
            copy_tokenizer(d, view)
        import_hf(view, out, tp=tp, dtype=dtype)
    meta = json.loads((out / META).read_text())
    meta["source"] = str(hf_dir.resolve())  # not the temporary view
    (out / META).write_text(json.dumps(meta, indent=2))
