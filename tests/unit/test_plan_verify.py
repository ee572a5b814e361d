"""The plan against the real model: megatron GPTModel + MoCaE blocks built per rank on the meta
device (torch's fake process group, one process, nothing allocated), counted, compared."""
from __future__ import annotations

import argparse

import pytest

from trinityx_ds.plan import MoCaEPlan, add_plan_arguments, cmd_plan, load_arch, per_rank_params, trainable_params
from trinityx_ds.plan import verify
from trinityx_ds.plan.verify import param_group, verify_layout

LLAMA2_70B = 68_976_648_192
H, F, L, TP = 8192, 28672, 80, 8


@pytest.fixture(scope="module")
def arch70():
    return load_arch("llama-2-70b")[1]


def test_llama2_70b_tp8_every_rank_builds_what_the_plan_says(arch70):
    moe = MoCaEPlan(kind="lora", lora_rank=8)
    got = verify_layout(arch70, moe, tp=TP, stages=(2,))
    assert [c.tp_rank for c in got] == list(range(TP)) and all(c.pp_rank == c.ep_rank == 0 for c in got)
    plan = per_rank_params(arch70, TP, 1, 0, moe)
    for c in got:
        assert c.ok and c.built == plan
    built = got[0].built
    # the TP shards add up to the published model; only the RMSNorm weights are replicated
    replicated = L * 2 * H + H
    backbone = sum(built[g] for g in ("embedding", "layers", "final_norm", "output"))
    assert TP * (backbone - replicated) + replicated == LLAMA2_70B
    # 3 LoRA experts per layer: gate/up A [r, H] + B [F/tp, r], down A [r, F/tp] + B [H, r]
    assert built["experts"] == L * 3 * (2 * (8 * H + F // TP * 8) + (8 * F // TP + H * 8))
    assert built["router"] == L * 3 * H


def test_stage1_builds_one_expert_the_plan_trains(arch70):
    moe = MoCaEPlan(kind="lora", lora_rank=8)
    got = verify_layout(arch70, moe, tp=TP, stages=(1,), ranks=(0, TP - 1))
    assert [c.tp_rank for c in got] == [0, TP - 1]
    for c in got:
        assert c.ok
        assert c.built["experts"] == trainable_params(arch70, TP, 1, 0, moe, 1)["dense"]  # what stage 1 trains
        assert c.built["router"] == L * H  # a one-expert router


def test_full_experts_placed_by_expert_parallelism(arch70):
    moe = MoCaEPlan(kind="full", num_experts=4, top_k=2)
    got = verify_layout(arch70, moe, tp=TP, ep=2, stages=(2,), ranks=(0, 2 * TP - 1))
    assert [(c.tp_rank, c.ep_rank) for c in got] == [(0, 0), (TP - 1, 1)]
    dense = per_rank_params(arch70, TP, 1, 0, None)["layers"]
    for c in got:
        assert c.ok
        assert c.built["experts"] == L * 2 * 3 * H * F // TP  # E/ep = 2 whole FFNs per layer, TP-sharded
        assert c.built["layers"] == dense - L * 3 * H * F // TP  # they replace the dense FFN


def test_pipeline_stages_and_chosen_layers():
    arch = load_arch("llama-3-8b")[1]
    moe = MoCaEPlan(kind="lora", layers=(3, 31), lora_targets=("up_proj",), normalize_output=True,
                    learnable_temperature=True)
    got = verify_layout(arch, moe, tp=2, pp=4, stages=(2,), ranks=(0, 3, 7))
    assert [(c.tp_rank, c.pp_rank) for c in got] == [(0, 0), (1, 1), (1, 3)]
    assert all(c.ok for c in got)
    assert [c.built["router"] for c in got] == [3 * 4096 + 1 + 4096, 0, 3 * 4096 + 1 + 4096]
    assert [(c.built["embedding"] > 0, c.built["output"] > 0) for c in got] == [(True, False), (False, False),
                                                                                 (False, True)]


def test_a_wrong_plan_is_caught(monkeypatch, capsys):
    arch = load_arch("tiny-llama")[1]
    monkeypatch.setattr(verify, "per_rank_params",
                        lambda *a: per_rank_params(*a[:4], MoCaEPlan(kind="lora", lora_rank=4), *a[5:]))
    (c,) = verify_layout(arch, MoCaEPlan(kind="lora", lora_rank=8), tp=2, stages=(2,), ranks=(1,))
    assert not c.ok and "BUILT" in c.describe() and c.planned["experts"] < c.built["experts"]
    parser = argparse.ArgumentParser()
    add_plan_arguments(parser)
    rc = cmd_plan(parser.parse_args(["--model", "tiny-llama", "--tp", "2", "--seq-len", "64", "--verify"]))
    out = capsys.readouterr()
    assert rc == 4 and "MISMATCH" in out.out and out.err.count("\n") == 1


def test_cli_verify_prints_every_rank(capsys):
    parser = argparse.ArgumentParser()
    add_plan_arguments(parser)
    rc = cmd_plan(parser.parse_args(["--model", "tiny-llama", "--tp", "2", "--seq-len", "64", "--verify"]))
    out = capsys.readouterr().out
    assert rc == 0 and out.count(": OK: ") == 4  # 2 TP ranks x 2 stages


def test_unknown_parameters_and_unbuildable_layouts_are_refused():
    assert param_group("decoder.layers.3.mlp.experts.gate_proj_A") == "experts"
    with pytest.raises(ValueError, match="does not know"):
        param_group("decoder.mtp.weight")
    with pytest.raises(ValueError, match="tied embeddings"):
        verify_layout(load_arch("smollm2-135m")[1], MoCaEPlan(), tp=1, pp=2)
