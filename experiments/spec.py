"""The experiment recipe: a base recipe per stage, factors whose levels override it, seeds, evaluations, metrics.

An experiment is the product of its factors' levels (the arms) times its seeds. Each level carries overrides for
the stages it changes (``data``, ``pretrain``, and per evaluation ``evals.<name>``). One factor may name a
``control`` level: every other arm is then compared, seed by seed, with the arm that differs from it only in that
factor (the paired difference). A level's ``x`` (a number, e.g. the data fraction) puts the factor on the x axis of
the plots. Loaded with the project's config system, so a wrong key or type is reported with its dotted name.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from pathlib import Path
from typing import Any, Literal

from launch.config import ConfigError, load_config

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


@dataclasses.dataclass
class DataSpec:
    """The synthetic set the arms train on (``python -m data_prep synthetic``), built once per distinct recipe."""

    config: str = "configs/data_prep/synthetic.yaml"
    overrides: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class StageSpec:
    """The pretraining stage: recipe, overrides, processes (``{data}`` and ``{train_shards}`` are filled in)."""

    config: str = ""
    overrides: list[str] = dataclasses.field(default_factory=list)
    nproc: int = 2


@dataclasses.dataclass
class EvalSpec:
    """An evaluation after pretraining: ``python -m finetune`` (``--eval-only`` or a fine-tuning run).

    ``metrics_from`` is the key of ``results.json``'s ``splits`` the metrics are read from (``test``, ``val_best``).
    With ``init_from_pretrain`` the model is the pretrained run (``model.name`` and ``model.init`` are set, the
    rest of the model section is inherited from the run); else the recipe's own ``model.init`` stays.
    """

    name: str = ""
    config: str = ""
    eval_only: bool = True
    overrides: list[str] = dataclasses.field(default_factory=list)
    metrics_from: str = "test"
    nproc: int = 1
    init_from_pretrain: bool = True
    # "finetune" for retrieval and the downstream heads; "finetune.tasks.classification" sweeps policies
    module: str = "finetune"


@dataclasses.dataclass
class Level:
    name: str = ""
    x: float | None = None
    data: list[str] = dataclasses.field(default_factory=list)
    pretrain: list[str] = dataclasses.field(default_factory=list)
    evals: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    pretrain_config: str | None = None  # another pretrain recipe for this level (e.g. one per model)


@dataclasses.dataclass
class Factor:
    name: str = ""
    levels: list[Level] = dataclasses.field(default_factory=list)
    control: str | None = None
    # the trend of the paired difference along this factor's x is fitted on log10(x) (data fractions, sizes)
    log_x: bool = False


@dataclasses.dataclass
class Comparison:
    """A paired difference between two levels of the control factor other than against the control: "alpha 0
    vs the default alpha", "style vs traditional". Each arm at ``level`` is paired, seed by seed, with the arm
    that differs from it only in having ``vs`` there."""

    level: str = ""
    vs: str = ""


@dataclasses.dataclass
class Curve:
    """A per-step series of every run (a JSON-lines log of one stage), drawn per arm as the mean over seeds."""

    stage: str = ""  # "pretrain" or an evaluation's name: the folder of the run that wrote the log
    key: str = ""  # the field plotted, e.g. top1 (eval.jsonl), train_top1 or loss (metrics.jsonl)
    file: str = "eval.jsonl"


@dataclasses.dataclass
class Requirement:
    """A file the experiment cannot run without (a trained style network, pretrained weights) and how to make it."""

    path: str = ""
    what: str = ""
    make: str = ""
    # safetensors header values that mean the file is not what is needed, e.g. {vgg_weights: random}: a style
    # network trained against a random loss network has learnt no style space
    refuse_metadata: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class ExperimentSpec:
    name: str = ""
    claim: str = ""  # the paper's claim this experiment tests, for the report
    description: str = ""
    out: str = "runs/experiments"  # run folders: <out>/<name>/<arm>/seed<S>/<stage>
    results: str = "experiments/results"  # report: <results>/<name>/
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0, 1, 2])
    data: DataSpec | None = None
    pretrain: StageSpec | None = None
    evals: list[EvalSpec] = dataclasses.field(default_factory=list)
    factors: list[Factor] = dataclasses.field(default_factory=list)
    # "<eval name>.<metric key>", or "<a> - <b>": a per-run difference of two of them (a generalisation gap)
    metrics: list[str] = dataclasses.field(default_factory=list)
    lower_is_better: list[str] = dataclasses.field(default_factory=list)  # metrics where a decrease is better
    # paired differences between two treated levels of the control factor, beside those against the control
    comparisons: list[Comparison] = dataclasses.field(default_factory=list)
    curves: list[Curve] = dataclasses.field(default_factory=list)  # training curves for the report
    # a factor whose levels are averaged per seed (Office-31's "Avg" over the transfer tasks), reported beside
    # the per-level tables: the seed stays the unit of replication, the interval is over seeds
    average_over: str | None = None
    launcher: Literal["local", "slurm"] = "local"
    slurm: list[str] = dataclasses.field(default_factory=list)  # launch overrides (configs/launch keys)
    requires: list[Requirement] = dataclasses.field(default_factory=list)
    gpu_recipe: str = ""  # the experiment at full size, for the report (the commands, or a recipe path)
    # false: once a run's every stage is done, delete its stages' checkpoints/ (~4x the weights each)
    # where a .safetensors copy of the weights sits beside them; results, logs and TensorBoard stay
    keep_checkpoints: bool = True

    def validate(self, recipe: Any) -> None:
        if not _NAME_RE.match(self.name):
            raise ConfigError(f"name: {self.name!r} must be a file-name-safe word (letters, digits, _ . + -)")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds: a non-empty list of distinct seeds, got {self.seeds}")
        if not self.evals:
            raise ConfigError("evals: at least one evaluation is needed to have something to compare")
        names = [e.name for e in self.evals]
        for i, ev in enumerate(self.evals):
            if not _NAME_RE.match(ev.name) or names.count(ev.name) > 1:
                raise ConfigError(f"evals[{i}].name: {ev.name!r} must be a unique file-name-safe word")
            if not ev.config:
                raise ConfigError(f"evals[{i}].config: the fine-tune recipe is required")
            if ev.init_from_pretrain and self.pretrain is None:
                raise ConfigError(f"evals[{i}].init_from_pretrain: there is no pretrain stage to start from")
        if self.pretrain is not None and not self.pretrain.config:
            raise ConfigError("pretrain.config: the pretrain recipe is required (or drop the pretrain section)")
        if not self.factors:
            raise ConfigError("factors: at least one factor with at least one level")
        for i, f in enumerate(self.factors):
            if not f.levels:
                raise ConfigError(f"factors[{i}].levels: empty")
            lnames = [lv.name for lv in f.levels]
            for j, lv in enumerate(f.levels):
                if not _NAME_RE.match(lv.name) or lnames.count(lv.name) > 1:
                    raise ConfigError(f"factors[{i}].levels[{j}].name: {lv.name!r} must be a unique file-name word")
                unknown = sorted(set(lv.evals) - set(names))
                if unknown:
                    raise ConfigError(f"factors[{i}].levels[{j}].evals: {unknown} are not among evals {names}")
                if lv.data and self.data is None:
                    raise ConfigError(f"factors[{i}].levels[{j}].data: the experiment has no data section")
                if (lv.pretrain or lv.pretrain_config) and self.pretrain is None:
                    raise ConfigError(f"factors[{i}].levels[{j}].pretrain: the experiment has no pretrain section")
            if f.log_x and any(lv.x is None or lv.x <= 0 for lv in f.levels):
                raise ConfigError(f"factors[{i}].log_x: every level needs an x > 0 to take its logarithm")
            if f.control is not None and f.control not in lnames:
                raise ConfigError(f"factors[{i}].control: {f.control!r} is not one of its levels {lnames}")
        if sum(f.control is not None for f in self.factors) > 1:
            raise ConfigError("factors: at most one factor names a control level (the one the arms are paired on)")
        for i, m in enumerate(self.metrics):
            for operand in metric_operands(m):
                ev, _, key = operand.partition(".")
                if ev not in names or not key:
                    raise ConfigError(
                        f"metrics[{i}]: {operand!r} must be '<eval name>.<metric>' with an eval among {names} "
                        "(or '<a> - <b>' of two such)"
                    )
        if not self.metrics:
            raise ConfigError("metrics: name at least one '<eval name>.<metric>' to compare")
        stages = [*names, *(["pretrain"] if self.pretrain is not None else [])]
        for i, c in enumerate(self.curves):
            if c.stage not in stages or not c.key or not c.file:
                raise ConfigError(f"curves[{i}]: stage {c.stage!r} must be one of {stages}, with a key and a file")
        if self.average_over is not None:
            ctrl = next((f.name for f in self.factors if f.control is not None), None)
            if self.average_over not in [f.name for f in self.factors] or self.average_over == ctrl:
                raise ConfigError(
                    f"average_over: {self.average_over!r} must name a factor other than the control factor "
                    f"({[f.name for f in self.factors if f.name != ctrl]})"
                )
        ctrl_factor = next((f for f in self.factors if f.control is not None), None)
        for i, c in enumerate(self.comparisons):
            if ctrl_factor is None:
                raise ConfigError(f"comparisons[{i}]: pairs levels of the control factor, and no factor names one")
            lnames = [lv.name for lv in ctrl_factor.levels]
            if c.level not in lnames or c.vs not in lnames or c.level == c.vs:
                raise ConfigError(f"comparisons[{i}]: level {c.level!r} and vs {c.vs!r} must be two different levels "
                                  f"of the control factor {ctrl_factor.name!r} ({lnames})")  # fmt: skip
        stray = [m for m in self.lower_is_better if m not in self.metrics]
        if stray:
            raise ConfigError(f"lower_is_better: {stray[0]!r} is not one of metrics {self.metrics}")


@dataclasses.dataclass(frozen=True)
class Arm:
    """One combination of levels: ``levels`` maps factor name -> level."""

    levels: tuple[tuple[str, Level], ...]

    @property
    def name(self) -> str:
        return "__".join(f"{f}-{lv.name}" for f, lv in self.levels)

    @property
    def label(self) -> str:
        return ", ".join(f"{f}={lv.name}" for f, lv in self.levels)

    def level(self, factor: str) -> Level:
        return dict(self.levels)[factor]

    def pretrain_config(self, default: str) -> str:
        """The pretrain recipe: the last level that names one, else the experiment's."""
        chosen = [lv.pretrain_config for _, lv in self.levels if lv.pretrain_config]
        return chosen[-1] if chosen else default

    def overrides(self, stage: str) -> list[str]:
        out: list[str] = []
        for _, lv in self.levels:
            if stage == "data":
                out += lv.data
            elif stage == "pretrain":
                out += lv.pretrain
            else:
                out += lv.evals.get(stage, [])
        return out


def metric_operands(metric: str) -> list[str]:
    """``["ev.key"]`` for a plain metric, ``["ev.a", "ev2.b"]`` for the difference ``"ev.a - ev2.b"``."""
    parts = [p.strip() for p in metric.split(" - ")]
    return parts if len(parts) <= 2 else [metric]  # three operands: left whole, so validation names it


def arms(spec: ExperimentSpec) -> list[Arm]:
    """Every combination of the factors' levels, in the recipe's order (first factor slowest)."""
    combos = itertools.product(*[[(f.name, lv) for lv in f.levels] for f in spec.factors])
    return [Arm(tuple(c)) for c in combos]


def control_factor(spec: ExperimentSpec) -> Factor | None:
    return next((f for f in spec.factors if f.control is not None), None)


def control_of(spec: ExperimentSpec, arm: Arm) -> Arm | None:
    """The arm ``arm`` is paired with: same levels except the control factor's, which is the control level."""
    factor = control_factor(spec)
    if factor is None or factor.control is None or arm.level(factor.name).name == factor.control:
        return None
    return swap_level(spec, arm, factor.control)


def swap_level(spec: ExperimentSpec, arm: Arm, level: str) -> Arm:
    """``arm`` with the control factor at ``level`` (the arm it is paired with in a comparison)."""
    factor = control_factor(spec)
    assert factor is not None
    lv = next(x for x in factor.levels if x.name == level)
    return Arm(tuple((f, lv if f == factor.name else old) for f, old in arm.levels))


def load_spec(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentSpec:
    """The validated experiment recipe (``key=value`` overrides apply, e.g. ``seeds=[0]``)."""
    return load_config(ExperimentSpec, path, list(overrides), check_paths=False)
