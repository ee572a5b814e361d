"""Worker for the lm-eval tests. argv: MODE MODEL TASK_DIR TASKS [TRUTHFULQA]

ours RUN_DIR ... : lm-eval's evaluator with our backend (`--model trinityx`, TP = the job's size),
    then, on the same model, our truthfulqa_mc suite on TRUTHFULQA.
hf HF_DIR ... : lm-eval's stock `hf` model on an exported folder (trust_remote_code), one process.
Both return each task's per-request responses (doc order) as lm-eval logged them.
"""
import os
import sys

from tests.dist import worker_setup, write_result

worker_setup()

import lm_eval  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

mode, model, task_dir, tasks = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4].split(",")


def responses(results: dict) -> dict:
    """{task: [per doc: [per request: its response, (ll, greedy) as [float, bool]]]}"""
    def plain(r):
        return [float(r[0]), bool(r[1])] if isinstance(r, (tuple, list)) else (r if isinstance(r, str) else float(r))
    return {t: [[plain(r[0]) for r in s["resps"]] for s in sorted(samples, key=lambda s: s["doc_id"])]
            for t, samples in results["samples"].items()}


common = dict(tasks=tasks, task_manager=TaskManager(include_path=task_dir, include_defaults=False), batch_size=4,
              log_samples=True, bootstrap_iters=0)
if mode == "hf":
    args = {"pretrained": model, "trust_remote_code": True, "max_length": 64, "dtype": "float32", "device": "cpu"}
    write_result({"responses": responses(lm_eval.simple_evaluate(model="hf", model_args=args, **common))})
    sys.exit(0)

from trinityx_ds.eval import suites  # noqa: E402
from trinityx_ds.eval.harness import TrinityXLM  # noqa: E402
from trinityx_ds.parallel.groups import destroy_parallel  # noqa: E402

lm = TrinityXLM(run=model, tp=int(os.environ["WORLD_SIZE"]), batch_size=4)
results = lm_eval.simple_evaluate(model=lm, **common)
# lm-eval hands results to LOCAL_RANK 0 only; every rank ran every request
assert (results is not None) == (int(os.environ["LOCAL_RANK"]) == 0)
tqa = suites.truthfulqa_mc(lm.lm, sys.argv[5])
if results is not None:
    write_result({"responses": responses(results), "tp": lm.lm.dims.tp, "dp": lm.lm.dims.dp,
                  "truthfulqa": {"summary": tqa[0], "ll": [d["ll"] for d in tqa[1]]}})
destroy_parallel()
