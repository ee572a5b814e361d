"""One assembly of a run's model on this rank, for training and evaluation alike: the backbone
source, the experts' files, and the one rule for which MoCaE tensors may be absent from them.

Sources are HF-named tensor sources chained in order (the first that holds a tensor wins): what
overrides (a universal checkpoint copy, evaluation's router overrides), then the backbone, then
the MoCaE files. A tensor no source holds keeps its initial value only where `may_be_absent`
says so; anything else is an error naming the model source.
"""
from __future__ import annotations

from pathlib import Path

import torch

from trinityx_ds.errors import CheckpointError
from trinityx_ds.model.mocae_spec import EXPERTS, POST_NORM, ROUTER, expert_shapes, mocae_role
from trinityx_ds.model.weights import load_weights
from trinityx_ds.parallel.device import rank_device
from trinityx_ds.storage.layout import RunLayout
from trinityx_ds.storage.sources import ChainSource, SafetensorsSource


def may_be_absent(name: str, upcycled_experts: bool = False) -> bool:
    """Whether tensor `name` (megatron) keeps its initial value when no source holds it: the router
    and the post-mix norm (initialised until stage 2 has trained them), and the `full` experts a
    stage upcycles from the base FFN (stage 1, `upcycled_experts`). Backbone tensors and every
    trained expert must be read."""
    role = mocae_role(name)
    return role in (ROUTER, POST_NORM) or (upcycled_experts and role == EXPERTS and ".experts.local." in name)


DTYPES = {"fp32": "F32", "bf16": "BF16", "fp16": "F16"}  # model.dtype -> safetensors' name


def nonfinite(where, key: str, tensor: torch.Tensor) -> str | None:
    """Why tensor `key` of file `where` cannot be used for its values (NaN or inf), or None."""
    bad = int((~torch.isfinite(tensor)).sum())
    return f"{where}: tensor {key!r} holds {bad} NaN or inf value(s)" if bad else None


def open_expert(path: Path, arch, moe, name: str, dtype: str | None = None, backbone: str | None = None,
                values: bool = False) -> SafetensorsSource:
    """Expert `name`'s file at `path` as a tensor source, once it is known to serve MoCaE config
    `moe`; else CheckpointError naming the file (missing, unreadable) and the tensor (missing, of
    another shape; with `dtype`, the run's model.dtype: neither fp32 nor that dtype; with `values`,
    holding a NaN or inf, read whole) or the backbone (`backbone`: the run's fingerprint, against
    the one the file's metadata records; files written before it was recorded are not checked)."""
    if not path.is_file():
        raise CheckpointError(f"{path}: expert {name!r} not trained yet "
                              f"(run `trinityx train experts --only {name}` first)")
    src = SafetensorsSource.from_file(path)
    want = expert_shapes(arch, moe, name)
    missing = sorted(set(want) - set(src.keys()))
    if missing:
        raise CheckpointError(f"{path}: no tensor {missing[0]!r} ({len(missing)} of {len(want)} missing; the run "
                              f"config has experts.kind {moe.kind}, lora rank {moe.lora_rank}, targets "
                              f"{list(moe.lora_targets)}, layers {moe.layers})")
    for key, shape in want.items():
        if src.shape(key) != shape:
            raise CheckpointError(f"{path}: tensor {key!r} has shape {src.shape(key)}, the run config needs {shape} "
                                  f"(experts.kind {moe.kind}, lora rank {moe.lora_rank})")
        allowed = {"F32", DTYPES.get(dtype, "F32")} if dtype else None
        if allowed and src.dtype(key) not in allowed:
            raise CheckpointError(f"{path}: tensor {key!r} is {src.dtype(key)}; the run (model.dtype {dtype}) reads "
                                  f"{' or '.join(sorted(allowed))} expert tensors")
        if values:  # one tensor mapped at a time: a 70B run's full experts are tens of GB
            problem = nonfinite(path, key, src.read(key))
            src.close()
            if problem:
                raise CheckpointError(f"{problem}: a diverged or damaged expert; retrain it (a lower learning rate) "
                                      "or restore the file")
    recorded = src.metadata().get("backbone")
    if backbone and recorded and recorded != backbone:
        raise CheckpointError(f"{path}: expert {name!r} was trained on another backbone (fingerprint {recorded[:12]}, "
                              f"this run's {backbone[:12]}): train it on this run's model")
    return src


def expert_sources(layout: RunLayout, arch, moe, trained_in_stage2: bool = False, final: bool = True) -> list:
    """The files of `moe`'s experts as tensor sources, each checked against `moe` first: as the run
    last trained them (`final`: stage 2's copies once stage 2 trained and finished them), else as
    stage 1 left them."""
    return [open_expert(layout.final_expert_file(name, trained_in_stage2) if final else layout.expert_file(name),
                        arch, moe, name) for name in moe.expert_names]


def router_source(layout: RunLayout, required: bool) -> list:
    """Stage 2's router file as a source ([] when absent and not `required`)."""
    if layout.router_file.is_file():
        return [SafetensorsSource.from_file(layout.router_file)]
    if required:
        raise FileNotFoundError(f"{layout.router_file}: no trained router (run `trinityx train router` first)")
    return []


def assemble(arch, dims, moe, sources: list, *, where: str | Path, dtype: str = "fp32",
             activation_checkpointing: bool | str = "none", upcycled_experts: bool = False, attention: str = "sdpa",
             sequence_parallel: bool = False):
    """(model, MoCaE blocks) on this rank: built by `build_model`, every tensor loaded from the
    chained `sources` at this rank's TP slice. `where` names the model source in the error."""
    # megatron: only once a model is built (train/preflight checks experts with this module before launching)
    from trinityx_ds.model.build import build_model

    model, blocks = build_model(arch, dims, moe, dtype=dtype, activation_checkpointing=activation_checkpointing,
                                attention=attention, sequence_parallel=sequence_parallel)
    foreign = load_weights(model, ChainSource(sources), arch, dims.tp, dims.tp_rank, moe)
    unexpected = [n for n in foreign if not may_be_absent(n, upcycled_experts)]
    if unexpected:
        raise ValueError(f"{where}: no weights for {unexpected[:5]}")
    # megatron builds the backbone on the current GPU, the MoCaE parts (router, LoRA, post-mix
    # norm, routing EMA) are made on the CPU: the whole model onto the rank's device, for
    # evaluation (which has no engine to move it) and training alike
    model.to(rank_device())
    return model, blocks
