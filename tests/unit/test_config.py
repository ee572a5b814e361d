"""The config room: defaults, round trips, recipes, and one exact problem line per malformed file."""
from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from trinityx_ds.config import (ConfigError, ParallelConfig, RouterConfig, RunConfig, TrainConfig, cmd_validate,
                                config_from_dict, config_to_dict, load_config, save_config, validate_file)

REPO = Path(__file__).resolve().parents[2]
DELETE = object()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("tiny-llama")
    cfg = transformers.LlamaConfig(vocab_size=1001, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


@pytest.fixture
def base(tmp_path, tiny_model) -> dict:
    """A valid run whose files exist: the tiny model and one small JSONL per expert."""
    tasks = {}
    for name, fmt in (("help", "alpaca"), ("harm", "hh_rlhf"), ("honest", "truthfulqa")):
        (tmp_path / f"{name}.jsonl").write_text('{"x": 1}\n')
        tasks[name] = [{"path": f"{name}.jsonl", "format": fmt}]
    return {"model": {"hf_path": str(tiny_model)}, "data": {"tasks": tasks}}


def _write(tmp_path: Path, data) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def _set(data: dict, dotted: str, value) -> None:
    *parents, last = [int(p) if p.isdigit() else p for p in dotted.split(".")]
    for p in parents:
        data = data.setdefault(p, {}) if isinstance(data, dict) else data[p]
    if value is DELETE:
        del data[last]
    else:
        data[last] = value


def edit(changes: dict):
    def make(tmp_path, base):
        for key, value in changes.items():
            _set(base, key, value)
        return _write(tmp_path, base)
    return make


def raw(text: str):
    return lambda tmp_path, base: _write(tmp_path, text)


def model_folder(files: dict):
    """A model folder holding `files` (name -> JSON data), used as hf_path or checkpoint."""
    def make(tmp_path, base):
        folder = tmp_path / "model"
        folder.mkdir()
        for name, data in files.items():
            (folder / name).write_text(json.dumps(data))
        key = "checkpoint" if "trinityx_meta.json" in files or not files else "hf_path"
        base["model"] = {key: str(folder)}
        return _write(tmp_path, base)
    return make


def renamed_expert(tmp_path, base):
    base["experts"] = {"names": ["help", "harm-x", "honest"]}
    base["data"]["tasks"]["harm-x"] = base["data"]["tasks"].pop("harm")
    return _write(tmp_path, base)


GPT2 = {"model_type": "gpt2", "num_attention_heads": 4, "intermediate_size": 128, "num_hidden_layers": 2}

# (id, make the YAML file, world size, dotted key, message fragment, number of problems)
CASES = [
    ("lr-wrong-type", edit({"train.stage1.lr": "fast"}), None, "train.stage1.lr", "'fast' — a number", 1),
    ("bool-for-int", edit({"parallel.tp": True}), None, "parallel.tp", "True — an int", 1),
    ("section-not-mapping", edit({"router": 3}), None, "router", "3 — a mapping", 1),
    ("unknown-key", edit({"experts.kindd": "full"}), None, "experts.kindd", "unknown key — did you mean 'kind'?", 1),
    ("unknown-section", edit({"routr": {}}), None, "routr", "did you mean 'router'?", 1),
    ("unknown-key-no-match", edit({"train.zzz": 1}), None, "train.zzz", "allowed: stage1, stage2", 1),
    ("tp-vs-ffn", edit({"parallel.tp": 3}), None, "parallel.tp", "3 — must divide model intermediate_size (128)", 1),
    ("tp-vs-ffn-large", edit({"parallel.tp": 256}), None, "parallel.tp", "must divide model intermediate_size (128)", 1),
    ("world-size", edit({"parallel.tp": 2}), 3, "parallel", "tp(2) x pp(1) = 2 does not divide world size 3", 1),
    ("dp-vs-world-size", edit({"parallel.dp": 2}), 4, "parallel.dp", "2 — world size 4 / (tp 1 x pp 1) gives dp 4", 1),
    ("world-size-conflict", edit({"parallel.world_size": 2}), 4, "parallel.world_size", "differs from the launch", 1),
    ("ep-vs-dp", edit({"experts.kind": "full", "parallel.ep": 3}), 4, "parallel.ep", "3 — must divide dp (4)", 1),
    ("ep-with-lora", edit({"parallel.ep": 3}), 3, "parallel.ep", "needs experts.kind: full", 1),
    ("ep-vs-experts", edit({"experts.kind": "full", "parallel.ep": 2}), 2, "parallel.ep",
     "must divide the number of experts (3)", 1),
    ("importance-length", edit({"router.importance": [1.0, 2.0]}), None, "router.importance",
     "one weight per expert (3)", 1),
    ("importance-zero", edit({"router.importance": [1, 0, 1]}), None, "router.importance[1]", "0.0 — a number > 0", 1),
    ("top-k-range", edit({"router.top_k": 5}), None, "router.top_k", '5 — an int in 1..3 or "all"', 1),
    ("top-k-type", edit({"router.top_k": "some"}), None, "router.top_k", "'some' — an int or \"all\"", 1),
    ("task-missing", edit({"data.tasks.honest": DELETE}), None, "data.tasks", "missing: honest", 1),
    ("task-extra", edit({"data.tasks.extra": [{"path": "help.jsonl"}]}), None, "data.tasks.extra",
     "'extra' — not an expert; experts.names is help, harm, honest", 1),
    ("data-file-missing", edit({"data.tasks.help.0.path": "nope.jsonl"}), None, "data.tasks.help[0].path",
     "nope.jsonl' — no such file", 1),
    ("data-path-required", edit({"data.tasks.help.0": {"format": "alpaca"}}), None, "data.tasks.help[0].path",
     "missing — a required key", 1),
    ("data-format-enum", edit({"data.tasks.help.0.format": "csv"}), None, "data.tasks.help[0].format",
     "'csv' — one of \"alpaca\", \"self_instruct\"", 1),
    ("max-rows-zero", edit({"data.tasks.help.0.max_rows": 0}), None, "data.tasks.help[0].max_rows", ">= 1 or null", 1),
    ("model-folder-missing", edit({"model.hf_path": "no_model"}), None, "model.hf_path", "no_model' — no such folder", 1),
    ("model-no-config-json", model_folder({}), None, "model.checkpoint", "no readable trinityx_meta.json", 1),
    ("hf-no-config-json", model_folder({"other.json": {}}), None, "model.hf_path", "no readable config.json", 1),
    ("model-type", model_folder({"trinityx_meta.json": {"hf_config": GPT2}}), None, "model.checkpoint",
     "config.json model_type: 'gpt2' — supported: llama, mistral, qwen2, gemma, qwen3", 1),
    ("model-both", edit({"model.checkpoint": "elsewhere"}), None, "model.checkpoint", "not both", 1),
    ("model-neither", edit({"model.hf_path": None}), None, "model.hf_path", "None — set exactly one", 1),
    ("dtype-enum", edit({"model.dtype": "fp64"}), None, "model.dtype", "'fp64' — one of \"fp32\", \"bf16\"", 1),
    ("attention-enum", edit({"model.attention": "flash"}), None, "model.attention",
     "'flash' — one of \"sdpa\", \"eager\", \"te\"", 1),
    ("recompute-enum", edit({"model.activation_checkpointing": "some"}), None, "model.activation_checkpointing",
     "'some' — one of \"none\", \"full\", \"selective\" or true or false", 1),
    ("selective-with-sdpa", edit({"model.activation_checkpointing": "selective"}), None,
     "model.activation_checkpointing", "'selective' — recomputes only the attention scores, which model.attention: "
     "sdpa (a fused kernel) never keeps", 1),
    *([("attention-te-absent", edit({"model.attention": "te"}), None, "model.attention",
        "'te' — Transformer Engine is not installed here; use sdpa", 1)]
      if importlib.util.find_spec("transformer_engine") is None else []),
    ("kind-enum", edit({"experts.kind": "lorax"}), None, "experts.kind", "'lorax' — one of \"lora\", \"full\"", 1),
    ("negative-lr", edit({"train.stage1.lr": -1e-3}), None, "train.stage1.lr", "-0.001 — a number > 0", 1),
    ("warmup-ge-steps", edit({"train.stage2": {"steps": 5, "warmup_steps": 5}}), None, "train.stage2.warmup_steps",
     "5 — an int >= 0 and < steps (5)", 1),
    ("yaml-syntax", raw("name: demo\nseed: 1\nexperts: {names: [a, b}\n"), None, "{file}:3",
     "YAML syntax error: expected ',' or ']'", 1),
    ("top-level-list", raw("- a\n- b\n"), None, "{file}", "top level must be a mapping", 1),
    ("missing-file", lambda tmp_path, base: tmp_path / "absent.yaml", None, "{file}", "no such file", 1),
    ("pp-with-zero3", edit({"parallel.pp": 2}), None, "parallel.pp", "zero_stage <= 1 (got 3)", 1),
    ("zero-stage-range", edit({"parallel.zero_stage": 4}), None, "parallel.zero_stage", "4 — an int in 0..3", 1),
    ("ds-config-missing", edit({"parallel.ds_config": "ds.json"}), None, "parallel.ds_config", "no such file", 1),
    ("layer-too-deep", edit({"experts.layers": [0, 2]}), None, "experts.layers[1]",
     "2 — must be < model num_hidden_layers (2)", 1),
    ("layers-duplicate", edit({"experts.layers": [1, 1]}), None, "experts.layers", "must be unique", 1),
    ("layers-type", edit({"experts.layers": "last"}), None, "experts.layers", '"all" or a list of ints', 1),
    ("duplicate-experts", edit({"experts.names": ["help", "harm", "help"], "data.tasks.honest": DELETE}), None,
     "experts.names", "unique (repeated: help)", 1),
    ("one-expert", edit({"experts.names": ["help"], "data.tasks.harm": DELETE, "data.tasks.honest": DELETE}), None,
     "experts.names", "at least 2 expert names", 1),
    ("expert-not-identifier", renamed_expert, None, "experts.names[1]", "'harm-x' — an identifier", 1),
    ("lora-rank", edit({"experts.lora.rank": 0}), None, "experts.lora.rank", "0 — an int >= 1", 1),
    ("lora-target", edit({"experts.lora.targets": ["q_proj"]}), None, "experts.lora.targets[0]", "'q_proj' — one of", 1),
    ("temperature-zero", edit({"router.temperature": 0}), None, "router.temperature", "0.0 — a number > 0", 1),
    ("loss-negative", edit({"router.losses.entropy": -0.1}), None, "router.losses.entropy", "a loss weight >= 0", 1),
    ("ema-decay", edit({"router.losses.ema_decay": 1.0}), None, "router.losses.ema_decay", "in [0, 1)", 1),
    ("heldout", edit({"data.heldout_fraction": 0.7}), None, "data.heldout_fraction", "in [0, 0.5]", 1),
    ("max-seq-len", edit({"data.max_seq_len": 4}), None, "data.max_seq_len", "4 — an int >= 8", 1),
    ("steps-per-expert-name", edit({"train.stage1.steps_per_expert": {"hram": 50}}), None,
     "train.stage1.steps_per_expert.hram", "not an expert; experts.names is help, harm, honest", 1),
    ("steps-per-expert-value", edit({"train.stage1.steps_per_expert": {"harm": 0}}), None,
     "train.stage1.steps_per_expert.harm", "0 — an int >= 1", 1),
    # issue 28: b86774b reported `harm: dpoo` as "experts.objective: ... missing: harm"
    ("objective-value", edit({"experts.objective": {"help": "sft", "harm": "dpoo", "honest": "sft"}}), None,
     "experts.objective.harm", "'dpoo' — one of \"sft\", \"dpo\", \"simpo\", \"cpo\"", 1),
    ("collapse-steps", edit({"train.collapse_steps": 0}), None, "train.collapse_steps", "0 — an int >= 1", 1),
]


@pytest.mark.parametrize("make,world_size,key,fragment,count", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_malformed(tmp_path, base, capsys, make, world_size, key, fragment, count):
    path = make(tmp_path, base)
    key = key.format(file=path)
    problems = validate_file(str(path), world_size=world_size)
    assert len(problems) == count, problems
    assert any(p.startswith(key + ": ") and fragment in p for p in problems), problems
    assert all("\n" not in p for p in problems)

    assert cmd_validate(str(path), world_size) == 2
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err
    assert err.splitlines() == problems


def test_defaults_validate(tmp_path, base):
    cfg = load_config(str(_write(tmp_path, base)))
    assert cfg.router == RouterConfig() and cfg.train == TrainConfig() and cfg.parallel == ParallelConfig()
    assert cfg.experts.names == ["help", "harm", "honest"] and cfg.train.stage2.lr == 1e-3
    assert cfg.data.tasks["help"][0].path == str(tmp_path / "help.jsonl")


def test_round_trip(tmp_path, base):
    base.update(parallel={"tp": 2, "world_size": 4}, router={"top_k": "all", "importance": [1, 2, 3]},
                experts={"layers": [1], "lora": {"alpha": 4}}, train={"stage1": {"lr": 3e-4}})
    cfg = load_config(str(_write(tmp_path, base)))
    assert cfg.parallel.dp == 2 and cfg.experts.lora.alpha == 4.0 and cfg.router.importance == [1.0, 2.0, 3.0]
    save_config(cfg, str(tmp_path / "saved" / "config.yaml"))
    assert load_config(str(tmp_path / "saved" / "config.yaml")) == cfg
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_steps_per_expert(tmp_path, base):
    """One expert's own step count; the others keep train.stage1.steps; a round trip keeps it."""
    base.update(train={"stage1": {"steps": 60, "steps_per_expert": {"harm": 180}}})
    cfg = load_config(str(_write(tmp_path, base)))
    assert cfg.train.stage1.for_expert("harm").steps == 180 and cfg.train.stage1.for_expert("help").steps == 60
    assert cfg.train.stage1.for_expert("harm").lr == cfg.train.stage1.lr
    save_config(cfg, str(tmp_path / "saved" / "config.yaml"))
    assert load_config(str(tmp_path / "saved" / "config.yaml")) == cfg


def test_relative_paths_follow_the_yaml_folder(tmp_path, base, monkeypatch):
    monkeypatch.chdir("/")
    cfg = load_config(str(_write(tmp_path, base)))
    assert [s.path for s in cfg.data.tasks["honest"]] == [str(tmp_path / "honest.jsonl")]


def test_scientific_floats_and_partial_stages(tmp_path, base):
    text = yaml.safe_dump(base) + "train:\n  stage1: {lr: 5e-4, steps: 3}\n  stage2: {steps: 7}\n"
    cfg = load_config(str(_write(tmp_path, text)))
    assert cfg.train.stage1.lr == 5e-4 and cfg.train.stage1.micro_batch == 4
    assert (cfg.train.stage2.steps, cfg.train.stage2.lr) == (7, 1e-3)


def test_problems_are_reported_together(tmp_path, base):
    base.update(router={"top_k": 9}, parallel={"zero_stage": "three"}, experts={"kindd": "full"})
    problems = validate_file(str(_write(tmp_path, base)))
    assert [p.split(":")[0] for p in problems] == ["experts.kindd", "parallel.zero_stage", "router.top_k"]
    with pytest.raises(ConfigError) as err:
        load_config(str(tmp_path / "run.yaml"))
    assert str(err.value) == "\n".join(problems)


def test_resolve_before_any_process_group():
    assert ParallelConfig(tp=2, ep=2).resolve(8) == ParallelConfig(tp=2, ep=2, dp=4, world_size=8)
    with pytest.raises(ConfigError, match=r"parallel: tp\(2\) x pp\(1\) = 2 does not divide world size 3"):
        ParallelConfig(tp=2).resolve(3)
    with pytest.raises(ConfigError, match=r"parallel.world_size: 0 — an int >= 1"):
        ParallelConfig().resolve(0)


def test_world_size_fills_dp(tmp_path, base):
    base["parallel"] = {"tp": 2}
    assert load_config(str(_write(tmp_path, base)), world_size=8).parallel.dp == 4


def test_cmd_validate_ok(tmp_path, base, capsys):
    path = str(_write(tmp_path, base))
    assert cmd_validate(path, 2) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == [f"OK: {path}", "  experts: help, harm, honest (lora); tp=1 pp=1 ep=1 dp=2"]
    assert err == ""


@pytest.mark.parametrize("name", ["demo.yaml", "tiny_tp2.yaml"])
def test_recipes(name):
    path = str(REPO / "configs" / name)
    assert validate_file(path, check_paths=False) == []
    cfg = load_config(path, check_paths=False)
    assert cfg.parallel.tp == 2 and cfg.experts.kind == "lora" and len(cfg.experts.names) == 3


def _leaves(data: dict, prefix: str = ""):
    for key, value in data.items():
        if isinstance(value, dict) and value:
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


@pytest.mark.parametrize("value,mode", [(True, "full"), (False, "none"), ("none", "none"), ("full", "full"),
                                        ("selective", "selective")])
def test_activation_checkpointing_bools_read_as_modes(tmp_path, base, value, mode):
    """YAML from when the key was a bool keeps its meaning, normalised to the string."""
    path = edit({"model.activation_checkpointing": value, "model.attention": "eager"})(tmp_path, base)
    cfg = load_config(str(path))
    assert cfg.model.activation_checkpointing == mode


def test_garbage_values_give_problems_not_exceptions():
    good = {"model": {"hf_path": "m"}, "data": {"tasks": {n: [{"path": "hub:x"}] for n in ("help", "harm", "honest")}}}
    for key in _leaves(config_to_dict(config_from_dict(good, check_paths=False))):
        for junk in (None, "x", -1, 0, 2.5, True, [], [0, "a"], {}, {"k": 1}):
            data = copy.deepcopy(good)
            _set(data, key, junk)
            try:
                config_from_dict(data, check_paths=False, world_size=6)
            except ConfigError as e:
                assert e.problems and all(p and "\n" not in p for p in e.problems), (key, junk)


def test_run_config_defaults_only_need_model_and_data():
    assert [p.split(":")[0] for p in RunConfig().problems()] == ["model.hf_path", "data.tasks"]
