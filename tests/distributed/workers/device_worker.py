"""One process: every GPU_READINESS path with the model on a device other than the host's (meta,
tests/devices.py), so a CPU tensor meeting the model's, or entering a collective, raises here as
it would on a GPU. Reports, per path, "ok" or the error's first line.

argv: CONFIG (a run config whose stage-1 experts exist: write_config + write_random_experts)
"""
import sys
import traceback

from tests.dist import worker_setup, write_result

worker_setup()

import torch  # noqa: E402

from tests.devices import devices_of, on_meta, to_rank_device_like_megatron  # noqa: E402
from trinityx_ds.config import load_config  # noqa: E402
from trinityx_ds.parallel.device import rank_device  # noqa: E402

config = sys.argv[1]
cfg = load_config(config)
result: dict = {}


def check(name, fn):
    try:
        out = fn()
        result[name] = "ok" if out is None else out
    except Exception as e:  # noqa: BLE001 - the report names what failed
        tb = traceback.extract_tb(e.__traceback__)
        ours = [f for f in tb if "/trinityx_ds/" in f.filename]
        where = f" at {ours[-1].filename.split('/trinityx_ds/')[-1]}:{ours[-1].lineno}" if ours else ""
        result[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}{where}"


class Engine:
    """What train_step and the validation ask of a DeepSpeed engine, over the real model on the
    rank's device: the forward takes the batch as DeepSpeed's does (moving nothing), and asserts
    that it arrives on the model's device."""

    def __init__(self, model):
        self.module, self.device, self.optimizer = model, rank_device(), None

    def __call__(self, ids, labels):
        for t in (ids, labels):
            assert t.device == self.device, f"a batch tensor on {t.device} reached the engine on {self.device}"
        return self.module.token_losses(ids, labels)

    def backward(self, loss):
        assert loss.device == self.device, loss.device
        loss.backward()

    def step(self):
        self.module.zero_grad(set_to_none=True)


def batch(rows: int, seq: int = 12, tasks: int = 3) -> dict:
    """A collated CPU batch as the data loader gives it: rows of one example each, responses after
    three prompt tokens, consecutive row pairs (chosen, rejected) for the preference objectives."""
    from trinityx_ds.data.dataset import collate

    g = torch.Generator().manual_seed(0)
    items = []
    for r in range(rows):
        ids = torch.randint(3, 60, (seq,), generator=g).tolist()
        items.append({"input_ids": ids, "labels": [-100] * 3 + ids[3:], "example_id": r, "task_id": (r // 2) % tasks})
    return collate(items, pad_id=0)


with on_meta() as log:
    from trinityx_ds.eval.lm import load_lm
    from trinityx_ds.eval.loglik import Request
    from trinityx_ds.model.mocae import RoutingContext, set_routing_context
    from trinityx_ds.train.objectives import Objective
    from trinityx_ds.train.step import train_step

    # finding 5: the evaluation model, router and LoRA experts included, on the rank's device
    lm = load_lm(cfg.output.dir, "uniform", config=config)
    to_rank_device_like_megatron(lm.model)
    result["eval_model_devices"] = sorted(devices_of(lm.model))
    check("eval_loglik", lambda: (lm.logprobs([Request([{"role": "user", "content": "Hi"}], "Hello there")]),
                                  None)[1])
    rows = [{"input_ids": [5, 6, 7, 8, 9], "labels": [-100, -100, 7, 8, 9], "example_id": 0, "task_id": 1}]
    check("eval_routing", lambda: (lm.routing(rows), None)[1])

    # training: DeepSpeed's engine moves the module to the rank's device (module.to(engine.device));
    # from here on, what reaches the model comes from our code
    model, blocks = lm.model.to(rank_device()), lm.blocks
    to_rank_device_like_megatron(model)
    engine = Engine(model)

    def no_labels():  # finding 17: a routing context without labels (its default mask)
        set_routing_context(blocks, RoutingContext(compute_losses=False, keep_probs=True))
        with torch.no_grad():
            model.logits(torch.zeros(1, 4, dtype=torch.long, device=rank_device()))
    check("mocae_record_without_mask", no_labels)

    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    names = list(cfg.experts.names)
    step_kw = dict(micro_batch=2, grad_accum=2, names=names, dp_group=None, dp=1)

    # finding 2: the training step (stage 1 SFT, stage 1 DPO with its reference forward, stage 2)
    check("train_step_stage1_sft", lambda: (train_step(engine, blocks, batch(4), stage=1, **step_kw), None)[1])
    check("train_step_stage1_dpo", lambda: (train_step(engine, blocks, batch(8), stage=1, **step_kw,
                                                       objective=Objective("dpo", cfg.train.stage1)), None)[1])
    check("train_step_stage2", lambda: (train_step(engine, blocks, batch(4), stage=2, **step_kw), None)[1])

    # finding 3: the preemption and divergence flags
    from trinityx_ds.train.guard import DivergenceGuard
    from trinityx_ds.train.preemption import Preemption

    check("preemption_flag", lambda: (Preemption().agreed(), None)[1])
    check("divergence_flag", lambda: DivergenceGuard(True, 0, "train.stage1", 0).check(1, 1.0, 1.0, 0, kept="x"))

    # finding 3 (external.py): the clipping norm of a rank that holds no expert gradient
    def external_step():
        from types import SimpleNamespace

        from trinityx_ds.parallel.groups import ParallelDims  # noqa: F401  (the dims the run passes)
        from trinityx_ds.train.external import ExternalExperts

        module = torch.nn.Linear(2, 2, bias=False).to(rank_device())
        ext = ExternalExperts([module], SimpleNamespace(ep=1, dp=1, ep_group_name=None))
        ext.build_optimizer(SimpleNamespace(optimizer="sgd", lr=0.1, weight_decay=0.0, warmup_steps=0, steps=1,
                                            grad_clip=1.0))
        ext.step()
    check("external_experts_step_without_grads", external_step)

    # finding 4: stage 2's validation
    def validation():
        from trinityx_ds.train.validate import routing_probs

        class Rows:  # a datasets.Dataset's slicing: a dict of columns
            def __init__(self, rows):
                self.rows = rows

            def __len__(self):
                return len(self.rows)

            def __getitem__(self, sl):
                part = self.rows[sl]
                return {k: [r[k] for r in part] for k in part[0]}

        p, z, s = routing_probs(engine, blocks, Rows(rows * 3), micro_batch=2, pad_id=0)
        return {"devices": sorted({str(t.device) for t in (p, z, s)})}
    check("validation_routing_probs", validation)

    # finding 6: stage outputs and the universal copy are gathered through the CPU
    def gather():
        from trinityx_ds.train.gather import gather_mocae_tensors

        got = gather_mocae_tensors(model, lm.moe, lm.arch, lm.dims, include=lambda n: True)
        return {"n": len(got), "devices": sorted({str(t.device) for t in got.values()})}
    check("gather_stage_outputs", gather)

    # finding 15: optimizer moments restored onto their parameter's device
    def moments():
        from trinityx_ds.train.universal import set_full

        p = torch.nn.Parameter(torch.zeros(3, device=rank_device()))
        opt = torch.optim.AdamW([p])
        opt.state[p] = {}
        set_full(p, opt, torch.ones(3), "exp_avg")
        return {"device": str(opt.state[p]["exp_avg"].device)}
    check("universal_moments_on_param_device", moments)
    result["collectives"] = sorted({c for c, _ in log.calls})



# finding 13 (on the CPU, values matter): experts held outside the engine keep fp32 masters under
# bf16, so updates below bf16's resolution add up instead of vanishing; the masters round-trip
def bf16_masters():
    from types import SimpleNamespace

    from trinityx_ds.train.external import ExternalExperts

    def experts():
        module = torch.nn.Linear(1, 1, bias=False).to(torch.bfloat16)
        torch.nn.init.ones_(module.weight)
        ext = ExternalExperts([module], SimpleNamespace(ep=1, dp=1, ep_group_name=None))
        ext.build_optimizer(SimpleNamespace(optimizer="sgd", lr=1.0, weight_decay=0.0, warmup_steps=0, steps=10 ** 6,
                                            grad_clip=0.0))
        return module, ext

    module, ext = experts()
    for _ in range(100):  # each update -1e-4: below bf16's spacing at 1.0 (2^-7)
        module.weight.grad = torch.full_like(module.weight, 1e-4)
        ext.step()
    again, ext2 = experts()
    ext2.load_state_dict(ext.state_dict())
    master = ext.optimizer.fp32_masters[id(module.weight)]
    return {"weight": module.weight.float().item(), "master": master.item(), "dtype": str(module.weight.dtype),
            "restored_master": ext2.optimizer.fp32_masters[id(again.weight)].item(),
            "restored_weight": again.weight.float().item()}


check("external_bf16_masters", bf16_masters)
write_result(result)
