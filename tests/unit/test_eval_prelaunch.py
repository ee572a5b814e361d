"""`trinityx eval` and `trinityx lm-eval` refuse what their ranks would refuse, before any process
starts, in one line (issue 28): a run without its trained router at --nproc 2 (b86774b: a traceback
per rank after launch), and a plain model asked for a MoCaE variant (lm-eval scored the backbone
under the label asked for)."""
import pytest

from trinityx_ds.cli import main
from trinityx_ds.eval.variants import checkpoint_problem
from trinityx_ds.model.tiny import make_tiny_model
from trinityx_ds.storage.layout import RunLayout
from trinityx_ds.train.tiny_run import write_config, write_random_experts


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("prelaunch")
    cfg = write_config(root)
    write_random_experts(cfg)
    layout = RunLayout(root / "out")
    layout.config_file.write_text(cfg.read_text())  # where `trinityx eval` finds the run's config
    return layout, root


def _one_line(err: str, command: str) -> str:
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("Writing model shards")]
    assert len(lines) == 1 and lines[0].startswith(f"trinityx {command}: ") and "Traceback" not in err, err
    return lines[0]


def test_the_checks(run):
    layout, root = run
    plain = make_tiny_model(root / "plain")
    assert checkpoint_problem(str(layout.root), None) == \
        f"{layout.router_file}: no trained router for --variant trinityx (run `trinityx train router` first)"
    assert checkpoint_problem(str(layout.root), "expert:harm") is None
    assert "expert 'nope' not trained yet" in checkpoint_problem(str(layout.root), "expert:nope")
    assert checkpoint_problem(str(plain), None) is None and checkpoint_problem(str(plain), "backbone") is None
    assert checkpoint_problem(str(plain), "trinityx") == \
        f"--variant trinityx: {plain} is a plain model (no run, no experts): use --variant backbone"


def test_eval_and_lm_eval_refuse_before_launch(run, capsys):
    layout, root = run
    assert main(["eval", "--checkpoint", str(layout.root), "--suite", "routing", "--nproc", "2"]) == 2
    assert "no trained router for --variant trinityx" in _one_line(capsys.readouterr().err, "eval")
    assert not layout.eval_dir().exists()  # nothing ran
    plain = make_tiny_model(root / "plain2")
    capsys.readouterr()
    assert main(["lm-eval", "--nproc", "2", "--model", "trinityx", "--model_args", f"run={plain},variant=trinityx",
                 "--tasks", "arc_easy"]) == 2
    assert f"{plain} is a plain model" in _one_line(capsys.readouterr().err, "lm-eval")
    assert main(["lm-eval", "--model", "trinityx", f"--model_args=run={layout.root}", "--tasks", "arc_easy"]) == 2
    assert "no trained router" in _one_line(capsys.readouterr().err, "lm-eval")
