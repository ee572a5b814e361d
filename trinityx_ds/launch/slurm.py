"""Slurm: render the sbatch templates of `slurm/` for one run config, and submit the whole
pipeline (expert array -> router -> export, eval) as one chain of `afterok` dependencies.

Cluster settings live in `SlurmConfig`, read from a file of their own (`--slurm FILE`) and CLI
flags, not from the run config: the same run is launched on different clusters, and the run
config's loader rejects keys it does not know.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from trinityx_ds.config import load_config
from trinityx_ds.errors import one_line_errors
from trinityx_ds.launch.torchrun import CPU_ENV
from trinityx_ds.storage.layout import RunLayout, SlurmDir
from trinityx_ds.storage.resources import data_dir

JOBS = ("experts", "router", "export", "eval")  # pipeline order; each depends on the one it needs
NEEDS = {"router": "experts", "export": "router", "eval": "router"}
_VAR = re.compile(r"\{\{(\w+)(\|q)?\}\}")


@dataclass
class SlurmConfig:
    """Where and how the jobs run. `nodes` is the router job's size (the only multi-node job by
    default); each expert array task gets `expert_nodes`."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str = "24:00:00"
    nodes: int = 1
    expert_nodes: int = 1
    gpus_per_node: int = 0
    procs_per_node: int | None = None  # default: gpus_per_node, or 1 on CPU nodes
    cpus_per_task: int = 8  # torchrun launcher: one task holds all processes of its node
    launcher: Literal["torchrun", "srun"] = "torchrun"
    python: str = sys.executable
    port: int | None = None  # rendezvous port; default derived from the job id
    signal_seconds: int = 300  # USR1 this long before the time limit: checkpoint, then requeue
    log_dir: str | None = None  # default SlurmDir(render folder).log_dir: beside the scripts
    container_image: str | None = None  # enroot/pyxis image for srun --container-image
    container_mounts: str | None = None
    env: dict[str, str] = field(default_factory=dict)  # exported in every job
    sbatch_args: list[str] = field(default_factory=list)  # extra options, one #SBATCH line each
    export_dir: str | None = None  # default the run's RunLayout.export_dir
    export_args: list[str] = field(default_factory=list)  # more `trinityx export-hf` options
    eval_suite: str = "routing"  # the others need data files: pass them in eval_args
    eval_dir: str | None = None  # --out of `trinityx eval`; default its own, the run's RunLayout.eval_dir(variant)
    eval_args: list[str] = field(default_factory=list)  # e.g. [--truthfulqa, F.csv, --limit, "100"]

    @property
    def procs(self) -> int:
        return self.procs_per_node or max(self.gpus_per_node, 1)

    def problems(self) -> list[str]:
        out = []
        for name, low in (("nodes", 1), ("expert_nodes", 1), ("cpus_per_task", 1), ("signal_seconds", 1),
                          ("gpus_per_node", 0), ("procs_per_node", 1), ("port", 1)):
            value = getattr(self, name)
            if value is None and name in ("procs_per_node", "port"):
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                out.append(f"slurm.{name}: {value!r} — an int >= {low}")
        for name in ("sbatch_args", "export_args", "eval_args"):
            if not isinstance(getattr(self, name), list):
                out.append(f"slurm.{name}: {getattr(self, name)!r} — a list of strings")
        if not isinstance(self.env, dict):
            out.append(f"slurm.env: {self.env!r} — a mapping NAME: value")
        if self.launcher not in ("torchrun", "srun"):
            out.append(f"slurm.launcher: {self.launcher!r} — torchrun or srun")
        if not re.fullmatch(r"[\d:-]+|UNLIMITED|INFINITE", str(self.time)):
            out.append(f"slurm.time: {self.time!r} — a Slurm time such as 24:00:00 or 2-00:00:00")
        return out


def load_slurm_config(path: str | None = None, **overrides) -> SlurmConfig:
    """SlurmConfig from a YAML file (optional), then non-None `overrides` (CLI flags)."""
    data = {}
    if path:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
        data = data.get("slurm", data) if isinstance(data, dict) else data  # `slurm:` section optional
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of Slurm settings")
    known = {f.name for f in dataclasses.fields(SlurmConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{path}: unknown Slurm setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    cfg = SlurmConfig(**{**data, **{k: v for k, v in overrides.items() if v is not None}})
    problems = cfg.problems()
    if problems:
        raise ValueError("; ".join(problems))
    return cfg


# ---------------------------------------------------------------------------------- render
def render_text(text: str, values: dict[str, str]) -> str:
    """Fills {{NAME}} (raw) and {{NAME|q}} (shell-quoted). An `#SBATCH` line with an empty value
    becomes `##SBATCH` (sbatch ignores it); a line that is one empty placeholder disappears."""
    out = []
    for line in text.splitlines():
        names = [m.group(1) for m in _VAR.finditer(line)]
        missing = [n for n in names if n not in values]
        if missing:
            raise ValueError(f"template variable(s) {', '.join(missing)} not set")
        if _VAR.fullmatch(line.strip() or "-") and not values[names[0]]:
            continue
        if line.startswith("#SBATCH") and any(values[n] == "" for n in names):
            line = "#" + line
        out.append(_VAR.sub(lambda m: shlex.quote(values[m.group(1)]) if m.group(2) else values[m.group(1)], line))
    return "\n".join(out) + "\n"


def _words(paths) -> str:
    """Paths as the words of a bash array, each quoted."""
    return " ".join(shlex.quote(str(p)) for p in paths)


def _paths(run: RunLayout, experts: list[str], slurm: SlurmConfig) -> dict[str, str]:
    """The run's paths the templates use, from RunLayout (the templates spell none). The expert
    array's task picks its expert at run time, so each per-expert path is a bash array in the
    order of EXPERTS, indexed by the task id like EXPERTS itself."""
    return {
        "EXPERT_FILES": _words(run.expert_file(e) for e in experts),
        "EXPERT_CHECKPOINTS": _words(run.checkpoints(1, e).path for e in experts),
        "ROUTER_FILE": str(run.router_file), "ROUTER_CHECKPOINTS": str(run.checkpoints(2).path),
        "EXPORT_DIR": str(Path(slurm.export_dir or run.export_dir).resolve()),
        # without eval_dir, `trinityx eval` writes where it always does: the run's eval_dir(variant),
        # whatever --variant eval_args name (one folder per variant, as on the command line)
        "EVAL_OUT": f"--out {shlex.quote(str(Path(slurm.eval_dir).resolve()))}" if slurm.eval_dir else "",
    }


def _values(run_cfg, run_config: Path, slurm: SlurmConfig, render_dir: Path, log_dir: Path) -> dict[str, str]:
    run_dir = Path(run_cfg.output.dir).resolve()
    gpus = str(slurm.gpus_per_node) if slurm.gpus_per_node else ""
    tp = run_cfg.parallel.tp  # the eval job: one process (and GPU) per TP rank of the run
    return {
        "NAME": run_cfg.name, "CONFIG": str(run_config), "WORKDIR": os.getcwd(), "RUN_DIR": str(run_dir),
        "RENDER_DIR": str(render_dir), "LOG_DIR": str(log_dir), "PYTHON": slurm.python,
        "LAUNCHER": slurm.launcher, "PROCS_PER_NODE": str(slurm.procs),
        "TASKS_PER_NODE": "1" if slurm.launcher == "torchrun" else str(slurm.procs),
        "NODES": str(slurm.nodes), "EXPERT_NODES": str(slurm.expert_nodes), "CPUS_PER_TASK": str(slurm.cpus_per_task),
        "GPUS_PER_NODE": gpus, "GPUS_PER_NODE_OR_0": gpus or "0", "EVAL_GPUS": str(tp) if gpus else "",
        "EVAL_PROCS": str(tp), "TP": str(tp),
        "PARTITION": slurm.partition or "", "ACCOUNT": slurm.account or "", "QOS": slurm.qos or "",
        "TIME": slurm.time, "SIGNAL_SECONDS": str(slurm.signal_seconds),
        "PORT_OR_AUTO": str(slurm.port) if slurm.port else "$((20000 + SLURM_JOB_ID % 40000))",
        "CONTAINER_IMAGE": slurm.container_image or "", "CONTAINER_MOUNTS": slurm.container_mounts or "",
        "ENV_EXPORTS": "\n".join(f"export {k}={shlex.quote(str(v))}" for k, v in slurm.env.items()),
        "CPU_ENV": " ".join(f"{k}={shlex.quote(v)}" for k, v in CPU_ENV.items()),
        "EXTRA_SBATCH": "\n".join(f"#SBATCH {a}" for a in slurm.sbatch_args),
        "EXPERTS": " ".join(run_cfg.experts.names), "LAST_EXPERT": str(len(run_cfg.experts.names) - 1),
        **_paths(RunLayout(run_dir), run_cfg.experts.names, slurm), "EVAL_SUITE": slurm.eval_suite,
        "EXPORT_ARGS": " ".join(map(shlex.quote, map(str, slurm.export_args))),
        "EVAL_ARGS": " ".join(map(shlex.quote, map(str, slurm.eval_args))),
    }


@dataclass
class Rendered:
    dir: Path
    scripts: dict[str, Path]  # job -> .sbatch
    log_dir: Path
    name: str  # the run's name: jobs are <name>-<job>

    def log_pattern(self, job: str, job_id: str) -> str:
        return str(self.log_dir / f"{self.name}-{job}-{job_id}{'_<task>' if job == 'experts' else ''}.out")


def render(run_config: str | Path, slurm: SlurmConfig, out_dir: str | Path | None = None,
           templates: Path | None = None) -> Rendered:
    """Writes launch.sh, one .sbatch per job and submit.sh into `out_dir` (default the run's
    RunLayout.slurm_dir); the jobs log into that folder's SlurmDir.log_dir unless `slurm.log_dir`
    says otherwise. Checks the run config against each job's world size first, so a layout that
    cannot tile the job fails here, not on the cluster."""
    templates = Path(templates) if templates is not None else data_dir("slurm")  # shipped with the package
    if not (templates / "launch.sh").is_file():
        raise FileNotFoundError(f"{templates}: no launch.sh — not a folder of sbatch templates")
    run_config = Path(run_config).resolve()
    load_config(str(run_config), world_size=slurm.expert_nodes * slurm.procs)
    run_cfg = load_config(str(run_config), world_size=slurm.nodes * slurm.procs)
    render_dir = Path(out_dir or RunLayout(run_cfg.output.dir).slurm_dir).resolve()
    log_dir = Path(slurm.log_dir or SlurmDir(render_dir).log_dir).resolve()
    for what, path in (("--log-dir", log_dir), ("the working folder", Path(os.getcwd()))):
        if '"' in str(path) or "\n" in str(path):  # #SBATCH lines quote these paths in double quotes
            raise ValueError(f"{what}: {str(path)!r} — a path without double quotes or newlines")
    render_dir.mkdir(parents=True, exist_ok=True)
    log_dir.mkdir(parents=True, exist_ok=True)  # Slurm does not make the folders of --output
    values = _values(run_cfg, run_config, slurm, render_dir, log_dir)
    scripts = {}
    for name in ("launch.sh", *(f"{job}.sbatch" for job in JOBS)):
        path = render_dir / name
        path.write_text(render_text((templates / name).read_text(), values))
        path.chmod(0o755 if name.endswith(".sbatch") else 0o644)
        if name.endswith(".sbatch"):
            scripts[name.removesuffix(".sbatch")] = path
    submit_sh = render_dir / "submit.sh"
    submit_sh.write_text(_submit_script())
    submit_sh.chmod(0o755)
    return Rendered(render_dir, scripts, log_dir, run_cfg.name)


def _submit_script() -> str:
    """submit.sh: the same chain as `trinityx slurm submit`, for submitting the rendered files by hand."""
    lines = ["#!/usr/bin/env bash", "# Submits the rendered pipeline by hand (what `trinityx slurm submit` does).",
             "set -euo pipefail", 'cd "$(dirname "$0")"']
    for job in JOBS:
        dep = f'--kill-on-invalid-dep=yes --dependency=afterok:"${NEEDS[job]}_id" ' if job in NEEDS else ""
        lines.append(f"{job}_id=$(sbatch --parsable {dep}{job}.sbatch | cut -d';' -f1)")
        lines.append(f'echo "{job}: job ${job}_id"')
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------- submit
class SubmitError(RuntimeError):
    """sbatch refused a job: one line naming the job and sbatch's reason."""


def _sbatch(args: list[str], job: str, script: Path) -> str:
    proc = subprocess.run(["sbatch", "--parsable", *args, str(script)], capture_output=True, text=True)
    if proc.returncode != 0:
        reason = " ".join(line.removeprefix("sbatch: error: ").strip()
                          for line in (proc.stderr or proc.stdout).splitlines() if line.strip())
        raise SubmitError(f"{job} job ({script.name}) refused by sbatch: {reason or f'exit {proc.returncode}'}")
    return proc.stdout.strip().split(";")[0]


def submit(scripts: dict[str, Path], jobs: tuple[str, ...] = JOBS) -> dict[str, str]:
    """Submits `jobs` (pipeline order) with afterok dependencies; returns {job: job id}.

    The first job is submitted held and released last, so a refusal part-way leaves nothing
    running: the jobs already accepted are cancelled and SubmitError says why.
    """
    if shutil.which("sbatch") is None:
        raise SubmitError("sbatch not found on PATH: submit from a Slurm login node (or render and copy)")
    ids: dict[str, str] = {}
    try:
        for job in (j for j in JOBS if j in jobs):
            args = ["--hold"] if not ids else []
            if NEEDS.get(job) in ids:
                args += ["--kill-on-invalid-dep=yes", f"--dependency=afterok:{ids[NEEDS[job]]}"]
            ids[job] = _sbatch(args, job, scripts[job])
    except BaseException as e:
        if ids:
            subprocess.run(["scancel", *ids.values()], capture_output=True)
            if isinstance(e, SubmitError):
                done = ", ".join(f"{job} {jid}" for job, jid in ids.items())
                raise SubmitError(f"{e}; cancelled the jobs already submitted ({done})") from None
        raise
    first = next(iter(ids.values()), None)
    if first and subprocess.run(["scontrol", "release", first], capture_output=True).returncode != 0:
        raise SubmitError(f"all jobs submitted, but the first ({first}) is still held: run `scontrol release {first}`")
    return ids


# ---------------------------------------------------------------------------------- CLI
def add_slurm_arguments(subparsers) -> argparse.ArgumentParser:
    """`trinityx slurm render|submit`: wire with `add_slurm_arguments(sub)` in the CLI."""
    p = subparsers.add_parser("slurm", help="render sbatch scripts for a run, or submit the whole pipeline")
    sub = p.add_subparsers(dest="slurm_command", required=True)
    for name, text in (("render", "write the sbatch scripts (and submit.sh) into a folder"),
                       ("submit", "render, then submit experts -> router -> export, eval with afterok")):
        s = sub.add_parser(name, help=text)
        s.add_argument("--config", required=True, help="the run config (YAML)")
        s.add_argument("--slurm", default=None, help="Slurm settings (YAML; see slurm/README.md); flags override")
        s.add_argument("--out", default=None,
                       help=f"folder for the scripts [{RunLayout('<output.dir>').slurm_dir.path}]")
        for flag, kind in (("partition", str), ("account", str), ("qos", str), ("time", str), ("nodes", int),
                           ("expert-nodes", int), ("gpus-per-node", int), ("procs-per-node", int),
                           ("cpus-per-task", int), ("python", str), ("log-dir", str), ("signal-seconds", int),
                           ("container-image", str)):
            s.add_argument(f"--{flag}", type=kind, default=None)
        s.add_argument("--launcher", choices=["torchrun", "srun"], default=None,
                       help="torchrun: one task per node (c10d rendezvous); srun: one task per process (env://)")
        if name == "submit":
            s.add_argument("--jobs", default=",".join(JOBS),
                           help=f"comma-separated subset of {','.join(JOBS)} [all]")
        s.set_defaults(fn=cmd_slurm)
    return p


def cmd_slurm(args) -> int:
    flags = ("partition", "account", "qos", "time", "nodes", "expert_nodes", "gpus_per_node", "procs_per_node",
             "cpus_per_task", "python", "log_dir", "signal_seconds", "container_image", "launcher")
    slurm = load_slurm_config(args.slurm, **{k: getattr(args, k) for k in flags})
    jobs = tuple(j.strip() for j in getattr(args, "jobs", "").split(",") if j.strip())
    if args.slurm_command == "submit" and (not jobs or set(jobs) - set(JOBS)):
        raise ValueError(f"--jobs: {args.jobs!r} — a comma-separated subset of {','.join(JOBS)}")
    out = render(args.config, slurm, args.out)
    if args.slurm_command == "render":
        print(f"rendered {', '.join(p.name for p in out.scripts.values())} into {out.dir} "
              f"(submit.sh submits them; logs go to {out.log_dir})")
        return 0
    try:
        ids = submit(out.scripts, jobs)
    except SubmitError as e:
        print(f"trinityx slurm submit: {e}", file=sys.stderr)
        return 1
    for job, jid in ids.items():
        after = f" (afterok {ids[NEEDS[job]]})" if NEEDS.get(job) in ids else ""
        print(f"{job}: job {jid}{after}; log {out.log_pattern(job, jid)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m trinityx_ds.launch.slurm render|submit ...` (the same as `trinityx slurm`)."""
    parser = argparse.ArgumentParser(prog="trinityx")
    add_slurm_arguments(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["slurm", *(sys.argv[1:] if argv is None else argv)])
    return one_line_errors("slurm", lambda: args.fn(args), errors=(ValueError, OSError))


if __name__ == "__main__":
    sys.exit(main())
