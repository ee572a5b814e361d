"""HF export without process groups: runs written from seeded HF-space tensors (the files a
training run leaves), exported and loaded with transformers in this process. The distributed
tests check the exported model against the megatron model; these check the formats against each
other, the round trip, the tensor count, bounded memory and the errors."""
import json
import os
import re
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from tests.dist import ROOT
from trinityx_ds.convert import write
from trinityx_ds.convert.export_spec import AUTO_MAP, ExportRefused
from trinityx_ds.convert.write import export_hf
from trinityx_ds.convert.hf_model import TrinityXForCausalLM
from trinityx_ds.convert.import_back import import_trinityx
from trinityx_ds.errors import CheckpointError
from trinityx_ds.model.mocae import MoCaEConfig
from trinityx_ds.model.tiny import TINY_GEMMA, TINY_QWEN3, make_tiny_model, mocae_source
from trinityx_ds.storage.sources import SafetensorsSource
from trinityx_ds.train.tiny_run import write_config

TOL = 1e-4
IDS = torch.randint(0, 1000, (2, 10), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "llama")


def make_run(root: Path, model: Path, kind="lora", top_k=2, importance=None, norm=False, layers="all",
             router_std=0.5) -> Path:
    """A training output dir: stage-1 expert files, stage-2 router file, config.yaml."""
    moe = MoCaEConfig(kind=kind, top_k=top_k, importance=importance, normalize_output=norm, layers=layers,
                      lora_rank=4, lora_alpha=8.0)
    tensors = mocae_source(model, moe, seed=1, router_std=router_std).tensors
    run = root / "run"
    write_config(run, model, experts={"kind": kind, "layers": layers, "lora": {"rank": 4, "alpha": 8.0}},
                 router={"top_k": top_k, "importance": importance, "normalize_output": norm}, output={"dir": str(run)})
    for n in moe.expert_names:
        (run / "stage1" / n).mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in tensors.items() if f".experts.{n}." in k},
                  str(run / "stage1" / n / "expert.safetensors"))
    (run / "stage2").mkdir()
    save_file({k: v.contiguous() for k, v in tensors.items() if ".router." in k or ".post_norm." in k},
              str(run / "stage2" / "router.safetensors"))
    return run


def logits(model_dir: Path, cls=None, **config) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = (cls or AutoModelForCausalLM).from_pretrained(model_dir).eval()
    for k, v in config.items():
        setattr(model.config, k, v)
    with torch.no_grad():
        return model(IDS).logits


def mocae_tensors(run: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in run.glob("stage*/**/*.safetensors"):
        out.update(load_file(f))
    return out


def test_trinityx_export_holds_every_expert_tensor(tiny, tmp_path):
    run = make_run(tmp_path, tiny)
    (run / "stage2" / "validation.json").write_text(json.dumps({"n": 30, "accuracy": 0.9, "ece": 0.05, "brier": 0.1,
                                                                "nll": 0.3, "per_task_accuracy": {"help": 1.0}}))
    out = export_hf(run, tmp_path / "hf", max_shard_bytes=100_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 5
    exported = SafetensorsSource(out)
    source = mocae_tensors(run)
    assert len(source) == 2 * (3 * 3 * 2 + 3)  # layers x (experts x targets x A/B + router)
    for name, t in source.items():  # every expert/router tensor, bit for bit
        assert torch.equal(exported.read(name), t), name
    assert sum(".mlp.experts." in k for k in index["weight_map"]) == sum(".experts." in k for k in source)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "trinityx" and cfg["auto_map"] == AUTO_MAP and cfg["base_model_type"] == "llama"
    assert {"modeling_trinityx.py", "configuration_trinityx.py", "tokenizer.json", "generation_config.json",
            "validation.json"} <= {p.name for p in out.iterdir()}
    card = (out / "README.md").read_text()
    assert "help, harm, honest" in card and "| 0 | 0.7 | [1.0, 1.0, 1.0] |" in card and "| 30 | 0.9000 |" in card


@pytest.mark.parametrize("kind,base,extra", [("lora", "llama", {}), ("full", "llama", {}), ("lora", "qwen2", {}),
                                             ("full", "mistral", {"tie_word_embeddings": True}),
                                             ("lora", "gemma", TINY_GEMMA), ("full", "gemma", TINY_GEMMA),
                                             ("lora", "qwen3", TINY_QWEN3)])
def test_dense_export_equals_the_forced_expert(tmp_path, tiny, kind, base, extra):
    model = tiny if base == "llama" else make_tiny_model(tmp_path / base, **{"model_type": base, **extra})
    run = make_run(tmp_path, model, kind=kind)
    forced = logits(export_hf(run, tmp_path / "hf"), TrinityXForCausalLM, force_expert="harm")
    routed = logits(tmp_path / "hf", TrinityXForCausalLM)
    dense_dir = export_hf(run, tmp_path / "dense", fmt="dense", expert="harm")
    assert json.loads((dense_dir / "config.json").read_text())["model_type"] == base
    dense = logits(dense_dir)
    assert (dense - forced).abs().max() <= TOL
    assert (dense - routed).abs().max() > 1e-2  # the expert alone differs from the mixture


def test_dense_refused_with_post_mix_norm(tmp_path, tiny):
    run = make_run(tmp_path, tiny, norm=True)
    with pytest.raises(ExportRefused, match="router.normalize_output"):
        export_hf(run, tmp_path / "dense", fmt="dense", expert="help")
    assert not (tmp_path / "dense").exists()


@pytest.mark.parametrize("top_k", [2, "all"])
def test_mixtral_equals_trinityx_where_exact(tmp_path, tiny, top_k):
    from transformers import MixtralForCausalLM

    run = make_run(tmp_path, tiny, kind="full", top_k=top_k)
    want = logits(export_hf(run, tmp_path / "hf"), TrinityXForCausalLM)
    got = logits(export_hf(run, tmp_path / "mixtral", fmt="mixtral"), MixtralForCausalLM)
    assert (got - want).abs().max() <= TOL


@pytest.mark.parametrize("base,reason", [("gemma", "model_type: 'gemma' — Mixtral has no (1 + w) RMSNorm"),
                                         ("qwen3", "model_type: 'qwen3' — Mixtral attention has no q/k RMSNorm")])
def test_mixtral_refused_for_gemma_and_qwen3(tmp_path, base, reason):
    model = make_tiny_model(tmp_path / base, **(TINY_GEMMA if base == "gemma" else TINY_QWEN3))
    with pytest.raises(ExportRefused, match=re.escape(reason)):
        export_hf(make_run(tmp_path, model, kind="full", top_k="all"), tmp_path / "mixtral", fmt="mixtral")
    assert not (tmp_path / "mixtral").exists()


@pytest.mark.parametrize("setting,kw", [
    ("experts.kind", {"kind": "lora"}),
    ("router.importance", {"kind": "full", "importance": [1.0, 2.0, 1.0]}),
    ("router.normalize_output", {"kind": "full", "norm": True}),
    ("experts.layers", {"kind": "full", "layers": [1]}),
    ("router.top_k", {"kind": "full", "router_std": 0.0}),  # untrained router: every token ties
])
def test_mixtral_refused_where_not_exact(tmp_path, tiny, setting, kw):
    run = make_run(tmp_path, tiny, **kw)
    with pytest.raises(ExportRefused, match=setting.replace(".", r"\.")):
        export_hf(run, tmp_path / "mixtral", fmt="mixtral")


@pytest.mark.parametrize("kind,base", [("lora", "llama"), ("full", "llama"), ("lora", "gemma")])
def test_import_then_export_is_bit_identical(tmp_path, tiny, kind, base):
    """Gemma too: its backbone checkpoint keeps the (1 + w) norms' original w (model/weights.py)."""
    from trinityx_ds.config import load_config
    from trinityx_ds.model.weights import read_meta

    model = tiny if base == "llama" else make_tiny_model(tmp_path / base, **TINY_GEMMA)
    run = make_run(tmp_path, model, kind=kind, importance=[1.0, 2.0, 0.5], norm=True)
    first = export_hf(run, tmp_path / "hf", max_shard_bytes=200_000)
    imported = import_trinityx(first, tmp_path / "imported", tp=1)
    second = export_hf(imported, tmp_path / "hf2", max_shard_bytes=200_000)
    a, b = SafetensorsSource(first), SafetensorsSource(second)
    assert sorted(a.keys()) == sorted(b.keys())
    for k in a.keys():
        x, y = a.read(k), b.read(k)
        assert x.dtype == y.dtype and torch.equal(x, y), k
    assert json.loads((first / "config.json").read_text()) == json.loads((second / "config.json").read_text())
    # a training starting point: the stage-1 layout, a backbone checkpoint, a run config
    cfg = load_config(str(imported / "config.yaml"), check_paths=False)
    assert cfg.experts.kind == kind and cfg.router.importance == [1.0, 2.0, 0.5] and cfg.router.normalize_output
    assert read_meta(cfg.model.checkpoint)["source"] == str(first.resolve())
    assert set(load_file(imported / "stage1" / "harm" / "expert.safetensors")) == \
        set(load_file(run / "stage1" / "harm" / "expert.safetensors"))
    tp2 = import_trinityx(first, tmp_path / "imported_tp2", tp=2)
    assert read_meta(tp2 / "backbone")["tp"] == 2


def test_expert_tensors_without_a_place_in_the_model_fail_the_export(tmp_path, tiny):
    run = make_run(tmp_path, tiny)  # experts trained on every layer ...
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["experts"]["layers"] = [1]  # ... but the config routes layer 1 only
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(CheckpointError, match=r"harm/expert\.safetensors: 21 of 42 .* 'model\.layers\.0\."):
        export_hf(run, tmp_path / "hf")
    assert not (tmp_path / "hf").exists() and not list(tmp_path.glob(".hf.*"))


def _one_line(excinfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text
    return text


def test_bad_inputs_fail_in_one_line_naming_file_and_tensor(tmp_path, tiny):
    run = make_run(tmp_path, tiny)
    harm = run / "stage1" / "harm" / "expert.safetensors"
    good = harm.read_bytes()

    with pytest.raises(CheckpointError) as e:
        export_hf(tmp_path / "nowhere", tmp_path / "hf")
    assert "nowhere: no such folder" in _one_line(e)

    tensors = load_file(harm)
    name = "model.layers.1.mlp.experts.harm.up_proj.lora_A.weight"
    save_file({k: v for k, v in tensors.items() if k != name}, str(harm))
    with pytest.raises(CheckpointError) as e:
        export_hf(run, tmp_path / "hf")
    assert _one_line(e).startswith(f"{harm}: no tensor {name!r} (1 of 12 missing; the run config has experts.kind ")

    save_file({**tensors, name: torch.zeros(5, 64)}, str(harm))
    with pytest.raises(CheckpointError) as e:
        export_hf(run, tmp_path / "hf")
    assert _one_line(e).startswith(f"{harm}: tensor {name!r} has shape (5, 64), the run config needs (4, 64)")

    for cut in (len(good) // 2, 40):  # data, then header, cut short
        harm.write_bytes(good[:cut])
        with pytest.raises(CheckpointError) as e:
            export_hf(run, tmp_path / "hf")
        assert _one_line(e).startswith(f"{harm}: ")

    harm.unlink()
    with pytest.raises(CheckpointError) as e:
        export_hf(run, tmp_path / "hf")
    assert _one_line(e) == f"{harm}: no such file"
    harm.write_bytes(good)

    (tmp_path / "hf").mkdir()
    with pytest.raises(FileExistsError) as e:
        export_hf(run, tmp_path / "hf")
    assert _one_line(e) == f"{tmp_path / 'hf'}: already exists (pass --overwrite to replace it)"
    assert (export_hf(run, tmp_path / "hf", overwrite=True) / "config.json").is_file()


def test_checkpoint_export_reads_the_universal_copy_and_refuses_incomplete_ones(tmp_path, tiny):
    """A stage-2 tag whose universal copy holds the router (and its optimizer moments, which are
    training state): the experts come from their stage-1 files, and the export equals the one of
    the stage outputs. The distributed tests write such tags by training."""
    import shutil

    from trinityx_ds.train.universal import write

    run = make_run(tmp_path, tiny)
    router = load_file(run / "stage2" / "router.safetensors")
    ckpt = run / "stage2" / "checkpoints"
    tag = ckpt / "step00000003"
    tag.mkdir(parents=True)
    copy = {**router, **{f"optimizer.exp_avg.{k}": torch.ones_like(v) for k, v in router.items()}}
    write(tag, iter(copy.items()), rank=0, max_shard_bytes=100_000)
    shutil.copy(run / "config.yaml", tag / "config.yaml")
    (tag / "trinityx_state.json").write_text(json.dumps({"step": 3, "stage": 2, "expert": None}))
    (ckpt / "latest").write_text(tag.name)

    with pytest.raises(CheckpointError) as e:
        export_hf(tag, tmp_path / "hf")
    assert _one_line(e) == f"{tag}: incomplete checkpoint (no COMPLETE marker: its save was interrupted)"
    with pytest.raises(CheckpointError) as e:
        export_hf(ckpt, tmp_path / "hf")
    assert _one_line(e) == f"{ckpt / 'latest'}: names no complete checkpoint (no COMPLETE marker)"
    (tag / "COMPLETE").write_text("")

    a, b = SafetensorsSource(export_hf(ckpt, tmp_path / "hf")), SafetensorsSource(export_hf(run, tmp_path / "out"))
    assert sorted(a.keys()) == sorted(b.keys()) and not any(k.startswith("optimizer.") for k in a.keys())
    assert all(torch.equal(a.read(k), b.read(k)) for k in a.keys())

    harm = run / "stage1" / "harm" / "expert.safetensors"
    harm.unlink()
    with pytest.raises(CheckpointError) as e:
        export_hf(tag, tmp_path / "hf2")
    assert _one_line(e) == f"{harm}: no such file"
    shutil.rmtree(tag / "universal")
    with pytest.raises(CheckpointError) as e:
        export_hf(tag, tmp_path / "hf2")
    assert _one_line(e) == f"{tag / 'universal'}: no universal copy (model.safetensors.index.json) in this checkpoint"


def test_cli_wrapper(tmp_path, tiny, capsys):
    import runpy

    main = runpy.run_path(str(ROOT / "tools" / "convert_to_hf.py"))["main"]
    run = make_run(tmp_path, tiny)
    args = [str(run), str(tmp_path / "d"), "--format", "dense", "--expert", "help", "--max-shard-size", "100KB"]
    assert main(args) == 0
    assert "(dense, " in capsys.readouterr().out
    assert len(list((tmp_path / "d").glob("model-*.safetensors"))) > 3
    assert main([str(run), str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.strip().endswith("already exists (pass --overwrite to replace it)")


def test_writer_holds_at_most_two_shards(tmp_path, tiny, monkeypatch):
    """Every tensor the exporter hands the writer is tracked until freed: at no point are more
    than two shards' worth alive (the shard being filled and the tensors being produced)."""
    run = make_run(tmp_path, tiny, kind="full")
    live, peak, add = {}, [0], write.ShardWriter.add

    def tracked(self, name, tensor):
        live[name] = tensor.numel() * tensor.element_size()
        weakref.finalize(tensor, live.pop, name)
        peak[0] = max(peak[0], sum(live.values()))
        add(self, name, tensor)

    monkeypatch.setattr(write.ShardWriter, "add", tracked)
    shard = 300_000  # >= the largest tensor (embeddings, 256 KB)
    out = export_hf(run, tmp_path / "hf", max_shard_bytes=shard)
    total = json.loads((out / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    assert total > 4 * shard and peak[0] <= 2 * shard, (peak[0], total)


def test_import_trinityx_ds_registers_lazily(tmp_path):
    code = """
import sys
from trinityx_ds.convert.register import install
install()
assert "transformers" not in sys.modules  # nothing heavy at import
from transformers import AutoConfig, AutoModelForCausalLM
config = AutoConfig.for_model("trinityx", vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                              num_attention_heads=2, mocae={"kind": "full", "top_k": 2})
print(type(AutoModelForCausalLM.from_config(config)).__name__)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0 and proc.stdout.strip() == "TrinityXForCausalLM", proc.stderr[-2000:]


RSS_PROBE = """
import json, sys, threading, time
from trinityx_ds.convert.write import export_hf
export_hf(sys.argv[3], sys.argv[4])  # imports and lazy set-up, outside the measurement

def resident():  # anonymous + file-backed: mapped safetensors pages count too
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return sum(int(fields[k].split()[0]) * 1024 for k in ("RssAnon", "RssFile"))

base, peak, done = resident(), [0], []
def sample():
    while not done:
        peak[0] = max(peak[0], resident())
        time.sleep(0.0005)
thread = threading.Thread(target=sample)
thread.start()
export_hf(sys.argv[1], sys.argv[2], max_shard_bytes=2**21)
done.append(1)
thread.join()
print(json.dumps({"peak_growth": peak[0] - base}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads /proc")
def test_export_resident_memory_is_bounded_by_shards_not_model(tmp_path):
    model = make_tiny_model(tmp_path / "model", hidden_size=256, intermediate_size=1024, num_hidden_layers=6,
                            vocab_size=4000, tokenizer=False)
    run = make_run(tmp_path, model, kind="full")
    small = make_run(tmp_path / "small", make_tiny_model(tmp_path / "small_model", tokenizer=False))
    proc = subprocess.run([sys.executable, "-c", RSS_PROBE, str(run), str(tmp_path / "hf"), str(small),
                           str(tmp_path / "warm")], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    growth = json.loads(proc.stdout.strip().splitlines()[-1])["peak_growth"]
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    largest = 4000 * 256 * 4  # embeddings: shards hold at most max(2 MiB, largest tensor)
    assert index["metadata"]["total_size"] > 60 * 2**20 and len(set(index["weight_map"].values())) > 30
    assert growth <= 4 * largest, (growth, index["metadata"]["total_size"])


def test_import_hf_checkpoint_exports_as_the_plain_model(tmp_path, tiny):
    from trinityx_ds.convert.backbone_ckpt import import_hf

    ckpt = import_hf(tiny, tmp_path / "ckpt", tp=2)
    out = export_hf(ckpt, tmp_path / "hf", max_shard_bytes=200_000)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    a, b = SafetensorsSource(tiny), SafetensorsSource(out)
    assert sorted(a.keys()) == sorted(b.keys())
    assert all(torch.equal(a.read(k), b.read(k)) for k in a.keys())
    assert (out / "tokenizer.json").is_file() and "TrinityX backbone" in (out / "README.md").read_text()
    with pytest.raises(ExportRefused, match="no mixture"):
        export_hf(ckpt, tmp_path / "mixtral", fmt="mixtral")


def test_generate_with_kv_cache_equals_without(tmp_path, tiny):
    model = TrinityXForCausalLM.from_pretrained(export_hf(make_run(tmp_path, tiny), tmp_path / "hf")).eval()
    with torch.no_grad():
        cached = model.generate(IDS, max_new_tokens=6, do_sample=False, use_cache=True)
        plain = model.generate(IDS, max_new_tokens=6, do_sample=False, use_cache=False)
    assert cached.shape == (2, 16) and torch.equal(cached, plain)


def test_export_into_an_unwritable_place_is_one_line(tmp_path, tiny, capsys):
    from trinityx_ds.cli import main

    run = make_run(tmp_path, tiny)
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the export's parent folder should be")
    assert main(["export-hf", str(run), str(blocker / "hf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("trinityx export-hf: ") and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_peft_adapters_on_every_layer_equal_the_forced_experts_and_route_reads_layer_0(tmp_path, tiny):
    """Every MoCaE layer (layers_to_transform null: a plain adapter): each PEFT adapter on the exported backbone is
    the TrinityX model with its expert forced; every expert and router tensor is in the export; the
    route helper's first-layer probabilities are the TrinityX router's (its input is the backbone's)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from trinityx_ds.convert.request_router import RequestRouter

    run = make_run(tmp_path, tiny)
    out = export_hf(run, tmp_path / "peft", fmt="peft")
    model = TrinityXForCausalLM.from_pretrained(export_hf(run, tmp_path / "hf")).eval()
    held = mocae_tensors(run)
    router = load_file(out / "adapters" / "router.safetensors")
    assert set(router) == {k for k in held if ".mlp.router." in k}
    for name in ("help", "harm", "honest"):
        folder = out / "adapters" / name
        assert json.loads((folder / "adapter_config.json").read_text())["layers_to_transform"] is None
        adapter = load_file(folder / "adapter_model.safetensors")
        mine = {k: v for k, v in held.items() if f".experts.{name}." in k}
        assert len(adapter) == len(mine) == 2 * 3 * 2
        peft_name = {k: "base_model.model." + k.replace(f"experts.{name}.", "") for k in mine}
        assert all(torch.equal(adapter[peft_name[k]], v) for k, v in mine.items())
        model.config.force_expert = name
        with torch.no_grad():
            forced = model(IDS).logits
            got = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out), folder).eval()(IDS).logits
        assert (got - forced).abs().max() <= TOL, name
    model.config.force_expert = None
    first = model.model.layers[0].mlp.router
    seen = []
    first.register_forward_hook(lambda mod, args, res: seen.append(args[0].float()))
    with torch.no_grad():
        model(IDS[:1])
    want_TE = (seen[0] @ first.weight.T / first.log_temperature.exp() + first.log_importance).softmax(-1)
    got_LTE = RequestRouter(out).layer_probs(IDS[0].tolist())
    assert got_LTE.shape == (2, 10, 3) and torch.allclose(got_LTE[0], want_TE, atol=1e-6)


@pytest.mark.parametrize("setting,kw,extra", [
    ("experts.kind: full", {"kind": "full"}, []),
    ("router.normalize_output: true", {"norm": True}, []),
    ("--expert: 'help' — only with --format dense", {}, ["--expert", "help"])])
def test_peft_refused_in_one_line(tmp_path, tiny, capsys, setting, kw, extra):
    from trinityx_ds.cli import main

    run = make_run(tmp_path, tiny, **kw)
    assert main(["export-hf", str(run), str(tmp_path / "peft"), "--format", "peft", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"trinityx export-hf: {setting}") and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "peft").exists()


def test_route_refuses_a_folder_without_router_in_one_line(tmp_path, tiny, capsys):
    from trinityx_ds.cli import main

    dense = export_hf(make_run(tmp_path, tiny), tmp_path / "dense", fmt="dense", expert="help")
    assert main(["route", "--export", str(dense), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"trinityx route: {dense / 'adapters' / 'router.json'}: missing (not an `export-hf " \
                          "--format peft` folder)"


def test_export_and_import_check_expert_files_first(tiny, tmp_path):
    """Issue 28: a NaN or an int64 tensor in an expert file reached the HF export (and the way back,
    import-hf); both are refused before anything is written, naming the file and the tensor."""
    from trinityx_ds.convert.import_back import import_trinityx
    from trinityx_ds.errors import CheckpointError
    from trinityx_ds.storage.layout import RunLayout

    run = make_run(tmp_path, tiny)
    cfg = run / "config.yaml"
    harm = RunLayout(run).expert_file("harm")
    good = load_file(harm)
    key = sorted(k for k in good if k.endswith("lora_B.weight"))[0]
    hf = export_hf(run, tmp_path / "hf", config=cfg)  # the good run exports
    for bad, fragment in (({**good, key: good[key].long()}, f"tensor {key!r} is I64"),
                          ({**good, key: torch.full_like(good[key], float("nan"))}, f"tensor {key!r} holds ")):
        save_file(bad, harm)
        with pytest.raises(CheckpointError, match="^" + re.escape(f"{harm}: {fragment}")):
            export_hf(run, tmp_path / "hf_bad", config=cfg)
        assert not (tmp_path / "hf_bad").exists()
    save_file(good, harm)

    shards = sorted(hf.glob("model*.safetensors"))
    for shard in shards:  # the exported folder with one NaN expert tensor: import-hf refuses it
        tensors = load_file(shard)
        if key in tensors:
            tensors[key] = torch.full_like(tensors[key], float("nan"))
            save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=re.escape(f"tensor {key!r} holds")):
        import_trinityx(hf, tmp_path / "back")
    assert not (tmp_path / "back").exists()
