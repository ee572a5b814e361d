"""Training: ZeRO stages agree, ZeRO-3 at TP=2 equals a plain single-process loop, and a run
killed (SIGKILL, also in the middle of a checkpoint) resumes to the uninterrupted result."""
import math
import os
import re
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.dist import ROOT
from tests.train_setup import metrics
from trinityx_ds.launch.torchrun import cpu_env, launch_torchrun
from trinityx_ds.storage.layout import CheckpointDir
from trinityx_ds.train.lock import RunLock
from trinityx_ds.train.tiny_run import write_config, write_random_experts

WORKER = Path(__file__).parent / "workers" / "train_worker.py"
pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from trinityx_ds.model.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("train") / "model")


def test_expert_training_zero_1_2_3_agree(run_dist, tmp_path, model_dir):
    """An SFT expert (help) and a DPO expert (harm, its reference forward under each ZeRO stage's
    partitioning) log the same losses at ZeRO 1, 2 and 3."""
    losses = {}
    for zero in (1, 2, 3):
        # importance weighs experts against each other in stage 2; stage 1 (one expert) ignores it
        cfg = write_config(tmp_path / f"z{zero}", model_dir, **{
            "parallel.zero_stage": zero, "router.importance": [2.0, 1.0, 1.0],
            "experts.objective": {"help": "sft", "harm": "dpo", "honest": "sft"}})
        run_dist(WORKER, 2, "cli", str(cfg), "experts")
        for name, key in (("help", "train/loss"), ("harm", "dpo/loss"), ("harm", "dpo/reward_margin")):
            logged = metrics(tmp_path / f"z{zero}/out/stage1/{name}/metrics.jsonl")
            losses[zero, name, key] = [m[key] for m in logged]
    assert len(losses[1, "help", "train/loss"]) == 5 and len(losses[1, "harm", "dpo/loss"]) == 5
    # step 1: the LoRA B factors start at zero, so the policy is its reference and the loss is log 2
    assert abs(losses[1, "harm", "dpo/loss"][0] - math.log(2)) <= 1e-6 and len(set(losses[1, "harm", "dpo/loss"])) > 1
    for (zero, name, key), got in losses.items():
        want = losses[1, name, key]
        assert max(abs(a - b) for a, b in zip(want, got)) <= 1e-5, (zero, name, key, want, got)


@pytest.mark.parametrize("sp", [False, True], ids=["tp2", "tp2-sequence-parallel"])
def test_router_zero3_tp2_equals_plain_single_process(run_dist, tmp_path, model_dir, sp):
    """Also with sequence parallelism: the 5 steps of the SP run equal the plain run's, step for
    step (losses), and so do the final router tensors."""
    # kl_prev off: its EMA advances once per rank and step, which a one-process reference cannot mirror
    common = {"train.stage2": {"steps": 5, "lr": 0.5, "micro_batch": 2, "optimizer": "sgd", "grad_clip": 0.0},
              "router": {"top_k": 2, "temperature_mode": "learnable", "losses": {"kl_prev": 0.0}}}
    ref_cfg = write_config(tmp_path / "ref", model_dir, **common)
    write_random_experts(ref_cfg)
    ds_cfg = write_config(tmp_path / "ds", model_dir, **common, **{"parallel.tp": 2, "parallel.zero_stage": 3,
                                                                    "model.sequence_parallel": sp})
    write_random_experts(ds_cfg)
    ref = run_dist(WORKER, 1, "router_plain", str(ref_cfg), "2")
    got = run_dist(WORKER, 4, "router_ds", str(ds_cfg), timeout=300)  # TP=2 x DP=2: ZeRO-3 partitions over DP
    assert got["sequence_parallel"] and all(b == sp for b in got["sequence_parallel"]), got["sequence_parallel"]
    _same_run(ref, got, micro_batches=5)


def _same_run(ref: dict, got: dict, micro_batches: int) -> None:
    assert got["zero_stage"] == 3 and got["partitioned"]
    assert len(got["losses"]) == 5 and ref["losses"][-1] < ref["losses"][0]
    assert max(abs(a - b) for a, b in zip(ref["losses"], got["losses"])) <= 1e-5, (ref["losses"], got["losses"])
    for name, w in ref["router"].items():
        assert torch.allclose(torch.tensor(got["router"][name]), torch.tensor(w), atol=1e-5), name
    # one routing EMA for the whole job, whatever tokens each data-parallel rank saw
    assert all(e == got["ema_per_rank"][0] for e in got["ema_per_rank"]), got["ema_per_rank"]
    assert all(n == micro_batches for n in got["ema_updates"])  # one update per layer and micro-batch


@pytest.mark.parametrize("clip", [0.0, 0.02])
def test_router_and_full_experts_ep3_zero3_equal_plain_single_process(run_dist, tmp_path, model_dir, clip):
    """Stage 2 as the design chose it: ZeRO-3 engine over the router, `full` experts placed by
    EP=3 outside the engine and trained with their own optimizer (gradients summed over the
    ranks that sent tokens, divided by the DP size; clipped by their global norm over the EP
    ranks), tokens by all-to-all."""
    common = {"experts": {"kind": "full"}, "train.train_experts_in_stage2": True,
              "train.stage2": {"steps": 5, "lr": 0.5, "micro_batch": 2, "grad_accum": 2, "optimizer": "sgd",
                               "grad_clip": clip},
              "router": {"top_k": 2, "losses": {"kl_prev": 0.0}}}
    ref_cfg = write_config(tmp_path / "ref", model_dir, **common)
    write_random_experts(ref_cfg)
    ds_cfg = write_config(tmp_path / "ds", model_dir, **common, **{"parallel.ep": 3, "parallel.zero_stage": 3})
    write_random_experts(ds_cfg)
    ref = run_dist(WORKER, 1, "router_plain", str(ref_cfg), "3")
    got = run_dist(WORKER, 3, "router_ds", str(ds_cfg), timeout=300)
    _same_run(ref, got, micro_batches=5 * 2)


def test_stage2_router_gradient_under_fp16_equals_fp32(run_dist, tmp_path, model_dir):
    """A router-only stage-2 step (SGD, lr 1, no clipping: the update is minus the gradient) under
    fp16 equals the fp32 step within fp16's error, router losses weighted up so they carry much of
    the router's gradient (their scale: tests/unit/test_loss_scale.py). Found here: DeepSpeed 0.19.8's
    ZeRO optimizer takes its dtype from the first trainable tensor, the fp32 router, so it scales
    nothing (loss scale 1.0) and its fp32 masters start from the fp16-rounded router values."""
    common = {"train.stage2": {"steps": 1, "lr": 1.0, "micro_batch": 2, "grad_accum": 2, "optimizer": "sgd",
                               "grad_clip": 0.0},
              "router": {"top_k": 2, "temperature_mode": "learnable",
                         "losses": {"kl_prev": 0.0, "entropy": 1.0, "kl_uniform": 1.0, "task_ce": 1.0}},
              "parallel.zero_stage": 2}
    got = {}
    for dtype in ("fp32", "fp16"):
        cfg = write_config(tmp_path / dtype, model_dir, **common, **{"model.dtype": dtype})
        write_random_experts(cfg)
        got[dtype] = run_dist(WORKER, 1, "router_grad", str(cfg), timeout=240)
    f32, f16 = got["fp32"], got["fp16"]
    assert f16["dtype"] == "torch.float16" and f16["loss_scale"] == 1.0 == f32["loss_scale"], got
    assert f16["skipped_steps"] == 0 == f32["skipped_steps"], got  # an overflow would skip the update
    for name, u32 in f32["update"].items():
        u32, u16 = torch.tensor(u32), torch.tensor(f16["update"][name])
        if name.endswith("router.weight"):  # starts at 0: no fp16 rounding in its update
            assert u32.abs().max() > 0.1, name
            assert (u16 - u32).abs().max().item() <= 1e-2 * u32.abs().max().item(), name
        else:  # log temperature: gradient 0 at a zero router; its start value rounded to fp16 (2^-11)
            assert (u16 - u32).abs().max().item() <= 2e-4, name


def _launch(cfg: Path, fault: str | None = None):
    env = cpu_env({"PYTHONPATH": str(ROOT), **({"TRINITYX_FAULT": fault} if fault else {})})
    return launch_torchrun([WORKER, "cli", str(cfg), "experts --only harm"], 2, 300, env=env, cwd=ROOT)


class _Payload:
    """Runs a command when unpickled: what a crafted checkpoint file carries."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# the harm expert trains with DPO: its reference forward and pair batches must resume exactly too
RESUME = {"train.stage1": {"steps": 12}, "train.checkpoint_every": 3, "train.keep_last": 2,
          "experts.objective": {"help": "sft", "harm": "dpo", "honest": "sft"}}


@pytest.fixture(scope="module")
def whole(tmp_path_factory, model_dir):
    """One uninterrupted run: what every interrupted or damaged run must end equal to."""
    root = tmp_path_factory.mktemp("whole")
    assert _launch(write_config(root, model_dir, **RESUME)).returncode == 0
    return root


def _same_expert(whole: Path, other: Path) -> None:
    a = load_file(whole / "out/stage1/harm/expert.safetensors")
    b = load_file(other / "out/stage1/harm/expert.safetensors")
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_after_sigkill_and_crash_during_save(tmp_path, model_dir, whole):
    overrides = RESUME
    broken = write_config(tmp_path / "broken", model_dir, **overrides)
    ckpt = tmp_path / "broken/out/stage1/harm/checkpoints"

    first = _launch(broken, "after_step:6")  # SIGKILL right after step 6 (checkpointed)
    assert first.returncode != 0 and (ckpt / "latest").read_text() == "step00000006"
    second = _launch(broken, "during_save:9")  # SIGKILL while step 9's checkpoint is written
    assert second.returncode != 0 and "resumed from" in second.stdout and "at step 6" in second.stdout
    assert (ckpt / "latest").read_text() == "step00000006"  # the half-written save is not trusted
    third = _launch(broken)
    assert third.returncode == 0, third.stdout[-3000:]
    assert "at step 6" in third.stdout

    a = load_file(whole / "out/stage1/harm/expert.safetensors")
    b = load_file(tmp_path / "broken/out/stage1/harm/expert.safetensors")
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the resumed run's logged losses continue the uninterrupted run's, step for step
    la = {m["step"]: m["train/loss"] for m in metrics(whole / "out/stage1/harm/metrics.jsonl")}
    lb = {m["step"]: m["train/loss"] for m in metrics(tmp_path / "broken/out/stage1/harm/metrics.jsonl")}
    assert all(la[s] == lb[s] for s in range(7, 13))
    # issue 28: steps 7-9, logged by the attempt killed while saving step 9, are not there twice
    assert [m["step"] for m in metrics(tmp_path / "broken/out/stage1/harm/metrics.jsonl")] == list(range(1, 13))
    kept = sorted(p.name for p in ckpt.iterdir() if p.is_dir())
    assert kept[-2:] == ["step00000009", "step00000012"]  # keep_last: 2 complete checkpoints


def test_damaged_latest_resumes_from_the_previous_tag_and_divergence_stops(tmp_path, model_dir, whole):
    run = write_config(tmp_path / "damaged", model_dir, **RESUME)
    ckpt = tmp_path / "damaged/out/stage1/harm/checkpoints"
    first = _launch(run, "after_step:9")  # SIGKILL after step 9: checkpoints 6 and 9 kept
    assert first.returncode != 0 and (ckpt / "latest").read_text() == "step00000009"
    truncated = sorted((ckpt / "step00000009").glob("*optim_states.pt"))[0]
    truncated.write_bytes(truncated.read_bytes()[:100])
    second = _launch(run)
    assert second.returncode == 0, second.stdout[-3000:]
    assert f"step00000009: skipped: {truncated.name}: 100 bytes" in second.stdout
    assert "resumed from" in second.stdout and "step00000006 at step 6" in second.stdout
    _same_expert(whole, tmp_path / "damaged")
    longer = write_config(tmp_path / "damaged", model_dir, **{**RESUME, "train.stage1": {"steps": 15},
                                                               "data.max_seq_len": 128})
    drift = _launch(longer)  # resuming step 12 with longer sequences: refused, nothing trained
    refused = re.findall(r"^trinityx train: (.*resume refused.*)$", drift.stdout, re.M)
    assert drift.returncode != 0 and refused and "data.max_seq_len was 64, now 128" in refused[0], drift.stdout[-3000:]
    assert CheckpointDir(ckpt).latest_tag() == "step00000012"
    owner = RunLock(ckpt.parent)
    owner.acquire()  # another job (this test process) owns the stage folder
    second_job = _launch(longer)
    owner.release()
    refused = re.findall(r"^trinityx train: (.*)$", second_job.stdout, re.M)
    assert second_job.returncode != 0 and refused, second_job.stdout[-3000:]
    assert f"another training job owns this folder (host {socket.gethostname()} pid {os.getpid()} " in refused[0]

    again = write_config(tmp_path / "damaged", model_dir, **RESUME)
    crafted = sorted((ckpt / "step00000012").glob("*model_states.pt"))[0]
    marker = tmp_path / "code-ran"
    torch.save({"module": _Payload(marker)}, crafted)  # a crafted file...
    CheckpointDir(ckpt).write_manifest("step00000012")  # ...copied with a manifest that matches it
    crafted_run = _launch(again)
    refused = re.findall(r"^trinityx train: (.*refused to load.*)$", crafted_run.stdout, re.M)
    assert crafted_run.returncode != 0 and refused and refused[0].startswith(str(crafted)), crafted_run.stdout[-3000:]
    assert not marker.exists()  # its code never ran

    nan = write_config(tmp_path / "nan", model_dir, **{"train.stage1": {"steps": 6, "lr": 1e30},
                                                       "train.checkpoint_every": 1, "train.keep_last": 2})
    diverged = _launch(nan)
    assert diverged.returncode != 0
    lines = re.findall(r"^trinityx train: (.*diverged:.*)$", diverged.stdout, re.M)
    assert lines and all(line == lines[0] for line in lines), diverged.stdout[-3000:]  # one line (per rank)
    assert lines[0].startswith("train.stage1 (expert harm): diverged: loss nan at step "), lines[0]
    step = int(lines[0].split("at step ")[1].split()[0])
    out = tmp_path / "nan/out/stage1/harm"
    assert not (out / "expert.safetensors").exists()  # no stage output from a diverged state
    kept = CheckpointDir(out / "checkpoints")
    assert kept.complete_tags() and kept.complete_tags()[-1] == kept.tag_for(step - 1)  # not pruned, not saved

    # issue 28: collapse passed as success (lr 1e4: loss fixed at ln(vocab), gradient norm exactly 0, exit 0)
    collapse = write_config(tmp_path / "collapse", model_dir, **{"train.stage1": {"steps": 12, "lr": 1e4}})
    collapsed = _launch(collapse)
    lines = re.findall(r"^trinityx train: (.*collapsed:.*)$", collapsed.stdout, re.M)
    assert collapsed.returncode != 0 and lines and all(line == lines[0] for line in lines), collapsed.stdout[-3000:]
    assert lines[0].startswith("train.stage1 (expert harm): collapsed: gradient norm exactly 0 for 5 steps in a row "
                               "up to step "), lines[0]
    assert not (tmp_path / "collapse/out/stage1/harm/expert.safetensors").exists()

    # issue 28: a full disk during a save was 123 lines per rank, the cause at line 45; now one line
    # naming the path and the cause, exit code 4 (storage), and the half-written tag is not trusted
    full = write_config(tmp_path / "full", model_dir, **{"train.stage1": {"steps": 6}, "train.checkpoint_every": 3})
    nospace = _launch(full, "nospace_during_save:3")
    lines = re.findall(r"^trinityx train: (.*cannot write checkpoint.*)$", nospace.stdout, re.M)
    assert nospace.returncode != 0 and lines and "exitcode  : 4" in nospace.stdout, nospace.stdout[-3000:]
    assert lines[0].startswith(str(tmp_path / "full/out/stage1/harm/checkpoints/step00000003")), lines[0]
    assert ": cannot write checkpoint step00000003: No space left on device — make room" in lines[0], lines[0]
    assert CheckpointDir(tmp_path / "full/out/stage1/harm/checkpoints").latest_tag() is None


def test_the_launcher_returns_the_kind_of_failure(tmp_path, model_dir):
    """Issue 28: the `--nproc` launcher returned torchrun's 1 for every failure; it returns the ranks'
    own code: 3 for a run its guard stopped (here a collapse), as a scheduler's retry logic needs."""
    from trinityx_ds.cli import main

    cfg = write_config(tmp_path, model_dir, **{"train.stage1": {"steps": 12, "lr": 1e4}, "output.tensorboard": False})
    assert main(["train", "experts", "--only", "help", "--config", str(cfg), "--nproc", "2"]) == 3
