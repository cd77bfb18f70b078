"""The Python API: what the `lrsweep` CLI does, for notebooks and scripts, returning objects.

    import logging
    from sweeps import load_sweep, plan_sweep, run_sweep, load_results, export_trial, evaluate, regenerate

    logging.basicConfig(level=logging.INFO)          # progress messages (logger "lrsweep")
    spec = load_sweep("sweeps/examples/quickstart.yaml", storage="results")
    plan = plan_sweep(spec)                          # its trials (TrialConfig), methods, folder
    result = run_sweep(spec, callbacks=[...])        # SweepResult: table, report, timing, faults
    df = load_results(result.directory)              # the typed trials table
    path, built = export_trial(result.directory, "best/", best=True, max_ratio=0.4, format="dense")
    numbers = evaluate("best/", tasks=["lrsweep_local"], perplexity="packaged:lee")   # sweeps.evaluation
    regenerate(result.directory)                     # report.md and plots again from the table

Errors are `compression.errors.UserInputError`s naming the sweep field or the argument at fault.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

from compression.errors import UserInputError
from compression.methods import MethodConfig
from sweeps.runner import check_storage
from sweeps.spec import NAME_PATTERN, SweepSpec, load_spec, parse_spec
from sweeps.storage import check_storage_string, sweep_directory
from sweeps.trials import check_resources, expand, local_resources, method_configs, optuna_choices, trial_count
from trainables.contract import TrialConfig


def load_sweep(source: str | os.PathLike | dict[str, Any], storage: str | None = None,
               name: str | None = None) -> SweepSpec:
    """A validated sweep from a YAML file (read with `yaml.safe_load`) or an already parsed
    mapping; `storage` and `name` replace the file's."""
    spec = parse_spec(source, origin="sweep") if isinstance(source, dict) else load_spec(source)
    if name is not None and not re.fullmatch(NAME_PATTERN, name):
        raise UserInputError(f"name {name!r}: use letters, digits, '.', '_' and '-' (starting with a letter or digit)")
    if storage is not None:
        check_storage_string(storage)
    updates = {k: v for k, v in (("storage", storage), ("name", name)) if v is not None}
    return spec.model_copy(update=updates) if updates else spec


@dataclass
class SweepPlan:
    """What a sweep would do, computed without starting anything."""

    spec: SweepSpec
    directory: str                 # <storage>/<name>
    stored: bool                   # the folder holds this sweep already (resume it)
    trials: list[TrialConfig]      # grid trials (an Optuna study creates its own as it goes)
    trial_count: int
    methods: list[MethodConfig]    # one decomposition each
    optuna_choices: dict[str, list] | None


def plan_sweep(spec: SweepSpec, address: str | None = None, resume: bool = False) -> SweepPlan:
    """Check that the sweep can start here (resources of this machine unless `address` names a
    cluster; its storage folder holds no different sweep unless `resume`) and list what it runs."""
    if address is None:
        check_resources(spec, *local_resources())
    directory = sweep_directory(spec.storage, spec.name)
    stored = check_storage(spec, directory, resume)
    return SweepPlan(spec=spec, directory=directory, stored=stored is not None, trials=expand(spec),
                     trial_count=trial_count(spec), methods=method_configs(spec),
                     optuna_choices=optuna_choices(spec) if spec.optuna is not None else None)

