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
