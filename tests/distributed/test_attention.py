"""`model.attention: sdpa` (torch's scaled_dot_product_attention) computes what megatron's eager
DotProductAttention computes: logits and every gradient, with MoCaE blocks and their router
losses, on a SmolLM2-shaped model (9 heads, 3 KV groups: TP=2 pads a query group); and activation
recomputation (`model.activation_checkpointing`: full with either attention, selective with eager)
changes no gradient."""
from pathlib import Path

import json

import pytest

from trinityx_ds.model.tiny import make_tiny_model

WORKER = Path(__file__).parent / "workers" / "attention_worker.py"
# SmolLM2-135M's head layout (9 heads, 3 KV heads, 3 heads per group) at a tiny width
SMOLLM2_SHAPED = dict(hidden_size=144, num_attention_heads=9, num_key_value_heads=3, intermediate_size=128,
                      tie_word_embeddings=True)


@pytest.fixture(scope="module")
def smollm2_shaped(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("attn") / "smollm2_shaped", tokenizer=False, **SMOLLM2_SHAPED)


@pytest.mark.distributed
@pytest.mark.parametrize("tp", [1, 2])
def test_sdpa_equals_eager_with_mocae(run_dist, smollm2_shaped, tp):
    r = run_dist(WORKER, tp, str(smollm2_shaped), json.dumps({"tp": tp}), timeout=240)
    assert r["heads"] == ([9, 3, 9, 3] if tp == 1 else [9, 3, 12, 4]), r["heads"]  # TP=2: one padded group
    for kind in ("lora", "full"):
        k = r[kind]
        print(f"tp={tp} {kind}: logits {k['logits']:.1e} loss {k['loss']:.1e} grad {k['grad']:.1e} "
              f"(largest grad {k['grad_scale']:.1e}, router {k['router_grad']:.1e}, {k['n_grads']} tensors; "
              "recomputed: " + ", ".join(f"{n} {v:.1e}" for n, v in k["recompute_grad"].items()) + ")")
        assert k["core"] == ["DotProductAttention", "SDPAttention"], k["core"]
        assert k["n_grads"] == k["n_params"]  # every parameter got a gradient, on every rank
        assert k["router_grad"] > 0
        assert k["logits"] <= 1e-5 and k["loss"] <= 1e-5 and k["grad"] <= 1e-5, k
        assert all(v <= 1e-6 for v in k["recompute_grad"].values()), k  # recomputation changes nothing
        # the recomputation really ran: core attention twice in the step (forward, then in backward)
        # under full and selective, and only selective wraps the core attention alone
        assert k["core_calls"] == {"none": 1, "sdpa full": 2, "eager full": 2, "eager selective": 2}, k
        assert k["selective"] == {"none": False, "sdpa full": False, "eager full": False, "eager selective": True}
