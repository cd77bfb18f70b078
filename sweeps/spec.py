"""The sweep file: its schema and its validation.

A sweep file is YAML, read with `yaml.safe_load`. Every section forbids unknown keys; every
mistake becomes one `UserInputError` naming the field (e.g. ``grid[1].ratio[0]``) and what is
allowed, before anything is started or written. Method names and their options are checked
against the registry of `compression.methods` (a method's options are its config's fields).
What the sweep runs (its trials) is `sweeps.trials`.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from compression.allocation import ALLOCATIONS
from compression.errors import UserInputError
from compression.methods import MethodConfig, method_config, registered
from sweeps.recipes import HealingSettings, TrainLayers, check_block, check_values, grid_sets, largest
from sweeps.section import PosInt, Section, check_source
from sweeps.spec_data import TASK_MODELS, Calibration, CausalLMTask, ClassificationTask, TrainSettings
from sweeps.spec_outputs import FinalEval, Tracking
from sweeps.spec_run import Checkpoints, Latency, Limits, Resources
from sweeps.storage import check_storage_string
from trainables.finetune import identity_settings

# Allocations a sweep file may list: those of `compression.allocation` except "explicit" (what
# Optuna drives internally), plus "optuna" (needs an `optuna` section).
GRID_ALLOCATIONS = tuple(a for a in ALLOCATIONS if a != "explicit") + ("optuna",)

NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]*"


class Refit(Section):
    """Propagated refitting (`compression.refit`): after compressing, every compressed layer is
    refitted at its rank to the dense model's outputs from the inputs the compressed blocks before
    it give, block by block on the calibration batches. `dense`: also refit the layers left dense
    (and pruned MLPs' down projections) by least squares; `damp`: ridge toward the layer's current
    weight, relative to the mean diagonal of its input Gram."""

    dense: bool = False
    damp: float = Field(0.0, ge=0)


class GridBlock(Section):
    """One block of the grid: the product of its lists. `options` maps a method option (a field of
    the method's config, e.g. whiten-fd's `alpha`) to the values to try; every method of the
    block must have each option. `refit` switches the refit stage on for the block's trials.
    `finetune` maps finetune settings to values (`sweeps.recipes`)."""

    method: list[str] = Field(min_length=1)
    ratio: list[float] = Field(min_length=1)
    allocation: list[str] | None = Field(None, min_length=1, description="default: [uniform], or [optuna] in an Optuna sweep")
    options: dict[str, list[Any]] = Field(default_factory=dict)
    refit: Refit | None = None
    finetune: dict[str, Any] = Field(default_factory=dict, description="finetune settings to try (lists)")

    _finetune = field_validator("finetune")(lambda v: check_values(v))

    @field_validator("method")
    @classmethod
    def _methods(cls, v: list[str]) -> list[str]:
        known = registered()
        for m in v:
            if m not in known:
                raise ValueError(f"unknown method {m!r}; allowed: {', '.join(known)}")
        return _unique(v)

    @field_validator("ratio")
    @classmethod
    def _ratios(cls, v: list[float]) -> list[float]:
        for r in v:
            if not 0 < r < 1:
                raise ValueError(f"ratio {r} is outside (0, 1): it is the fraction of the targeted "
                                 f"parameters removed, e.g. 0.2 or 0.4")
        return _unique(v)

    @field_validator("allocation")
    @classmethod
    def _allocations(cls, v: list[str] | None) -> list[str] | None:
        for a in v or ():
            if a not in GRID_ALLOCATIONS:
                raise ValueError(f"unknown allocation {a!r}; allowed: {', '.join(GRID_ALLOCATIONS)}")
        return v if v is None else _unique(v)

    @field_validator("options")
    @classmethod
    def _option_lists(cls, v: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for name, values in v.items():
            if not values:
                raise ValueError(f"options.{name}: give at least one value")
        return {name: _unique(values) for name, values in v.items()}

    @model_validator(mode="after")
    def _options_fit(self):
        self.method_configs()  # every method takes every option value (raises naming it)
        for method in self.method:
            allowed = registered()[method].allocations
            bad = [a for a in self.allocation or ["uniform"] if allowed is not None and a not in allowed]
            if bad:
                raise ValueError(f"allocation: method {method!r} allows only {', '.join(allowed)}, got "
                                 f"{', '.join(bad)}")
        return self

    def option_sets(self) -> list[dict]:
        """Every combination of the option values (one empty set without options)."""
        names = list(self.options)
        return [dict(zip(names, values)) for values in itertools.product(*(self.options[n] for n in names))]

    def method_configs(self) -> list[MethodConfig]:
        """The distinct method configs of the block (methods x option sets; equal configs once)."""
        configs: dict[str, MethodConfig] = {}
        for method in self.method:
            for options in self.option_sets():
                try:
                    config = method_config(method, **options)
                except UserInputError as e:
                    raise ValueError(f"options: {e}") from None
                configs.setdefault(config.key, config)
        return list(configs.values())

    def combinations(self) -> list[dict]:
        """{"method", "ratio", "allocation", "options", "finetune"} of every grid point, in file order
        (options: the method's non-default options, so equal configs are one point; finetune: the
        settings this point gives, over the sweep's `finetune` section)."""
        out = []
        for method, ratio, allocation in itertools.product(self.method, self.ratio, self.allocation or ["uniform"]):
            for options in self.option_sets():
                config = method_config(method, **options)
                out += [{"method": method, "ratio": ratio, "allocation": allocation, "options": config.options(),
                         "refit": None if self.refit is None else self.refit.model_dump(), "finetune": finetune}
                        for finetune in grid_sets(self.finetune)]
        return out


class Optuna(Section):
    """Optuna searches per-group ratios (rescaled to the budget `grid.ratio`).

    Every grid list with several values becomes a categorical choice of the study. With a single
    objective the budget must be one ratio (metrics at different budgets do not compare); with
    ["metric", "size"] Optuna also picks the budget and searches the Pareto front.
    """

    trials: PosInt
    granularity: Literal["block", "role", "matrix"] = "block"
    bounds: tuple[float, float] = (0.0, 0.9)
    sampler: Literal["tpe", "random", "nsga2"] = "tpe"
    objective: str | list[str] = Field("metric", description='"metric", or [metric, size] (multi-objective)')
    seed: int | None = Field(None, description="default: the sweep seed")

    @field_validator("bounds")
    @classmethod
    def _bounds(cls, v: tuple[float, float]) -> tuple[float, float]:
        lo, hi = v
        if not 0 <= lo < hi < 1:
            raise ValueError(f"bounds [{lo}, {hi}] must satisfy 0 <= lo < hi < 1 (fractions removed per group)")
        return v

    @field_validator("objective")
    @classmethod
    def _objective(cls, v: str | list[str]) -> str | list[str]:
        if v not in ("metric", ["metric", "size"]):
            raise ValueError(f"{v!r} is not an objective; allowed: metric (the task metric alone) or "
                             f"[metric, size] (the Pareto front of metric and model size)")
        return v

    @property
    def multi(self) -> bool:
        return self.objective != "metric"


class EarlyStopping(Section):
    """ASHA on the finetuning curve (rungs counted in evaluations)."""

    grace_period: PosInt = 1
    reduction_factor: float = Field(2.0, gt=1)


class Finetune(TrainSettings, HealingSettings):
    eval_every: int = Field(0, ge=0, description="steps between evaluations during finetuning; 0 = at the end only")
    train: TrainLayers = Field(
        "all", description="all parameters, those of the layers the method replaced (compressed), or a list of roles")
    early_stopping: EarlyStopping | None = None


# Sections that do not change any result: left out of the sweep hash and of the trial ids.
NOT_RESULTS = ("name", "storage", "resources", "latency", "checkpoints", "limits", "final_eval", "tracking")


class SweepSpec(Section):
    name: str
    model: str
    task: Annotated[CausalLMTask | ClassificationTask, Field(discriminator="type")]
    calibration: Calibration = Calibration()
    grid: list[GridBlock] = Field(description="one block or a list of blocks: the union of their products")
    optuna: Optuna | None = None
    finetune: Finetune = Finetune()
    resources: Resources = Resources()
    latency: Latency = Latency()
    checkpoints: Checkpoints = Checkpoints()
    limits: Limits = Limits()
    final_eval: FinalEval | None = None
    tracking: Tracking | None = None
    storage: str = "results"
    seed: int = 0

    _model = field_validator("model")(lambda v: check_source(v, "model"))
    _storage = field_validator("storage")(lambda v: check_storage_string(v, what=""))

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.fullmatch(NAME_PATTERN, v):
            raise ValueError(f"{v!r} is not a usable name (it names a folder): use letters, digits, '.', '_' "
                             f"and '-', starting with a letter or digit")
        return v

    @field_validator("task", mode="before")
    @classmethod
    def _task_type(cls, v):
        if isinstance(v, dict) and v.get("type") not in TASK_MODELS:
            raise ValueError(f"type {v.get('type')!r} is not a task; allowed: {', '.join(TASK_MODELS)}")
        return v

    @field_validator("grid", mode="before")
    @classmethod
    def _grid(cls, v):
        if v is None or v == [] or v == {}:
            raise ValueError("the grid is empty: give a block with `method` and `ratio` lists (or a list of blocks)")
        return [v] if isinstance(v, dict) else v

    @model_validator(mode="after")
    def _consistent(self):
        kind = "text" if self.task.type == "causal-lm" else "labelled"
        if self.calibration.source is not None:
            try:
                check_source(self.calibration.source, kind)
            except ValueError as e:
                raise _at(("calibration", "source"), str(e)) from None
        cal = self.calibration_settings()
        if self.task.type == "causal-lm":
            shared = {self.task.eval, self.task.train or cal["source"]}
            if cal["source"] in shared and cal["seq_len"] != self.task.seq_len:
                raise _at(("calibration", "seq_len"),
                          f"{cal['seq_len']} differs from task.seq_len {self.task.seq_len}, but "
                          f"{cal['source']} feeds both; windows of one source share one length")
        allocations = {a for block in self.grid for a in block.allocation or ()}
        if self.optuna is None and "optuna" in allocations:
            raise _at(("grid", "allocation"), "allocation 'optuna' needs an `optuna` section")
        if self.optuna is not None:
            other = sorted(allocations - {"optuna"})
            if other:
                raise _at(("grid", "allocation"),
                          f"{other} cannot run with an `optuna` section: Optuna drives the allocation "
                          f"('optuna'); list only that (or leave allocation out), and run other "
                          f"allocations in a separate sweep")
            if len(self.grid) != 1:
                raise _at(("grid",), "an Optuna sweep takes one grid block (its lists become Optuna's choices)")
            if not self.optuna.multi and len(self.grid[0].ratio) != 1:
                raise _at(("grid", "ratio"),
                          f"a single-objective Optuna study needs one budget, got {self.grid[0].ratio}; "
                          f"use objective [metric, size] to search several budgets")
        if self.final_eval is not None and self.task.type != "causal-lm":
            raise _at(("final_eval",), "lm-eval tasks and perplexity need a causal-lm sweep; score exported "
                                       "classifiers with `lrsweep evaluate MODEL --labelled SOURCE`")
        if self.final_eval is not None and largest(self, "steps") and not self.checkpoints.keep:
            raise _at(("final_eval",), "evaluates the trials' finetuned weights, which checkpoints.keep: 0 "
                                       "deletes; keep at least 1")
        if self.finetune.early_stopping is not None and not (largest(self, "steps") and self.finetune.eval_every):
            raise _at(("finetune", "early_stopping"),
                      "needs finetune.steps > 0 and finetune.eval_every > 0 (ASHA stops on the finetuning curve)")
        for i, block in enumerate(self.grid):
            check_block(block.finetune, self.finetune, self.optuna is not None, f"grid[{i}].finetune")
        return self

    # -- derived views -------------------------------------------------------------------------

    @property
    def metric_mode(self) -> str:
        return "min" if self.task.type == "causal-lm" else "max"

    def calibration_settings(self) -> dict:
        """The calibration section with defaults filled in (what the statistics depend on)."""
        task = self.task
        default_source = task.eval if task.type == "causal-lm" else task.train
        default_len = task.seq_len if task.type == "causal-lm" else task.max_length
        c = self.calibration
        settings = {"source": c.source or default_source, "samples": c.samples,
                    "seq_len": c.seq_len or default_len, "batch_size": c.batch_size,
                    "seed": self.seed if c.seed is None else c.seed}
        if c.fisher != "empirical":  # only when set, so the keys and trial ids of other sweeps stay
            settings |= {"fisher": c.fisher, "fisher_samples": c.fisher_samples}
        return settings

    def task_settings(self) -> dict:
        task = self.task.model_dump(mode="json")
        if self.task.type == "causal-lm":
            task["train"] = task["train"] or self.calibration_settings()["source"]
        else:
            task["eval"] = task["eval"] or task["train"]
        return task

    def finetune_settings(self) -> dict:
        """Keyword arguments of `trainables.finetune.FinetuneConfig` plus `train` (which parameters)."""
        f = self.finetune.model_dump(mode="json", exclude={"early_stopping"})
        if self.task.type == "classification":
            f["max_length"] = self.task.max_length
        f["seed"] = self.seed
        return f

    @property
    def spec_hash(self) -> str:
        """Identity of the sweep: everything that changes results (not name, storage, resources,
        latency, checkpoints or limits)."""
        return _hash(_stable_body(self.model_dump(mode="json", exclude=set(NOT_RESULTS))))


# Grid-block keys added after sweeps were first hashed, left out of the hash while empty.
LATER_BLOCK_KEYS = ("finetune", "refit")
# Calibration settings added after sweeps were first hashed, left out of the hash at these defaults.
LATER_CALIBRATION_DEFAULTS = {"fisher": "empirical", "fisher_samples": 1}


def _stable_body(body: dict) -> dict:
    """The dumped sweep settings with what later versions added left out where it holds its
    defaults (healing settings, a block's finetune values and refit, the calibration's Fisher
    settings), so sweeps written before keep their hash."""
    body = dict(body)
    if "finetune" in body:
        body["finetune"] = identity_settings(body["finetune"])
    if "calibration" in body:
        body["calibration"] = {k: v for k, v in body["calibration"].items()
                               if LATER_CALIBRATION_DEFAULTS.get(k, object()) != v}
    body["grid"] = [{k: v for k, v in block.items() if k not in LATER_BLOCK_KEYS or v} for block in body["grid"]]
    return body


def _unique(values: list) -> list:
    return list(dict.fromkeys(values))


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _at(loc: tuple, message: str) -> ValueError:
    return ValueError(f"{'.'.join(map(str, loc))}: {message}")


# -- loading ------------------------------------------------------------------------------------


def parse_spec(data: Any, origin: str = "sweep file") -> SweepSpec:
    """Validate a mapping (parsed YAML) into a SweepSpec; errors name the field and what is allowed."""
    if not isinstance(data, dict):
        raise UserInputError(f"{origin}: expected a mapping of sections (name, model, task, grid, ...), "
                             f"got {type(data).__name__}")
    try:
        return SweepSpec.model_validate(data)
    except ValidationError as e:
        raise UserInputError(f"{origin}: " + "; ".join(_describe(err) for err in e.errors())) from None


def _describe(err: dict) -> str:
    loc = _loc(err["loc"])
    if err["type"] == "extra_forbidden":
        return f"unknown key {loc!r}; allowed: {', '.join(_section(err['loc'][:-1]).model_fields)}"
    if err["type"] == "missing":
        return f"{loc}: missing (required)"
    msg = err["msg"].removeprefix("Value error, ")
    return f"{loc}: {msg}" if loc else msg  # model validators name their field themselves


def _loc(loc: tuple) -> str:
    """("grid", 1, "ratio", 0) -> "grid[1].ratio[0]"; drops pydantic's union tags."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part not in TASK_MODELS:
            out += ("." if out else "") + str(part)
    return out


def _section(loc: tuple) -> type[BaseModel]:
    """The pydantic model of the section at `loc` (to list its allowed keys)."""
    model: type[BaseModel] = SweepSpec
    for part in loc:
        if part in TASK_MODELS:
            model = TASK_MODELS[part]
        elif isinstance(part, str):
            model = _submodel(model.model_fields[part].annotation) or model
    return model


def _submodel(annotation) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _submodel(arg)
        if found is not None:
            return found
    return None


def load_spec(path: str | os.PathLike) -> SweepSpec:
    """Read and validate a sweep file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserInputError(f"sweep file {str(path)!r} does not exist") from None
    except IsADirectoryError:
        raise UserInputError(f"sweep file {str(path)!r} is a directory, not a YAML file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserInputError(f"sweep file {str(path)!r} cannot be read: {e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" (line {where.line + 1}, column {where.column + 1})" if where else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserInputError(f"sweep file {str(path)!r} is not valid YAML{line}: {problem}") from None
    return parse_spec(data, origin=str(path))
