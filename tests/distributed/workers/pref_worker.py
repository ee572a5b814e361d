"""Worker for the preference-objective tests. argv: CONFIG EXPERT.

Trains EXPERT's stage 1 (its objective from the config) as `trinityx train experts --only` does,
then, on the trained model (non-zero LoRA delta), checks the DPO reference: the block's
experts-off forward against a backbone built without any MoCaE block, on the first pairs of the
training data. Reports the per-token losses' equality and how far the expert itself moved them.
"""
import sys

from tests.dist import worker_setup, write_result

worker_setup()

import torch  # noqa: E402

from trinityx_ds.config import load_config  # noqa: E402
from trinityx_ds.data.dataset import Batches, collate_pairs  # noqa: E402
from trinityx_ds.model.assemble import assemble  # noqa: E402
from trinityx_ds.model.mocae import RoutingContext, set_routing_context  # noqa: E402
from trinityx_ds.model.weights import open_source  # noqa: E402
from trinityx_ds.parallel.groups import destroy_parallel  # noqa: E402
from trinityx_ds.train.stages import StageRun  # noqa: E402

config, expert = sys.argv[1], sys.argv[2]
cfg = load_config(config)
run = StageRun(cfg, 1, expert)
summary = run.run()
train, _ = run._datasets()
batch = next(Batches(train, 4, cfg.seed, run.tokenizer.pad_token_id, collate_fn=collate_pairs,
                     pad_to_multiple=run.pad_to_multiple))
ids, labels = batch["input_ids"], batch["labels"]
run.model.eval()
with torch.no_grad():
    set_routing_context(run.blocks, RoutingContext(reference=True, compute_losses=False))
    ref_BS = run.engine(ids, labels)
    set_routing_context(run.blocks, RoutingContext(force_expert=0, compute_losses=False))
    policy_BS = run.engine(ids, labels)
    _, backbone_src = open_source(cfg.model.checkpoint or cfg.model.hf_path)
    plain, _ = assemble(run.arch, run.dims, None, [backbone_src], where=cfg.model.hf_path, dtype=cfg.model.dtype)
    plain.eval()
    plain_BS = plain(ids, labels)
mask = labels >= 0
result = {"summary": {k: v for k, v in summary.items() if isinstance(v, (int, str, bool, float))},
          "ref_equals_backbone": bool(torch.equal(ref_BS[mask], plain_BS[mask])),
          "ref_vs_backbone_max": float((ref_BS - plain_BS)[mask].abs().max()),
          "expert_moved": float((policy_BS - plain_BS)[mask].abs().max()),
          "zero_stage": run.engine.zero_optimization_stage(),
          "prefix": None if run.prefix is None else {"first": run.prefix.first, "shared": run.prefix.shared},
          "sequence_parallel": [b.sequence_parallel for b in run.blocks]}
destroy_parallel()
write_result(result)
