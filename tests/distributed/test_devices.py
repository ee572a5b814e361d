"""Device placement, proved on a CPU machine: the GPU_READINESS findings that crash a GPU run at
its first step, each caught here with the model on a device other than the host's (PyTorch's meta
device, tests/devices.py), in one process running the real training step, validation, evaluation
model, gathers and flags (workers/device_worker.py).

Each test names its finding; each failed on b86774b, with the message in its docstring (run of
device_worker.py on that commit, with this harness copied in)."""
from pathlib import Path

import pytest

from trinityx_ds.train.tiny_run import write_config, write_random_experts

pytestmark = pytest.mark.distributed
WORKER = Path(__file__).parent / "workers" / "device_worker.py"


@pytest.fixture(scope="module")
def got(tmp_path_factory):
    from tests.dist import run_dist

    root = tmp_path_factory.mktemp("devices")
    cfg = write_config(root)
    write_random_experts(cfg)
    return run_dist(WORKER, 1, str(cfg), timeout=300)


def test_training_step_moves_its_batches_and_keeps_its_scalars_on_the_device(got):
    """Finding 2. b86774b: "a batch tensor on cpu reached the engine on meta" (step.py:71; the DPO
    reference forward at :65)."""
    assert got["train_step_stage1_sft"] == "ok", got
    assert got["train_step_stage1_dpo"] == "ok", got
    assert got["train_step_stage2"] == "ok", got


def test_flags_and_norms_enter_collectives_on_the_device(got):
    """Finding 3. b86774b: "dist.all_reduce got a tensor on cpu" (preemption.py:26, guard.py:39,
    external.py:78): NCCL's "No backend type associated with device type cpu"."""
    assert got["preemption_flag"] == got["divergence_flag"] == "ok", got
    assert got["external_experts_step_without_grads"] == "ok", got
    assert got["collectives"] == ["all_reduce"], got


def test_stage2_validation_feeds_the_device_and_returns_cpu_tables(got):
    """Finding 4. b86774b: "a batch tensor on cpu reached the engine on meta" (validate.py:32); the
    calibration maths then gets CPU tensors, fp64 there."""
    assert got["validation_routing_probs"] == {"devices": ["cpu"]}, got


def test_evaluation_model_is_whole_on_the_rank_device(got):
    """Finding 5. b86774b: the evaluation model stayed where it was built (["cpu"]): on a GPU,
    megatron's backbone on cuda and the router / LoRA experts on the CPU."""
    assert got["eval_model_devices"] == ["meta"], got
    assert got["eval_loglik"] == got["eval_routing"] == "ok", got


def test_stage_outputs_are_gathered_through_the_cpu(got):
    """Finding 6. b86774b: the gathered tensors were the device's (["meta"]): on a GPU, pickled
    CUDA tensors unpickle on rank 0 onto the sender's GPU and TP shards meet in one torch.cat."""
    assert got["gather_stage_outputs"]["devices"] == ["cpu"] and got["gather_stage_outputs"]["n"] > 0, got


def test_restored_moments_meet_their_parameter_on_its_device(got):
    """Finding 15. b86774b: a moment restored from the universal copy stayed on the CPU while its
    parameter was on the device (AdamW then fails at the first step of a resharded resume)."""
    assert got["universal_moments_on_param_device"] == {"device": "meta"}, got


def test_routing_record_without_labels_builds_its_mask_on_the_device(got):
    """Finding 17. b86774b: "Tensor on device cpu is not on the expected device meta" (mocae.py:187)."""
    assert got["mocae_record_without_mask"] == "ok", got


def test_experts_outside_the_engine_step_fp32_masters_under_bf16(got):
    """Finding 13: b86774b stepped bf16 weights directly, so 100 updates of -1e-4 (each below bf16's
    spacing at 1.0) left the weight at 1.0. With fp32 masters they add up to -0.01, the weight is
    the master rounded to bf16, and a checkpoint restores the master exactly."""
    r = got["external_bf16_masters"]
    assert isinstance(r, dict), r
    assert r["dtype"] == "torch.bfloat16" and abs(r["master"] - 0.99) < 5e-5, r  # the bf16 gradient: 1e-4 to 3 digits
    assert r["weight"] < 1.0 and abs(r["weight"] - 0.99) <= 2 ** -8, r
    assert r["restored_master"] == r["master"] and r["restored_weight"] == r["weight"], r
