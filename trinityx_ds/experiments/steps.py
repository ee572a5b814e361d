"""One training step of ours against what a user would run instead, on the same shapes, weights and
tokens: the workers of `tools/bench_steps.py` (each variant in a process of its own).

Ours is the step a run takes: the model assembled by `StageRun` from a run config (the same
assembly, trainable filter and DeepSpeed engine as `trinityx train`), and `train/step.train_step`
on a batch in the collator's format. The peers:
- `peft_sft`: transformers' `AutoModelForCausalLM` + PEFT LoRA on the same targets, rank and alpha,
  torch AdamW, the model's own `labels=` loss;
- `trl_dpo`: TRL's `DPOTrainer.compute_loss` on a PEFT model (one concatenated forward of chosen and
  rejected rows, the reference with the adapter disabled: TRL's default without a ref_model), the
  same pairs and beta, torch AdamW.
Both peers start from our LoRA initialisation (`lora_init_tensors`), so every variant computes the
same function. Tokens are random (the step's cost does not depend on them), the weights random with
the backbone's real shape (nothing is downloaded): `write_model`.
"""
from __future__ import annotations

import os
import re
import resource
import statistics
import time
from pathlib import Path

import torch
from megatron.core import parallel_state as ps
from torch.profiler import ProfilerActivity, profile as torch_profile
from transformers import AutoConfig, AutoModelForCausalLM

from trinityx_ds.config import load_config
from trinityx_ds.data.tokenizer import load_tokenizer
from trinityx_ds.model.arch import ModelArch
from trinityx_ds.model.assemble import assemble
from trinityx_ds.model.backbone import masked_mean_loss
from trinityx_ds.model.experts import lora_init_tensors
from trinityx_ds.model.mocae_spec import MoCaEConfig
from trinityx_ds.model.tiny import make_tiny_tokenizer
from trinityx_ds.model.weights import open_source
from trinityx_ds.parallel.groups import destroy_parallel, init_parallel
from trinityx_ds.plan import PRESETS
from trinityx_ds.train.engine import initialize
from trinityx_ds.train.stages import StageRun
from trinityx_ds.train.step import train_step
from trinityx_ds.train.tiny_run import write_config, write_random_experts

# name: (what it is, processes)
VARIANTS = {
    "peft_sft": ("transformers + PEFT LoRA, torch AdamW", 1),
    "sft_z1": ("ours stage 1 SFT, ZeRO-1, TP=1", 1),
    "sft_z3": ("ours stage 1 SFT, ZeRO-3, TP=1", 1),
    "sft_tp2": ("ours stage 1 SFT, ZeRO-1, TP=2 (2 ranks)", 2),
    "trl_dpo": ("TRL DPOTrainer on PEFT (adapter-off reference)", 1),
    "dpo_z1": ("ours stage 1 DPO, ZeRO-1, TP=1", 1),
    "dpo_noshare": ("ours DPO, reference prefix not shared (ablation)", 1),
    "router": ("ours stage 2 router, top-1 of 3 LoRA experts", 1),
    "backbone": ("backbone forward + backward, frozen (floor)", 1),
}
EXPERTS = ("help", "harm", "honest")
LORA = {"rank": 8, "alpha": 16.0}
BETA = 0.1


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_model(folder: Path, shape: str = "smollm2-135m", seed: int = 0) -> Path:
    """An HF folder with random weights of `shape` (a `trinityx plan` preset) and the tiny tokenizer
    (its ids are never used: the batches are random ids below the model's vocabulary)."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    preset = dict(PRESETS[shape])
    config = AutoConfig.for_model(preset.pop("model_type"), **preset)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(folder)
    make_tiny_tokenizer(folder)
    return folder


def write_run(root: Path, model_dir: Path, *, zero: int, tp: int, objective: str, micro_batch: int,
              seq: int, layers: list[int] | None = None) -> Path:
    """The run config of our variants (fixture data: its rows are never read, the batch is given);
    experts on `layers` (None: every layer)."""

    return write_config(
        root, model_dir, experts={"kind": "lora", "lora": dict(LORA), "layers": layers or "all"},
        parallel={"tp": tp, "zero_stage": zero},
        **{"experts.objective": {"help": "sft", "harm": objective, "honest": "sft"},
           "data.max_seq_len": seq, "output.tensorboard": False,
           "train.stage1": {"steps": 10 ** 6, "lr": 1e-4, "micro_batch": micro_batch, "beta": BETA,
                            "grad_clip": 1.0},
           "train.stage2": {"steps": 10 ** 6, "lr": 1e-3, "micro_batch": micro_batch, "grad_clip": 1.0}})


def batch(rows: int, seq: int, vocab: int, pairs: bool, prompt: float = 0.5, seed: int = 0) -> dict[str, torch.Tensor]:
    """A batch in the collator's format (data/dataset.py): labels already shifted, on the response
    tokens only, as the data pipeline (and TRL's trainers) label them: each row a prompt of
    `prompt` x `seq` tokens, then its response (prompt 0: every token but the last is a target).
    Pairs (row 2i chosen, 2i + 1 rejected) share their prompt and differ in their responses."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, seq), generator=g)
    start = int(seq * prompt)
    if pairs:
        ids[1::2, :start] = ids[0::2, :start]  # each pair's prompt is shared
    labels = torch.full_like(ids, -100)
    labels[:, max(start - 1, 0):-1] = ids[:, max(start, 1):]
    return {"input_ids": ids, "labels": labels,
            "example_id": torch.arange(rows)[:, None].expand(rows, seq).clone(),
            "task_label": torch.full((rows,), 1 if pairs else 0, dtype=torch.long)}


def hf_inputs(b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels) as transformers takes them: labels unshifted, the model shifts."""
    hf = torch.full_like(b["labels"], -100)
    hf[:, 1:] = b["labels"][:, :-1]
    return b["input_ids"], hf


def timed(step, warmup: int, steps: int, profile: Path | None = None) -> dict:
    """Runs `step` (which returns its loss, waiting for it) warmup + steps times; the timed steps'
    seconds, the first step's loss (before any update: the variants compute the same function, so
    theirs agree), and with `profile` one more step under torch's profiler, its table written there."""
    losses, times = [], []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        losses.append(step())
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    out = {"step_s": statistics.median(times), "steps_s": times, "first_loss": float(losses[0])}
    if profile is not None:
        with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            step()
        by_op = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
        by_shape = prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=60,
                                                                      max_shapes_column_width=120)
        profile.write_text(f"{by_op}\n\nBy input shapes:\n{by_shape}")
        out["profile"] = str(profile)
    return out


def _peft_model(model_dir: Path, init: dict[str, torch.Tensor], expert: str, layers: list[int] | None = None):
    """transformers' model with a PEFT LoRA adapter on our targets, its A and B set to `init`."""
    from peft import LoraConfig, get_peft_model  # the peers' libraries: the `test` extra, imported when run

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"], lora_dropout=0.0,
                                             target_modules=["gate_proj", "up_proj", "down_proj"],
                                             layers_to_transform=layers))
    pattern = re.compile(r".*layers\.(\d+)\.mlp\.(\w+)\.lora_([AB])\.default\.weight")
    params = {}
    for name, p in model.named_parameters():
        m = pattern.fullmatch(name)
        if m:
            layer, proj, ab = m.groups()
            params[f"model.layers.{layer}.mlp.experts.{expert}.{proj}.lora_{ab}.weight"] = p
    if params.keys() != init.keys():
        raise RuntimeError(f"PEFT's LoRA tensors do not match ours: {sorted(params.keys() ^ init.keys())[:4]}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(init[name])
    return model, list(params.values())


def _lora_init(model_dir: Path, expert: str, layers: list[int] | None = None, seed: int = 7) -> dict[str, torch.Tensor]:
    moe = MoCaEConfig(expert_names=list(EXPERTS), lora_rank=LORA["rank"], lora_alpha=LORA["alpha"],
                      layers=layers or "all")
    return lora_init_tensors(ModelArch.from_hf_dir(model_dir), moe.one_expert(expert), seed)


def run_peer(variant: str, model_dir: Path, *, micro_batch: int, seq: int, warmup: int, steps: int,
             profile: Path | None = None, prompt: float = 0.5, layers: list[int] | None = None) -> dict:
    """`peft_sft` or `trl_dpo` in this process."""
    expert = "harm" if variant == "trl_dpo" else "help"
    model, lora_params = _peft_model(model_dir, _lora_init(model_dir, expert, layers), expert, layers)
    model.train()
    opt = torch.optim.AdamW(lora_params, lr=1e-4)
    vocab = model.config.vocab_size
    if variant == "peft_sft":
        ids, labels = hf_inputs(batch(micro_batch, seq, vocab, pairs=False, prompt=prompt))

        def step():
            loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(lora_params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.item()
    else:
        import datasets
        from trl import DPOConfig, DPOTrainer

        args = DPOConfig(output_dir=str(model_dir.parent / "trl"), beta=BETA,
                         loss_type=["sigmoid"], report_to=[], use_cpu=True, precompute_ref_log_probs=False,
                         bf16=False)
        dummy = datasets.Dataset.from_dict({"prompt": ["a"], "chosen": ["b"], "rejected": ["c"]})
        trainer = DPOTrainer(model=model, args=args, train_dataset=dummy, processing_class=load_tokenizer(model_dir))
        model = trainer.model
        model.train()
        rows = 2 * micro_batch
        b = batch(rows, seq, vocab, pairs=True, prompt=prompt)
        order = torch.cat([torch.arange(0, rows, 2), torch.arange(1, rows, 2)])  # TRL's [chosen; rejected]
        ids, labels = b["input_ids"][order], b["labels"][order]
        completion = torch.zeros_like(ids)
        completion[:, 1:] = (labels[:, :-1] >= 0).long()
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": completion}

        def step():
            loss = trainer.compute_loss(model, inputs)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(lora_params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.item()

    out = timed(step, warmup, steps, profile)
    return {**out, "peak_rss_mib": rss_mib(), "loss": step()}


def run_ours(variant: str, root: Path, model_dir: Path, *, micro_batch: int, seq: int, warmup: int, steps: int,
             profile: Path | None = None, prompt: float = 0.5, layers: list[int] | None = None) -> dict:
    """`sft_*`, `dpo_*` or `router` in this process (a rank of a torchrun job for `sft_tp2`): the
    stage as `StageRun` assembles it, one `train_step` per step."""
    stage = 2 if variant == "router" else 1
    dpo = variant.startswith("dpo")
    expert = None if stage == 2 else ("harm" if dpo else "help")
    tp = VARIANTS[variant][1]
    cfg_path = write_run(root, model_dir, zero=3 if variant == "sft_z3" else 1, tp=tp,
                         objective="dpo" if dpo else "sft", micro_batch=micro_batch, seq=seq,
                         layers=layers)
    if stage == 2 and int(os.environ.get("RANK", "0")) == 0:
        write_random_experts(cfg_path, std=0.02)
    cfg = load_config(cfg_path)
    run = StageRun(cfg, stage, expert)
    try:
        engine = initialize(run.model, run.trainable, cfg, run.stage_cfg, run.dims.dp)
        run.model.train()
        pairs = run.objective is not None and run.objective.pairs
        b = batch(micro_batch * (2 if pairs else 1), seq, run.arch.vocab_size, pairs=pairs, prompt=prompt)
        if stage == 2:  # a mixture: every task's rows
            b["task_label"] = torch.arange(micro_batch) % len(EXPERTS)
        prefix = None if variant == "dpo_noshare" else run.prefix

        def step():
            return train_step(engine, run.blocks, b, stage=stage, micro_batch=micro_batch, grad_accum=1,
                              names=cfg.experts.names, dp_group=ps.get_data_parallel_group(), dp=run.dims.dp,
                              external=run.external, objective=run.objective, prefix=prefix)["train/loss"]

        if profile is not None and run.dims.rank:  # every rank profiles the same steps (collectives)
            profile = profile.with_suffix(f".rank{run.dims.rank}.txt")
        out = timed(step, warmup, steps, profile)
        return {**out, "peak_rss_mib": rss_mib(), "loss": step()}
    finally:
        run.lock.release()
        destroy_parallel()


def run_backbone(model_dir: Path, *, micro_batch: int, seq: int, warmup: int, steps: int,
                 profile: Path | None = None, prompt: float = 0.5, layers: list[int] | None = None) -> dict:
    """The floor under any frozen-backbone adapter on `layers`: our backbone's forward and its
    backward through the activations from the lowest of them up (every weight frozen), no optimizer."""

    dims = init_parallel(tp=1)
    try:
        arch, source = open_source(str(model_dir))
        model, _ = assemble(arch, dims, None, [source], where=str(model_dir))
        for p in model.parameters():
            p.requires_grad_(False)
        def needs_grad(_layer, args, kwargs):  # as a trainable parameter in that layer would make it
            if "hidden_states" in kwargs:
                return args, {**kwargs, "hidden_states": kwargs["hidden_states"].detach().requires_grad_()}
            return (args[0].detach().requires_grad_(), *args[1:]), kwargs

        model.decoder.layers[min(layers) if layers else 0].register_forward_pre_hook(needs_grad, with_kwargs=True)
        model.train()
        b = batch(micro_batch, seq, arch.vocab_size, pairs=False, prompt=prompt)

        def step():
            loss = masked_mean_loss(model(b["input_ids"], b["labels"]), b["labels"])
            loss.backward()
            return loss.item()

        out = timed(step, warmup, steps, profile)
        return {**out, "peak_rss_mib": rss_mib(), "loss": step()}
    finally:
        destroy_parallel()
