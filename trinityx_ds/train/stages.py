"""Stage 1 (one HHH expert on the frozen backbone) and stage 2 (the calibrated router on the
mixture, experts frozen), each a resumable DeepSpeed run over megatron TP (+ EP for full experts).

`StageRun` is the loop; its components own their state: the model assembly (model/assemble.py),
the experts held outside the engine (train/external.py), the train state and its checkpoints
(train/state.py), one step (train/step.py), the stage's outputs (train/outputs.py).

Composition (docs/DESIGN.md): the ZeRO engine holds backbone, router and LoRA experts; `full`
experts of stage 2 are placed by expert parallelism and kept outside the engine (ZeRO-3 would
partition an EP rank's own experts as if they were replicated), with their own optimizer when
trained. Every rank runs the same collectives whatever the routing.
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from trinityx_ds.config import save_config
from trinityx_ds.data.dataset import Batches, build_pair_datasets, build_task_datasets, collate, collate_pairs, mixture
from trinityx_ds.data.tokenizer import load_tokenizer, pad_id
from trinityx_ds.errors import StorageError
from trinityx_ds.model.assemble import assemble, expert_sources
from trinityx_ds.model.experts import lora_init_tensors
from trinityx_ds.model.mocae_spec import MoCaEConfig, mocae_role
from trinityx_ds.model.weights import open_source
from trinityx_ds.parallel.deepspeed_compat import engine_counters
from trinityx_ds.parallel.groups import init_parallel
from trinityx_ds.storage.layout import RunLayout
from trinityx_ds.storage.sources import DictSource
from trinityx_ds.train import checkpoint, outputs, preemption
from trinityx_ds.train.drift import check_resume, inputs_of
from trinityx_ds.train.engine import initialize
from trinityx_ds.train.external import ExternalExperts
from trinityx_ds.train.guard import DivergenceGuard, Diverged
from trinityx_ds.train.lock import FolderLocked, RunLock
from trinityx_ds.train.metrics import MetricsLogger, step_flops
from trinityx_ds.train.objectives import Objective
from trinityx_ds.train.state import ResumePoint, TrainState
from trinityx_ds.train.step import ReferencePrefix, train_step
from trinityx_ds.train.validate import routing_report


def select_trainable(model, stage: int, train_experts_in_stage2: bool,
                     external_experts=()) -> list[torch.nn.Parameter]:
    """What a stage trains (outputs.trained_roles). Sets requires_grad on every parameter; returns
    the engine's (the experts held outside the engine train with their own optimizer)."""
    roles = outputs.trained_roles(stage, train_experts_in_stage2)
    trainable = []
    for name, p in model.named_parameters():
        p.requires_grad_(mocae_role(name) in roles)
        if p.requires_grad:
            trainable.append(p)
    for experts in external_experts:
        for p in experts.parameters():
            p.requires_grad_(train_experts_in_stage2)
    return trainable


class StageRun:
    """One stage on this rank: the model assembled at __init__; `run()` trains, checkpoints and
    writes the stage's outputs."""

    def __init__(self, cfg, stage: int, expert: str | None = None):
        if stage == 1 and expert not in cfg.experts.names:
            raise ValueError(f"--only: {expert!r} — one of {', '.join(cfg.experts.names)}")
        if cfg.parallel.pp > 1:
            raise ValueError(f"parallel.pp: {cfg.parallel.pp} — training runs at PP=1 in this release "
                             "(TP x EP x DP); `trinityx plan` models PP layouts")
        self.cfg, self.stage, self.expert = cfg, stage, expert
        self.stage_cfg = cfg.train.stage1.for_expert(expert) if stage == 1 else cfg.train.stage2
        self.layout = RunLayout(cfg.output.dir)
        self.dir = self.layout.stage_dir(stage, expert)
        ep = cfg.parallel.ep if stage == 2 else 1  # stage 1 trains one expert: nothing to place
        self.dims = init_parallel(tp=cfg.parallel.tp, pp=cfg.parallel.pp, ep=ep, seed=cfg.seed)
        self.preempt = preemption.install()
        # asked to stop before this stage built anything (during start-up, or during an earlier
        # stage of the job): every rank learns it here, and run() returns at once
        self.stop_before = self.preempt.agreed()
        if self.stop_before:  # nothing built, nothing locked: run() reports where a resume starts
            self.ckpt = self.layout.checkpoints(stage, expert)
            return
        model_path = cfg.model.checkpoint or cfg.model.hf_path
        self.arch, backbone = open_source(model_path)
        self.arch.check_seq_len(cfg.data.max_seq_len)
        moe = MoCaEConfig.from_run_config(cfg)
        self.moe = moe.one_expert(expert) if stage == 1 else moe
        self.lock = RunLock(self.dir)
        self.notes = [n for n in (self._lock(self.lock),) if n]  # what rank 0 reports when the run starts
        self.ckpt = self.layout.checkpoints(stage, expert)
        self.resume = ResumePoint.find(self.ckpt, self.dims, cfg.parallel.zero_stage)
        self.notes += self.resume.notes
        if self.resume.tag is not None:
            self.notes += [f"config changed since the checkpoint: {d}"
                           for d in check_resume(self.ckpt.config_file(self.resume.tag), cfg, stage)]
        sources = self.resume.sources + [backbone]
        if stage == 1 and self.moe.kind == "lora":
            sources.append(DictSource(lora_init_tensors(self.arch, self.moe, cfg.seed)))
        if stage == 2:  # the experts as stage 1 trained them
            sources += expert_sources(self.layout, self.arch, self.moe, final=False)
        self.model, self.blocks = assemble(self.arch, self.dims, self.moe, sources, where=model_path,
                                           dtype=cfg.model.dtype, upcycled_experts=stage == 1,
                                           activation_checkpointing=cfg.model.activation_checkpointing,
                                           attention=cfg.model.attention,
                                           sequence_parallel=cfg.model.sequence_parallel)
        # sequence parallelism splits every batch's sequence over TP: pad it to a multiple of TP
        self.pad_to_multiple = self.dims.tp if cfg.model.sequence_parallel else 1
        outside = stage == 2 and self.moe.kind == "full"
        self.external = ExternalExperts.place(self.blocks, self.dims) if outside else ExternalExperts([], self.dims)
        self.external_experts = self.external.modules
        self.trainable = select_trainable(self.model, stage, cfg.train.train_experts_in_stage2,
                                          self.external_experts)
        self.tokenizer = load_tokenizer(model_path, cfg.model.tokenizer)
        # stage 1's loss (experts.objective); stage 2 trains the router on SFT rows whatever it is
        self.objective = Objective(cfg.experts.objective_of(expert), self.stage_cfg) if stage == 1 else None
        # DPO: the reference forward's frozen layers below the first expert layer serve the policy's
        self.prefix = (ReferencePrefix(self.model, self.blocks)
                       if self.objective is not None and self.objective.needs_reference() else None)
        self.engine = None  # run() starts it
        self.task_sets: dict | None = None  # {task: (train rows, held-out rows)}, read by run()

    def _lock(self, lock: RunLock) -> str | None:
        """Rank 0 takes the stage folder's lock; every rank learns whether it got it, so all of
        them stop together when another job owns the folder."""
        outcome = [None]
        if self.dims.rank == 0:
            try:
                outcome = [("ok", lock.acquire())]
            except FolderLocked as e:
                outcome = [("refused", str(e))]
        dist.broadcast_object_list(outcome, src=0)
        kind, text = outcome[0]
        if kind == "refused":
            raise FolderLocked(text)
        return text

    def _datasets(self):
        """Stage 1: this expert's training rows, or its preference pairs under dpo/simpo/cpo. Stage 2:
        the mixture of every task's SFT rows (a preference task's chosen responses, with its task
        label: what the router must recognise is the task, and the chosen response is the task's
        behaviour), and the held-out rows that validate the routing."""
        cfg = self.cfg
        if self.objective is not None and self.objective.pairs:
            train, _ = build_pair_datasets(cfg.data, self.tokenizer, cfg.experts.names, cfg.seed, self.expert)
            return train, None
        sets = build_task_datasets(cfg.data, self.tokenizer, cfg.experts.names, cfg.seed)
        train = sets[self.expert][0] if self.stage == 1 else mixture(sets, cfg.seed, cfg.data.mixture == "balanced")
        return train, sets

    def _write_run_files(self, tag: str) -> None:
        """Rank 0, into each checkpoint: the config it was trained with and its tokenizer."""
        save_config(self.cfg, str(self.ckpt.config_file(tag)))
        self.tokenizer.save_pretrained(self.ckpt.tokenizer_dir(tag))

    def run(self) -> dict:
        cfg, sc, dims = self.cfg, self.stage_cfg, self.dims
        if self.stop_before:
            latest = self.ckpt.latest()
            return {"stage": self.stage, "expert": self.expert, "step": latest[1]["step"] if latest else 0,
                    "preempted": "before"}
        train, self.task_sets = self._datasets()
        engine = self.engine = initialize(self.model, self.trainable, cfg, sc, dims.dp)
        self.external.build_optimizer(sc)
        pairs = self.objective is not None and self.objective.pairs
        batches = Batches(train, sc.micro_batch * sc.grad_accum, cfg.seed, pad_id(self.tokenizer),
                          rank=dims.dp_rank, world=dims.dp, pad_to_multiple=self.pad_to_multiple,
                          collate_fn=collate_pairs if pairs else collate)
        # what this stage reads, by content: rank 0 writes it into each checkpoint and, its backbone
        # fingerprint, into the stage's output files
        self.inputs = inputs_of(cfg, self.stage, self.expert) if dims.rank == 0 else None
        state = TrainState(self.ckpt, self.resume, engine, self.external, batches, self.model, self.moe, self.arch,
                           dims, self.stage, self.expert, cfg.train.train_experts_in_stage2, cfg.train.keep_last,
                           self._write_run_files, self.inputs)
        start = state.restore()
        log = MetricsLogger(self.dir, sc.steps, start, enabled=dims.rank == 0, tensorboard=cfg.output.tensorboard,
                            desc=f"stage {self.stage}{' ' + self.expert if self.expert else ''}")
        for note in self.notes if dims.rank == 0 else ():
            log.bar.write(note)
        if self.resume.tag is not None and dims.rank == 0:
            log.bar.write(f"resumed from {self.ckpt.tag_dir(self.resume.tag)} at step {start}"
                          + (f" (resharded from {self.resume.state.get('layout')} to {self.resume.layout})"
                             if self.resume.resharded else ""))
        preempt = self.preempt
        guard = DivergenceGuard(cfg.train.stop_on_nonfinite, cfg.train.max_skipped_steps,
                                f"train.stage{self.stage}" + (f" (expert {self.expert})" if self.expert else ""),
                                engine_counters(engine)["skipped_steps"],
                                cfg.train.collapse_steps if cfg.train.stop_on_collapse else None)
        step, saved_at, stopped = start, None, False
        self.model.train()
        while step < sc.steps:
            t0 = time.time()
            batch = next(batches)
            stats = train_step(engine, self.blocks, batch, stage=self.stage, micro_batch=sc.micro_batch,
                               grad_accum=sc.grad_accum, names=cfg.experts.names,
                               dp_group=ps.get_data_parallel_group(), dp=dims.dp, external=self.external,
                               objective=self.objective, prefix=self.prefix)
            step += 1
            stats["time/step_s"] = time.time() - t0
            stats["train/tokens_per_s"] = stats.pop("_tokens") * dims.dp / max(stats["time/step_s"], 1e-9)
            stats |= step_flops(cfg, self.arch, self.moe, self.stage, stats["train/tokens_per_s"],
                                batch["input_ids"].shape[1], dims.world_size)
            stats["train/lr"] = engine.get_lr()[0]
            if torch.cuda.is_available():  # this rank's peak since the run started
                stats["memory/peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
            grad_norm = engine.get_global_grad_norm()
            if grad_norm is not None:
                stats["train/grad_norm"] = float(grad_norm)
            if step % cfg.train.log_every == 0 or step == sc.steps:
                log.log(step, stats)
            try:
                guard.check(step, stats["train/loss"], stats.get("train/grad_norm"),
                            engine_counters(engine)["skipped_steps"], kept=str(self.ckpt.path))
            except Diverged:
                log.close()  # the progress bar ends its line before the error's
                raise
            stop = preempt.agreed()
            if step % cfg.train.checkpoint_every == 0 or step == sc.steps or stop:
                try:
                    state.save(step)
                except StorageError:
                    log.close()  # the progress bar ends its line before the error's
                    raise
                saved_at = step
            checkpoint.fault("after_step", step)
            if stop:
                stopped = True
                break
        if saved_at != step and step > start:
            state.save(step)
        summary = {"stage": self.stage, "expert": self.expert, "step": step, "preempted": stopped}
        if not stopped:
            summary.update(self._finish(log, step))
        log.close()
        self.lock.release()
        return summary

    def _finish(self, log, step: int) -> dict:
        backbone = self.inputs["backbone"] if self.inputs else ""  # rank 0 writes the files
        meta = outputs.file_metadata(self.cfg, self.moe, self.arch, step, backbone, self.expert)
        if self.stage == 1:
            return outputs.write_stage1(self.layout, self.expert, self.model, self.moe, self.arch, self.dims, meta)
        report = routing_report(self.engine, self.model, self.blocks, {n: s[1] for n, s in self.task_sets.items()},
                                self.cfg.experts.names, self.stage_cfg.micro_batch, pad_id(self.tokenizer),
                                self.layout.validation_file if self.dims.rank == 0 else None, self.pad_to_multiple)
        if self.dims.rank == 0:
            log.log(step, {"val/routing_accuracy": report["accuracy"], "val/routing_ece": report["ece"],
                           "val/routing_brier": report["brier"]}, progress=False)
        return {**outputs.write_stage2(self.layout, self.model, self.moe, self.arch, self.dims,
                                       self.cfg.train.train_experts_in_stage2, meta), "validation": report}


def run_stage(cfg, stage: int, expert: str | None = None) -> dict:
    """One stage on this rank (torchrun/srun/deepspeed set the job); the caller destroys the groups."""
    return StageRun(cfg, stage, expert).run()
