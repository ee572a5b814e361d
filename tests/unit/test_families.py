"""Gemma and Qwen3 dense: what the architecture reads from their configs, the exactness of the
Gemma norm fold, import-hf shards that give the HF tensors back, planner presets that count what
transformers builds, and the one-line refusals of every other family and setting, by every entry
point, before any process starts."""
import json
import os
import subprocess
import sys

import pytest
import torch

from tests.dist import ROOT
from trinityx_ds.cli import main
from trinityx_ds.config.families import SUPPORTED_MODEL_TYPES, hf_config_problems
from trinityx_ds.model.arch import ArchError, ModelArch
from trinityx_ds.model.llama_adapter import LlamaAdapter, fold_norm, unfold_norm
from trinityx_ds.model.tiny import TINY, TINY_GEMMA, TINY_QWEN3, make_tiny_model
from trinityx_ds.train.tiny_run import write_config


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {"gemma": make_tiny_model(root / "gemma", tokenizer=False, **TINY_GEMMA),
            "qwen3": make_tiny_model(root / "qwen3", tokenizer=False, **TINY_QWEN3)}


def _config_only(folder, **cfg):
    """An HF folder holding only config.json: every refusal below comes before any weight is read."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({**TINY, "model_type": "llama", **cfg}))
    return folder


def _one_line(err: str, command: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"trinityx {command}: ") and "Traceback" not in err, err
    return lines[0]


# ------------------------------------------------------------------------------ architecture
def test_arch_reads_each_familys_differences(models):
    gemma, qwen3 = ModelArch.from_hf_dir(models["gemma"]), ModelArch.from_hf_dir(models["qwen3"])
    assert (gemma.hidden_act, gemma.norm_plus_one, gemma.embedding_scale, gemma.qk_norm) == \
        ("gelu_pytorch_tanh", True, True, False)
    assert gemma.head_dim == 16 != gemma.hidden_size // gemma.num_heads and gemma.tie_word_embeddings
    assert (qwen3.hidden_act, qwen3.qk_norm, qwen3.norm_plus_one, qwen3.qkv_bias, qwen3.head_dim) == \
        ("silu", True, False, False, 24)
    # Gemma's releases spell the tanh GELU "gelu" (transformers reads it as gelu_pytorch_tanh)
    legacy = {**json.loads((models["gemma"] / "config.json").read_text()), "hidden_act": "gelu"}
    assert ModelArch.from_hf_dict(legacy).hidden_act == "gelu_pytorch_tanh"


# ------------------------------------------------------------------------------ the (1 + w) fold
def test_gemma_norm_fold_is_exact_where_it_can_be():
    """fold is transformers' own multiplier; fold(unfold(weight)) == weight for every folded w >= -2
    (the exported model computes with the same 1 + w, bit for bit); w itself comes back exactly
    precisely where 1 + w is representable in fp32."""
    g = torch.Generator().manual_seed(0)
    w = torch.cat([torch.randn(100_000, generator=g) * s for s in (0.01, 0.1, 1.0, 5.0)]
                  + [torch.rand(100_000, generator=g) * 32 - 2,
                     torch.tensor([-2.0, -1.0, -0.75, -0.5, -0.4999999, 0.0, 1e-30, 2.0 ** -24, 2.0 ** -23, 1.0,
                                   30.0, 1000.0])]).float()
    w = w[w >= -2]
    folded = fold_norm(w)
    assert torch.equal(folded, 1.0 + w.float())  # GemmaRMSNorm: output * (1.0 + self.weight.float())
    back = unfold_norm(folded)
    assert torch.equal(fold_norm(back), folded)  # same multiplier, every value
    representable = folded.double() - 1.0 == w.double()  # 1 + w is exactly an fp32 number (exact in fp64)
    assert torch.equal(back == w, representable)  # w exact iff 1 + w is an fp32 number
    assert representable[w <= -0.5].all() and not representable.all()  # both cases occur


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("family", ["gemma", "qwen3"])
def test_import_gives_back_the_hf_tensors_and_reimports_identically(tmp_path, models, family, tp):
    """import-hf's HF view is the HF folder bit for bit (Gemma's norms: the originals it keeps);
    without them, unfolding gives the same multipliers, not always the same bits; either view
    re-imports to the very megatron tensors (HF -> megatron -> HF -> megatron is the identity)."""
    from trinityx_ds.convert.backbone_ckpt import import_hf
    from trinityx_ds.model.weights import ORIGINALS, ShardedCheckpoint, backbone_param_names
    from trinityx_ds.storage.sources import SafetensorsSource

    ckpt = ShardedCheckpoint(import_hf(models[family], tmp_path / "ckpt", tp=tp))
    hf, adapter = SafetensorsSource(models[family]), LlamaAdapter(ckpt.arch, tp)
    names = set(adapter.hf_names())
    assert names == set(hf.keys()) - ({"lm_head.weight"} if ckpt.arch.tie_word_embeddings else set())
    views = [ckpt.hf_view()]
    for name in names:
        assert torch.equal(views[0].read(name), hf.read(name)), name
    if family == "gemma":  # megatron holds transformers' multiplier
        assert torch.equal(ckpt.shard(0, "decoder.final_layernorm.weight"), 1.0 + hf.read("model.norm.weight"))
        (ckpt.folder / ORIGINALS).unlink()
        views.append(ShardedCheckpoint(ckpt.folder).hf_view())
        assert all(adapter.hf_equal(n, views[1].read(n), hf.read(n)) for n in names)
        assert any(not torch.equal(views[1].read(n), hf.read(n)) for n in adapter.folded_names())
    else:
        assert adapter.folded_names() == [] and not (ckpt.folder / ORIGINALS).exists()
        assert {f"model.layers.{i}.self_attn.{p}_norm.weight" for i in range(2) for p in "qk"} <= names
    for view in views:
        for rank in range(tp):
            for name in backbone_param_names(ckpt.arch):
                assert torch.equal(adapter.shard(name, view, rank), ckpt.shard(rank, name)), name


# ------------------------------------------------------------------------------ presets
@pytest.mark.parametrize("name", ["gemma-7b", "qwen3-8b", "qwen3-32b", "llama-3.1-8b", "llama-3.1-70b"])
def test_preset_parameter_count_is_what_transformers_builds(name):
    from transformers import AutoConfig, AutoModelForCausalLM

    from trinityx_ds.plan import PRESETS, backbone_params
    from trinityx_ds.plan.presets import load_arch

    preset = dict(PRESETS[name])
    config = AutoConfig.for_model(preset.pop("model_type"), **preset)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert backbone_params(load_arch(name)[1]) == sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("cfg,field", [
    ({"model_type": "gemma2"}, "model_type: 'gemma2' — supported: llama, mistral, qwen2, gemma, qwen3 (Gemma-2"),
    ({"model_type": "qwen3_moe"}, "model_type: 'qwen3_moe' — supported: llama, mistral, qwen2, gemma, qwen3 (Qwen3-MoE"),
    ({"model_type": "gpt2"}, "model_type: 'gpt2' — supported: llama, mistral, qwen2, gemma, qwen3"),
    ({"model_type": "gemma", "final_logit_softcapping": 30.0}, "final_logit_softcapping: 30.0 — no logit soft-capping"),
    ({"model_type": "gemma", "attn_logit_softcapping": 50.0}, "attn_logit_softcapping: 50.0 — no logit soft-capping"),
    ({"model_type": "gemma", "hidden_act": "silu"}, "hidden_act: 'silu' — gemma supports gelu_pytorch_tanh or gelu"),
    ({"model_type": "gemma", "query_pre_attn_scalar": 144}, "query_pre_attn_scalar: 144 — must equal head_dim (16)"),
    ({"model_type": "gemma", "use_bidirectional_attention": True}, "use_bidirectional_attention: True — causal"),
    ({"model_type": "qwen3", "attention_bias": True}, "attention_bias: True — qwen3 without attention bias only"),
    ({"model_type": "llama", "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling.rope_type: 'yarn'"),
])
def test_unsupported_settings_are_named(cfg, field):
    full = {**TINY, "head_dim": 16, **cfg}
    problems = hf_config_problems(full)
    assert len(problems) == 1 and problems[0].startswith(f"config.json {field}"), problems
    with pytest.raises(ArchError, match="^config.json "):
        ModelArch.from_hf_dict(full)


def test_supported_families_are_accepted(models):
    assert SUPPORTED_MODEL_TYPES == ("llama", "mistral", "qwen2", "gemma", "qwen3")
    for folder in models.values():
        assert hf_config_problems(json.loads((folder / "config.json").read_text())) == []


@pytest.mark.parametrize("bad", [{"model_type": "gemma2"}, {"model_type": "qwen3_moe"},
                                 {"model_type": "gemma", "final_logit_softcapping": 30.0}])
def test_import_parity_eval_refuse_in_one_line(tmp_path, capsys, bad):
    folder = _config_only(tmp_path / "m", **bad)
    for argv, command in ((["import-hf", str(folder), str(tmp_path / "out")], "import-hf"),
                          (["parity", str(folder), "--tp", "2"], "parity"),
                          (["eval", "--checkpoint", str(folder), "--suite", "routing", "--nproc", "2"], "eval")):
        assert main(argv) == 2, argv
        line = _one_line(capsys.readouterr().err, command)
        assert f"{folder}: config.json " in line
        assert ("model_type: " in line or "softcapping: 30.0" in line), line
    assert not (tmp_path / "out").exists()


def test_parity_refuses_a_window_shorter_than_its_sequences(tmp_path, capsys):
    folder = _config_only(tmp_path / "m", model_type="qwen3", use_sliding_window=True, sliding_window=16,
                          max_window_layers=0, head_dim=16)
    assert main(["parity", str(folder), "--tp", "1"]) == 2
    line = _one_line(capsys.readouterr().err, "parity")
    assert "parity sequence length: 24 — must not exceed the model's sliding_window (16)" in line


@pytest.mark.parametrize("bad,fragment", [
    ({"model_type": "gemma2"}, "config.json model_type: 'gemma2' — supported:"),
    ({"model_type": "gemma", "attn_logit_softcapping": 50.0}, "config.json attn_logit_softcapping: 50.0"),
    ({"model_type": "mistral", "sliding_window": 32}, "data.max_seq_len: 64 — must not exceed the model's sliding_window (32)"),
    # Qwen3 windows the layers from max_window_layers on: exact while sequences fit, refused beyond
    ({"model_type": "qwen3", "use_sliding_window": True, "sliding_window": 32, "max_window_layers": 1,
      "layer_types": ["full_attention", "sliding_attention"]},
     "data.max_seq_len: 64 — must not exceed the model's sliding_window (32)"),
])
@pytest.mark.parametrize("nproc", [["--nproc", "2"], []])  # the launcher, or a rank under torchrun/srun
def test_train_refuses_in_one_line(tmp_path, capsys, bad, fragment, nproc):
    cfg = write_config(tmp_path, _config_only(tmp_path / "m", **bad))
    assert main(["train", "experts", "--config", str(cfg), *nproc]) == 2
    assert fragment in _one_line(capsys.readouterr().err, "train")


def test_parity_command_exits_2_without_a_traceback(tmp_path):
    """As a user runs it (the command that crashed on both ranks before): one line, exit 2."""
    folder = _config_only(tmp_path / "m", model_type="gemma2")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "trinityx_ds.cli", "parity", str(folder), "--tp", "2"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("trinityx ")]
    assert len(lines) == 1 and "model_type: 'gemma2'" in lines[0] and "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("name,tp", [("gemma-7b", 8), ("qwen3-8b", 4)])
def test_preset_builds_per_rank_what_the_plan_counts(name, tp):
    """The megatron model of the preset (GeGLU, head_dim 256 / q-k layernorms), built per TP rank on
    the meta device with LoRA experts, holds exactly the parameters the planner counts."""
    from trinityx_ds.plan import MoCaEPlan, load_arch
    from trinityx_ds.plan.verify import verify_layout

    got = verify_layout(load_arch(name)[1], MoCaEPlan(kind="lora"), tp=tp, stages=(2,), ranks=(0, tp - 1))
    assert len(got) == 2 and all(c.ok for c in got), [c.describe() for c in got]
