"""Worker: `trinityx_ds.eval.parity` on each HF folder of argv[2] (JSON list) at TP=argv[1]."""
import json
import sys

from tests.dist import worker_setup, write_result

worker_setup()

from trinityx_ds.eval.parity import backbone_parity  # noqa: E402
from trinityx_ds.parallel.groups import init_parallel  # noqa: E402

dims = init_parallel(tp=int(sys.argv[1]))
write_result({f: backbone_parity(f, dims.tp, dims.tp_rank) for f in json.loads(sys.argv[2])})
