"""Worker for the training tests. argv: MODE CONFIG [EXTRA].

cli   : `trinityx train EXTRA --config CONFIG` as a user runs it (EXTRA: experts|router [--only X]).
router_ds : stage 2 through DeepSpeed; reports its ZeRO stage, whether parameters are partitioned,
            the losses, the final router tensors and every rank's routing EMA.
router_grad : one stage-2 step (SGD, lr 1, no clipping) through DeepSpeed on one process; reports
            every router tensor's update (its fp32 master after the step minus the weight before:
            minus the gradient), the engine's loss scale and skipped steps.
router_plain : the same stage 2 on one process without DeepSpeed (torch SGD, experts included
            when the run trains them), as the reference.
"""
import json
import sys

from tests.dist import worker_setup, write_result

worker_setup()

import torch  # noqa: E402

from trinityx_ds.cli import main  # noqa: E402
from trinityx_ds.config import load_config  # noqa: E402
from trinityx_ds.parallel.groups import destroy_parallel  # noqa: E402

mode, config = sys.argv[1], sys.argv[2]
if mode == "cli":
    sys.exit(main(["train", *sys.argv[3].split(), "--config", config]))

from trinityx_ds.train.stages import StageRun  # noqa: E402
from trinityx_ds.train.gather import gather_mocae_tensors  # noqa: E402

cfg = load_config(config)
if mode == "router_grad":
    from tests.dist import allow_cpu_fp16

    allow_cpu_fp16()  # also where this CPU has no fp16 units: torch's CPU fp16 kernels run the maths
run = StageRun(cfg, 2)
result = {}
if mode == "router_grad":
    from deepspeed.utils import safe_get_full_fp32_param


    from trinityx_ds.parallel.deepspeed_compat import backward_loss_scale

    before = {n: p.detach().float().clone() for n, p in run.model.named_parameters() if p.requires_grad}
    run.run()
    after = {n: safe_get_full_fp32_param(p) for n, p in run.model.named_parameters() if n in before}
    result["update"] = {n: (after[n] - before[n]).tolist() for n in before}
    result["loss_scale"] = backward_loss_scale(run.engine)
    result["skipped_steps"] = run.engine.skipped_steps
    result["dtype"] = str(next(run.model.parameters()).dtype)
    destroy_parallel()
    write_result(result)
    sys.exit(0)
if mode == "router_ds":
    summary = run.run()
    engine = run.engine
    result["zero_stage"] = engine.zero_optimization_stage()
    result["sequence_parallel"] = [b.sequence_parallel for b in run.blocks]
    result["partitioned"] = any(getattr(p, "ds_tensor", None) is not None and p.ds_tensor.numel() < p.ds_numel
                                for p in run.model.parameters())
    losses = [json.loads(line)["train/loss"] for line in (run.dir / "metrics.jsonl").read_text().splitlines()
              if "train/loss" in line]
    emas = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(emas, [b.routing_ema.ema_LE.tolist() for b in run.blocks])
    result["ema_per_rank"] = emas
    result["ema_updates"] = [int(b.routing_ema.updates_L.sum()) for b in run.blocks]
else:
    from trinityx_ds.data.dataset import Batches
    from trinityx_ds.model.backbone import masked_mean_loss
    from trinityx_ds.model.mocae import RoutingContext, set_router_loss_scale, set_routing_context
    from trinityx_ds.train.engine import lr_lambda
    from trinityx_ds.train.step import local_examples as _local_examples

    # DeepSpeed averages the data-parallel ranks' gradients of their own mean losses, each rank's
    # the mean of its grad_accum micro-batches: the reference takes the same global batch in
    # dp x grad_accum chunks of micro_batch rows, each weighted 1/(dp x grad_accum).
    dp = int(sys.argv[3])
    sc = cfg.train.stage2
    chunks = dp * sc.grad_accum
    train, _ = run._datasets()
    experts = [p for e in run.external_experts for p in e.parameters() if p.requires_grad]
    opt = torch.optim.SGD(run.trainable + experts, lr=sc.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(sc))
    pad = run.tokenizer.pad_token_id
    batches = Batches(train, sc.micro_batch * chunks, cfg.seed, pad)
    set_router_loss_scale(1.0 / chunks)
    losses = []
    for _ in range(sc.steps):
        big = next(batches)
        step_loss = 0.0
        for c in range(chunks):
            batch = {k: v[c * sc.micro_batch:(c + 1) * sc.micro_batch] for k, v in big.items()}
            local, task_N = _local_examples(batch)
            set_routing_context(run.blocks, RoutingContext.from_batch(batch["labels"], local, task_N))
            loss = masked_mean_loss(run.model(batch["input_ids"], batch["labels"]), batch["labels"])
            (loss / chunks).backward()
            step_loss += loss.item() / chunks
        if sc.grad_clip > 0:  # DeepSpeed clips the engine's parameters; the experts clip on their own
            torch.nn.utils.clip_grad_norm_(run.trainable, sc.grad_clip)
            torch.nn.utils.clip_grad_norm_(experts, sc.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(step_loss)
result["losses"] = losses
router = gather_mocae_tensors(run.model, run.moe, run.arch, run.dims, lambda n: ".mlp.router.weight" in n)
result["router"] = {k: v.tolist() for k, v in router.items()}
destroy_parallel()
write_result(result)
