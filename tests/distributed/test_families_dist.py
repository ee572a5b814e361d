"""Gemma and Qwen3 through training and export: the model trained at TP=2, exported, and loaded
by transformers in a fresh process computes the training model's logits.

Backbone parity of both families (TP=1 and TP=2, against transformers) is in
test_backbone_parity.py, in the same two launches as the other families.
"""
import json

import pytest

from tests.distributed.test_export import TOL, WORKER, check_trinityx, hf_eval
from trinityx_ds.convert.write import export_hf
from trinityx_ds.model.tiny import TINY_GEMMA, TINY_QWEN3, make_tiny_model

pytestmark = pytest.mark.distributed


def test_gemma_tp2_stage1_stage2_export_reproduced_by_transformers(run_dist, tmp_path):
    """One job: stage 1 trains three LoRA experts on the tiny Gemma (GeGLU, folded (1 + w) norms,
    scaled embeddings, padded query group, tied embeddings) at TP=2 x ZeRO-3, stage 2 trains the
    top-1 router over them; the live stage-2 model's logits are the reference. The export loaded
    with AutoModelForCausalLM (registered, then trust_remote_code without trinityx_ds) matches it
    for top-1, dense (every expert) and forced routing; the dense export is a plain Gemma."""
    from trinityx_ds.train.tiny_run import write_config

    model = make_tiny_model(tmp_path / "gemma", **TINY_GEMMA)
    cfg = write_config(tmp_path / "train", model, **{
        "parallel": {"tp": 2, "zero_stage": 3}, "router": {"top_k": 1}, "output": {"tensorboard": False},
        "train.stage1": {"steps": 2, "micro_batch": 2}, "train.stage2": {"steps": 2, "micro_batch": 2}})
    info = run_dist(WORKER, 2, "pipeline", str(cfg), "1", timeout=300)
    assert info["stage1_steps"] == {"help": 2, "harm": 2, "honest": 2}
    run = tmp_path / "train" / "out"
    out = export_hf(run, tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["base_model_type"] == "gemma"
    ref = run / "reference.pt"
    for remote in (False, True):
        res = hf_eval(out, ref, tmp_path, remote=remote)
        print(f"gemma TP=2 export (remote={remote}): routed {res['routed']:.2e} dense {res['dense']:.2e} "
              f"forced {res['forced']:.2e}")
        check_trinityx(res, remote=remote)
    dense = export_hf(run, tmp_path / "dense", fmt="dense", expert="harm")
    res = hf_eval(dense, ref, tmp_path, dense_of="harm", remote=True)
    assert res["class"] == "GemmaForCausalLM" and res["forced"] <= TOL, res


def test_qwen3_tp2_lora_export(run_dist, tmp_path):
    """The tiny Qwen3 (q/k norms, explicit head_dim, padded group) as a TP=2 MoCaE model with
    LoRA experts, top-2 and unequal priors: its TrinityX export, loaded with trust_remote_code,
    computes its logits (the dense export equals the forced expert: test_export_unit.py)."""
    model = make_tiny_model(tmp_path / "qwen3", tokenizer=False, **TINY_QWEN3)
    run = tmp_path / "run"
    opts = {"kind": "lora", "tp": 2, "experts": 3, "top_k": 2, "importance": [1.0, 2.0, 0.5], "force": 1}
    run_dist(WORKER, 2, "build", str(model), str(run), json.dumps(opts))
    ref = run / "reference.pt"
    res = hf_eval(export_hf(run, tmp_path / "hf"), ref, tmp_path, remote=True)
    print(f"qwen3 TP=2 export: routed {res['routed']:.2e} dense {res['dense']:.2e} forced {res['forced']:.2e}")
    check_trinityx(res, remote=True)
