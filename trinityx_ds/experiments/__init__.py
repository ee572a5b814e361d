"""The experiments bench: the project's own measurements of what TrinityX buys, kept apart from
the evaluation library (eval/: suites, metrics, the scorer, the lm-eval backend) they use.

- `samples`: evaluation files cut out of the real samples by prompt (plain files, no model);
- `heldout`: the held-out HHH figures of a run's variants, one torchrun job, with paired
  bootstrap intervals (what `trinityx demo` prints);
- `efficacy`: the seven-variant efficacy benchmark's split, run config and verdicts
  (tools/hhh_efficacy.py, tools/hhh_dev.py);
- `routing`: request-level against token-level routing on a run's held-out prompts
  (tools/route_agreement.py, tools/gap_attribution.py).

The scripts in tools/ are thin commands over these modules.
"""
