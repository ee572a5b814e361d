"""`trinityx plan`: exact parameter counts, memory terms, DeepSpeed's estimator, the CLI contract."""
from __future__ import annotations

import argparse
import json
from dataclasses import replace

import pytest

from trinityx_ds.plan import (PRESETS, Cluster, Layout, MoCaEPlan, add_plan_arguments, backbone_params, cmd_plan,
                              flops_per_token, largest_module, layer_activations, layout_problems, load_arch,
                              model_states, per_rank_params, plan_layout, recommend, stage_memory,
                              stage_throughput, trainable_params)
from trinityx_ds.plan.layout import GIB, ZeroBuffers
from trinityx_ds.plan.memory import zero3_gathered

LLAMA2_70B = 68_976_648_192


def run_plan(capsys, *argv: str) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser()
    add_plan_arguments(parser)
    rc = cmd_plan(parser.parse_args(list(argv)))
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize("name, published", [
    ("llama-2-7b", 6_738_415_616), ("llama-2-13b", 13_015_864_320), ("llama-2-70b", LLAMA2_70B),
    ("mistral-7b", 7_241_732_096), ("llama-3-8b", 8_030_261_248), ("llama-3-70b", 70_553_706_496),
    ("smollm2-135m", 134_515_008), ("llama-3.1-8b", 8_030_261_248), ("llama-3.1-70b", 70_553_706_496),
    ("gemma-7b", 8_537_680_896), ("qwen3-8b", 8_190_735_360), ("qwen3-32b", 32_762_123_264),
])
def test_preset_parameter_counts_are_the_published_ones(name, published):
    assert backbone_params(load_arch(name)[1]) == published


def test_tiny_preset_is_the_demo_model():
    from trinityx_ds.model.tiny import TINY

    assert {k: PRESETS["tiny-llama"][k] for k in TINY} == TINY


def test_model_accepts_an_hf_config_file_or_folder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(PRESETS["llama-2-7b"]))
    for where in (tmp_path, tmp_path / "config.json"):
        assert backbone_params(load_arch(str(where))[1]) == 6_738_415_616


def test_cmd_plan_json_reports_llama2_70b_backbone(capsys):
    rc, out, _ = run_plan(capsys, "--model", "llama-2-70b", "--nodes", "8", "--json")
    assert rc == 0
    assert json.loads(out)["plan"]["params"]["backbone"] == LLAMA2_70B


def _megatron_rank(h, f, layers, heads, kv, head_dim, vocab, tp):
    """What megatron allocates on one TP rank, from the raw numbers (no padding needed here)."""
    qkv = (heads + 2 * kv) * head_dim // tp * h
    proj = h * heads * head_dim // tp
    fc1, fc2 = 2 * f // tp * h, h * f // tp
    return {"embedding": vocab // tp * h, "layers": layers * (qkv + proj + fc1 + fc2 + 2 * h),
            "final_norm": h, "output": vocab // tp * h}


def test_per_rank_params_llama2_70b_tp8_equal_megatron_allocation():
    arch = load_arch("llama-2-70b")[1]
    expect = _megatron_rank(8192, 28672, 80, 64, 8, 128, 32000, tp=8)
    got = per_rank_params(arch, 8, 1, 0, None)
    assert got == expect | {"router": 0, "experts": 0}
    # TP shards add up to the whole model; only the RMSNorm weights are replicated
    replicated = 80 * 2 * 8192 + 8192
    assert 8 * (sum(got.values()) - replicated) + replicated == LLAMA2_70B


def test_per_rank_params_pipeline_stages_and_mocae():
    arch = load_arch("llama-2-70b")[1]
    whole = per_rank_params(arch, 8, 1, 0, None)
    stages = [per_rank_params(arch, 8, 4, r, None) for r in range(4)]
    assert [s["embedding"] for s in stages] == [whole["embedding"], 0, 0, 0]
    assert [s["output"] > 0 for s in stages] == [False, False, False, True]
    assert sum(s["layers"] for s in stages) == whole["layers"]
    h, f_local, r = 8192, 28672 // 8, 16
    lora = per_rank_params(arch, 8, 1, 0, MoCaEPlan(kind="lora", lora_rank=r, num_experts=3))
    # gate/up: A [r, H] + B [F/tp, r]; down: A [r, F/tp] + B [H, r]; 3 experts, 80 layers
    assert lora["experts"] == 80 * 3 * (2 * (r * h + f_local * r) + (r * f_local + h * r))
    assert lora["router"] == 80 * 3 * h and lora["layers"] == whole["layers"]
    full = per_rank_params(arch, 8, 1, 0, MoCaEPlan(kind="full", num_experts=4), ep=2)
    ffn = 3 * h * f_local
    assert full["experts"] == 80 * 2 * ffn  # E/ep = 2 experts per EP rank
    assert full["layers"] == whole["layers"] - 80 * ffn  # full experts replace the dense FFN


def test_query_group_and_vocab_padding():
    arch = load_arch("smollm2-135m")[1]  # 9 heads, 3 kv groups, tied embeddings
    got = per_rank_params(arch, 2, 1, 0, None)
    heads, kv = 12, 4  # groups padded to a multiple of 2, 3 heads per group
    layer = (heads + 2 * kv) * 64 // 2 * 576 + 576 * heads * 64 // 2 + 3 * 576 * 1536 // 2 + 2 * 576
    assert got == {"embedding": 49152 // 2 * 576, "layers": 30 * layer, "final_norm": 576, "output": 0,
                   "router": 0, "experts": 0}
    tiny = load_arch("tiny-llama")[1]  # vocab 1001, padded to 1004 at tp 4
    assert per_rank_params(tiny, 4, 1, 0, None)["embedding"] == 1004 // 4 * 64


def test_trainable_params_per_stage():
    arch = load_arch("llama-2-7b")[1]
    lora = MoCaEPlan(kind="lora", lora_rank=8)
    one = 3 * 8 * (4096 + 11008)
    assert trainable_params(arch, 1, 1, 0, lora, 1) == {"dense": 32 * one, "experts": 0}  # one expert per run
    assert trainable_params(arch, 1, 1, 0, lora, 2) == {"dense": 32 * 3 * 4096, "experts": 0}
    full = MoCaEPlan(kind="full", train_experts_in_stage2=True)
    # stage 1 holds its single full expert inside the ZeRO engine (partitioned over DP, no EP)
    assert trainable_params(arch, 1, 1, 0, full, 1) == {"dense": 32 * 3 * 4096 * 11008, "experts": 0}
    assert trainable_params(arch, 1, 1, 0, full, 2)["experts"] == 32 * 3 * 3 * 4096 * 11008


def test_recommended_70b_layout_on_8x8_fits_and_explains_every_term(capsys):
    rec = recommend("llama-2-70b", 8, 8, 80)
    best = rec.best
    assert best is not None and best.fits and len(rec.top) > 1
    assert [p.step_s for p in rec.top] == sorted(p.step_s for p in rec.top)
    for st in best.stages:
        m = st.memory
        assert m.total <= 80 * GIB
        tensors = sum(t.value for t in m.terms if t.name not in ("CUDA context + NCCL", "fragmentation margin"))
        assert m.term("fragmentation margin").value == pytest.approx(0.10 * tensors)
    rc, out, _ = run_plan(capsys, "--model", "llama-2-70b", "--nodes", "8")
    assert rc == 0 and best.layout.describe(64) in out
    for term in best.stages[0].memory.terms + best.stages[0].throughput.comm:
        assert f"{term.name}" in out and term.formula in out
    for line in ("compute", "pipeline bubble", "tokens/s per GPU", "implied MFU", "executed GFLOP/token"):
        assert line in out


def test_given_layout_that_cannot_fit_is_refused_with_gib_over(capsys):
    argv = ("--model", "llama-2-70b", "--nodes", "1", "--tp", "1", "--zero", "1", "--act-ckpt")
    rc, out, err = run_plan(capsys, *argv)
    assert rc == 3
    assert "GiB over" in err and "largest term: weights (frozen)" in err
    rc, out, _ = run_plan(capsys, *argv, "--json")
    plan = json.loads(out)
    assert rc == 3 and not plan["plan"]["fits"] and "GiB over" in plan["refused"]
    # 2 B x 69.2B bf16 weights alone exceed an 80 GiB GPU
    assert plan["plan"]["stages"][0]["over_gib"] > 128.0 - 80


def test_unknown_model_and_impossible_layout_exit_2(capsys):
    rc, _, err = run_plan(capsys, "--model", "llama-9-1t")
    assert rc == 2 and err.count("\n") == 1 and "llama-2-70b" in err and "mistral-7b" in err
    rc, _, err = run_plan(capsys, "--model", "llama-2-7b", "--tp", "2", "--pp", "2", "--zero", "3")
    assert rc == 2 and "ZeRO-1" in err
    rc, _, err = run_plan(capsys, "--model", "mistral-7b", "--seq-len", "8192")
    assert rc == 2 and "sliding_window" in err


def test_zero3_model_states_agree_with_deepspeed_estimator():
    """DeepSpeed's estimate_zero3_model_states_mem_needs (what ..._all_cold prints), no offload:
        gpu = 18 B x total_params / total_gpus + 4 B x largest_layer_params
    maps onto our terms as: 18 = weights (trainable) 2 + gradients 4 + optimizer states 12 per
    param over DP; 4 x largest layer = "ZeRO-3 gathered params" (the module being computed and
    the one prefetched behind it, 2 B each). DeepSpeed assumes every parameter trainable and
    released right after use: our frozen weights, reduce bucket and reuse window are outside it.
    """
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    # 1) a fully trainable llama-2-7b over 8 GPUs (DeepSpeed's own case)
    arch = load_arch("llama-2-7b")[1]
    n, largest = backbone_params(arch), largest_module(arch, 1, None)
    ours = model_states(n, 0, 8, zero=3, offload=False)
    ours = ours["weights (trainable)"] + ours["gradients"] + ours["optimizer states"] + zero3_gathered(largest)
    _, ds, _ = estimate_zero3_model_states_mem_needs(n, largest, num_gpus_per_node=8, num_nodes=1, cpu_offload=False)
    assert ours == pytest.approx(ds, rel=0.05)

    # 2) the plan itself: stage 1 of llama-2-70b full experts, tp 8 x dp 8 on 8 nodes; the
    #    trainable model is one expert FFN per layer, TP-sharded, so DeepSpeed's total/GPUs
    #    equals our per-rank trainable / DP
    arch = load_arch("llama-2-70b")[1]
    moe, lay = MoCaEPlan(kind="full"), Layout(tp=8, zero=3, act_ckpt=True)
    mem = stage_memory(arch, moe, lay, Cluster(nodes=8), stage=1)
    ours = sum(mem.term(k).value for k in ("weights (trainable)", "gradients", "optimizer states",
                                             "ZeRO-3 gathered params"))
    total = sum(trainable_params(arch, 1, 1, 0, moe, 1).values())
    largest = largest_module(arch, 8, moe)
    _, ds, _ = estimate_zero3_model_states_mem_needs(total, largest, num_gpus_per_node=8, num_nodes=8,
                                                     cpu_offload=False)
    assert ours == pytest.approx(ds, rel=0.05)
    print(f"70B full-expert stage 1, ZeRO-3: plan {ours / GIB:.3f} GiB, DeepSpeed {ds / GIB:.3f} GiB")


def test_zero2_model_states_agree_with_deepspeed_estimator():
    """estimate_zero2_model_states_mem_needs: 2 B replicated bf16 weights + 18 B / GPUs
    (2 grads16 + 4 grads32 + 4 params32 + 8 Adam) = our weights + gradients + optimizer."""
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    n = backbone_params(load_arch("llama-2-13b")[1])
    ours = sum(v for k, v in model_states(n, 0, 16, zero=2, offload=False).items() if k != "cpu")
    _, ds = estimate_zero2_model_states_mem_needs(n, num_gpus_per_node=8, num_nodes=2, cpu_offload=False)
    assert ours == pytest.approx(ds, rel=0.05)


def test_zero_buffer_defaults_are_deepspeeds():
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    ds, ours = DeepSpeedZeroConfig(), ZeroBuffers()
    assert (ds.reduce_bucket_size, ds.prefetch_bucket_size, ds.max_reuse_distance) == \
        (ours.reduce_bucket_size, ours.prefetch_bucket_size, ours.max_reuse_distance)


def test_activation_terms():
    arch = load_arch("llama-2-70b")[1]
    moe, lay = MoCaEPlan(), Layout(tp=8, seq_len=4096, micro_batch=1, attention="eager")
    s, b, a, t = 4096, 1, 64, 8
    eager = layer_activations(arch, lay, moe, 2, mocae=False)
    flash = layer_activations(arch, replace(lay, attention="sdpa"), moe, 2, mocae=False)
    # a fused kernel drops the s^2 scores and keeps Q, K, V unexpanded: 8 s b h_q -> 4 s b (h_q + h_kv)
    assert eager - flash == 6 * a * s * s * b / t + (8 * 8192 - 4 * (8192 + 1024)) * s * b / t
    assert layer_activations(arch, replace(lay, attention="te"), moe, 2, mocae=False) == flash
    sp = layer_activations(arch, replace(lay, sequence_parallel=True), moe, 2, mocae=False)
    assert eager - sp == 8 * s * b * 8192 * (1 - 1 / t)
    lora = layer_activations(arch, lay, replace(moe, top_k=2), 2, mocae=True)
    assert lora - eager == (8 * 2 + 2 - 8) * s * b * 28672 / t
    cluster = Cluster(nodes=8)
    full = stage_memory(arch, moe, lay, cluster, 2).term("activations").value
    ckpt = stage_memory(arch, moe, replace(lay, act_ckpt=True), cluster, 2).term("activations").value
    assert ckpt < full / 10
    # selective (eager): every layer as a fused kernel keeps it, the one in backward with its recomputed scores
    sel = stage_memory(arch, moe, replace(lay, act_ckpt="selective"), cluster, 2).term("activations").value
    mocae = layer_activations(arch, replace(lay, attention="sdpa"), moe, 2, mocae=True)
    assert sel == 80 * mocae + layer_activations(arch, lay, moe, 2, mocae=True)
    assert ckpt < sel < full
    assert replace(lay, act_ckpt=False).act_ckpt == "none" and replace(lay, act_ckpt=True).act_ckpt == "full"


def test_selective_only_with_eager_attention():
    arch, moe, cluster = load_arch("llama-2-7b")[1], MoCaEPlan(), Cluster()
    assert layout_problems(arch, moe, Layout(act_ckpt="selective", attention="eager"), cluster) == []
    assert layout_problems(arch, moe, Layout(act_ckpt="selective"), cluster) == [
        "selective checkpointing recomputes only attention scores, which sdpa attention never keeps"]


def test_flops_frozen_weights_cost_4n_trainable_6n():
    arch = load_arch("llama-2-7b")[1]
    moe = MoCaEPlan(kind="lora")
    executed, model = flops_per_token(arch, moe, 2, 4096, act_ckpt=False)
    # stage 2 trains only the router: every other matmul weight misses its weight gradient (2 N)
    frozen = backbone_params(arch) - 32000 * 4096 - 32 * 2 * 4096 - 4096 + 32 * moe.lora_params(4096, 11008)
    assert model - executed == pytest.approx(2 * frozen)
    recompute, _ = flops_per_token(arch, moe, 2, 4096, act_ckpt=True)
    assert recompute > executed and flops_per_token(arch, moe, 2, 4096, act_ckpt="full")[0] == recompute
    # selective: one more forward of the core attention (QK^T and AV) in the 32 layers
    selective, _ = flops_per_token(arch, moe, 2, 4096, act_ckpt="selective")
    assert selective - executed == pytest.approx(32 * 4 * 4096 * 4096)


def test_step_time_and_mfu_follow_the_assumptions():
    arch, moe = load_arch("llama-2-7b")[1], MoCaEPlan()
    lay, cluster = Layout(tp=1, zero=1, act_ckpt=True, grad_accum=16), Cluster()
    tp = stage_throughput(arch, moe, lay, cluster, 2)
    assert tp.tokens_per_step == 4096 * 16 * 8
    assert tp.compute_s == pytest.approx(tp.tokens_per_step * tp.flops_per_token / (8 * 989e12 * 0.40))
    assert tp.tokens_per_s_per_gpu == pytest.approx(tp.tokens_per_step / tp.step_s / 8)
    assert tp.mfu == pytest.approx(tp.tokens_per_step * tp.model_flops_per_token / (tp.step_s * 8 * 989e12))


def test_tp_across_nodes_is_penalised():
    arch, moe = load_arch("llama-2-13b")[1], MoCaEPlan()
    cluster = Cluster(nodes=2)
    inside = stage_throughput(arch, moe, Layout(tp=8, zero=1, grad_accum=8), cluster, 2)
    across = stage_throughput(arch, moe, Layout(tp=16, zero=1, grad_accum=16), cluster, 2)
    comm = {t.name: t for t in across.comm}
    assert "IB" in comm["TP all-reduce"].formula and across.step_s > inside.step_s


def test_layout_rules_and_full_experts_with_ep():
    arch, cluster = load_arch("llama-2-70b")[1], Cluster(nodes=8)
    assert layout_problems(arch, MoCaEPlan(), Layout(ep=2), cluster)  # EP needs full experts
    assert layout_problems(arch, MoCaEPlan(kind="full", num_experts=3), Layout(ep=2), cluster)  # 2 does not divide 3
    full = MoCaEPlan(kind="full", num_experts=4, top_k=2)
    plan = plan_layout("llama-2-70b", arch, full, Layout(tp=8, ep=4, zero=3, act_ckpt=True), cluster)
    assert {t.name for t in plan.stages[1].throughput.comm} >= {"EP all-to-all", "ZeRO-3 gather/reduce"}
    # the engine's part partitioned over DP = 8; the EP-placed experts live outside it, whole
    frozen = plan.stages[1].memory.term("weights (frozen)").value
    rank = per_rank_params(arch, 8, 1, 0, full, ep=4)
    assert frozen == pytest.approx(2 * (sum(rank.values()) - rank["experts"] - rank["router"]) / 8
                                   + 2 * rank["experts"])


def test_mocae_plan_from_the_run_config():
    from trinityx_ds.model.mocae import MoCaEConfig

    cfg = MoCaEConfig(kind="full", layers=[0, 5], lora_rank=4, top_k="all", temperature_mode="learnable",
                      normalize_output=True)
    moe = MoCaEPlan.from_mocae_config(cfg)
    assert (moe.kind, moe.num_experts, moe.top_k, moe.layers, moe.lora_rank) == ("full", 3, 3, (0, 5), 4)
    assert moe.router_params(64) == 3 * 64 + 1 + 64  # weight, learnable log-temperature, post-mix norm


def test_stage1_plans_the_one_expert_it_builds():
    """Stage 1 trains one expert per run without EP: its memory holds that expert alone."""
    arch, cluster = load_arch("llama-2-70b")[1], Cluster(nodes=8)
    full, lay = MoCaEPlan(kind="full", num_experts=4), Layout(tp=8, ep=2, zero=3, act_ckpt=True)
    one = per_rank_params(arch, 8, 1, 0, replace(full, num_experts=1, top_k=1), ep=1)
    trained = trainable_params(arch, 8, 1, 0, full, 1)["dense"]
    assert trained == one["experts"] == 80 * 3 * 8192 * 28672 // 8
    mem = stage_memory(arch, full, lay, cluster, 1)
    assert mem.term("weights (frozen)").value == pytest.approx(2 * (sum(one.values()) - trained) / 8)
    assert "EP all-to-all" not in {t.name for t in stage_throughput(arch, full, lay, cluster, 1).comm}
    assert "EP all-to-all" in {t.name for t in stage_throughput(arch, full, lay, cluster, 2).comm}
