"""import-hf: TP shards that give back the HF tensors exactly, at any TP, and clear refusals."""
import pytest
import torch

from trinityx_ds.cli import main
from trinityx_ds.convert.backbone_ckpt import import_hf
from trinityx_ds.model.weights import ShardedCheckpoint, shard_file
from trinityx_ds.model.llama_adapter import LlamaAdapter
from trinityx_ds.storage.sources import SafetensorsSource
from trinityx_ds.model.tiny import make_tiny_model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("import")
    return {
        "gqa": make_tiny_model(root / "gqa", tokenizer=False),
        # 3 KV groups at TP=2: one padded group; tied embeddings; qkv biases
        "padded": make_tiny_model(root / "padded", model_type="qwen2", tokenizer=False, num_attention_heads=6,
                                  num_key_value_heads=3, hidden_size=96, tie_word_embeddings=True),
    }


@pytest.mark.parametrize("name", ["gqa", "padded"])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_shards_give_back_hf_tensors(tmp_path, models, name, tp):
    out = import_hf(models[name], tmp_path / "ckpt", tp=tp)
    ckpt = ShardedCheckpoint(out)
    assert ckpt.tp == tp and all(shard_file(out, r).is_file() for r in range(tp))
    hf = SafetensorsSource(models[name])
    view = ckpt.hf_view()
    for key in hf.keys():
        if key == "lm_head.weight" and ckpt.arch.tie_word_embeddings:
            continue
        assert torch.equal(view.read(key), hf.read(key)), key
    # re-slicing the checkpoint for another TP equals slicing the HF folder directly
    other = LlamaAdapter(ckpt.arch, 2 if tp != 2 else 1)
    for mname in ("decoder.layers.0.self_attention.linear_qkv.weight", "embedding.word_embeddings.weight",
                  "decoder.layers.1.mlp.linear_fc1.weight", "decoder.layers.1.self_attention.linear_proj.weight"):
        assert torch.equal(other.shard(mname, view, 0), other.shard(mname, hf, 0)), mname


def test_padded_groups_are_zero(tmp_path, models):
    ckpt = ShardedCheckpoint(import_hf(models["padded"], tmp_path / "ckpt", tp=2))
    qkv = ckpt.shard(1, "decoder.layers.0.self_attention.linear_qkv.weight")  # groups 2 (real) and 3 (padding)
    per_group = qkv.shape[0] // 2
    assert qkv[per_group:].abs().sum() == 0 and qkv[:per_group].abs().sum() > 0
    proj = ckpt.shard(1, "decoder.layers.0.self_attention.linear_proj.weight")
    assert proj[:, proj.shape[1] // 2:].abs().sum() == 0


def test_cli_refuses_to_overwrite_and_names_missing_weights(tmp_path, models, capsys):
    out = tmp_path / "ckpt"
    assert main(["import-hf", str(models["gqa"]), str(out), "--tp", "2"]) == 0
    assert main(["import-hf", str(models["gqa"]), str(out), "--tp", "2"]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--overwrite" in err and "Traceback" not in err
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text((models["gqa"] / "config.json").read_text())
    assert main(["import-hf", str(empty), str(tmp_path / "x")]) == 2
    assert "model.safetensors" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["gqa", "padded"])
def test_view_names_are_the_streamed_names_and_others_are_refused_without_reading(tmp_path, models, name):
    from trinityx_ds.storage.sources import ChainSource, DictSource, MissingTensor, UnshardedSource

    ckpt = ShardedCheckpoint(import_hf(models[name], tmp_path / "ckpt", tp=2))
    adapter = LlamaAdapter(ckpt.arch, 2)
    assert sorted(adapter.hf_names()) == sorted(n for n, _ in adapter.unshard(ckpt.shard))
    reads = []
    counted = UnshardedSource(adapter, lambda r, n: reads.append(n) or ckpt.shard(r, n))
    lora = torch.ones(2, 3)
    chain = ChainSource([counted, DictSource({"model.layers.0.mlp.experts.help.lora_A": lora})])
    assert chain.read("model.layers.0.mlp.experts.help.lora_A") is lora and reads == []
    with pytest.raises(MissingTensor):
        counted.shape("model.layers.0.mlp.nothing")
    assert reads == []
