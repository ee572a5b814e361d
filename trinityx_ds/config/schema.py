"""The typed description of one run: one dataclass per YAML section.

Each section states its own invariants in `problems()`, which collects every broken rule as a
one-line `<dotted.key>: <value> — <what is allowed>` instead of raising at the first, so a user
fixes a whole recipe in one pass, long before a process group or a model exists. Types and
enums are enforced by the loader from the annotations; file-system and model-shape checks live
in `load.py` because they need the YAML file's folder.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, replace
from typing import Literal

MlpProj = Literal["gate_proj", "up_proj", "down_proj"]
DataFormat = Literal["alpaca", "self_instruct", "hh_rlhf", "beavertails", "truthfulqa", "chat_jsonl", "preference"]
PAIR_FORMATS = ("hh_rlhf", "truthfulqa", "beavertails", "preference")  # formats that give preference pairs
Objective = Literal["sft", "dpo", "simpo", "cpo"]
PREFERENCE_OBJECTIVES = ("dpo", "simpo", "cpo")
from trinityx_ds.config.families import SUPPORTED_MODEL_TYPES  # noqa: F401, E402  (re-exported: one list, families.py)


class ConfigError(ValueError):
    """A run configuration that cannot be used; carries every problem, one line each."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


def problem(key: str, value, allowed: str) -> str:
    return f"{key}: {value!r} — {allowed}"


def _need(out: list[str], ok: bool, key: str, value, allowed: str) -> None:
    if not ok:
        out.append(problem(key, value, allowed))


Recompute = Literal["none", "full", "selective"]
RECOMPUTE = ("none", "full", "selective")


def recompute_mode(value: bool | str) -> str:
    """`model.activation_checkpointing` as one of RECOMPUTE: YAML written when it was a bool keeps
    its meaning (true = full, false = none), and so does code that still passes a bool."""
    if isinstance(value, bool):
        return "full" if value else "none"
    if value not in RECOMPUTE:
        raise ValueError(problem("model.activation_checkpointing", value, "one of " + ", ".join(RECOMPUTE)))
    return value


@dataclass
class ModelConfig:
    hf_path: str | None = None
    checkpoint: str | None = None
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    sequence_parallel: bool = False
    # what backward recomputes instead of keeping (megatron's recompute_granularity):
    #   none: keep every activation; full: keep each layer's input, recompute the whole layer
    #   (uniform, 1 layer); selective: recompute only the core attention (its [b, heads, s, s]
    #   scores and probabilities; megatron's "selective" with recompute_modules ["core_attn"]),
    #   eager attention only: sdpa and te run fused kernels that keep no scores, so selective would
    #   only repeat the attention forward; refused there (megatron warns the same for TE's fused one).
    # true / false (the old bool) are read as full / none and normalised to the string.
    activation_checkpointing: Recompute | bool = "none"
    tokenizer: str | None = None
    # core attention (model/attention.py): torch SDPA (no [b, heads, s, s] scores), megatron's eager
    # reference, or Transformer Engine's where it is installed
    attention: Literal["sdpa", "eager", "te"] = "sdpa"

    def __post_init__(self):
        if isinstance(self.activation_checkpointing, bool):
            self.activation_checkpointing = recompute_mode(self.activation_checkpointing)

    def problems(self, at: str) -> list[str]:
        out: list[str] = []
        _need(out, recompute_mode(self.activation_checkpointing) != "selective" or self.attention == "eager",
              f"{at}.activation_checkpointing", "selective",
              f"recomputes only the attention scores, which {at}.attention: {self.attention} (a fused kernel) "
              f"never keeps, so it would save nothing; use none or full, or {at}.attention: eager")
        if self.attention == "te":
            import importlib.util  # not transformer_engine itself: a config check starts no CUDA

            _need(out, importlib.util.find_spec("transformer_engine") is not None, f"{at}.attention", self.attention,
                  "Transformer Engine is not installed here; use sdpa (the default) or eager")
        if self.hf_path is None and self.checkpoint is None:
            out.append(problem(f"{at}.hf_path", None, f"set exactly one of {at}.hf_path (HF folder) "
                                                     f"or {at}.checkpoint (folder from `trinityx import-hf`)"))
        elif self.hf_path is not None and self.checkpoint is not None:
            out.append(problem(f"{at}.checkpoint", self.checkpoint, f"set exactly one of {at}.hf_path "
                                                                    f"or {at}.checkpoint, not both"))
        return out


@dataclass
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[MlpProj] = field(default_factory=lambda: ["gate_proj", "up_proj", "down_proj"])

    def problems(self, at: str) -> list[str]:
        out: list[str] = []
        _need(out, self.rank >= 1, f"{at}.rank", self.rank, "an int >= 1")
        _need(out, self.alpha > 0, f"{at}.alpha", self.alpha, "a number > 0")
        _need(out, 0 <= self.dropout < 1, f"{at}.dropout", self.dropout, "a number in [0, 1)")
        _need(out, bool(self.targets) and len(set(self.targets)) == len(self.targets), f"{at}.targets",
              self.targets, "a non-empty list of unique names among gate_proj, up_proj, down_proj")
        return out


@dataclass
class ExpertsConfig:
    names: list[str] = field(default_factory=lambda: ["help", "harm", "honest"])
    kind: Literal["lora", "full"] = "lora"
    layers: Literal["all"] | list[int] = "all"
    lora: LoraConfig = field(default_factory=LoraConfig)
    # stage 1's loss: one name for every expert or one per expert (train/objectives.py)
    objective: Objective | dict[str, Objective] = "sft"

    def objective_of(self, name: str) -> str:
        return self.objective if isinstance(self.objective, str) else self.objective.get(name, "sft")

    def problems(self, at: str) -> list[str]:
        out: list[str] = []
        _need(out, len(self.names) >= 2, f"{at}.names", self.names, "at least 2 expert names")
        dups = sorted({n for n in self.names if self.names.count(n) > 1})
        _need(out, not dups, f"{at}.names", self.names, f"names must be unique (repeated: {', '.join(dups)})")
        for i, name in enumerate(self.names):
            _need(out, name.isidentifier(), f"{at}.names[{i}]", name, "an identifier (letters, digits, _)")
        if self.layers != "all":
            _need(out, bool(self.layers), f"{at}.layers", self.layers, '"all" or a non-empty list of layer indices')
            _need(out, len(set(self.layers)) == len(self.layers), f"{at}.layers", self.layers,
                  "layer indices must be unique")
            for i, layer in enumerate(self.layers):
                _need(out, layer >= 0, f"{at}.layers[{i}]", layer, "a layer index >= 0")
        if isinstance(self.objective, dict):
            missing = [n for n in self.names if n not in self.objective]
            _need(out, not missing, f"{at}.objective", self.objective,
                  f"one objective per expert (sft, dpo, simpo or cpo); missing: {', '.join(missing)}")
            for name in self.objective:
                _need(out, name in self.names, f"{at}.objective.{name}", name,
                      f"not an expert; experts.names is {', '.join(self.names)}")
        preference = [n for n in self.names if self.objective_of(n) in PREFERENCE_OBJECTIVES]
        _need(out, not preference or self.kind == "lora", f"{at}.objective", self.objective,
              "dpo, simpo and cpo need experts.kind: lora (DPO's reference is the backbone with the LoRA delta "
              "off; a full expert replaces the FFN it would need)")
        return out + self.lora.problems(f"{at}.lora")


@dataclass
class RouterLossConfig:
    entropy: float = 0.1
    kl_prev: float = 0.01
    kl_uniform: float = 0.05
    task_ce: float = 0.01
    load_balance: float = 0.0
    z_loss: float = 0.0
    ema_decay: float = 0.9
    # the tokens task_ce averages an example's routing over: its response (the tokens the LM loss
    # scores), or all of it, prompt included: what each expert was trained with (stage 1 applies
    # an expert to every token) and what a router that picks one adapter per request reads
    # `both`: the mean of a response term and a prompt term, so a short answer is not outweighed by
    # its prompt and the chat template's tokens (which every task shares)
    task_tokens: Literal["response", "all", "both"] = "response"
    # what task_ce scores: each example's mean routing (H3Fusion's -log pbar_n[label]), or each of
    # its tokens' own (the mean of -log p_t[label]: what top-1 routing acts on, token by token)
    task_level: Literal["example", "token"] = "example"

    def problems(self, at: str) -> list[str]:
        out: list[str] = []
        for name in ("entropy", "kl_prev", "kl_uniform", "task_ce", "load_balance", "z_loss"):
            value = getattr(self, name)
            _need(out, value >= 0, f"{at}.{name}", value, "a loss weight >= 0")
        _need(out, 0 <= self.ema_decay < 1, f"{at}.ema_decay", self.ema_decay, "a number in [0, 1)")
        return out


@dataclass
class RouterConfig:
    temperature: float = 0.7
    temperature_mode: Literal["fixed", "learnable", "fitted"] = "fixed"
    importance: list[float] | None = None
    top_k: int | Literal["all"] = 1
    renormalize: bool = True
    normalize_output: bool = False
    losses: RouterLossConfig = field(default_factory=RouterLossConfig)

    def problems(self, at: str, num_experts: int | None) -> list[str]:
        """`num_experts` is None when experts.names is itself broken: skip the checks that count them."""
        out: list[str] = []
        _need(out, self.temperature > 0, f"{at}.temperature", self.temperature, "a number > 0")
        if self.importance is not None:
            _need(out, num_experts is None or len(self.importance) == num_experts, f"{at}.importance", self.importance,
                  f"one weight per expert ({num_experts}), or null for all 1.0")
            for i, gamma in enumerate(self.importance):
                _need(out, gamma > 0, f"{at}.importance[{i}]", gamma, "a number > 0")
        _need(out, self.top_k == "all" or 1 <= self.top_k and (num_experts is None or self.top_k <= num_experts),
              f"{at}.top_k", self.top_k, f'an int in 1..{num_experts or "N"} or "all"')
        return out + self.losses.problems(f"{at}.losses")


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
            _need(out, value is None or value >= 1, f"{at}.{name}", value, "an int >= 1")
        sizes_ok = not out  # the rules below need positive sizes
        _need(out, 0 <= self.zero_stage <= 3, f"{at}.zero_stage", self.zero_stage, "an int in 0..3")
        if not sizes_ok:
            return out
        _need(out, self.pp == 1 or self.zero_stage <= 1, f"{at}.pp", self.pp,
              f"pipeline parallelism needs zero_stage <= 1 (got {self.zero_stage}): "
              "DeepSpeed's pipeline engine refuses ZeRO-2/3")
        if self.world_size is not None:
            return out + self._layout_problems(at)
        _need(out, self.dp is None or self.dp % self.ep == 0, f"{at}.ep", self.ep,
              f"must divide dp ({self.dp}): expert-parallel ranks are carved out of the data-parallel ranks")
        return out

    def _layout_problems(self, at: str) -> list[str]:
        """What stops this layout from tiling `world_size` ranks; empty when it fits."""
        world_size, mp = self.world_size, self.tp * self.pp
        if world_size % mp:
            return [f"{at}: tp({self.tp}) x pp({self.pp}) = {mp} does not divide world size {world_size}"]
        dp, out = world_size // mp, []
        _need(out, self.dp in (None, dp), f"{at}.dp", self.dp,
              f"world size {world_size} / (tp {self.tp} x pp {self.pp}) gives dp {dp}")
        _need(out, dp % self.ep == 0, f"{at}.ep", self.ep,
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

    def problems(self, at: str, names: list[str] | None) -> list[str]:
        """`names` is None when experts.names is itself broken: skip matching the task keys to it."""
        out: list[str] = []
        missing = [n for n in names or [] if n not in self.tasks]
        _need(out, not missing, f"{at}.tasks", sorted(self.tasks),
              f"one entry per expert; missing: {', '.join(missing)}")
        for name, sources in self.tasks.items():
            _need(out, names is None or name in names, f"{at}.tasks.{name}", name,
                  f"not an expert; experts.names is {', '.join(names or [])}")
            _need(out, bool(sources), f"{at}.tasks.{name}", sources, "at least one data source")
            for i, src in enumerate(sources):
                _need(out, src.path.removeprefix("hub:").strip() != "", f"{at}.tasks.{name}[{i}].path", src.path,
                      "a file path or hub:NAME")
                _need(out, src.max_rows is None or src.max_rows >= 1, f"{at}.tasks.{name}[{i}].max_rows",
                      src.max_rows, "an int >= 1 or null")
        _need(out, self.max_seq_len >= 8, f"{at}.max_seq_len", self.max_seq_len, "an int >= 8")
        _need(out, 0 <= self.heldout_fraction <= 0.5, f"{at}.heldout_fraction", self.heldout_fraction,
              "a number in [0, 0.5]")
        for name, sources in self.heldout.items():
            _need(out, name in self.tasks, f"{at}.heldout.{name}", name,
                  f"not a task; data.tasks has {', '.join(sorted(self.tasks))}")
            _need(out, bool(sources), f"{at}.heldout.{name}", sources, "at least one data source")
        _need(out, self.pairs_per_prompt >= 1, f"{at}.pairs_per_prompt", self.pairs_per_prompt, "an int >= 1")
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
            _need(out, getattr(self, name) >= 1, f"{at}.{name}", getattr(self, name), "an int >= 1")
        _need(out, self.lr > 0, f"{at}.lr", self.lr, "a number > 0")
        warmup_ok = self.warmup_steps >= 0 and (self.steps < 1 or self.warmup_steps < self.steps)
        _need(out, warmup_ok, f"{at}.warmup_steps", self.warmup_steps, f"an int >= 0 and < steps ({self.steps})")
        _need(out, self.weight_decay >= 0, f"{at}.weight_decay", self.weight_decay, "a number >= 0")
        _need(out, self.grad_clip >= 0, f"{at}.grad_clip", self.grad_clip, "a number >= 0 (0 turns clipping off)")
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

    def for_expert(self, name: str) -> "Stage1Config":
        """This stage's settings as expert `name` trains: its own step count where one is given."""
        return replace(self, steps=self.steps_per_expert.get(name, self.steps), steps_per_expert={})

    def problems(self, at: str) -> list[str]:
        out = super().problems(at)
        for name, steps in self.steps_per_expert.items():
            _need(out, isinstance(steps, int) and steps > self.warmup_steps and steps >= 1,
                  f"{at}.steps_per_expert.{name}", steps, f"an int >= 1 and > warmup_steps ({self.warmup_steps})")
        _need(out, self.beta > 0, f"{at}.beta", self.beta, "a number > 0")
        _need(out, 0 <= self.label_smoothing < 0.5, f"{at}.label_smoothing", self.label_smoothing,
              "a number in [0, 0.5)")
        _need(out, self.simpo_gamma >= 0, f"{at}.simpo_gamma", self.simpo_gamma, "a number >= 0")
        _need(out, self.cpo_alpha >= 0, f"{at}.cpo_alpha", self.cpo_alpha, "a number >= 0")
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

    def problems(self, at: str) -> list[str]:
        out = self.stage1.problems(f"{at}.stage1") + self.stage2.problems(f"{at}.stage2")
        for name in ("checkpoint_every", "keep_last", "log_every"):
            _need(out, getattr(self, name) >= 1, f"{at}.{name}", getattr(self, name), "an int >= 1")
        _need(out, self.peak_tflops is None or self.peak_tflops > 0, f"{at}.peak_tflops", self.peak_tflops,
              "the GPU's peak TFLOP/s (> 0, bf16 dense), or null to take it from the GPU's name")
        _need(out, self.max_skipped_steps >= 0, f"{at}.max_skipped_steps", self.max_skipped_steps,
              "an int >= 0 (0: never stop on skipped steps)")
        return out


@dataclass
class OutputConfig:
    dir: str = "runs/trinityx"
    tensorboard: bool = True

    def problems(self, at: str) -> list[str]:
        out: list[str] = []
        _need(out, bool(self.dir), f"{at}.dir", self.dir, "a non-empty folder path")
        return out


@dataclass
class RunConfig:
    name: str = "trinityx"
    seed: int = 1234
    model: ModelConfig = field(default_factory=ModelConfig)
    experts: ExpertsConfig = field(default_factory=ExpertsConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def problems(self) -> list[str]:
        """Every rule this config breaks that needs no file system; empty when none."""
        out: list[str] = []
        _need(out, bool(self.name), "name", self.name, "a non-empty run name")
        _need(out, self.seed >= 0, "seed", self.seed, "an int >= 0")
        experts, par = self.experts.problems("experts"), self.parallel
        names = None if any(p.startswith("experts.names") for p in experts) else self.experts.names
        out += self.model.problems("model") + experts
        out += self.router.problems("router", None if names is None else len(names)) + par.problems("parallel")
        out += self.data.problems("data", names) + self.train.problems("train") + self.output.problems("output")
        for name in self.train.stage1.steps_per_expert if names else ():
            _need(out, name in names, f"train.stage1.steps_per_expert.{name}", name,
                  f"not an expert; experts.names is {', '.join(names)}")
        for name in names or []:
            if self.experts.objective_of(name) in PREFERENCE_OBJECTIVES:
                plain = [f"data.tasks.{name}[{i}]" for i, src in enumerate(self.data.tasks.get(name, []))
                         if src.format not in PAIR_FORMATS]
                _need(out, not plain, f"experts.objective.{name}", self.experts.objective_of(name),
                      f"needs preference pairs: {', '.join(plain)} "
                      f"{'has a format' if len(plain) == 1 else 'have formats'} without them "
                      f"(pairs come from {', '.join(PAIR_FORMATS)})")
        if par.ep > 1:
            _need(out, self.experts.kind == "full", "parallel.ep", par.ep,
                  "expert parallelism needs experts.kind: full (LoRA experts are replicated on every rank)")
            _need(out, names is None or len(names) % par.ep == 0, "parallel.ep", par.ep,
                  f"must divide the number of experts ({len(self.experts.names)})")
        return out
