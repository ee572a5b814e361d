"""The typed description of one run: one dataclass per YAML section, and the run that holds them.

Each section states its own invariants in `problems()`, which collects every broken rule as a
one-line `<dotted.key>: <value> — <what is allowed>` instead of raising at the first, so a user
fixes a whole recipe in one pass, long before a process group or a model exists. Types and
enums are enforced by the loader from the annotations; file-system and model-shape checks live
in `load.py` because they need the YAML file's folder.

The sections live by what they describe: the model's (`model`, `experts`, `router`) in
sections_model.py, the run's (`parallel`, `data`, `train`, `output`) in sections_run.py, the
problem wording in rules.py. `RunConfig` stays here with the rules that span sections, and this
module re-exports every name of those modules that callers import from `config.schema`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from trinityx_ds.config.families import SUPPORTED_MODEL_TYPES  # re-exported: one list, families.py
from trinityx_ds.config.rules import ConfigError, need, problem
from trinityx_ds.config.sections_model import (PREFERENCE_OBJECTIVES, RECOMPUTE, ExpertsConfig, LoraConfig, MlpProj,
                                               ModelConfig, Objective, Recompute, RouterConfig, RouterLossConfig,
                                               recompute_mode)
from trinityx_ds.config.sections_run import (PAIR_FORMATS, DataConfig, DataFormat, DataSource, OutputConfig,
                                             ParallelConfig, Stage1Config, StageConfig, TrainConfig)

__all__ = ["PAIR_FORMATS", "PREFERENCE_OBJECTIVES", "RECOMPUTE", "SUPPORTED_MODEL_TYPES", "ConfigError", "DataConfig",
           "DataFormat", "DataSource", "ExpertsConfig", "LoraConfig", "MlpProj", "ModelConfig", "Objective",
           "OutputConfig", "ParallelConfig", "Recompute", "RouterConfig", "RouterLossConfig", "RunConfig",
           "Stage1Config", "StageConfig", "TrainConfig", "problem", "recompute_mode"]



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
        need(out, bool(self.name), "name", self.name, "a non-empty run name")
        need(out, self.seed >= 0, "seed", self.seed, "an int >= 0")
        experts, par = self.experts.problems("experts"), self.parallel
        names = None if any(p.startswith("experts.names") for p in experts) else self.experts.names
        out += self.model.problems("model") + experts
        out += self.router.problems("router", None if names is None else len(names)) + par.problems("parallel")
        out += self.data.problems("data", names) + self.train.problems("train") + self.output.problems("output")
        for name in self.train.stage1.steps_per_expert if names else ():
            need(out, name in names, f"train.stage1.steps_per_expert.{name}", name,
                 f"not an expert; experts.names is {', '.join(names)}")
        for name in names or []:
            if self.experts.objective_of(name) in PREFERENCE_OBJECTIVES:
                plain = [f"data.tasks.{name}[{i}]" for i, src in enumerate(self.data.tasks.get(name, []))
                         if src.format not in PAIR_FORMATS]
                need(out, not plain, f"experts.objective.{name}", self.experts.objective_of(name),
                     f"needs preference pairs: {', '.join(plain)} "
                     f"{'has a format' if len(plain) == 1 else 'have formats'} without them "
                     f"(pairs come from {', '.join(PAIR_FORMATS)})")
        if par.ep > 1:
            need(out, self.experts.kind == "full", "parallel.ep", par.ep,
                 "expert parallelism needs experts.kind: full (LoRA experts are replicated on every rank)")
            need(out, names is None or len(names) % par.ep == 0, "parallel.ep", par.ep,
                 f"must divide the number of experts ({len(self.experts.names)})")
        return out
