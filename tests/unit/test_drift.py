"""Config drift on resume: what changes the meaning of saved tensors or the data order is refused
in one line naming key, old and new value; the rest is allowed and reported."""
import copy

import pytest

from trinityx_ds.config import load_config, save_config
from trinityx_ds.train.drift import check_resume, config_drift
from trinityx_ds.train.tiny_run import write_config


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("drift")
    cfg = load_config(str(write_config(root)), check_paths=False)
    save_config(cfg, str(root / "saved.yaml"))
    return cfg, root / "saved.yaml"


def test_reordered_experts_and_longer_sequences_are_refused(saved):
    cfg, path = saved
    new = copy.deepcopy(cfg)
    new.experts.names = ["harm", "help", "honest"]
    new.data.max_seq_len = 128
    with pytest.raises(ValueError) as e:
        check_resume(path, new, stage=2)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{path}: resume refused: ")
    assert "experts.names was ['help', 'harm', 'honest'], now ['harm', 'help', 'honest']" in msg
    assert "data.max_seq_len was 64, now 128" in msg


def test_lora_rank_seed_and_batch_shape_are_refused(saved):
    cfg, _ = saved
    new = copy.deepcopy(cfg)
    new.experts.lora.rank, new.seed, new.train.stage1.micro_batch = 8, 8, 4
    refused, _ = config_drift(cfg, new, stage=1)
    assert [r.split(" was")[0] for r in refused] == ["experts.lora.rank", "seed", "train.stage1.micro_batch"]
    assert config_drift(cfg, new, stage=2)[0] == ["experts.lora.rank was 4, now 8", "seed was 7, now 8"]


def test_steps_schedule_cadence_and_layout_are_allowed_and_reported(saved, tmp_path):
    cfg, path = saved
    new = copy.deepcopy(cfg)
    new.train.stage1.steps, new.train.stage1.lr, new.train.checkpoint_every = 50, 5e-4, 7
    new.parallel.tp, new.output.dir = 2, str(tmp_path / "moved")
    for src in new.data.tasks["help"]:
        src.path = str(tmp_path / "elsewhere" / "alpaca_tiny.jsonl")  # the same file, moved
    allowed = check_resume(path, new, stage=1)
    assert allowed == ["parallel.tp was 1, now 2", "train.checkpoint_every was 100, now 7",
                       "train.stage1.lr was 0.001, now 0.0005", "train.stage1.steps was 5, now 50"]
    assert check_resume(tmp_path / "absent.yaml", new, stage=1) == []  # checkpoints without a config


def test_changed_data_or_backbone_by_content_is_refused_before_launch(tmp_path, capsys):
    """Issue 28: resuming with another data file of the same name (other rows) resumed silently: the
    drift check compared Path.name. A checkpoint now records its stage's inputs by content; a
    resume whose data or backbone changed is refused before launch in one line naming the source,
    or, with --allow-data-change, reported and let through."""
    import json
    import shutil

    from trinityx_ds.cli import main
    from trinityx_ds.storage.layout import RunLayout
    from trinityx_ds.train.drift import input_drift, inputs_of
    from trinityx_ds.train.preflight import problems
    from trinityx_ds.train.tiny_run import FIXTURES

    data = tmp_path / "alpaca.jsonl"
    shutil.copy(FIXTURES / "alpaca_tiny.jsonl", data)
    cfg_path = write_config(tmp_path, **{"data.tasks.help": [{"path": str(data), "format": "alpaca"}]})
    cfg = load_config(str(cfg_path), world_size=1)
    recorded = inputs_of(cfg, 1, "help")
    assert recorded["data"]["data.tasks.help[0]"]["bytes"] == data.stat().st_size
    assert set(recorded["data"]) == {"data.tasks.help[0]"} and input_drift(recorded, inputs_of(cfg, 1, "help")) == []
    ckpt = RunLayout(cfg.output.dir).checkpoints(1, "help")  # what a training save writes
    ckpt.tag_dir("step00000003").mkdir(parents=True)
    ckpt.state_file("step00000003").write_text(json.dumps({"step": 3, "data": {"world": 1}, "inputs": recorded}))
    ckpt.marker("step00000003").write_text("")

    rows = data.read_text().splitlines()
    data.write_text("\n".join(rows[1:] + rows[:1]) + "\n")  # the same name and size, other row order
    capsys.readouterr()
    assert main(["train", "experts", "--only", "help", "--config", str(cfg_path), "--nproc", "1"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith(f"trinityx train: {ckpt.tag_dir('step00000003')}: resume refused: "
                                               f"data.tasks.help[0] ({data}): its content changed since the "
                                               "checkpoint ("), err
    assert err[0].endswith("or pass --allow-data-change to resume anyway"), err
    notes: list[str] = []
    assert problems(cfg, "experts", "help", allow_data_change=True, notes=notes) == []
    assert len(notes) == 1 and "resuming anyway (--allow-data-change): data.tasks.help[0]" in notes[0]

    data.write_text("\n".join(rows) + "\n")  # the data back, the backbone's weights changed
    weights = next((tmp_path / "model").glob("*.safetensors"))
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0xFF
    weights.write_bytes(bytes(raw))
    found = problems(cfg, "experts", "help")
    assert len(found) == 1 and "the backbone's weights differ from the checkpoint's" in found[0], found
