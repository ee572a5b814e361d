"""The sections that say how a run goes: `parallel` (the layout), `data`, `train` (its two
stages) and `output`.

Each states its own invariants in `problems(at)` (see schema.py); a rule that spans sections
(e.g. preference objectives need pair data) is RunConfig's.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, replace
from typing import Literal

from trinityx_ds.config.rules import ConfigError, need

# each has one reader in data/formats.py's READERS, which checks that the two lists agree
DataFormat = Literal["alpaca", "self_instruct", "hh_rlhf", "beavertails", "truthfulqa", "chat_jsonl", "preference"]
PAIR_FORMATS = ("hh_rlhf", "truthfulqa", "beavertails", "preference")  # formats that give preference pairs


@dataclass
class ParallelConfig:
    """Megatron's layout: world_size = tp * pp * dp, expert-parallel groups carved out of dp."""

    tp: int = 1
    pp: int = 1
    ep: int = 1
    dp: int | None = None
    world_size: int | None = None
    zero_stage: int = 3
    offload: Literal["none", "cpu"] = "none"
    ds_config: str | None = None

    def problems(self, at: str) -> list[str]:
        out: list[str] = []
        for name in ("tp", "pp", "ep", "dp", "world_size"):
            value = getattr(self, name)
            need(out, value is None or value >= 1, f"{at}.{name}", value, "an int >= 1")
        sizes_ok = not out  # the rules below need positive sizes
        need(out, 0 <= self.zero_stage <= 3, f"{at}.zero_stage", self.zero_stage, "an int in 0..3")
        if not sizes_ok:
            return out
        need(out, self.pp == 1 or self.zero_stage <= 1, f"{at}.pp", self.pp,
             f"pipeline parallelism needs zero_stage <= 1 (got {self.zero_stage}): "
             "DeepSpeed's pipeline engine refuses ZeRO-2/3")
        if self.world_size is not None:
            return out + self._layout_problems(at)
        need(out, self.dp is None or self.dp % self.ep == 0, f"{at}.ep", self.ep,
             f"must divide dp ({self.dp}): expert-parallel ranks are carved out of the data-parallel ranks")
        return out

    def _layout_problems(self, at: str) -> list[str]:
        """What stops this layout from tiling `world_size` ranks; empty when it fits."""
        world_size, mp = self.world_size, self.tp * self.pp
        if world_size % mp:
            return [f"{at}: tp({self.tp}) x pp({self.pp}) = {mp} does not divide world size {world_size}"]
        dp, out = world_size // mp, []
        need(out, self.dp in (None, dp), f"{at}.dp", self.dp,
             f"world size {world_size} / (tp {self.tp} x pp {self.pp}) gives dp {dp}")
        need(out, dp % self.ep == 0, f"{at}.ep", self.ep,
             f"must divide dp ({dp}): expert-parallel ranks are carved out of the data-parallel ranks")
        return out

    def resolve(self, world_size: int) -> ParallelConfig:
        """Fills `world_size` and `dp` for a launch; callable before any process group starts."""
        placed = dataclasses.replace(self, world_size=world_size)
        problems = placed.problems("parallel")
        if problems:
            raise ConfigError(problems)
        return dataclasses.replace(placed, dp=world_size // (self.tp * self.pp))


@dataclass
class DataSource:
    path: str
    format: DataFormat = "alpaca"
    max_rows: int | None = None
    split: str = "train"


@dataclass
class DataConfig:
    tasks: dict[str, list[DataSource]] = field(default_factory=dict)
    max_seq_len: int = 512
    packing: bool = False
    heldout_fraction: float = 0.1
    on_malformed: Literal["fail", "skip"] = "fail"
    chat_template: Literal["auto", "default"] = "auto"
    # held-out rows given as files, per task (instead of drawing heldout_fraction of its prompts)
    heldout: dict[str, list[DataSource]] = field(default_factory=dict)
    pairs_per_prompt: int = 4  # preference pairs kept per prompt (TruthfulQA question, BeaverTails prompt)
    # stage 2's training mixture: every task's rows as they come (proportional to the data sets'
    # sizes), or each task oversampled to the largest (balanced: no size prior for the router)
    mixture: Literal["proportional", "balanced"] = "proportional"
    pair_too_long: Literal["truncate_prompt", "skip"] = "truncate_prompt"
    # a row longer than this many characters is malformed (on_malformed decides), found before any
    # tokeniser sees it: one valid 50 MB row cost 5-7 GB and 169 s per rank to tokenise and cut
    max_row_chars: int = 1_000_000

    def problems(self, at: str, names: list[str] | None) -> list[str]:
        """`names` is None when experts.names is itself broken: skip matching the task keys to it."""
        out: list[str] = []
        missing = [n for n in names or [] if n not in self.tasks]
        need(out, not missing, f"{at}.tasks", sorted(self.tasks),
             f"one entry per expert; missing: {', '.join(missing)}")
        for name, sources in self.tasks.items():
            need(out, names is None or name in names, f"{at}.tasks.{name}", name,
                 f"not an expert; experts.names is {', '.join(names or [])}")
            need(out, bool(sources), f"{at}.tasks.{name}", sources, "at least one data source")
            for i, src in enumerate(sources):
                need(out, src.path.removeprefix("hub:").strip() != "", f"{at}.tasks.{name}[{i}].path", src.path,
                     "a file path or hub:NAME")
                need(out, src.max_rows is None or src.max_rows >= 1, f"{at}.tasks.{name}[{i}].max_rows",
                     src.max_rows, "an int >= 1 or null")
        need(out, self.max_seq_len >= 8, f"{at}.max_seq_len", self.max_seq_len, "an int >= 8")
        need(out, 0 <= self.heldout_fraction <= 0.5, f"{at}.heldout_fraction", self.heldout_fraction,
             "a number in [0, 0.5]")
        for name, sources in self.heldout.items():
            need(out, name in self.tasks, f"{at}.heldout.{name}", name,
                 f"not a task; data.tasks has {', '.join(sorted(self.tasks))}")
            need(out, bool(sources), f"{at}.heldout.{name}", sources, "at least one data source")
        need(out, self.pairs_per_prompt >= 1, f"{at}.pairs_per_prompt", self.pairs_per_prompt, "an int >= 1")
        need(out, self.max_row_chars >= 1000, f"{at}.max_row_chars", self.max_row_chars, "an int >= 1000")
        return out


@dataclass
class StageConfig:
    steps: int = 100
    lr: float = 5e-4
    micro_batch: int = 4
    grad_accum: int = 1
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    optimizer: Literal["adamw", "sgd"] = "adamw"

    def problems(self, at: str) -> list[str]:
        out: list[str] = []
        for name in ("steps", "micro_batch", "grad_accum"):
            need(out, getattr(self, name) >= 1, f"{at}.{name}", getattr(self, name), "an int >= 1")
        need(out, self.lr > 0, f"{at}.lr", self.lr, "a number > 0")
        warmup_ok = self.warmup_steps >= 0 and (self.steps < 1 or self.warmup_steps < self.steps)
        need(out, warmup_ok, f"{at}.warmup_steps", self.warmup_steps, f"an int >= 0 and < steps ({self.steps})")
        need(out, self.weight_decay >= 0, f"{at}.weight_decay", self.weight_decay, "a number >= 0")
        need(out, self.grad_clip >= 0, f"{at}.grad_clip", self.grad_clip, "a number >= 0 (0 turns clipping off)")
        return out


@dataclass
class Stage1Config(StageConfig):
    """Stage 1 adds the preference objectives' options (experts.objective: dpo | simpo | cpo)."""

    beta: float = 0.1  # DPO: scale of the implicit reward; SimPO: of the length-normalised log-prob
    label_smoothing: float = 0.0  # DPO: the probability that a pair's label is flipped (cDPO)
    simpo_gamma: float = 0.5  # SimPO: target reward margin (TRL's CPOConfig default)
    cpo_alpha: float = 1.0  # CPO: weight of the chosen responses' NLL (TRL's CPOConfig default); 0: none
    # steps of one expert where it differs from `steps` (experts' data differ in size: e.g. a
    # preference expert with 4x the pairs of another), e.g. {harm: 180}
    steps_per_expert: dict[str, int] = field(default_factory=dict)

    def for_expert(self, name: str) -> Stage1Config:
        """This stage's settings as expert `name` trains: its own step count where one is given."""
        return replace(self, steps=self.steps_per_expert.get(name, self.steps), steps_per_expert={})

    def problems(self, at: str) -> list[str]:
        out = super().problems(at)
        for name, steps in self.steps_per_expert.items():
            need(out, isinstance(steps, int) and steps > self.warmup_steps and steps >= 1,
                 f"{at}.steps_per_expert.{name}", steps, f"an int >= 1 and > warmup_steps ({self.warmup_steps})")
        need(out, self.beta > 0, f"{at}.beta", self.beta, "a number > 0")
        need(out, 0 <= self.label_smoothing < 0.5, f"{at}.label_smoothing", self.label_smoothing,
             "a number in [0, 0.5)")
        need(out, self.simpo_gamma >= 0, f"{at}.simpo_gamma", self.simpo_gamma, "a number >= 0")
        need(out, self.cpo_alpha >= 0, f"{at}.cpo_alpha", self.cpo_alpha, "a number >= 0")
        return out


@dataclass
class TrainConfig:
    stage1: Stage1Config = field(default_factory=Stage1Config)
    stage2: StageConfig = field(default_factory=lambda: StageConfig(lr=1e-3))
    train_experts_in_stage2: bool = False
    checkpoint_every: int = 50
    keep_last: int = 2
    log_every: int = 1
    peak_tflops: float | None = None  # per GPU, bf16 dense, for train/mfu; None: from the GPU's name
    stop_on_nonfinite: bool = True  # a NaN/inf loss or gradient norm stops the run (train/guard.py)
    max_skipped_steps: int = 20  # this many optimizer steps skipped in a row (fp16 overflow) stop it; 0: never
    # a gradient norm of exactly 0 for this many optimizer steps in a row stops it (train/guard.py)
    stop_on_collapse: bool = True
    collapse_steps: int = 5

    def problems(self, at: str) -> list[str]:
        out = self.stage1.problems(f"{at}.stage1") + self.stage2.problems(f"{at}.stage2")
        for name in ("checkpoint_every", "keep_last", "log_every"):
            need(out, getattr(self, name) >= 1, f"{at}.{name}", getattr(self, name), "an int >= 1")
        need(out, self.peak_tflops is None or self.peak_tflops > 0, f"{at}.peak_tflops", self.peak_tflops,
             "the GPU's peak TFLOP/s (> 0, bf16 dense), or null to take it from the GPU's name")
        need(out, self.max_skipped_steps >= 0, f"{at}.max_skipped_steps", self.max_skipped_steps,
             "an int >= 0 (0: never stop on skipped steps)")
        need(out, self.collapse_steps >= 1, f"{at}.collapse_steps", self.collapse_steps,
             "an int >= 1 (steps in a row with a gradient norm of exactly 0; train.stop_on_collapse: false to never stop)")
        return out


@dataclass
class OutputConfig:
    dir: str = "runs/trinityx"
    tensorboard: bool = True

    def problems(self, at: str) -> list[str]:
        out: list[str] = []
        need(out, bool(self.dir), f"{at}.dir", self.dir, "a non-empty folder path")
        return out

