"""Where a run keeps its files. This module alone knows the on-disk layout of a run; training,
export, evaluation, launch and the demo ask it (pathlib and json only: no torch, no config), and
the Slurm templates get their paths rendered from it (launch/slurm.py). tests/unit/
test_layout_spellings.py fails on a run's sub-path spelled anywhere else.

    <root>/config.yaml                                  the run config (the demo, import of a TrinityX folder)
    <root>/stage1/<expert>/expert.safetensors           stage 1's output: one expert, HF-named
    <root>/stage1/<expert>/checkpoints/                 its training checkpoints (CheckpointDir)
    <root>/stage2/router.safetensors                    stage 2's output, written last: stage 2 is complete
    <root>/stage2/experts/<expert>.safetensors          the experts, when stage 2 trains them
    <root>/stage2/validation.json                       stage 2's held-out routing report
    <root>/stage2/checkpoints/
    <root>/stage*/metrics.jsonl, tensorboard/           what the stage logged
    <root>/eval/<variant>/                              `trinityx eval` reports, one folder per variant
    <root>/hf/                                          the HF export of the Slurm pipeline and the demo
    <root>/slurm/, slurm/logs/                          `trinityx slurm render`'s scripts, their jobs' logs (SlurmDir)
    <root>/imported/, parity.json, models/tiny-llama/,  the demo's own: its backbone in TP shards and its
      eval_data/, hhh_heldout/, hhh_heldout.json          check, its generated model, its held-out files and figures

A checkpoint folder (`CheckpointDir`) holds one folder per tag (step%08d: DeepSpeed's files, the
layout-free `universal/` copy, the run state, `config.yaml`, `tokenizer/`, a COMPLETE marker) and
a `latest` pointer in DeepSpeed's format.
"""
from __future__ import annotations

import json
import shutil
import zlib
from pathlib import Path

from trinityx_ds.errors import CheckpointError
from trinityx_ds.storage.atomic import write_text

CONFIG = "config.yaml"
IMPORT_META = "trinityx_meta.json"  # written by `trinityx import-hf` next to the TP shards
EXPERT = "expert.safetensors"
ROUTER = "router.safetensors"
VALIDATION = "validation.json"
METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"
STAGE1, STAGE2 = "stage1", "stage2"
CHECKPOINTS = "checkpoints"
EVAL = "eval"


class CheckpointDir:
    """One stage's `checkpoints/` folder: its tags, markers, pointer and what each tag holds."""

    LATEST = "latest"
    COMPLETE = "COMPLETE"
    STATE = "trinityx_state.json"
    UNIVERSAL = "universal"
    TOKENIZER = "tokenizer"
    MANIFEST = "MANIFEST.json"  # every file of a tag with its size (and CRC-32 up to CRC_BYTES)
    CRC_BYTES = 16 * 1024**2  # files up to this size are checksummed: the run state, LoRA shards

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __fspath__(self) -> str:
        return str(self.path)

    @staticmethod
    def tag_for(step: int) -> str:
        return f"step{step:08d}"

    def tag_dir(self, tag: str) -> Path:
        return self.path / tag

    def pointer(self) -> Path:
        return self.path / self.LATEST

    def marker(self, tag: str) -> Path:
        return self.path / tag / self.COMPLETE

    def state_file(self, tag: str) -> Path:
        return self.path / tag / self.STATE

    def config_file(self, tag: str) -> Path:
        return self.path / tag / CONFIG

    def tokenizer_dir(self, tag: str) -> Path:
        return self.path / tag / self.TOKENIZER

    def universal_dir(self, tag: str) -> Path:
        return self.path / tag / self.UNIVERSAL

    def external_experts_file(self, tag: str, tp_rank: int, dp_rank: int) -> Path:
        """Stage 2's EP-placed experts and their optimizer, one file per (TP, DP) rank."""
        return self.path / tag / f"experts_tp{tp_rank:02d}_dp{dp_rank:03d}.pt"

    def manifest_file(self, tag: str) -> Path:
        return self.path / tag / self.MANIFEST

    def is_complete(self, tag: str) -> bool:
        return self.marker(tag).is_file()

    def tags(self) -> list[str]:
        """Every tag folder (step%08d), oldest first, complete or not."""
        if not self.path.is_dir():
            return []
        return sorted(p.name for p in self.path.iterdir() if p.is_dir() and p.name.startswith("step")
                      and p.name[4:].isdigit())

    def complete_tags(self) -> list[str]:
        """Every tag with its COMPLETE marker, oldest first."""
        return [t for t in self.tags() if self.is_complete(t)]

    def _files(self, tag: str) -> list[Path]:
        skip = {self.COMPLETE, self.MANIFEST}
        return sorted(p for p in self.tag_dir(tag).rglob("*") if p.is_file() and p.name not in skip)

    @classmethod
    def _crc(cls, path: Path, size: int) -> int | None:
        if size > cls.CRC_BYTES:
            return None
        return zlib.crc32(path.read_bytes())

    def write_manifest(self, tag: str) -> None:
        """Records every file of `tag` (written by every rank: call after they all finished)."""
        files = {}
        for p in self._files(tag):
            size = p.stat().st_size
            files[str(p.relative_to(self.tag_dir(tag)))] = {"size": size, "crc32": self._crc(p, size)}
        write_text(self.manifest_file(tag), json.dumps({"files": files}, indent=1))

    def damage(self, tag: str) -> str | None:
        """Why tag `tag` cannot be resumed (no marker, a file missing, truncated or changed since it
        was written), or None when it verifies. Tags written before manifests existed verify by
        their marker alone."""
        if not self.tag_dir(tag).is_dir():
            return "no such folder"
        if not self.is_complete(tag):
            return f"no {self.COMPLETE} marker (its save was interrupted)"
        if not self.manifest_file(tag).is_file():
            return None
        try:
            files = json.loads(self.manifest_file(tag).read_text())["files"]
        except (OSError, ValueError, KeyError) as e:
            return f"{self.MANIFEST} unreadable ({e})"
        for rel, want in files.items():
            path = self.tag_dir(tag) / rel
            if not path.is_file():
                return f"{rel}: missing"
            size = path.stat().st_size
            if size != want["size"]:
                return f"{rel}: {size} bytes, {want['size']} when written (truncated or replaced)"
            if want.get("crc32") is not None and self._crc(path, size) != want["crc32"]:
                return f"{rel}: checksum differs from when it was written"
        return None

    def choose(self) -> tuple[str | None, list[str]]:
        """The tag to resume: the newest complete tag that verifies, whatever `latest` says; and
        one note per damaged or incomplete tag skipped on the way (by name, never deleted), plus
        one when `latest` names another tag."""
        notes, skipped, chosen = [], set(), None
        for tag in reversed(self.tags()):
            why = self.damage(tag)
            if why is None:
                chosen = tag
                break
            skipped.add(tag)
            notes.append(f"{self.tag_dir(tag)}: skipped: {why}")
        pointed = self.pointer().read_text().strip() if self.pointer().is_file() else None
        if pointed is not None and pointed != chosen and pointed not in skipped:
            why = self.damage(pointed) or "older than a verified tag"
            notes.append(f"{self.pointer()}: names {pointed} ({why}); resuming from {chosen or 'the start'}")
        return chosen, notes

    def latest_tag(self) -> str | None:
        """The newest complete tag that verifies (see `choose`), or None."""
        return self.choose()[0]

    def latest(self) -> tuple[str, dict] | None:
        """(tag, run state) of the newest verified checkpoint, or None."""
        tag = self.latest_tag()
        return None if tag is None else (tag, json.loads(self.state_file(tag).read_text()))

    def prune(self, keep_last: int) -> list[str]:
        """Deletes verified tags older than the newest `keep_last` verified ones; damaged and
        incomplete tags are left for a person to look at. Returns the deleted tags."""
        verified = [t for t in self.complete_tags() if self.damage(t) is None]
        old = verified[:-keep_last]
        for tag in old:
            shutil.rmtree(self.tag_dir(tag), ignore_errors=True)
        return old

    @classmethod
    def tag_of(cls, path: str | Path) -> Path | None:
        """The tag folder a checkpoint path means: a `checkpoints/` folder (with a `latest` pointer)
        means its latest complete tag, a tag folder itself; None when `path` is neither. A pointer
        to no complete tag, or a tag whose save was interrupted, is an error naming the file."""
        path = Path(path)
        if (path / cls.LATEST).is_file():
            tag = cls(path).latest_tag()
            if tag is None:
                raise CheckpointError(f"{path / cls.LATEST}: names no complete checkpoint (no {cls.COMPLETE} marker)")
            return path / tag
        if (path / cls.STATE).is_file() or (path / cls.UNIVERSAL).is_dir():
            if not (path / cls.COMPLETE).is_file():
                raise CheckpointError(f"{path}: incomplete checkpoint (no {cls.COMPLETE} marker: "
                                        "its save was interrupted)")
            return path
        return None


class SlurmDir:
    """A folder of rendered sbatch scripts (`trinityx slurm render`): the run's `slurm/` unless
    `--out` puts them elsewhere. Its jobs log into `logs/` inside it (unless the Slurm settings name
    a log_dir), next to the scripts that wrote them: Slurm does not make the folder of --output, so
    render makes it."""

    LOGS = "logs"

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __fspath__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"SlurmDir({str(self.path)!r})"

    @property
    def log_dir(self) -> Path:
        return self.path / self.LOGS


class RunLayout:
    """The files of one run under `root` (a run's `output.dir`, wherever it has moved since)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunLayout({str(self.root)!r})"

    @property
    def config_file(self) -> Path:
        return self.root / CONFIG

    def stage_dir(self, stage: int, expert: str | None = None) -> Path:
        if stage == 1:
            if expert is None:
                raise ValueError("stage 1 keeps one folder per expert: name the expert")
            return self.root / STAGE1 / expert
        return self.root / STAGE2

    def checkpoints(self, stage: int, expert: str | None = None) -> CheckpointDir:
        return CheckpointDir(self.stage_dir(stage, expert) / CHECKPOINTS)

    def metrics_file(self, stage: int, expert: str | None = None) -> Path:
        """What a stage logged, one JSON line per step (train/metrics.py's MetricsLogger)."""
        return self.stage_dir(stage, expert) / METRICS

    def tensorboard_dir(self, stage: int, expert: str | None = None) -> Path:
        return self.stage_dir(stage, expert) / TENSORBOARD

    def expert_file(self, name: str) -> Path:
        """Expert `name` as stage 1 trained it."""
        return self.stage_dir(1, name) / EXPERT

    def stage2_expert_file(self, name: str) -> Path:
        """Expert `name` as stage 2 leaves it when it trains experts (train.train_experts_in_stage2)."""
        return self.stage_dir(2) / "experts" / f"{name}.safetensors"

    @property
    def router_file(self) -> Path:
        return self.stage_dir(2) / ROUTER

    @property
    def validation_file(self) -> Path:
        return self.stage_dir(2) / VALIDATION

    def stage2_done(self) -> bool:
        """Stage 2 writes its router last: the file's presence says the stage is complete."""
        return self.router_file.is_file()

    def final_expert_file(self, name: str, trained_in_stage2: bool) -> Path:
        """Expert `name` as the run last trained it (what export and evaluation read): stage 2's copy
        when stage 2 trains experts and has finished, else stage 1's."""
        return self.stage2_expert_file(name) if trained_in_stage2 and self.stage2_done() else self.expert_file(name)

    def eval_dir(self, variant: str | None = None) -> Path:
        """`eval_dir()`: the folder of the run's evaluation reports; `eval_dir(variant)`: the one
        variant's reports (report.json, report.md, per-suite details), where `trinityx eval` writes
        without --out, and so the Slurm eval job, which passes --out only when the Slurm settings
        name an eval_dir. A folder per variant because one report folder holds one variant's
        report: two variants in one folder would overwrite each other."""
        folder = self.root / EVAL
        return folder if variant is None else folder / variant_folder(variant)

    @property
    def export_dir(self) -> Path:
        """The run exported as one HF folder (`trinityx export-hf RUN RUN/hf`), where the Slurm
        pipeline's export job (unless the Slurm settings name an export_dir) and the demo write it:
        inside the run, so the export travels with the weights it was made from."""
        return self.root / "hf"

    @property
    def slurm_dir(self) -> SlurmDir:
        """Where `trinityx slurm render` writes the run's sbatch scripts without --out (and its
        jobs' logs, `slurm_dir.log_dir`): inside the run, so a run's scripts and logs stay with it."""
        return SlurmDir(self.root / "slurm")

    # -- the demo's own files (`trinityx demo`): everything of its pipeline inside its run folder,
    #    so one folder holds (and one `rm -r` removes) the whole demonstration
    @property
    def imported_dir(self) -> Path:
        """The backbone imported into TP shards (`trinityx import-hf`), when the run imports its own."""
        return self.root / "imported"

    @property
    def parity_file(self) -> Path:
        """The imported backbone checked against transformers (`trinityx parity`'s results)."""
        return self.root / "parity.json"

    @property
    def tiny_model_dir(self) -> Path:
        """A generated tiny Llama (model/tiny.py), when no real model is at hand."""
        return self.root / "models" / "tiny-llama"

    @property
    def eval_data_dir(self) -> Path:
        """Held-out files cut from real samples (`--eval-data`), prompt-disjoint from training."""
        return self.root / "eval_data"

    @property
    def heldout_dir(self) -> Path:
        """The held-out HHH figures, one result file per variant (backbone, trinityx)."""
        return self.root / "hhh_heldout"

    @property
    def heldout_report_file(self) -> Path:
        """The held-out HHH figures side by side, with the paired differences."""
        return self.root / "hhh_heldout.json"

    def is_run(self) -> bool:
        return (self.root / STAGE1).is_dir() or (self.root / STAGE2).is_dir()

    def stage_checkpoints(self) -> list[CheckpointDir]:
        """Every stage's checkpoint folder, stage 2's first (the run's latest config lives there)."""
        stage1 = sorted((self.root / STAGE1).glob(f"*/{CHECKPOINTS}"))
        return [self.checkpoints(2)] + [CheckpointDir(p) for p in stage1]

    def run_config_file(self) -> Path:
        """The config the run last trained with: stage 2's latest checkpoint, else a stage 1
        checkpoint's, else `<root>/config.yaml`."""
        for ckpt in self.stage_checkpoints():
            tag = ckpt.latest_tag()
            if tag is not None and ckpt.config_file(tag).is_file():
                return ckpt.config_file(tag)
        if self.config_file.is_file():
            return self.config_file
        raise FileNotFoundError(f"{self.root}: no run config found (no stage checkpoint with {CONFIG}, no {CONFIG}); "
                                "pass --config")

    @classmethod
    def of_checkpoint(cls, tag_dir: str | Path, stage: int) -> "RunLayout":
        """The run a checkpoint tag folder belongs to: <root>/stage2/checkpoints/<tag> or
        <root>/stage1/<expert>/checkpoints/<tag> (the run may have moved since it was trained)."""
        tag_dir = Path(tag_dir).resolve()
        return cls(tag_dir.parents[2] if stage == 2 else tag_dir.parents[3])


def variant_folder(variant: str) -> str:
    """A variant's folder name: `expert:help` -> `expert-help` (no colon in a path)."""
    return variant.replace(":", "-")


def model_eval_dir(model: str | Path, variant: str) -> Path:
    """Where `trinityx eval` writes a plain model's reports without --out (a model folder is not a
    run: its reports go under the working directory's runs/eval/, one folder per model and variant)."""
    return Path("runs") / EVAL / f"{Path(model).name}-{variant_folder(variant)}"


def import_origin(path: str | Path) -> Path:
    """The HF folder an imported checkpoint was made from (where its tokenizer and transformers'
    reference live); `path` itself for anything else."""
    meta = Path(path) / IMPORT_META
    return Path(json.loads(meta.read_text())["source"]) if meta.is_file() else Path(path)


def latest_tag(ckpt_dir: str | Path) -> str | None:
    """The newest complete tag of a `checkpoints/` folder, or None."""
    return CheckpointDir(ckpt_dir).latest_tag()


def expert_file(cfg, name: str) -> Path:
    """Stage 1's file of expert `name` in the run of config `cfg` (its `output.dir`)."""
    return RunLayout(cfg.output.dir).expert_file(name)
