"""`trinityx --help` (and each command's) imports no heavy library: every invocation builds the
whole parser, so the modules that define the commands' arguments (convert/export.py,
convert/route.py, calibration/cli.py, eval/runner.py, launch/slurm.py, plan/cli.py) keep torch
and the rest out of their module-level imports; the work they start imports it when it runs.
Read from `python -X importtime`, which names every module a process imports."""
import subprocess
import sys

import pytest

from tests.dist import ROOT

HEAVY = ("torch", "deepspeed", "megatron", "transformers", "datasets")


def _imported(argv: list[str]) -> tuple[set[str], subprocess.CompletedProcess]:
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "trinityx_ds.cli", *argv], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    names = {line.rsplit("|", 1)[1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}
    return names - {"imported package"}, r


@pytest.mark.parametrize("argv", [["--help"], ["export-hf", "--help"], ["route", "--help"], ["calibrate", "--help"],
                                  ["eval", "--help"], ["plan", "--help"], ["slurm", "--help"],
                                  ["train", "experts", "--help"]], ids=" ".join)
def test_help_imports_no_heavy_library(argv):
    names, r = _imported(argv)
    assert r.returncode == 0 and "usage: trinityx" in r.stdout, r.stderr[-2000:]
    assert "trinityx_ds.convert.export" in names, "no importtime line names the parser's modules"
    heavy = sorted(n for n in names if n.split(".")[0] in HEAVY)
    assert not heavy, (f"`trinityx {' '.join(argv)}` imports {', '.join(sorted({n.split('.')[0] for n in heavy}))} "
                       f"(first: {heavy[0]}): a module the parser is built from imports it at module level; "
                       f"`python -X importtime -m trinityx_ds.cli {' '.join(argv)}` shows which")
