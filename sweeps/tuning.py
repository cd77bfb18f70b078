"""Ray Tune for one sweep: the Tuner (grid search, or an Optuna study over per-group ratios), its
scheduler (ASHA) and limits, and the driver-side callback that turns finished trials into rows of
the results table.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

from ray import tune
from ray.tune import Callback
from ray.tune.schedulers import ASHAScheduler

from compression.methods import method_config
from sweeps.prepare import Prepared
from sweeps.recipes import largest, suggest
from sweeps.spec import SweepSpec
from sweeps.storage import is_uri
from sweeps.table import ResultsTable, checkpoint_path
from sweeps.trials import base_config, expand, optuna_choices
from trainables.contract import TrialConfig, TrialRow
from trainables.trial import Shared

log = logging.getLogger("lrsweep")


def trial_id(trial) -> str:
    """Our id of a Tune trial (the `trial_id` column) from its config."""
    return TrialConfig.from_dict(trial.config).trial_id


def _trial_name(trial) -> str:
    c = trial.config.get("trial", trial.config)
    return f"{c.get('method', '?')}-{c.get('allocation', '?')}-{c.get('ratio', '?')}"


def _trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


class OptunaSpace:
    """Define-by-run space: the grid's multi-valued lists as categorical choices (a method's options
    only when the chosen method has them), then one ratio per group (block, role or matrix) in
    `bounds`, rescaled to the budget by the allocation, then the grid block's finetune values
    over the sweep's finetune settings `finetune` (`sweeps.recipes.suggest`). Runs in the driver:
    the options it returns are the chosen method's canonical ones (equal configs, equal trials)."""

    def __init__(self, choices: dict[str, list], groups: dict[str, list[str]], bounds: tuple[float, float],
                 granularity: str, finetune: dict | None = None, finetune_values: dict | None = None) -> None:
        self.choices, self.groups, self.bounds, self.granularity = choices, groups, bounds, granularity
        self.finetune, self.finetune_values = finetune or {}, finetune_values or {}

    def __call__(self, trial) -> dict:
        def pick(name: str):
            values = self.choices[name]
            return trial.suggest_categorical(name, values) if len(values) > 1 else values[0]

        method, ratio = pick("method"), pick("ratio")
        has = method_config(method).option_names()
        options = {name.removeprefix("option/"): pick(name) for name in self.choices
                   if name.startswith("option/") and name.removeprefix("option/") in has}
        lo, hi = self.bounds
        for group in self.groups[method]:
            trial.suggest_float(f"group_ratios/{group}", lo, hi)
        return {"method": method, "ratio": ratio, "allocation": "optuna", "granularity": self.granularity,
                "options": method_config(method, **options).options(),
                "finetune": suggest(trial, self.finetune_values, self.finetune)}


def optuna_groups(model, stats, method: str, granularity: str) -> list[str]:
    """Names of the groups Optuna gives one ratio each: block indices, roles, or unit names (a
    unit is whatever the method decomposes: a matrix, or an MLP)."""
    units = [(str(u.block), u.role, u.name) for u in method_config(method).units(model, stats)]
    column = {"block": 0, "role": 1, "matrix": 2}[granularity]
    return list(dict.fromkeys(u[column] for u in units))


def _sampler(spec: SweepSpec, seen: int = 0):
    """The study's sampler. A study that goes on from its journal holds `seen` trials already; its
    sampler starts from seed + `seen`, so it does not draw again what it drew before."""
    import optuna

    seed = (spec.seed if spec.optuna.seed is None else spec.optuna.seed) + seen
    return {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler,
            "nsga2": optuna.samplers.NSGAIISampler}[spec.optuna.sampler](seed=seed)


@functools.cache
def _journal_search():
    """`JournalSearch`: Tune's OptunaSearch whose study is a `sweeps.study.Journal`, the searcher's
    whole state. Tune checkpoints a searcher as a serialised Python object (`searcher-state-*.pkl`),
    and loading one can run any code: this searcher writes no such file and refuses to read one, so
    nothing a storage folder holds can run code. (Defined on first use: importing Optuna is slow.)"""
    from ray.tune.search.optuna import OptunaSearch

    class JournalSearch(OptunaSearch):
        def __init__(self, space, journal, **kw) -> None:
            self.journal = journal
            super().__init__(space, storage=journal.storage, study_name=journal.study_name, **kw)

        def save_to_dir(self, checkpoint_dir: str, session_str: str = "default") -> None:
            pass  # the journal already holds every operation of the study

        def save(self, checkpoint_path: str) -> None:
            raise NotImplementedError("the study is kept in its Optuna journal, not in a .pkl file")

        def restore(self, checkpoint_path: str) -> None:
            raise RuntimeError("a saved searcher state (.pkl) is never read; the study resumes from its Optuna journal")

        def restore_from_dir(self, checkpoint_dir: str) -> None:  # refuses: reads nothing
            raise RuntimeError("a saved searcher state (.pkl) is never read; the study resumes from its Optuna journal")

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            super().on_trial_complete(trial_id, result=result, error=error)
            self.journal.publish()

    return JournalSearch


class _NoRestoreAdvice(logging.Filter):
    """Drops Tune's advice to call `Tuner.restore` after an interrupt: `lrsweep run --resume` (or
    `run_sweep(..., resume=True)`) is how a sweep goes on, and says so itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Tuner.restore" not in record.getMessage()


def _quiet_restore_advice() -> None:
    tune_log = logging.getLogger("ray.tune.tune")
    if not any(isinstance(f, _NoRestoreAdvice) for f in tune_log.filters):
        tune_log.addFilter(_NoRestoreAdvice())


def make_tuner(spec: SweepSpec, prepared: Prepared, shared: Shared, directory: str, table: ResultsTable,
               kept: list[TrialRow], time_budget: float | None = None, journal=None,
               callbacks: list | None = None) -> tuple[tune.Tuner, ResultsCallback] | None:
    """The Tuner for the trials without a row in `kept`, and its results callback (None when
    nothing is left to run). `journal`: the open `sweeps.study.Journal` of an Optuna sweep.
    `callbacks`: more Tune callbacks (MLflow, W&B, your own)."""
    from trainables.trial import trainable

    res = spec.resources
    fn = tune.with_resources(tune.with_parameters(trainable, shared=shared), {"cpu": res.cpu, "gpu": res.gpu})
    scheduler = None
    es = spec.finetune.early_stopping
    if es is not None:
        steps = largest(spec, "steps")
        scheduler = ASHAScheduler(metric="metric", mode=spec.metric_mode, time_attr="training_iteration",
                                  max_t=2 + steps // spec.finetune.eval_every,
                                  grace_period=es.grace_period, reduction_factor=es.reduction_factor)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0: no experiment banner from Tune
    # a trial checkpoints its best evaluation (num_to_keep 1): each forces a snapshot of the
    # experiment's state, by design here, which Tune would warn about at every evaluation
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    _quiet_restore_advice()
    # reuse_actors: trials run one after another in the same worker process, which keeps its dense
    # model loaded (trainables.trial caches it per process): one model load per worker, not per trial
    common = {"max_concurrent_trials": res.max_concurrent, "scheduler": scheduler, "reuse_actors": True,
              "trial_name_creator": _trial_name, "trial_dirname_creator": _trial_dirname,
              "time_budget_s": time_budget}
    if spec.optuna is None:
        done = {r.trial_id for r in kept}
        # the longest first (finetuning, then refitting): trials run a few at a time, and a long
        # one started last would run alone at the end while the other slots idle
        todo = sorted((c for c in expand(spec) if c.trial_id not in done), reverse=True,
                      key=lambda c: (c.finetune.get("steps", 0), c.refit is not None))
        configs = [c.to_dict() for c in todo]
        if not configs:
            return None
        param_space = {"trial": tune.grid_search(configs)}
        tune_config = tune.TuneConfig(num_samples=1, **common)
        total = len(configs)
    else:
        remaining = spec.optuna.trials - len(kept)
        if remaining <= 0:
            return None
        choices = optuna_choices(spec)
        groups = {m: optuna_groups(prepared.loaded.model, prepared.stats, m, spec.optuna.granularity)
                  for m in choices["method"]}
        space = OptunaSpace(choices, groups, spec.optuna.bounds, spec.optuna.granularity,
                            finetune=base_config(spec)["finetune"], finetune_values=spec.grid[0].finetune)
        metric, mode = ("metric", spec.metric_mode) if not spec.optuna.multi else \
            (["metric", "size_mb"], [spec.metric_mode, "min"])
        search = _journal_search()(space, journal, metric=metric, mode=mode, sampler=_sampler(spec, journal.trials()))
        param_space = base_config(spec)
        tune_config = tune.TuneConfig(search_alg=search, num_samples=remaining, **common)
        total = remaining
    if is_uri(directory):  # Tune takes the URI's query with the storage path
        base, sep, query = directory.partition("?")
        storage_path, name = base.rsplit("/", 1)
        storage_path += sep + query
    else:
        storage_path, name = str(Path(directory).parent), Path(directory).name
    limits = spec.limits
    callback = ResultsCallback(table, total)
    # a trial checkpoints each evaluation that improves on its best: the latest checkpoint is its best
    run_config = tune.RunConfig(name=name, storage_path=storage_path, verbose=0, callbacks=[callback, *(callbacks or [])],
                                stop={"time_total_s": limits.trial_seconds} if limits.trial_seconds else None,
                                failure_config=tune.FailureConfig(max_failures=limits.retries),
                                checkpoint_config=tune.CheckpointConfig(num_to_keep=1))
    return tune.Tuner(fn, param_space=param_space, tune_config=tune_config, run_config=run_config), callback


class ResultsCallback(Callback):
    """Driver side: rewrites trials.parquet after every finished trial and logs one line for it
    (Tune's own output is silenced: it would print every config and metric)."""

    def __init__(self, table: ResultsTable, total: int) -> None:
        self.table, self.total = table, total
        self.done = 0
        self.recorded: set[str] = set()  # Tune trial ids with a row
        self.running: dict[str, object] = {}  # Tune trial id -> Trial, started and without a row yet
        self.retried = 0  # crashed attempts Tune retried (FailureConfig)
        self.trials: list = []  # all of the run's trials, when it has ended

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self.running[trial.trial_id] = trial

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.recorded.add(trial.trial_id)
        self.running.pop(trial.trial_id, None)
        result = trial.last_result or {}
        if not result.get("stage"):
            self.record_failed(trial, "the trial ended without reporting a result")
            return
        status = "stopped" if result.get("status") == "running" else result.get("status")
        self._add(TrialRow.from_result(result, trial_id(trial), status=status, checkpoint=checkpoint_path(trial)))

    def _add(self, row: TrialRow, stopped_by: str = "ASHA or limits.trial_seconds") -> None:
        self.table.add(row)
        self.done += 1
        what = f"{row.method} {row.allocation} {100 * (row.target_ratio or 0):.0f}%"
        if row.status == "error":
            outcome = f"error: {row.error}"
        else:
            outcome = f"{row.metric_name} {row.metric_compressed:.4g}"
            if row.metric != row.metric_compressed:
                outcome += f" -> {row.metric:.4g} finetuned"
            outcome += f", removed {100 * row.achieved_ratio:.1f}%"
            if row.status == "stopped":
                outcome += f" (stopped early: {stopped_by})"
        log.info(f"[{self.done}/{self.total}] {row.trial_id} {what}: {outcome}")

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        self.retried += 1
        error = trial.get_error()
        message = str(error).strip().splitlines()[-1] if error else "the trial's worker failed"
        log.warning(f"trial {_trial_name(trial)} crashed ({message}); Tune retries it")

    def on_experiment_end(self, trials, **info) -> None:
        self.trials = list(trials)

    def record_unfinished(self, why: str = "interrupted, or limits.sweep_seconds ran out") -> int:
        """After a Tune run that ended normally: the trials it left unfinished (`why`: Ctrl-C, or
        the sweep's time budget, limits.sweep_seconds) get no final row; those that reported keep a
        "stopped" row with their last result (`--resume` runs both again). Returns how many."""
        cut = [t for t in self.trials if t.trial_id not in self.recorded]
        for trial in cut:
            result = trial.last_result or {}
            if result.get("stage"):
                self.recorded.add(trial.trial_id)
                self._add(TrialRow.from_result(result, trial_id(trial), status="stopped"),
                          stopped_by=f"{why}; --resume runs it again")
        return len(cut) + max(0, self.total - len(self.trials))  # an Optuna study creates trials lazily

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.recorded.add(trial.trial_id)
        self.running.pop(trial.trial_id, None)
        error = trial.get_error()
        message = str(error).strip().splitlines()[-1] if error else "the trial's worker failed"
        self.record_failed(trial, message)

    def record_failed(self, trial, message: str) -> None:
        """An error row for `trial` (its last result, or its config when it reported none)."""
        result = trial.last_result or {}
        config = TrialConfig.from_dict(trial.config)
        self._add(TrialRow.failed(config, message, last=result if result.get("stage") else None))
