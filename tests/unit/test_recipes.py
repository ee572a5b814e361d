"""The cluster recipes in configs/recipes/: valid run configs whose only open item is the user's
model folder, wired through to DeepSpeed and Slurm, on the planner's fastest layout, with the
recorded plans (and docs/plans/) equal to what the planner says today."""
from __future__ import annotations

import argparse
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from trinityx_ds.config import load_config, validate_file
from trinityx_ds.launch.slurm import load_slurm_config, render
from trinityx_ds.plan import PRESETS, add_plan_arguments, cmd_plan, recommend

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "configs" / "recipes"
NAMES = ("llama-2-7b_1x8", "llama-2-13b_2x8", "llama-2-70b_8x8")


def parts(name: str) -> tuple[str, int, int]:
    """(preset, nodes, GPUs per node) from a recipe's name, <model>_<nodes>x<gpus>."""
    model, nodes, gpus = re.fullmatch(r"(.+)_(\d+)x(\d+)", name).groups()
    return model, int(nodes), int(gpus)


def plan_output(capsys, argv: list[str]) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser()
    add_plan_arguments(parser)
    rc = cmd_plan(parser.parse_args(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def with_model(name: str, tmp_path: Path) -> Path:
    """The recipe with model.hf_path on a folder holding the preset's config.json (shapes only)."""
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(PRESETS[parts(name)[0]]))
    data = yaml.safe_load((RECIPES / f"{name}.yaml").read_text())
    data["model"]["hf_path"] = str(model_dir)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_every_recipe_has_its_slurm_settings_and_plan():
    assert sorted(p.name for p in RECIPES.glob("*.yaml")) == sorted(
        [f"{n}.yaml" for n in NAMES] + [f"{n}.slurm.yaml" for n in NAMES])
    assert sorted(p.name for p in RECIPES.glob("*.plan.json")) == sorted(f"{n}.plan.json" for n in NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_recipe_is_valid_but_for_the_users_model_folder(name, tmp_path):
    _, nodes, gpus = parts(name)
    world = nodes * gpus
    path = str(RECIPES / f"{name}.yaml")
    assert validate_file(path, world_size=world, check_paths=False) == []
    problems = validate_file(path, world_size=world)
    assert len(problems) == 1 and problems[0].startswith("model.hf_path: ") and "no such folder" in problems[0]
    assert validate_file(path, world_size=world // 2)  # the layout is for this cluster only
    # with a model folder in place, the whole check passes, the model's shapes against TP included
    cfg = load_config(str(with_model(name, tmp_path)), world_size=world)
    assert cfg.model.dtype == "bf16" and cfg.data.packing and cfg.parallel.pp == 1


@pytest.mark.parametrize("name", NAMES)
def test_recipe_reaches_deepspeed_as_planned(name):
    from trinityx_ds.model.backbone import transformer_config
    from trinityx_ds.plan import load_arch
    from trinityx_ds.train.engine import deepspeed_config

    model, nodes, gpus = parts(name)
    cfg = load_config(str(RECIPES / f"{name}.yaml"), world_size=nodes * gpus, check_paths=False)
    plan = json.loads((RECIPES / f"{name}.plan.json").read_text())["plan"]["layout"]
    for stage in (cfg.train.stage1, cfg.train.stage2):
        ds = deepspeed_config(cfg, stage, cfg.parallel.dp)
        assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
        # micro-batch gradients summed in fp32 (GPU_READINESS finding 12: bf16 sums before)
        assert ds["data_types"] == {"grad_accum_dtype": "fp32"}
        assert ds["zero_optimization"]["stage"] == plan["zero"]
        assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == \
            (plan["micro_batch"], plan["grad_accum"])
        assert ds["train_batch_size"] == 128 and "offload_optimizer" not in ds["zero_optimization"]
    tc = transformer_config(load_arch(model)[1], tp=cfg.parallel.tp, dtype="bf16",
                            activation_checkpointing=cfg.model.activation_checkpointing)
    assert {None: "none"}.get(tc.recompute_granularity, tc.recompute_granularity) == plan["act_ckpt"] == \
        cfg.model.activation_checkpointing
    assert plan["attention"] == cfg.model.attention
    # CPU offload is one line of the recipe away: DeepSpeed's CPU Adam, the offload ZeRO file
    cfg.parallel.offload = "cpu"
    ds = deepspeed_config(cfg, cfg.train.stage1, cfg.parallel.dp)
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu" and ds["optimizer"]["type"] == "AdamW"


@pytest.mark.parametrize("name", NAMES)
def test_recorded_plan_is_what_the_planner_says_today(name, capsys):
    model, nodes, gpus = parts(name)
    rc, out, _ = plan_output(capsys, ["--config", str(RECIPES / f"{name}.yaml"), "--model", model,
                                   "--nodes", str(nodes), "--gpus-per-node", str(gpus), "--json"])
    assert rc == 0
    assert json.loads(out) == json.loads((RECIPES / f"{name}.plan.json").read_text()), \
        f"stale: trinityx plan --config {RECIPES / name}.yaml --model {model} --nodes {nodes} --json"
    text = (ROOT / "docs" / "plans" / f"{name}.txt").read_text()
    command, recorded = text.split("\n", 1)
    rc, out, _ = plan_output(capsys, shlex.split(command.removeprefix("$ trinityx plan ")))
    assert rc == 0 and "\n" + out == recorded, f"stale: docs/plans/{name}.txt ({command})"


@pytest.mark.parametrize("name", NAMES)
def test_recipe_runs_the_fastest_layout_that_fits(name):
    model, nodes, gpus = parts(name)
    plan = json.loads((RECIPES / f"{name}.plan.json").read_text())["plan"]
    best = recommend(model, nodes, gpus, 80, fixed={"pp": 1}).best  # training runs at PP=1
    assert plan["fits"] and best.to_dict()["layout"] == plan["layout"]


@pytest.mark.parametrize("name", NAMES)
def test_slurm_settings_render_the_recipe(name, tmp_path):
    _, nodes, gpus = parts(name)
    slurm = load_slurm_config(str(RECIPES / f"{name}.slurm.yaml"))
    out = render(with_model(name, tmp_path), slurm, tmp_path / "slurm")
    for job in ("experts", "router"):
        script = out.scripts[job].read_text()
        assert f"#SBATCH --nodes={nodes}\n" in script and f"#SBATCH --gres=gpu:{gpus}\n" in script
        assert "#SBATCH --exclusive\n" in script and "##SBATCH --partition=\n" in script
    assert f"PROCS_PER_NODE={gpus}" in (out.dir / "launch.sh").read_text()


def test_config_validate_cli_can_skip_paths(capsys):
    from trinityx_ds.cli import main

    path = str(RECIPES / "llama-2-70b_8x8.yaml")
    assert main(["config", "validate", path, "--world-size", "64"]) == 2
    assert capsys.readouterr().err.startswith("model.hf_path: ")
    assert main(["config", "validate", path, "--world-size", "64", "--skip-paths"]) == 0
    assert "input files not checked" in capsys.readouterr().out


def test_plan_config_refuses_layout_flags(capsys):
    recipe = ["--config", str(RECIPES / "llama-2-7b_1x8.yaml"), "--model", "llama-2-7b"]
    rc, _, err = plan_output(capsys, recipe + ["--tp", "4"])
    assert rc == 2 and "drop --tp" in err and err.count("\n") == 1
    rc, _, err = plan_output(capsys, recipe + ["--nodes", "2"])
    assert rc == 2 and "launch world size 16" in err and err.count("\n") == 1
