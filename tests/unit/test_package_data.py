"""Package data: the stock ds_configs, Slurm templates and recipes are found through
importlib.resources, in the checkout (symlinks to the top-level folders) and from a wheel installed
into a folder outside the repository, where a user renders the Slurm pipeline and builds a
stage's DeepSpeed config with the stock ZeRO-3 settings."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from trinityx_ds.storage.resources import FOLDERS, data_dir, data_file, package_root

ROOT = Path(__file__).resolve().parents[2]
# what a source tree holds that is not the source (the venv, build outputs, runs)
NOT_SOURCE = (".venv", ".git", "runs", "outputs", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache")


@pytest.mark.parametrize("folder", FOLDERS)
def test_checkout_reads_the_top_level_folders(folder):
    """In the checkout the package data are the top-level folders themselves, not copies."""
    assert data_dir(folder).resolve() == (ROOT / folder).resolve()
    assert package_root().resolve() == ROOT.resolve()


def test_unknown_folder_is_one_line():
    with pytest.raises(ValueError, match=r"^package data folder: 'ds_config' — one of ds_configs, slurm, configs$"):
        data_dir("ds_config")


def test_stock_zero_file_comes_from_package_data():
    from trinityx_ds.config.schema import ParallelConfig
    from trinityx_ds.train.engine import zero_file

    assert zero_file(ParallelConfig(zero_stage=3)) == data_file("ds_configs", "zero3.json")
    assert zero_file(ParallelConfig(zero_stage=3, offload="cpu")).name == "zero3_offload.json"


INSTALLED_SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import yaml
    import trinityx_ds
    from trinityx_ds.config import load_config
    from trinityx_ds.launch.slurm import load_slurm_config, render
    from trinityx_ds.plan.presets import PRESETS
    from trinityx_ds.storage.resources import data_file
    from trinityx_ds.train.engine import deepspeed_config, zero_file

    here = Path.cwd()
    model = here / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(PRESETS["llama-2-7b"]))
    recipe = yaml.safe_load(data_file("configs", "recipes", "llama-2-7b_1x8.yaml").read_text())
    recipe["model"]["hf_path"] = str(model)
    recipe["output"]["dir"] = str(here / "run")
    (here / "run.yaml").write_text(yaml.safe_dump(recipe))
    out = render(here / "run.yaml", load_slurm_config(None, nodes=1, gpus_per_node=8), here / "slurm")
    cfg = load_config(str(here / "run.yaml"), world_size=8, check_paths=False)
    ds = deepspeed_config(cfg, cfg.train.stage1, dp=8 // cfg.parallel.tp)
    from trinityx_ds.demo import write_run_config
    (here / "demo").mkdir()
    demo = yaml.safe_load(write_run_config(here / "demo", here / "ckpt", 2, None).read_text())
    print("RESULT " + json.dumps({
        "demo_data": [s["path"] for t in demo["data"]["tasks"].values() for s in t],
        "package": trinityx_ds.__file__, "path": sys.path,
        "zero_file": str(zero_file(cfg.parallel)), "zero": ds["zero_optimization"],
        "scripts": {k: str(v) for k, v in out.scripts.items()},
        "router": out.scripts["router"].read_text(), "launch": (out.dir / "launch.sh").read_text()}))
""")


@pytest.mark.slow
def test_installed_wheel_outside_the_repository(tmp_path):
    """Builds the wheel from a copy of the source tree (symlinks kept as symlinks, as git checks
    them out), installs it with pip into a fresh folder, and from a third folder (no repository on
    sys.path) renders the Slurm pipeline, builds a stage's DeepSpeed config and writes the demo's
    run config from the shipped recipe."""
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, symlinks=True, ignore=shutil.ignore_patterns(*NOT_SOURCE))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)],
                   check=True, capture_output=True, timeout=300)
    wheel = next((tmp_path / "dist").glob("trinityx_ds-*.whl"))
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    assert not any(p.is_symlink() for p in site.rglob("*")), "the wheel holds symlinks, not files"
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", INSTALLED_SCRIPT], cwd=work, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert res["package"].startswith(str(site)), res["package"]
    assert not any(p and Path(p).resolve() == ROOT.resolve() for p in res["path"])
    assert res["zero_file"] == str(site / "trinityx_ds" / "_data" / "ds_configs" / "zero3.json")
    stock = json.loads((ROOT / "ds_configs" / "zero3.json").read_text())["zero_optimization"]
    assert res["zero"] == stock  # every stock ZeRO-3 setting, the run's stage included
    assert set(res["scripts"]) == {"experts", "router", "export", "eval"}
    assert "#SBATCH --gres=gpu:8" in res["router"] and "{{" not in res["launch"]
    # the demo's recipe ships too, its fixture paths resolved into the installed package
    assert len(res["demo_data"]) == 3
    assert all(p.startswith(str(site / "trinityx_ds" / "fixtures")) and Path(p).is_file() for p in res["demo_data"])
