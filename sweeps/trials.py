"""What a validated sweep runs: its trials (`TrialConfig`s), its methods, Optuna's choices, and
whether they fit the machine.

A grid sweep expands into the union of its blocks' products, duplicates (the same trial id)
dropped, in file order. An Optuna sweep has no trials up front: one base config, plus the grid's
multi-valued lists as the study's choices (`optuna_choices`).

Resources: without a cluster address, a sweep may not ask for more CPUs or GPUs than the local
machine has (one trial, or `max_concurrent` trials at once); with an address the cluster (and its
autoscaler) decides, so that check is left to Ray.
"""

from __future__ import annotations

import os

from compression.errors import UserInputError
from compression.methods import MethodConfig
from sweeps.spec import SweepSpec
from trainables.contract import TrialConfig


def base_config(spec: SweepSpec) -> dict:
    """The `TrialConfig` fields every trial of the sweep shares."""
    base = {"model": spec.model, "task": spec.task_settings(), "calibration": spec.calibration_settings(),
            "finetune": spec.finetune_settings(), "seed": spec.seed,
            "resources": {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu},
            "checkpoints": {"keep": spec.checkpoints.keep}}
    if spec.optuna is not None and spec.grid[0].refit is not None:  # a grid sweep's blocks set it per trial
        base["refit"] = spec.grid[0].refit.model_dump()
    return base


def refits(spec: SweepSpec) -> bool:
    """Whether any trial of the sweep has a refit stage (it then needs the calibration batches)."""
    return any(block.refit is not None for block in spec.grid)


def expand(spec: SweepSpec) -> list[TrialConfig]:
    """The trials of a grid sweep (see the module docstring); an Optuna sweep has none up front."""
    if spec.optuna is not None:
        return []
    base = base_config(spec)
    trials: dict[str, TrialConfig] = {}
    for block in spec.grid:
        for combo in block.combinations():
            config = TrialConfig(**base | combo | {"finetune": base["finetune"] | combo["finetune"]})
            trials.setdefault(config.trial_id, config)
    return list(trials.values())


def method_configs(spec: SweepSpec) -> list[MethodConfig]:
    """The distinct method configs the sweep uses (every grid point's, or every one Optuna can
    choose): one ratio-independent decomposition each."""
    configs: dict[str, MethodConfig] = {}
    for block in spec.grid:
        for config in block.method_configs():
            configs.setdefault(config.key, config)
    return list(configs.values())


def optuna_choices(spec: SweepSpec) -> dict[str, list]:
    """The grid values an Optuna study chooses among: methods, ratios, and each option's values
    ("option/<name>"); lists of one value are constants."""
    block = spec.grid[0]
    return {"method": block.method, "ratio": block.ratio} | {f"option/{k}": v for k, v in block.options.items()}


def trial_count(spec: SweepSpec) -> int:
    return spec.optuna.trials if spec.optuna is not None else len(expand(spec))


def local_resources() -> tuple[float, float]:
    """CPUs and GPUs this machine offers a local Ray instance."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    import torch

    return float(cpus), float(torch.cuda.device_count())


def check_resources(spec: SweepSpec, cpus: float, gpus: float, where: str = "this machine") -> None:
    """UserInputError when one trial, or `max_concurrent` trials at once, cannot fit."""
    r = spec.resources
    for kind, per_trial, available in (("cpu", r.cpu, cpus), ("gpu", r.gpu, gpus)):
        if per_trial > available:
            raise UserInputError(f"resources.{kind}: a trial asks for {per_trial:g} {kind.upper()}s but "
                                 f"{where} has {available:g}; lower it, or run on a Ray cluster (an address)")
        if r.max_concurrent and r.max_concurrent * per_trial > available:
            raise UserInputError(
                f"resources.max_concurrent: {r.max_concurrent} trials x {per_trial:g} {kind.upper()}s = "
                f"{r.max_concurrent * per_trial:g} {kind.upper()}s, but {where} has {available:g}; allowed "
                f"max_concurrent <= {int(available // per_trial)}, or run on a Ray cluster (an address)")
