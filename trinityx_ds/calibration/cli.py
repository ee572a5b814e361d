"""`trinityx calibrate RUN`: show or set a trained router's temperature and importance weights.

Both are set after training, in stage 2's router file (calibration/fit.py: written atomically, the
file as trained kept once as `router.safetensors.bak`): T as `trinityx eval --suite routing
--write-temperature` fits it on held-out routing, importance weights as chosen on a dev cut of the
training side (`tools/hhh_dev.py --choose router`; docs/RESULTS.md says why after training and not
in `router.importance`, which the router trains with and learns to offset). Without --importance
or --temperature it prints what the file holds.

    trinityx calibrate runs/x --importance help=4          # harm and honest back to 1
    trinityx calibrate runs/x --temperature 0.5            # every MoCaE layer
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

from trinityx_ds.config import load_config
from trinityx_ds.storage.layout import RunLayout


def add_calibrate_arguments(sub) -> argparse.ArgumentParser:
    c = sub.add_parser("calibrate", help="show or set a trained router's temperature and importance weights")
    c.add_argument("run", help="a run's output folder (stage 2 finished)")
    c.add_argument("--importance", nargs="+", metavar="NAME=GAMMA",
                   help="per-expert weight gamma > 0 (a log-prior on the calibrated logits) on every MoCaE "
                        "layer; experts not named get 1 (no prior)")
    c.add_argument("--temperature", type=float, metavar="T", help="one T > 0 for every MoCaE layer")
    c.add_argument("--config", help="run config naming the experts [the one saved with the run]")
    c.set_defaults(fn=cmd_calibrate)
    return c


def parse_importance(specs: list[str], names: list[str]) -> list[float]:
    """["help=4", ...] -> one weight per expert in the run's order; unnamed experts 1."""
    weights = dict.fromkeys(names, 1.0)
    for spec in specs:
        name, sep, value = spec.partition("=")
        if not sep or name not in weights:
            raise ValueError(f"--importance {spec}: NAME=GAMMA, NAME one of the run's experts: {', '.join(names)}")
        try:
            gamma = float(value)
        except ValueError:
            gamma = float("nan")
        if not (gamma > 0 and math.isfinite(gamma)):
            raise ValueError(f"--importance {spec}: GAMMA must be a finite number > 0")
        weights[name] = gamma
    return [weights[n] for n in names]


def expert_names(layout: RunLayout, config: str | None) -> list[str]:
    path = Path(config) if config else layout.run_config_file()
    if not path.is_file():
        raise ValueError(f"{layout.root}: no saved run config ({path}); pass --config")
    return list(load_config(str(path), check_paths=False).experts.names)


def cmd_calibrate(args) -> int:
    from trinityx_ds.calibration.fit import read_importance, read_temperatures, write_importance, write_temperatures

    layout = RunLayout(args.run)
    router = layout.router_file
    if not router.is_file():
        raise ValueError(f"{args.run}: no {router.relative_to(layout.root)} (stage 2 has not finished here)")
    names = expert_names(layout, args.config)
    if args.temperature is not None and not (args.temperature > 0 and math.isfinite(args.temperature)):
        raise ValueError(f"--temperature {args.temperature}: must be a finite number > 0")
    gamma = parse_importance(args.importance, names) if args.importance else None
    backup = None
    if gamma is not None:
        backup = write_importance(router, gamma)
    if args.temperature is not None:
        backup = write_temperatures(router, dict.fromkeys(read_temperatures(router), args.temperature))
    temps, weights = read_temperatures(router), read_importance(router)
    print(f"{router}" + (f" (the file as trained: {backup})" if backup else ""))
    print("layer  T       " + "  ".join(f"{n:>8}" for n in names))
    for layer, t in temps.items():
        print(f"{layer:<6} {t:<7.4f} " + "  ".join(f"{g:>8.4g}" for g in weights.get(layer, [])))
    stale = layout.eval_dir("trinityx")
    if backup and stale.is_dir():
        print(f"note: {stale} was evaluated with the values before this change")
    return 0
