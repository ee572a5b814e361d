"""experiments/heldout.evaluate on every rank with the options given as JSON (argv[1]): the held-out
benchmark's job, under the test harness's watchdog."""
import json
import sys

from tests.dist import worker_setup

worker_setup()

from trinityx_ds.experiments.heldout import evaluate  # noqa: E402

evaluate(json.loads(sys.argv[1]))
