"""Worker for the training tests. argv: MODE CONFIG [EXTRA].

cli   : `trinityx train EXTRA --config CONFIG` as a user runs it (EXTRA: experts|router [--only X]).
router_ds : stage 2 through DeepSpeed; reports its ZeRO stage, whether parameters are partitioned,
            the losses and the final router tensors.
router_plain : the same stage 2 on one process without DeepSpeed (torch SGD), as the reference.
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
run = StageRun(cfg, 2)
result = {}
if mode == "router_ds":
    summary = run.run()
    engine = run.engine
    result["zero_stage"] = engine.zero_optimization_stage()
    result["partitioned"] = any(getattr(p, "ds_tensor", None) is not None and p.ds_tensor.numel() < p.ds_numel
                                for p in run.model.parameters())
    losses = [json.loads(line)["train/loss"] for line in (run.dir / "metrics.jsonl").read_text().splitlines()
              if "train/loss" in line]
else:
    from trinityx_ds.data.dataset import Batches
    from trinityx_ds.model.backbone import masked_mean_loss
    from trinityx_ds.model.mocae import RoutingContext, set_router_loss_scale, set_routing_context
    from trinityx_ds.train.engine import lr_lambda
    from trinityx_ds.train.stages import _local_examples

    # DeepSpeed averages the data-parallel ranks' gradients of their own mean losses: the
    # reference takes the same global batch in `dp` chunks, each weighted 1/dp.
    dp = int(sys.argv[3])
    sc = cfg.train.stage2
    train, _ = run._datasets()
    opt = torch.optim.SGD(run.trainable, lr=sc.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(sc))
    pad = run.tokenizer.pad_token_id
    batches = Batches(train, sc.micro_batch * dp, cfg.seed, pad)
    set_router_loss_scale(1.0 / dp)
    losses = []
    for _ in range(sc.steps):
        big = next(batches)
        step_loss = 0.0
        for r in range(dp):
            batch = {k: v[r * sc.micro_batch:(r + 1) * sc.micro_batch] for k, v in big.items()}
            local, task_N = _local_examples(batch)
            set_routing_context(run.blocks, RoutingContext.from_batch(batch["labels"], local, task_N))
            loss = masked_mean_loss(run.model(batch["input_ids"], batch["labels"]), batch["labels"])
            (loss / dp).backward()
            step_loss += loss.item() / dp
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(step_loss)
result["losses"] = losses
router = gather_mocae_tensors(run.model, run.moe, run.arch, run.dims, lambda n: ".mlp.router.weight" in n)
result["router"] = {k: v.tolist() for k, v in router.items()}
destroy_parallel()
write_result(result)
