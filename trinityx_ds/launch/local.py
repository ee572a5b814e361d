"""Launch N local processes with torchrun: used by tests, tools and the `--nproc N` of `trinityx
train`, `trinityx eval` and `trinityx demo` (`relaunch`).

The machinery lives in `trinityx_ds.parallel.env`, next to the rendezvous it sets up, because
evaluation (a room below launch/) relaunches itself too; this module is its name for launchers.
"""

from __future__ import annotations

from trinityx_ds.parallel.env import CPU_ENV, cpu_env, free_port, launch_torchrun, relaunch

__all__ = ["CPU_ENV", "cpu_env", "free_port", "launch_torchrun", "relaunch"]
