"""The DeepSpeed 0.19.8 internals we rely on, in one place: nothing else touches DeepSpeed's
private names.

DeepSpeed has no public API for three things a MoCaE run needs:

* expert-parallel process groups made from megatron's parallel state before any engine exists
  (`deepspeed.utils.groups`, whose functions are all `_`-prefixed), so MoCaE blocks can be built
  on their EP ranks and stage 2's external experts can reduce their gradients over the
  expert-data-parallel group;
* telling which parameters ZeRO / the bf16 optimizer hold in their partitions, and linking the
  partitions into an optimizer state created before the first step (a resume from the universal
  copy, train/universal.py);
* the engine's step counters, which a resume at another layout restores itself.

Each function names the private construct it wraps; tests/unit/test_compat.py checks each one
against the installed DeepSpeed, so a version bump that removes or changes one fails there,
naming the construct and the function here to fix.
"""

from __future__ import annotations

import pickle

import torch
from deepspeed.runtime.base_optimizer import ZeROOptimizer
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils import groups
from deepspeed.utils.tensor_fragment import fragment_address

from trinityx_ds.errors import CheckpointError


def set_mpu(mpu) -> None:
    """Make `mpu` (megatron's parallel_state) the model-parallel unit DeepSpeed's groups module
    derives its data- and expert-parallel groups from (`deepspeed.utils.groups.mpu`).

    Call it before `ensure_expert_groups`: DeepSpeed reads the data-parallel size from it."""
    groups.mpu = mpu


def ensure_expert_groups(ep: int, mpu) -> None:
    """Create DeepSpeed's expert-parallel and expert-data-parallel groups of size `ep` (named
    `ep_size_{ep}`) unless they exist. Collective over the world (every rank must call it).

    `groups._create_expert_data_and_model_parallel` leaves that check to its caller; repeating it
    would make new torch process groups each time."""
    if f"ep_size_{ep}" not in groups._get_expert_parallel_group_dict():
        groups._create_expert_data_and_model_parallel(ep, mpu=mpu)


def expert_parallel_group(name: str):
    """This rank's expert-parallel group `name` ("ep_size_{ep}"): the ranks its tokens go to
    (`groups._get_expert_parallel_group`; an AssertionError if not created)."""
    return groups._get_expert_parallel_group(name)


def expert_data_parallel_group(name: str):
    """This rank's expert-data-parallel group `name`: the ranks holding replicas of its experts
    (`groups._get_expert_data_parallel_group`; an AssertionError if not created)."""
    return groups._get_expert_data_parallel_group(name)


def zero_managed(p: torch.Tensor) -> bool:
    """Whether DeepSpeed holds p's fp32 master and moments in its partitions: ZeRO-3 marks its
    parameters with `ds_id`, ZeRO-1/2 and the bf16 optimizer with `_hp_mapping` (None on ranks
    that hold no fragment of p). The same test DeepSpeed's safe_get_full_* functions make."""
    return hasattr(p, "ds_id") or hasattr(p, "_hp_mapping")


def inner_optimizer(opt):
    """The torch optimizer itself: ZeRO's and the bf16 wrappers hold it as `.optimizer`; a plain
    torch optimizer is returned as it is."""
    return getattr(opt, "optimizer", opt)


def optimizer_state_params(opt) -> list[torch.Tensor]:
    """The tensors the torch optimizer inside `opt` keys its state by, also before its first step:
    ZeRO-3's fp32 partitions (`fp32_partitioned_groups_flat`: ZeRO-3 puts them into the torch
    optimizer's param groups only inside step(), so the groups are empty when a resume creates the
    state), else the tensors of the torch optimizer's param groups."""
    flats = getattr(opt, "fp32_partitioned_groups_flat", None)
    if flats is not None:
        return list(flats)
    return [t for group in inner_optimizer(opt).param_groups for t in group["params"]]


def link_optimizer_fragments(opt) -> None:
    """Link each parameter's fragment into an optimizer state created before the first step.

    ZeRO-1/2 and the bf16 optimizer do it once, at their first step
    (`_lazy_init_hp_params_optimizer_state`); until then safe_get/set_full_optimizer_state find
    nothing. Optimizers without it (ZeRO-3, torch's own) need no linking: a no-op."""
    link = getattr(opt, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:
        link()


ENGINE_COUNTERS = ("global_steps", "global_samples", "skipped_steps")


def backward_loss_scale(engine) -> float:
    """The factor `engine.backward` multiplies a loss by after dividing it by the accumulation
    steps: fp16's current (dynamic) loss scale, 1.0 under bf16 and fp32.

    Mirrors DeepSpeed 0.19.8's `DeepSpeedEngine.backward`: a ZeROOptimizer (ZeRO 1-3 and the bf16
    optimizer) scales by `optimizer.scale_if_loss` (its `loss_scaler`, a custom scale, or torch's
    autocast GradScaler), a ZeRO-0 engine under torch autocast by `torch_autocast_z0_gradscaler`,
    anything else not at all. Probing `scale_if_loss` with a one-element loss gives exactly the
    number it would apply, whichever of its branches is taken. Read it before every backward: the
    dynamic scaler changes it at each step that overflows or that ends a clean window.
    """
    opt = engine.optimizer
    if isinstance(opt, ZeROOptimizer):
        probe = torch.ones((), device=engine.device, requires_grad=True) * 1.0  # one element, a grad_fn: a "loss"
        return float(opt.scale_if_loss(probe).detach())
    scaler = getattr(engine, "torch_autocast_z0_gradscaler", None)
    return float(scaler.get_scale()) if scaler is not None else 1.0


def engine_counters(engine) -> dict[str, int]:
    """The engine's step counters (its optimizer steps, samples seen, skipped steps), which its own
    checkpoints save and a resume from the universal copy restores with `set_engine_counters`."""
    return {k: getattr(engine, k) for k in ENGINE_COUNTERS}


def set_engine_counters(engine, counters: dict) -> None:
    """Restore step counters taken by `engine_counters` (every key in `counters` is set)."""
    for k, v in counters.items():
        setattr(engine, k, v)


def safe_checkpoint_globals() -> list:
    """The non-tensor types DeepSpeed 0.19's checkpoints hold (found by reading this project's
    ZeRO 1/2/3 checkpoints with weights_only=True): the ZeRO stage enum, the loss scalers and the
    fragment addresses of ZeRO-1/2's parameter slice mappings."""
    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def load_weights_only(engine) -> None:
    """Makes `engine.load_checkpoint` unpickle with `weights_only=True` and only the types of
    `safe_checkpoint_globals` allowed. DeepSpeed's TorchCheckpointEngine.load calls
    `torch.load(weights_only=False)`, which runs whatever code a crafted file carries, and
    checkpoints are copied between clusters and users. Every file DeepSpeed's native load reads
    (model states, ZeRO optimizer states) goes through `engine.checkpoint_engine.load`; a file that
    holds anything else is refused as a CheckpointError naming it."""
    def load(path, map_location=None):
        try:
            with torch.serialization.safe_globals(safe_checkpoint_globals()):
                return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            first = str(e).strip().splitlines()
            why = next((line.strip() for line in first if "GLOBAL" in line or "Unsupported" in line), first[0] if first else "")
            raise CheckpointError(f"{path}: refused to load: it holds objects no checkpoint needs ({why}); "
                                  "checkpoints are read with weights_only=True") from None

    engine.checkpoint_engine.load = load
