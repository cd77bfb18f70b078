"""Healing recipes in a sweep file: the finetune settings that choose how a compressed model heals,
and the finetune values a grid block varies or an Optuna study samples.

The `finetune:` section (`sweeps.spec.Finetune`) takes `HealingSettings`' fields besides the
optimizer's: kind (full / lora), the LoRA rank, alpha and dropout, the loss (lm / distill), the
distillation temperature and LM weight, precision (CUDA) and cpu_precision, gradient checkpointing; `train` picks the
layers (`trainables.adapters`). A grid block's `finetune:` mapping varies any of them (and the
optimizer settings: steps, lr, batch_size, ...):

    grid:
      - {method: [whiten-fd], ratio: [0.2], allocation: [spectrum],
         finetune: {kind: [full, lora], loss: [lm, distill], lr: [1.0e-4, 3.0e-4]}}   # 8 trials

A list multiplies the block (every combination is a trial); in an Optuna sweep a list is a choice
of the study and a distribution is sampled: `{loguniform: [lo, hi]}`, `{uniform: [lo, hi]}`,
`{int: [lo, hi]}` (inclusive), `{choice: [...]}`. Settings that do not apply to a trial (a LoRA
rank when kind is full, a temperature without distillation) are not sampled and do not make
trials distinct.
"""

from __future__ import annotations

import itertools
from dataclasses import fields
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, Field

from compression.errors import UserInputError
from sweeps.section import Section
from trainables.finetune import CPU_PRECISIONS, KINDS, LOSSES, PRECISIONS, FinetuneConfig, applies, check_train

_DEFAULT = FinetuneConfig()
# Finetune settings a grid block may vary: all but those the sweep sets itself (seed, max_length)
# and the evaluation interval (ASHA's rungs count evaluations, the same for every trial).
VARIABLE = tuple(f.name for f in fields(FinetuneConfig) if f.name not in ("seed", "max_length", "eval_every"))
DISTRIBUTIONS = ("uniform", "loguniform", "int", "choice")
_FIRST = ("kind", "loss")  # chosen first: whether the other settings apply depends on them


def _train_layers(value):
    try:
        return check_train(value)
    except UserInputError as e:
        raise ValueError(str(e).removeprefix("finetune train ")) from None


TrainLayers = Annotated[str | list[str], BeforeValidator(_train_layers)]


class HealingSettings(Section):
    """How a compressed model heals (see `trainables.finetune.FinetuneConfig`): mixed into the
    sweep file's `finetune` section."""

    kind: Literal[KINDS] = Field(_DEFAULT.kind, description="full: train the layers' weights; lora: LoRA adapters")  # type: ignore[valid-type]
    lora_rank: int = Field(_DEFAULT.lora_rank, ge=1)
    lora_alpha: float = Field(_DEFAULT.lora_alpha, gt=0, description="the adapters' scale is lora_alpha / lora_rank")
    lora_dropout: float = Field(_DEFAULT.lora_dropout, ge=0, le=0.99)
    loss: Literal[LOSSES] = Field(_DEFAULT.loss, description="lm: next-token / label cross-entropy; distill: "  # type: ignore[valid-type]
                                  "KL divergence to the dense model's outputs")
    temperature: float = Field(_DEFAULT.temperature, gt=0)
    lm_weight: float = Field(_DEFAULT.lm_weight, ge=0, le=1, description="share of the LM loss in a distillation")
    precision: Literal[PRECISIONS] = Field(_DEFAULT.precision, description="autocast dtype on CUDA (float32 on CPU)")  # type: ignore[valid-type]
    gradient_checkpointing: bool = _DEFAULT.gradient_checkpointing
    cpu_precision: Literal[CPU_PRECISIONS] = Field(_DEFAULT.cpu_precision, description="float32, or bf16 autocast "  # type: ignore[valid-type]
                                                   "on the CPU (fast with AVX512-BF16 or AMX)")


def check_values(values: dict[str, Any]) -> dict[str, Any]:
    """The shape of a grid block's `finetune` mapping: known settings, each a non-empty list or one
    distribution (pydantic validator: a ValueError names the setting)."""
    for name, value in values.items():
        if name not in VARIABLE:
            raise ValueError(f"{name!r} is not a finetune setting a grid block can vary; allowed: "
                             f"{', '.join(VARIABLE)}")
        if isinstance(value, list):
            if not value:
                raise ValueError(f"{name}: give at least one value")
        elif isinstance(value, dict):
            if len(value) != 1 or next(iter(value)) not in DISTRIBUTIONS:
                raise ValueError(f"{name}: a distribution is one of {', '.join(DISTRIBUTIONS)} with its "
                                 f"arguments, e.g. {{loguniform: [1.0e-5, 1.0e-3]}}; got {value!r}")
            (kind, args), = value.items()
            bounded = kind != "choice"
            if not isinstance(args, list) or not args or (bounded and (
                    len(args) != 2 or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)
                    or not args[0] < args[1] or (kind == "loguniform" and args[0] <= 0)
                    or (kind == "int" and not all(isinstance(a, int) for a in args)))):
                wanted = "a non-empty list of values" if not bounded else \
                    f"[lo, hi] with lo < hi{' and lo > 0' if kind == 'loguniform' else ''}" + \
                    (", integers" if kind == "int" else "")
                raise ValueError(f"{name}: {kind} takes {wanted}; got {args!r}")
        else:
            raise ValueError(f"{name}: give a list of values (or, in an Optuna sweep, a distribution "
                             f"such as {{loguniform: [1.0e-5, 1.0e-3]}}); got {value!r}")
    return values


def candidates(value) -> list:
    """Every value a list or a distribution can take that validation must see (bounds of a range)."""
    if isinstance(value, list):
        return value
    (kind, args), = value.items()
    return args


def grid_sets(values: dict[str, Any]) -> list[dict]:
    """Every combination of a grid block's finetune lists (one empty set without any)."""
    names = list(values)
    return [dict(zip(names, combo)) for combo in itertools.product(*(values[n] for n in names))]


def check_block(values: dict[str, Any], section: BaseModel, optuna: bool, where: str) -> None:
    """A grid block's finetune values against the sweep's `finetune` section: distributions only
    in an Optuna sweep; every value, and every combination of a grid, a valid section. UserInputError
    naming `where` (e.g. "grid[0].finetune") otherwise."""
    base = section.model_dump(mode="json")
    for name, value in values.items():
        if isinstance(value, dict) and not optuna:
            raise UserInputError(f"{where}.{name}: a distribution ({next(iter(value))}) is sampled by Optuna: add an "
                                 f"`optuna` section, or give a list of values to try")
        for i, candidate in enumerate(candidates(value)):
            _valid(section, base | {name: candidate}, f"{where}.{name}[{i}]")
    if not optuna:
        for combo in grid_sets(values):
            _valid(section, base | combo, f"{where} {combo}")


def _valid(section: BaseModel, settings: dict, where: str) -> None:
    try:
        type(section).model_validate(settings)
    except ValueError as e:  # pydantic's ValidationError is a ValueError
        errors = getattr(e, "errors", None)
        message = "; ".join(err["msg"].removeprefix("Value error, ") for err in errors()) if errors else str(e)
        raise UserInputError(f"{where}: {message}") from None


def suggest(trial, values: dict[str, Any], base: dict) -> dict:
    """An Optuna trial's finetune settings: `base` with each of `values` chosen (lists, `choice`)
    or sampled, named "finetune.<setting>" in the study (not "/", which Tune would unfold into
    the config); settings that do not apply to the chosen kind and loss are not sampled."""
    settings = dict(base)
    for name in sorted(values, key=lambda n: (n not in _FIRST, list(values).index(n))):
        if not applies(name, settings):
            continue
        value, key = values[name], f"finetune.{name}"
        kind, args = ("choice", value) if isinstance(value, list) else next(iter(value.items()))
        if len(args) == 1 and kind == "choice":
            settings[name] = args[0]
        elif kind == "choice":
            settings[name] = trial.suggest_categorical(key, args)
        elif kind == "int":
            settings[name] = trial.suggest_int(key, *args)
        else:
            settings[name] = trial.suggest_float(key, *args, log=kind == "loguniform")
    return settings


def largest(spec, name: str):
    """The largest value finetune setting `name` takes in sweep `spec` (a `SweepSpec`): in its
    `finetune` section or any grid block's values (e.g. the most finetune steps of any trial)."""
    found = [getattr(spec.finetune, name)]
    for block in spec.grid:
        if name in block.finetune:
            found += candidates(block.finetune[name])
    return max(found)
