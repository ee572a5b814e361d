"""Stage 1 (one HHH expert on the frozen backbone) and stage 2 (the calibrated router on the
mixture, experts frozen), each a resumable DeepSpeed run over megatron TP (+ EP for full experts).

Composition (docs/DESIGN.md): the ZeRO engine holds backbone, router and LoRA experts; `full`
experts of stage 2 are placed by expert parallelism and kept outside the engine (ZeRO-3 would
partition an EP rank's own experts as if they were replicated), with their own optimizer when
trained. Every rank runs the same collectives whatever the routing.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

from trinityx_ds.train import checkpoint, universal

FOREIGN_OK = (".mlp.router.", ".mlp.post_norm.", ".mlp.experts.local.")  # initialised, not loaded


def stage_dir(cfg, stage: int, expert: str | None = None) -> Path:
    root = Path(cfg.output.dir)
    return root / "stage1" / expert if stage == 1 else root / "stage2"


def expert_file(cfg, name: str) -> Path:
    return stage_dir(cfg, 1, name) / "expert.safetensors"


def stage2_expert_file(cfg, name: str) -> Path:
    """Expert `name` as stage 2 leaves it when it trains experts (train.train_experts_in_stage2)."""
    return stage_dir(cfg, 2) / "experts" / f"{name}.safetensors"


def final_expert_file(cfg, name: str) -> Path:
    """Expert `name` as the run last trained it (what export and evaluation read): stage 2's copy
    when stage 2 trains experts and has finished (its router file, written last, is there), else
    stage 1's."""
    done = (stage_dir(cfg, 2) / "router.safetensors").is_file()
    return stage2_expert_file(cfg, name) if cfg.train.train_experts_in_stage2 and done else expert_file(cfg, name)


def select_trainable(model, stage: int, train_experts_in_stage2: bool,
                     external_experts=()) -> list[torch.nn.Parameter]:
    """What a stage trains: stage 1 its expert; stage 2 the router (and post-mix norm), plus the
    experts when the run says so. Sets requires_grad on every parameter; returns the engine's
    (the experts held outside the engine train with their own optimizer)."""
    keep = (".mlp.experts.",) if stage == 1 else \
        (".mlp.router.", ".mlp.post_norm.") + ((".mlp.experts.",) if train_experts_in_stage2 else ())
    trainable = []
    for name, p in model.named_parameters():
        p.requires_grad_(any(k in name for k in keep))
        if p.requires_grad:
            trainable.append(p)
    for experts in external_experts:
        for p in experts.parameters():
            p.requires_grad_(train_experts_in_stage2)
    return trainable


def _save_output(tensors: dict, path: Path) -> None:
    """A stage output, renamed into place when whole: a reader never sees a torn file."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


class _Preemption:
    """SIGUSR1/SIGTERM (Slurm's --signal, scancel, preemption) ask for a checkpoint at the end of
    the current step; ranks agree through an all-reduce so every rank saves together."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.requested = True

    def agreed(self) -> bool:
        flag = torch.tensor([1.0 if self.requested else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def _local_examples(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token example index renumbered 0..N-1 within the batch, and each example's task label."""
    ex_BS = batch["example_id"]
    valid = ex_BS >= 0
    uniq, inv = torch.unique(ex_BS[valid], return_inverse=True)
    local = torch.full_like(ex_BS, -1)
    local[valid] = inv
    rows = torch.arange(ex_BS.shape[0]).unsqueeze(1).expand_as(ex_BS)[valid]
    task_N = torch.full((len(uniq),), -1, dtype=torch.long)
    task_N[inv] = batch["task_label"][rows]
    return local, task_N


class StageRun:
    """Everything one stage needs on this rank; `run()` trains, checkpoints and writes outputs."""

    def __init__(self, cfg, stage: int, expert: str | None = None):
        from transformers import AutoTokenizer

        from trinityx_ds.model.weights import load_weights, open_source
        from trinityx_ds.storage.sources import ChainSource, DictSource, SafetensorsSource
        from trinityx_ds.model.build import build_model
        from trinityx_ds.model.experts import lora_init_tensors
        from trinityx_ds.model.mocae import MoCaEConfig
        from trinityx_ds.parallel.groups import init_parallel

        if stage == 1 and expert not in cfg.experts.names:
            raise ValueError(f"--only: {expert!r} — one of {', '.join(cfg.experts.names)}")
        if cfg.parallel.pp > 1:
            raise ValueError(f"parallel.pp: {cfg.parallel.pp} — training runs at PP=1 in this release "
                             "(TP x EP x DP); `trinityx plan` models PP layouts")
        self.cfg, self.stage, self.expert = cfg, stage, expert
        self.stage_cfg = cfg.train.stage1 if stage == 1 else cfg.train.stage2
        self.dir = stage_dir(cfg, stage, expert)
        ep = cfg.parallel.ep if stage == 2 else 1  # stage 1 trains one expert: nothing to place
        self.dims = init_parallel(tp=cfg.parallel.tp, pp=cfg.parallel.pp, ep=ep, seed=cfg.seed)
        model_path = cfg.model.checkpoint or cfg.model.hf_path
        self.arch, backbone_src = open_source(model_path)
        self.arch.check_seq_len(cfg.data.max_seq_len)
        moe = MoCaEConfig.from_run_config(cfg)
        if stage == 1:
            moe = moe.one_expert(expert)
        self.moe = moe
        self.model, self.blocks = build_model(self.arch, self.dims, moe, dtype=cfg.model.dtype,
                                              activation_checkpointing=cfg.model.activation_checkpointing)
        self.ckpt_dir = self.dir / "checkpoints"
        self.layout = checkpoint.layout(self.dims, cfg.parallel.zero_stage)
        self.resume = checkpoint.latest(self.ckpt_dir)
        # resumed at another layout: the trained tensors come from the checkpoint's universal copy
        self.universal = (universal.open_copy(self.ckpt_dir / self.resume[0]) if self.resume is not None
                          and not checkpoint.same_layout(self.resume[1], self.layout) else None)
        sources = [backbone_src] if self.universal is None else [self.universal, backbone_src]
        if stage == 1 and moe.kind == "lora":
            sources.append(DictSource(lora_init_tensors(self.arch, moe, cfg.seed)))
        if stage == 2:
            for name in moe.expert_names:
                if not expert_file(cfg, name).is_file():
                    raise FileNotFoundError(f"{expert_file(cfg, name)}: expert {name!r} not trained yet "
                                            f"(run `trinityx train experts --only {name}` first)")
                sources.append(SafetensorsSource.from_file(expert_file(cfg, name)))
        foreign = load_weights(self.model, ChainSource(sources), self.arch, self.dims.tp, self.dims.tp_rank, moe)
        unexpected = [n for n in foreign if not any(k in n for k in FOREIGN_OK)]
        if unexpected:
            raise ValueError(f"{model_path}: no weights for {unexpected[:5]}")
        self.external_experts = self._place_experts()
        self._external_ids = {id(p) for e in self.external_experts for p in e.parameters()}
        self.trainable = select_trainable(self.model, stage, cfg.train.train_experts_in_stage2,
                                          self.external_experts)
        tok_dir = cfg.model.tokenizer or (model_path if Path(model_path, "tokenizer_config.json").is_file()
                                          else open_source_origin(model_path))
        self.tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)

    # ------------------------------------------------------------------ set-up
    def _place_experts(self) -> list[torch.nn.Module]:
        """Stage 2 `full` experts leave the engine's module tree (see module docstring)."""
        if self.stage != 2 or self.moe.kind != "full":
            return []
        out = []
        for block in self.blocks:
            experts = block._modules.pop("experts")
            object.__setattr__(block, "experts", experts)
            out.append(experts)
        return out

    def _expert_optimizer(self):
        params = [p for e in self.external_experts for p in e.parameters() if p.requires_grad]
        if not params:
            return None
        from trinityx_ds.train.engine import lr_lambda, make_optimizer

        opt = make_optimizer(params, self.stage_cfg)
        # the engine's schedule, stepped with it: the experts follow the router's learning rate
        self.expert_sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(self.stage_cfg))
        return opt

    def _datasets(self):
        from trinityx_ds.data.dataset import build_task_datasets, mixture

        sets = build_task_datasets(self.cfg.data, self.tokenizer, self.cfg.experts.names, self.cfg.seed)
        train = sets[self.expert][0] if self.stage == 1 else mixture(sets, self.cfg.seed)
        return train, sets

    # ------------------------------------------------------------------ training
    def run(self) -> dict:
        from trinityx_ds.data.dataset import Batches
        from trinityx_ds.model.backbone import masked_mean_loss
        from trinityx_ds.model.mocae import RoutingContext, set_router_loss_scale, set_routing_context
        from trinityx_ds.train.engine import initialize
        from trinityx_ds.train.metrics import MetricsLogger, step_flops

        cfg, sc, dims = self.cfg, self.stage_cfg, self.dims
        train, self.task_sets = self._datasets()
        engine = self.engine = initialize(self.model, self.trainable, cfg, sc, dims.dp)
        expert_opt = self._expert_optimizer()
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        batches = Batches(train, sc.micro_batch * sc.grad_accum, cfg.seed, pad_id, rank=dims.dp_rank, world=dims.dp)
        ckpt_dir = self.ckpt_dir
        start = 0
        if self.resume is not None:
            tag, state = self.resume
            if self.universal is None:
                checkpoint.load(engine, ckpt_dir, tag)
                self._load_external(ckpt_dir / tag, expert_opt)
            else:
                self._load_universal(engine, expert_opt, state)
            batches.load_state_dict(state["data"])
            start = state["step"]
        log = MetricsLogger(self.dir, sc.steps, start, enabled=dims.rank == 0, tensorboard=cfg.output.tensorboard,
                            desc=f"stage {self.stage}{' ' + self.expert if self.expert else ''}")
        if self.resume is not None and dims.rank == 0:
            saved = self.resume[1].get("layout")
            log.bar.write(f"resumed from {ckpt_dir / self.resume[0]} at step {start}"
                          + (f" (resharded from {saved} to {self.layout})" if self.universal is not None else ""))
        set_router_loss_scale(1.0 / sc.grad_accum)
        preempt = _Preemption()
        step, saved_at, stopped = start, None, False
        self.model.train()
        while step < sc.steps:
            t0 = time.time()
            batch = next(batches)
            stats = self._train_step(engine, expert_opt, batch, sc.grad_accum, masked_mean_loss, RoutingContext,
                                     set_routing_context)
            step += 1
            stats["train/tokens_per_s"] = stats.pop("_tokens") * dims.dp / max(time.time() - t0, 1e-9)
            stats |= step_flops(cfg, self.arch, self.moe, self.stage, stats["train/tokens_per_s"],
                                batch["input_ids"].shape[1], dims.world_size)
            stats["train/lr"] = engine.get_lr()[0]
            grad_norm = engine.get_global_grad_norm()
            if grad_norm is not None:
                stats["train/grad_norm"] = float(grad_norm)
            if step % cfg.train.log_every == 0 or step == sc.steps:
                log.log(step, stats)
            stop = preempt.agreed()
            if step % cfg.train.checkpoint_every == 0 or step == sc.steps or stop:
                self._save(engine, expert_opt, ckpt_dir, step, batches)
                saved_at = step
            checkpoint.fault("after_step", step)
            if stop:
                stopped = True
                break
        if saved_at != step and step > start:
            self._save(engine, expert_opt, ckpt_dir, step, batches)
        summary = {"stage": self.stage, "expert": self.expert, "step": step, "preempted": stopped}
        if not stopped:
            summary.update(self._finish(engine, log, step))
        log.close()
        return summary

    def _train_step(self, engine, expert_opt, big_batch, grad_accum, masked_mean_loss, RoutingContext,
                    set_routing_context) -> dict:
        """One optimizer step over `grad_accum` micro-batches; returns the step's scalars."""
        stats: dict[str, float] = {}
        task_sum = torch.zeros(len(self.cfg.experts.names))
        task_cnt = torch.zeros(len(self.cfg.experts.names))
        tokens = 0
        micro = self.stage_cfg.micro_batch
        for i in range(grad_accum):
            batch = {k: v[i * micro:(i + 1) * micro] for k, v in big_batch.items()}
            ids, labels = batch["input_ids"], batch["labels"]
            local_ex, task_N = _local_examples(batch)
            ctx = RoutingContext.from_batch(labels, local_ex, task_N,
                                            force_expert=0 if self.stage == 1 else None,
                                            compute_losses=self.stage == 2)
            set_routing_context(self.blocks, ctx)
            token_loss_BS = engine(ids, labels)
            loss = masked_mean_loss(token_loss_BS, labels)
            engine.backward(loss)
            engine.step()
            with torch.no_grad():
                valid = labels >= 0
                row_loss = (token_loss_BS.detach() * valid).sum(1)
                task = batch["task_label"].clamp(min=0)
                task_sum.index_add_(0, task, row_loss)
                task_cnt.index_add_(0, task, valid.sum(1).float())
                tokens += int(ids.numel())
            stats["train/loss"] = stats.get("train/loss", 0.0) + loss.detach() / grad_accum
            self._record_routing(ctx, stats, grad_accum)
        if expert_opt is not None:
            self._step_external(expert_opt)
        from megatron.core import parallel_state as ps

        mean_loss = stats["train/loss"].clone()  # what the data-parallel ranks optimise together
        dist.all_reduce(mean_loss, group=ps.get_data_parallel_group())
        stats["train/loss"] = mean_loss.item() / self.dims.dp
        if self.stage == 2:
            for t, name in enumerate(self.cfg.experts.names):
                if task_cnt[t] > 0:
                    stats[f"train/loss_{name}"] = (task_sum[t] / task_cnt[t]).item()
        stats["_tokens"] = tokens
        return stats

    def _record_routing(self, ctx, stats: dict, grad_accum: int) -> None:
        if not ctx.records:
            return
        names = self.cfg.experts.names
        n_layers = len(ctx.records)
        for layer, rec in ctx.records.items():
            for term, value in rec["losses"].items():
                key = f"router/{term}"
                stats[key] = stats.get(key, 0.0) + value.item() / (n_layers * grad_accum)
            for e, share in enumerate(rec["share_E"].tolist()):
                key = f"routing/layer{layer:02d}/{names[e]}"
                stats[key] = stats.get(key, 0.0) + share / grad_accum

    def _step_external(self, opt) -> None:
        """Experts outside the engine, made to match what the engine does for its own parameters.

        Each owner's gradient already sums the contributions of every rank of its EP group (the
        all-to-all's backward brings them home); summing over the expert's replicas (the
        expert-data-parallel group, or the DP group without EP) then covers all DP ranks, and
        dividing by the DP size gives the gradient of the mean of the ranks' losses, as DeepSpeed
        does for the router. Clipping uses the global norm: shards are summed over the TP group
        and, with EP, over the distinct experts of the EP group.
        """
        from deepspeed.utils import groups
        from megatron.core import parallel_state as ps

        params = [p for e in self.external_experts for p in e.parameters() if p.grad is not None]
        if self.dims.ep > 1:
            replicas = groups._get_expert_data_parallel_group(self.dims.ep_group_name)
        else:
            replicas = ps.get_data_parallel_group()
        for p in params:
            dist.all_reduce(p.grad, group=replicas)
            p.grad /= self.dims.dp
        if self.stage_cfg.grad_clip > 0:
            sq = torch.stack([p.grad.float().pow(2).sum() for p in params]).sum() if params else torch.zeros(())
            dist.all_reduce(sq, group=ps.get_tensor_model_parallel_group())
            if self.dims.ep > 1:
                dist.all_reduce(sq, group=groups._get_expert_parallel_group(self.dims.ep_group_name))
            scale = (self.stage_cfg.grad_clip / (sq.sqrt() + 1e-6)).clamp(max=1.0)
            for p in params:
                p.grad.mul_(scale)
        opt.step()
        self.expert_sched.step()
        opt.zero_grad(set_to_none=True)

    def _external_file(self, tag_dir: Path) -> Path:
        return tag_dir / f"experts_tp{self.dims.tp_rank:02d}_dp{self.dims.dp_rank:03d}.pt"

    def _save(self, engine, expert_opt, ckpt_dir: Path, step: int, batches) -> None:
        def extra(tag_dir: Path):
            if self.external_experts and expert_opt is not None:
                tag_dir.mkdir(parents=True, exist_ok=True)
                torch.save({"experts": [e.state_dict() for e in self.external_experts],
                            "optimizer": expert_opt.state_dict(), "scheduler": self.expert_sched.state_dict()},
                           self._external_file(tag_dir))

        state = {"step": step, "data": batches.state_dict(), "stage": self.stage, "expert": self.expert,
                 "layout": self.layout, "universal": self._universal_meta(engine, expert_opt)}
        checkpoint.save(engine, ckpt_dir, step, state, self.cfg.train.keep_last, extra_files=extra,
                        universal=lambda tag_dir: self._write_universal(engine, expert_opt, tag_dir))
        if self.dims.rank == 0:
            from trinityx_ds.config import save_config

            save_config(self.cfg, ckpt_dir / checkpoint.tag_for(step) / "config.yaml")
            self.tokenizer.save_pretrained(ckpt_dir / checkpoint.tag_for(step) / "tokenizer")

    def _load_external(self, tag_dir: Path, expert_opt) -> None:
        path = self._external_file(tag_dir)
        if expert_opt is None or not path.is_file():
            return
        state = torch.load(path, weights_only=True)
        for experts, sd in zip(self.external_experts, state["experts"]):
            experts.load_state_dict(sd)
        expert_opt.load_state_dict(state["optimizer"])
        self.expert_sched.load_state_dict(state["scheduler"])

    # ------------------------------------------------------------------ universal copy
    def _in_universal(self, name: str) -> bool:
        """The stage's MoCaE tensors; stage 2's experts only when it trains them (stage 1's files
        hold them otherwise)."""
        if ".mlp.experts." in name:
            return self.stage == 1 or self.cfg.train.train_experts_in_stage2
        return any(k in name for k in (".mlp.router.", ".mlp.post_norm.", ".mlp.routing_ema."))

    def _optimizers(self, engine, expert_opt) -> dict:
        """The optimizers and their schedules by name: the engine's, and the EP-placed experts'."""
        out = {"engine": (engine.optimizer, engine.lr_scheduler)}
        if expert_opt is not None:
            out["experts"] = (expert_opt, self.expert_sched)
        return out

    def _optimizer_of(self, p: torch.Tensor) -> str:
        """The `_optimizers` key of the optimizer that steps trainable parameter `p`."""
        return "experts" if id(p) in self._external_ids else "engine"

    def _universal_meta(self, engine, expert_opt) -> dict:
        """What the universal copy's tensors do not hold: optimizer counters, schedules, DeepSpeed's
        step counters (JSON, in trinityx_state.json)."""
        opts = self._optimizers(engine, expert_opt)
        return {"optimizers": {k: universal.optimizer_summary(o) for k, (o, _) in opts.items()},
                "schedulers": {k: s.state_dict() for k, (_, s) in opts.items()},
                "counters": {k: getattr(engine, k) for k in ("global_steps", "global_samples", "skipped_steps")}}

    def _write_universal(self, engine, expert_opt, tag_dir: Path) -> None:
        """Collective: the stage's MoCaE tensors (trainable ones as DeepSpeed's fp32 masters) and
        their optimizer moments, gathered layer by layer to rank 0 and written as TAG/universal."""
        import deepspeed

        from trinityx_ds.storage.shards import DEFAULT_SHARD_BYTES
        from trinityx_ds.train.gather import gather_layers

        opts = {k: (o, universal.optimizer_summary(o)["moments"]) for k, (o, _) in
                self._optimizers(engine, expert_opt).items()}

        def values(name, t):
            if isinstance(t, torch.nn.Parameter) and t.requires_grad:
                opt, moments = opts[self._optimizer_of(t)]
                return {"": universal.full(t, opt), **{k: universal.full(t, opt, k) for k in moments}}
            with deepspeed.zero.GatheredParameters([t], modifier_rank=None):  # a no-op unless ZeRO-3's
                return {"": t.detach().clone()}

        tensors = gather_layers(self.model, self.moe, self.arch, self.dims, self._in_universal, values)
        universal.write(tag_dir, tensors, self.dims.rank, DEFAULT_SHARD_BYTES)

    def _load_universal(self, engine, expert_opt, state: dict) -> None:
        """Resume at another layout. The universal copy's tensors were loaded with the weights
        (__init__), re-sliced for this TP/EP by the adapter; here DeepSpeed's fp32 masters, the
        optimizer moments and counters, the schedules and the engine's step counters follow."""
        from trinityx_ds.model.mocae_adapter import MoCaEAdapter
        from trinityx_ds.storage.sources import PrefixedSource
        from trinityx_ds.train.gather import OPTIMIZER, mocae_named_tensors

        saved, src, rank = state["universal"], self.universal, self.dims.tp_rank
        adapter = MoCaEAdapter(self.moe, self.dims.tp)
        opts = self._optimizers(engine, expert_opt)
        for key, (opt, sched) in opts.items():
            universal.materialise(opt, saved["optimizers"][key])
            sched.load_state_dict(saved["schedulers"][key])
            for group, lr in zip(opt.param_groups, sched.get_last_lr()):
                group["lr"] = lr
        for name, t in mocae_named_tensors(self.model):
            if ".mlp.routing_ema." in name:  # a buffer the weights loader leaves alone
                with torch.no_grad():
                    t.copy_(adapter.shard(name, src, rank))
            elif self._in_universal(name) and isinstance(t, torch.nn.Parameter) and t.requires_grad:
                key = self._optimizer_of(t)
                opt = opts[key][0]
                universal.set_full(t, opt, adapter.shard(name, src, rank))
                for m in saved["optimizers"][key]["moments"]:
                    universal.set_full(t, opt, adapter.shard(name, PrefixedSource(src, f"{OPTIMIZER}{m}."), rank), m)
        for k, v in saved["counters"].items():
            setattr(engine, k, v)

    # ------------------------------------------------------------------ outputs
    def _finish(self, engine, log, step: int) -> dict:
        from trinityx_ds.train.gather import gather_mocae_tensors

        if self.stage == 1:
            tensors = gather_mocae_tensors(self.model, self.moe, self.arch, self.dims,
                                           lambda n: ".mlp.experts." in n)
            if self.dims.rank == 0:
                _save_output(tensors, expert_file(self.cfg, self.expert))
            dist.barrier()
            return {"expert_file": str(expert_file(self.cfg, self.expert)), "tensors": len(tensors)}
        from trinityx_ds.train.validate import routing_report

        report = routing_report(self, engine)
        trained = self.cfg.train.train_experts_in_stage2
        tensors = gather_mocae_tensors(self.model, self.moe, self.arch, self.dims,
                                       lambda n: ".mlp.router." in n or ".mlp.post_norm." in n
                                       or (trained and ".mlp.experts." in n))
        out = {"router_file": str(self.dir / "router.safetensors"), "validation": report}
        if trained:
            out["expert_files"] = [str(stage2_expert_file(self.cfg, n)) for n in self.moe.expert_names]
        if self.dims.rank == 0:
            log.log(step, {"val/routing_accuracy": report["accuracy"], "val/routing_ece": report["ece"],
                           "val/routing_brier": report["brier"]}, progress=False)
            for name in self.moe.expert_names if trained else ():
                _save_output({k: v for k, v in tensors.items() if f".mlp.experts.{name}." in k},
                             stage2_expert_file(self.cfg, name))
            # last: its presence says stage 2 is complete (final_expert_file relies on it)
            _save_output({k: v for k, v in tensors.items() if ".mlp.experts." not in k},
                         self.dir / "router.safetensors")
        dist.barrier()
        return out


def open_source_origin(path: str) -> str:
    """The HF folder an imported checkpoint came from (where its tokenizer lives)."""
    from trinityx_ds.model.weights import META, read_meta

    return read_meta(path)["source"] if (Path(path) / META).is_file() else path


def run_stage(cfg, stage: int, expert: str | None = None) -> dict:
    """One stage on this rank (torchrun/srun/deepspeed set the job); the caller destroys the groups."""
    return StageRun(cfg, stage, expert).run()
