"""The foreign private names we rely on, each against the installed (pinned) version.

trinityx_ds/parallel/{deepspeed,torch,megatron}_compat.py are the only places that touch
DeepSpeed's, torch's and megatron's private names. Each test below checks one name with the
signature or behaviour we rely on, so a version bump that removes or changes it fails here with a
message naming the name and the compat function to fix.

DeepSpeed's checks need a process group and real engines (ZeRO-1, ZeRO-1 with the bf16 optimizer,
ZeRO-3; a torch.nn.Linear, world size 1 on gloo): they run in one subprocess, this file run as a
script under tests/dist.py's harness (timeout and watchdog), so no process group leaks into the
other tests. Each check records its own error, so one broken name fails only its own test.
"""

from __future__ import annotations

import inspect
import re
import traceback

import pytest
import torch

from trinityx_ds.parallel import deepspeed_compat as dc
from trinityx_ds.parallel import torch_compat


def _fix(name: str, where: str) -> str:
    return f"{name} changed or is gone in this version: fix {where}"


# --------------------------------------------------------------------------------------- torch
IN_BACKWARD = _fix("torch._C._current_graph_task_id", "trinityx_ds.parallel.torch_compat.in_backward")


MKLDNN_FP16 = _fix("torch.ops.mkldnn._is_mkldnn_fp16_supported", "trinityx_ds.parallel.torch_compat.mkldnn_fp16_supported")


def test_mkldnn_fp16_query_is_the_one_deepspeed_asks():
    """train/preflight.py refuses fp16 on a CPU where DeepSpeed's CPU accelerator would: both ask
    torch's private oneDNN query."""
    import inspect

    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

    assert isinstance(torch.ops.mkldnn._is_mkldnn_fp16_supported(), bool), MKLDNN_FP16
    assert "_is_mkldnn_fp16_supported" in inspect.getsource(CPU_Accelerator.is_fp16_supported), MKLDNN_FP16
    assert torch_compat.mkldnn_fp16_supported() is torch.ops.mkldnn._is_mkldnn_fp16_supported(), MKLDNN_FP16


def test_current_graph_task_id_is_minus_one_outside_backward():
    assert callable(getattr(torch._C, "_current_graph_task_id", None)), IN_BACKWARD
    assert torch._C._current_graph_task_id() == -1, IN_BACKWARD


def test_in_backward_false_outside_backward():
    x = torch.ones(2, requires_grad=True)
    seen = []

    def f(t):
        seen.append(torch_compat.in_backward())
        return t * 2

    f(x).sum()  # forward with grad recording
    with torch.no_grad():
        f(x)
    assert seen == [False, False], IN_BACKWARD


def test_in_backward_true_in_a_custom_function_backward():
    seen = []

    class Probe(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            seen.append(("forward", torch_compat.in_backward()))
            return t.clone()

        @staticmethod
        def backward(ctx, grad):
            seen.append(("backward", torch_compat.in_backward()))
            return grad

    Probe.apply(torch.ones(2, requires_grad=True)).sum().backward()
    assert seen == [("forward", False), ("backward", True)], IN_BACKWARD
    assert torch_compat.in_backward() is False, IN_BACKWARD


@pytest.mark.parametrize("use_reentrant", [True, False], ids=["reentrant", "non_reentrant"])
def test_in_backward_true_while_checkpoint_recomputes(use_reentrant):
    """What MoCaEBlock relies on: the first forward sees False, the recompute (megatron's full
    recompute is reentrant, like use_reentrant=True) sees True."""
    from torch.utils.checkpoint import checkpoint

    seen = []

    def layer(t):
        seen.append(torch_compat.in_backward())
        return t.sin()

    x = torch.ones(3, requires_grad=True)
    checkpoint(layer, x, use_reentrant=use_reentrant).sum().backward()
    assert seen == [False, True], IN_BACKWARD


def test_module_apply_is_what_dtype_casts_call():
    """CalibratedRouter (trinityx_ds/model/router.py) overrides torch's private nn.Module._apply to
    stay fp32 under model.bfloat16() / .to(dtype) / .half(); it calls super()._apply(fn, recurse)."""
    message = _fix("torch.nn.Module._apply(fn, recurse=True)", "CalibratedRouter._apply in trinityx_ds/model/router.py")
    assert callable(getattr(torch.nn.Module, "_apply", None)), message
    params = list(inspect.signature(torch.nn.Module._apply).parameters.values())
    assert [p.name for p in params] == ["self", "fn", "recurse"] and params[2].default is True, message

    class Spy(torch.nn.Linear):
        calls = 0

        def _apply(self, fn, recurse=True):
            Spy.calls += 1
            return super()._apply(fn, recurse)

    spy = Spy(2, 2)
    for cast in (lambda m: m.bfloat16(), lambda m: m.to(torch.float16), lambda m: m.half(), lambda m: m.float()):
        before = Spy.calls
        cast(spy)
        assert Spy.calls == before + 1, message


# ------------------------------------------------------------------------------------ megatron
ROPE = _fix("megatron RotaryEmbedding._apply_scaling", "trinityx_ds.parallel.megatron_compat.rope_apply_scaling")


def test_rotary_apply_scaling_signature():
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    assert callable(getattr(RotaryEmbedding, "_apply_scaling", None)), ROPE
    names = list(inspect.signature(RotaryEmbedding._apply_scaling).parameters)
    assert names == ["self", "freqs", "factor", "low_freq_factor", "high_freq_factor",
                     "original_max_position_embeddings"], ROPE


@pytest.mark.parametrize("rope", [
    {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    {"factor": 8.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0, "original_max_position_embeddings": 4096},
], ids=["llama3.2", "other"])
def test_rope_apply_scaling_equals_hf_llama3(rope):
    """Every parameter is honoured: inv_freq equals transformers' llama3 rope, what exports match."""
    import warnings

    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from trinityx_ds.parallel.megatron_compat import rope_apply_scaling

    theta, head_dim = 500000.0, 64
    rot = RotaryEmbedding(head_dim, 1.0, rotary_base=int(theta), use_cpu_initialization=True)
    rope_apply_scaling(rot, **rope)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, max_position_embeddings=16384,
                          rope_parameters={"rope_type": "llama3", "rope_theta": theta, **rope})
    want, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    torch.testing.assert_close(rot.inv_freq, want.float(), rtol=1e-6, atol=0, msg=lambda m: f"{ROPE}\n{m}")


# ----------------------------------------------------------------------- deepspeed, in-process
def _ds(name: str, fn: str) -> str:
    return _fix(f"deepspeed.utils.groups.{name}", f"trinityx_ds.parallel.deepspeed_compat.{fn}")


@pytest.mark.parametrize("name, params, fn", [
    ("_get_expert_parallel_group_dict", [], "ensure_expert_groups"),
    ("_create_expert_data_and_model_parallel", ["expert_parallel_size_", "mpu"], "ensure_expert_groups"),
    ("_get_expert_parallel_group", ["group_name"], "expert_parallel_group"),
    ("_get_expert_data_parallel_group", ["group_name"], "expert_data_parallel_group"),
])
def test_ds_groups_signatures(name, params, fn):
    """The leading parameters we pass (later ones must have defaults)."""
    from deepspeed.utils import groups

    assert callable(getattr(groups, name, None)), _ds(name, fn)
    sig = list(inspect.signature(getattr(groups, name)).parameters.values())
    assert [p.name for p in sig[:len(params)]] == params, _ds(name, fn)
    assert all(p.default is not p.empty for p in sig[len(params):]), _ds(name, fn)


def test_ds_groups_module_has_mpu_and_group_dict():
    from deepspeed.utils import groups

    assert hasattr(groups, "mpu"), _ds("mpu", "set_mpu")
    assert isinstance(groups._get_expert_parallel_group_dict(), dict), _ds("_get_expert_parallel_group_dict",
                                                                           "ensure_expert_groups")


def test_zero_managed_is_deepspeeds_own_test():
    """safe_get/set_full_* tell ZeRO's parameters by the same two marks zero_managed looks for."""
    from deepspeed import utils

    for name in ("safe_get_full_fp32_param", "safe_set_full_fp32_param", "safe_get_full_optimizer_state",
                 "safe_set_full_optimizer_state"):
        src = inspect.getsource(getattr(utils, name))
        for mark in ("ds_id", "_hp_mapping"):
            message = _fix(f"deepspeed.utils.{name}'s test for {mark!r}", "deepspeed_compat.zero_managed")
            assert re.search(rf"hasattr\(param,\s*[\"']{mark}[\"']\)", src), message


def test_ds_optimizers_link_without_arguments():
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    for cls in (DeepSpeedZeroOptimizer, BF16_Optimizer):
        link = getattr(cls, "_lazy_init_hp_params_optimizer_state", None)
        message = _fix(f"{cls.__name__}._lazy_init_hp_params_optimizer_state",
                       "trinityx_ds.parallel.deepspeed_compat.link_optimizer_fragments")
        assert link is not None and list(inspect.signature(link).parameters) == ["self"], message


def test_plain_torch_optimizer_passes_through():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([p])
    assert dc.inner_optimizer(opt) is opt
    assert dc.zero_managed(p) is False
    dc.link_optimizer_fragments(opt)  # nothing to link: a no-op
    assert dc.ENGINE_COUNTERS == ("global_steps", "global_samples", "skipped_steps")


def test_set_mpu_sets_deepspeeds_mpu(monkeypatch):
    from deepspeed.utils import groups

    monkeypatch.setattr(groups, "mpu", groups.mpu)  # restored afterwards
    unit = object()
    dc.set_mpu(unit)
    assert groups.mpu is unit, _ds("mpu", "set_mpu")


# --------------------------------------------------------------------- deepspeed, real engines
@pytest.fixture(scope="module")
def ds():
    from tests.dist import run_dist

    return run_dist(__file__, 1, timeout=180)  # a fresh machine builds DeepSpeed's shm op


def _check(ds: dict, name: str, section: str | None = None) -> dict:
    """One check's measurements, failing with the worker's traceback where it raised."""
    result = ds[name]
    assert "error" not in result, f"{name}: {result.get('message')}\n{result.get('error')}"
    if section is not None:
        result = result[section]
        assert "error" not in result, f"{name} {section}: {result.get('message')}\n{result.get('error')}"
    return result


def test_mpu_is_where_deepspeed_reads_the_data_parallel_size(ds):
    r = _check(ds, "groups")
    assert r["dp_size_from_mpu"] == 7, _ds("mpu", "set_mpu")


def test_ensure_expert_groups_creates_them_once(ds):
    """Named `ep_size_{ep}`, as ParallelDims.ep_group_name assumes; a second call keeps them."""
    from trinityx_ds.parallel.groups import ParallelDims

    r = _check(ds, "groups")
    name = ParallelDims(world_size=1, tp=1, pp=1, dp=1, ep=1, rank=0, tp_rank=0, dp_rank=0).ep_group_name
    assert r["before"] == [] and r["after"] == [name], _ds("_create_expert_data_and_model_parallel",
                                                          "ensure_expert_groups")
    assert r["again_same_groups"], _ds("_get_expert_parallel_group_dict", "ensure_expert_groups")


def test_expert_group_getters(ds):
    r = _check(ds, "groups")
    assert r["ep_ranks"] == [0], _ds("_get_expert_parallel_group", "expert_parallel_group")
    assert r["edp_ranks"] == [0], _ds("_get_expert_data_parallel_group", "expert_data_parallel_group")
    assert r["missing"] == ["AssertionError", "AssertionError"], _ds("_get_expert_parallel_group",
                                                                     "expert_parallel_group")


ENGINES = {"zero1": "DeepSpeedZeroOptimizer", "bf16": "BF16_Optimizer", "zero3": "DeepSpeedZeroOptimizer_Stage3"}
MARKS = {"zero1": "_hp_mapping", "bf16": "_hp_mapping", "zero3": "ds_id"}


def test_engines_use_the_expected_wrappers(ds):
    """ZeRO-1 fp32, ZeRO-1 bf16 with fp32 grad accumulation, ZeRO-3: the three wrappers covered."""
    assert {k: _check(ds, k)["wrapper"] for k in ENGINES} == ENGINES


@pytest.mark.parametrize("engine", ENGINES)
def test_zero_managed_on_a_real_engine(ds, engine):
    r = _check(ds, engine, "marks")
    message = _fix(f"{ENGINES[engine]}'s parameter mark {MARKS[engine]!r}", "deepspeed_compat.zero_managed")
    assert r["managed"] == [True, True] and r["marks"] == [MARKS[engine]] * 2, message
    assert r["plain_managed"] is False, message


@pytest.mark.parametrize("engine", ENGINES)
def test_inner_optimizer_on_a_real_engine(ds, engine):
    """`.optimizer` is the torch AdamW, and its state is keyed by DeepSpeed's fp32 partitions."""
    r = _check(ds, engine, "inner")
    message = _fix(f"{ENGINES[engine]}.optimizer", "deepspeed_compat.inner_optimizer")
    assert r["inner"] == "AdamW" and r["is_dot_optimizer"] and r["state_on_partitions"], message


@pytest.mark.parametrize("engine", ENGINES)
def test_resume_state_before_the_first_step(ds, engine):
    """deepspeed_compat.optimizer_state_params names the tensors the state is keyed by before any
    step (ZeRO-3: its fp32 partitions, absent from the torch param groups outside step()), so a
    resume's moments land where DeepSpeed reads them."""
    r = _check(ds, engine, "resume")
    message = _fix(f"{ENGINES[engine]}.fp32_partitioned_groups_flat / param_groups",
                   "deepspeed_compat.optimizer_state_params")
    assert r["params_before_step"] > 0 and r["round_trip"] and r["stepped_from_it"], message


@pytest.mark.parametrize("engine", ENGINES)
def test_link_optimizer_fragments_on_a_real_engine(ds, engine):
    """A state created before the first step (as a resume does) is what DeepSpeed reads and writes
    once linked; before linking, ZeRO-1/2 and the bf16 optimizer find no fragment. ZeRO-3 has
    nothing to link: its tensor-fragment API reads the torch state directly."""
    r = _check(ds, engine, "link")
    message = _fix(f"{ENGINES[engine]}._lazy_init_hp_params_optimizer_state",
                   "deepspeed_compat.link_optimizer_fragments")
    if engine == "zero3":
        assert not r["has_link"] and r["before_link"] == "ok", message
    else:
        assert r["has_link"] and r["params_before_step"] > 0, message
        assert r["before_link"] != "ok", f"{message} (DeepSpeed now links before the first step)"
    assert r["round_trip"] and r["in_created_state"] and r["step_after_link"], message


@pytest.mark.parametrize("engine", ENGINES)
def test_engine_counters_on_a_real_engine(ds, engine):
    """One step adds 1 step and 2 samples (micro batch 2, DP 1); set counters are where the
    engine counts on from."""
    r = _check(ds, engine, "counters")
    message = _fix("DeepSpeedEngine.global_steps/global_samples/skipped_steps", "deepspeed_compat.engine_counters")
    c0, c1, c2 = r["counters"]
    assert set(c0) == set(dc.ENGINE_COUNTERS), message
    assert c1 == {"global_steps": c0["global_steps"] + 1, "global_samples": c0["global_samples"] + 2,
                  "skipped_steps": c0["skipped_steps"]}, message
    assert c2 == {"global_steps": 8, "global_samples": 16, "skipped_steps": 1}, message
    assert set(r["types"]) == {"int"}, message


def test_backward_loss_scale_is_what_engine_backward_gives_the_loss(ds):
    """The router losses' gradient (train/step.py) is set from it: fp16 2^16 at the start, else 1."""
    r = _check(ds, "loss_scale")
    message = _fix("DeepSpeedEngine.backward's loss scaling (ZeROOptimizer.scale_if_loss)",
                   "deepspeed_compat.backward_loss_scale")
    assert {k: v["scale"] for k, v in r.items()} == {"zero1_fp16": 2.0 ** 16, "zero3_fp16": 2.0 ** 16,
                                                     "zero1_bf16": 1.0, "zero1_fp32": 1.0}, message
    assert all(v["given"] == v["scale"] for v in r.values()), (message, r)


# ---------------------------------------------------------------------------- the worker side
def _record(fn, *args) -> dict:
    try:
        return fn(*args)
    except Exception as exc:  # one broken name fails its own tests only
        return {"error": traceback.format_exc(), "message": str(exc)}


def _groups_checks() -> dict:
    from deepspeed.utils import groups
    from megatron.core import parallel_state
    from torch import distributed as dist

    class SevenRanks:
        def get_data_parallel_world_size(self):
            return 7

    dc.set_mpu(SevenRanks())
    dp_size = groups._get_data_parallel_world_size()
    dc.set_mpu(parallel_state)
    before = sorted(groups._get_expert_parallel_group_dict())
    dc.ensure_expert_groups(1, parallel_state)
    after = sorted(groups._get_expert_parallel_group_dict())
    ep, edp = dc.expert_parallel_group("ep_size_1"), dc.expert_data_parallel_group("ep_size_1")
    dc.ensure_expert_groups(1, parallel_state)
    missing = []
    for get in (dc.expert_parallel_group, dc.expert_data_parallel_group):
        try:
            get("ep_size_2")
            missing.append(None)
        except Exception as exc:
            missing.append(type(exc).__name__)
    return {"dp_size_from_mpu": dp_size, "before": before, "after": after,
            "again_same_groups": dc.expert_parallel_group("ep_size_1") is ep
            and dc.expert_data_parallel_group("ep_size_1") is edp,
            "ep_ranks": dist.get_process_group_ranks(ep), "edp_ranks": dist.get_process_group_ranks(edp),
            "missing": missing}


def _make_engine(stage: int, bf16: bool):
    """A DeepSpeed engine over a Linear(4, 3) with AdamW, and a function that takes one step."""
    import deepspeed

    from trinityx_ds.parallel.groups import DeepSpeedMPU

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
              "gradient_clipping": 0.0, "bf16": {"enabled": bf16}, "steps_per_print": 10 ** 9,
              "wall_clock_breakdown": False}
    if bf16:  # bf16 weights, fp32 grad accumulation: DeepSpeed's BF16_Optimizer
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    engine, opt, _, _ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()),
                                             optimizer=torch.optim.AdamW(model.parameters(), lr=0.1),
                                             config=config, mpu=DeepSpeedMPU())

    def step():
        x = torch.randn(2, 4, dtype=torch.bfloat16 if bf16 else torch.float32)
        engine.backward(engine(x).float().pow(2).sum())
        engine.step()

    return engine, opt, step


def _engine_checks(stage: int, bf16: bool) -> dict:
    """One engine; each section recorded on its own (engine creation failing fails them all)."""
    engine, opt, step = _make_engine(stage, bf16)
    # in this order: linking needs an engine that has not stepped yet; the resume gets its own
    return {"wrapper": type(opt).__name__, "marks": _record(_marks, engine),
            "link": _record(_link, engine, opt, step), "inner": _record(_inner, engine, opt),
            "counters": _record(_counters, engine, step),
            "resume": _record(lambda: _resume_state(*_make_engine(stage, bf16)))}


def _marks(engine) -> dict:
    params = list(engine.module.parameters())
    return {"managed": [dc.zero_managed(p) for p in params],
            "marks": [m for p in params for m in ("ds_id", "_hp_mapping") if hasattr(p, m)],
            "plain_managed": dc.zero_managed(torch.nn.Parameter(torch.zeros(1)))}


def _link(engine, opt, step) -> dict:
    """A resume: the torch state created before the first step (train/universal.py materialise),
    then linked; DeepSpeed's tensor-fragment API must then read and write that state."""
    from deepspeed.utils import safe_get_full_optimizer_state, safe_set_full_optimizer_state

    inner, weight = dc.inner_optimizer(opt), engine.module.weight
    flats = [f for g in inner.param_groups for f in g["params"]]
    out = {"has_link": hasattr(opt, "_lazy_init_hp_params_optimizer_state"), "params_before_step": len(flats)}
    if not flats:  # ZeRO-3 puts its fp32 partitions in the torch optimizer only inside step()
        step()
        flats = list(inner.state)
    for flat in flats:
        inner.state[flat].update(exp_avg=torch.zeros_like(flat), exp_avg_sq=torch.zeros_like(flat),
                                 step=torch.tensor(0.0))
    try:
        safe_get_full_optimizer_state(weight, "exp_avg")
        out["before_link"] = "ok"
    except Exception as exc:
        out["before_link"] = type(exc).__name__
    dc.link_optimizer_fragments(opt)
    dc.link_optimizer_fragments(opt)  # once: a second call changes nothing
    value = torch.arange(12, dtype=torch.float32).reshape(3, 4) + 1
    safe_set_full_optimizer_state(weight, value, "exp_avg")
    got = safe_get_full_optimizer_state(weight, "exp_avg")
    out["round_trip"] = got is not None and torch.equal(got.float(), value)
    out["in_created_state"] = sum(float(inner.state[f]["exp_avg"].sum()) for f in flats) == float(value.sum())
    step()
    after = safe_get_full_optimizer_state(weight, "exp_avg")
    out["step_after_link"] = after is not None and after.shape == value.shape and not torch.equal(after, value)
    return out


def _resume_state(engine, opt, step) -> dict:
    """A resume into an engine that has not stepped (train/universal.py materialise + set_full):
    the moments land where DeepSpeed reads them, and its next step starts from them."""
    from trinityx_ds.train import universal

    weight = engine.module.weight
    before = len(dc.optimizer_state_params(opt))
    universal.materialise(opt, {"moments": ["exp_avg", "exp_avg_sq"], "scalars": {"step": 3.0}})
    value = torch.arange(12, dtype=torch.float32).reshape(3, 4) + 1
    universal.set_full(weight, opt, value, "exp_avg")
    out = {"params_before_step": before, "round_trip": torch.equal(universal.full(weight, opt, "exp_avg"), value)}
    step()
    out["stepped_from_it"] = not torch.equal(universal.full(weight, opt, "exp_avg"), value)
    return out


def _inner(engine, opt) -> dict:
    inner = dc.inner_optimizer(opt)
    params = {id(p) for p in engine.module.parameters()}
    keys = list(inner.state)
    return {"inner": type(inner).__name__, "is_dot_optimizer": inner is opt.optimizer and inner is not opt,
            "state_on_partitions": bool(keys) and all(id(k) not in params and k.dtype == torch.float32
                                                      for k in keys)}


def _counters(engine, step) -> dict:
    counters = [dc.engine_counters(engine)]
    step()
    counters.append(dc.engine_counters(engine))
    dc.set_engine_counters(engine, {"global_steps": 7, "global_samples": 14, "skipped_steps": 1})
    step()
    counters.append(dc.engine_counters(engine))
    return {"counters": counters, "types": [type(v).__name__ for c in counters for v in c.values()]}


def _loss_scale_checks() -> dict:
    """backward_loss_scale against the factor engine.backward really gives the loss (the gradient
    reaching it, times grad_accum 2), under fp16 (ZeRO-1 and ZeRO-3), bf16 and fp32."""
    import deepspeed

    from tests.dist import allow_cpu_fp16
    from trinityx_ds.parallel.groups import DeepSpeedMPU

    allow_cpu_fp16()  # also where this CPU has no fp16 units: torch's CPU fp16 kernels run the maths
    out = {}
    for name, stage, prec in (("zero1_fp16", 1, "fp16"), ("zero3_fp16", 3, "fp16"), ("zero1_bf16", 1, "bf16"),
                              ("zero1_fp32", 1, "fp32")):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3)
        config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
                  "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
                  "gradient_clipping": 0.0, "fp16": {"enabled": prec == "fp16", "initial_scale_power": 16},
                  "bf16": {"enabled": prec == "bf16"}, "steps_per_print": 10 ** 9}
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()),
                                               optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                               config=config, mpu=DeepSpeedMPU())
        x = torch.randn(2, 4, dtype=next(engine.module.parameters()).dtype)
        loss = engine(x).float().pow(2).sum()
        seen = []
        loss.register_hook(lambda g: seen.append(float(g)))
        scale = dc.backward_loss_scale(engine)
        engine.backward(loss)
        out[name] = {"scale": scale, "given": seen[0] * 2}
    return out


def _worker() -> None:
    from megatron.core import parallel_state

    from tests.dist import worker_setup, write_result
    from trinityx_ds.parallel.env import init_distributed

    worker_setup()
    init_distributed()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
    write_result({"groups": _record(_groups_checks), "zero1": _record(_engine_checks, 1, False),
                  "bf16": _record(_engine_checks, 1, True), "zero3": _record(_engine_checks, 3, False),
                  "loss_scale": _record(_loss_scale_checks)})


if __name__ == "__main__":
    _worker()


class _Payload:
    """A pickle that runs a command when unpickled (what a crafted checkpoint file carries)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_checkpoints_load_weights_only_and_refuse_code(tmp_path):
    """deepspeed_compat.load_weights_only: DeepSpeed's own checkpoint types load, a pickle that
    would run code is refused naming the file, and the code never runs."""
    import types

    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    from trinityx_ds.errors import CheckpointError
    from trinityx_ds.parallel.deepspeed_compat import load_weights_only

    engine = types.SimpleNamespace(checkpoint_engine=types.SimpleNamespace())
    load_weights_only(engine)
    good = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    state = {"zero_stage": ZeroStageEnum.optimizer_states, "loss_scaler": LossScaler(1.0),
             "param_slice_mappings": [{"w": fragment_address(numel=4, start=0)}], "w": torch.arange(4.0)}
    torch.save(state, good)
    back = engine.checkpoint_engine.load(str(good), map_location=lambda storage, loc: storage)
    assert back["zero_stage"] == ZeroStageEnum.optimizer_states and torch.equal(back["w"], state["w"])
    assert back["param_slice_mappings"][0]["w"] == fragment_address(numel=4, start=0)

    marker = tmp_path / "code-ran"
    bad = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": _Payload(marker)}, bad)
    with pytest.raises(CheckpointError, match=rf"^{bad}: refused to load: it holds objects no checkpoint needs"):
        engine.checkpoint_engine.load(str(bad))
    assert not marker.exists()
