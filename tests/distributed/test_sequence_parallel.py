"""Sequence parallelism through MoCaE blocks (`model.sequence_parallel` at TP=2): the router, the
LoRA paths, the full-expert dispatch and the post-mix norm run on the sequence-sharded tokens, and
the model computes what it computes without SP: logits, loss, router and expert gradients, every
router-loss value, the routing shares and the routing EMA (<= 1e-5), with top-1, top-2 and dense
routing, LoRA experts and full experts placed by EP=2 (TP=2 x DP=2)."""
import json
from pathlib import Path

import pytest

from trinityx_ds.model.tiny import make_tiny_model

WORKER = Path(__file__).parent / "workers" / "sp_worker.py"
pytestmark = pytest.mark.distributed
# SmolLM2's head layout (9 heads, 3 KV heads: TP=2 pads a query group) at a tiny width
SMOLLM2_SHAPED = dict(hidden_size=144, num_attention_heads=9, num_key_value_heads=3, intermediate_size=128,
                      tie_word_embeddings=True)
LORA = [{"name": "lora stage 1 (one expert, forced)", "expert_names": ["harm"], "force": True},
        {"name": "lora top-1", "top_k": 1, "task_level": "token"},  # task_ce: every token's own -log p
        {"name": "lora top-2", "top_k": 2, "normalize_output": True, "task_tokens": "all"},  # task_ce: prompt too
        {"name": "lora dense", "top_k": "all", "temperature_mode": "learnable", "task_tokens": "both"}]
FOUR = ["help", "harm", "honest", "instruct"]  # EP=2 places two experts per rank
FULL = [{"name": "full top-2 ep2", "kind": "full", "top_k": 2, "normalize_output": True, "expert_names": FOUR},
        {"name": "full top-1 ep2", "kind": "full", "top_k": 1, "expert_names": FOUR}]


@pytest.fixture(scope="module")
def smollm2_shaped(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("sp") / "smollm2_shaped", tokenizer=False, **SMOLLM2_SHAPED)


def _check(r: dict, names: list[str]) -> None:
    for name in names:
        k = r[name]
        print(f"{name}: logits {k['logits']:.1e} loss {k['loss']:.1e} grad {k['grad']:.1e} "
              f"(router {k['router_grad']:.1e} of {k['router_grad_scale']:.1e}) router losses {k['router_loss']:.1e} "
              f"shares {k['share']:.1e} ema {k['ema']:.1e}")
        n_off, trainable_off, n_on, trainable_on = k["counts"]
        assert n_off == trainable_off and n_on == trainable_on, k  # every MoCaE tensor got a gradient, SP on and off
        assert k["grad_scale"] > 1e-3, k
        if "share_E" in k:  # routed, not forced
            assert k["router_grad_scale"] > 1e-4 and k["kl_prev"] > 0 and k["task_ce"] > 0, k  # the losses are live
            assert 0 < max(k["share_E"]) < 1, k  # routing spreads tokens: the shares compare something
        for what in ("logits", "loss", "grad", "router_grad", "router_loss", "share", "ema"):
            assert k[what] <= 1e-5, (name, what, k)


def test_sequence_parallel_equals_plain_lora_tp2(run_dist, smollm2_shaped):
    r = run_dist(WORKER, 2, str(smollm2_shaped), json.dumps({"ep": 1, "configs": LORA}), timeout=240)
    assert r["dims"] == [2, 1, 1]
    _check(r, [c["name"] for c in LORA])


def test_sequence_parallel_equals_plain_full_experts_ep2(run_dist, smollm2_shaped):
    r = run_dist(WORKER, 4, str(smollm2_shaped), json.dumps({"ep": 2, "configs": FULL}), timeout=300)
    assert r["dims"] == [2, 2, 2]
    _check(r, [c["name"] for c in FULL])
