"""Launch a sweep on Ray Tune.

Once per sweep, in the driver: load the model (and, for classification, task-finetune it), draw
the data, evaluate the dense model (the baseline row), and compute the calibration statistics, or
reuse them from the on-disk cache (safetensors + JSON, keyed by a hash of model, data and
settings). Once per method, in Ray tasks: the ratio-independent decompositions. All of it goes
into the object store once; then a `tune.Tuner` runs the grid (Tune's grid search) or an Optuna
study over per-group ratios, and a callback rewrites `trials.parquet` after every finished trial.

Layout of `<storage>/<name>/`: the Tune experiment itself (for `Tuner.restore` and Tune's own
analysis), `sweep.json` (the validated sweep and its hash), `trials.parquet` and `report.md`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import posixpath
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import ray
import torch
from ray import tune
from ray.tune import Callback
from ray.tune.schedulers import ASHAScheduler
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from compression.calibration import CalibrationStats, collect_stats, estimate_stats_bytes
from compression.errors import UserInputError

from sweeps import __version__
from sweeps.report import write_report
from sweeps.results import (SWEEP_FILE, ResultsTable, checkpoint_path, is_uri, read_file, read_trials, row_from_result,
                            write_file)
from sweeps.spec import (ALPHA_METHODS, NAME_PATTERN, SweepSpec, check_resources, expand, local_resources,
                         optuna_choices, trial_count)
from trainables.evaluation import evaluate
from trainables.finetune import FinetuneConfig, task_finetune_classifier
from trainables.sources import LoadedModel, draw_windows, load_labelled, load_model
from trainables.sources.packaged import cache_dir
from trainables.trial import Shared, decomposition_key, model_size, trial_key

_CACHE_FORMAT = 1  # bump when what goes into the calibration cache key changes


@dataclass
class Prepared:
    """What the driver computes once per sweep."""

    loaded: LoadedModel
    data: dict                      # "eval", "train", "calibration", "num_labels"
    stats: CalibrationStats
    calibration_key: str
    calibration_cached: bool
    seconds_calibration: float
    dense_row: dict
    dense_state: dict | None = None  # task-finetuned classifier weights
    timings: dict[str, float] = field(default_factory=dict)


# -- storage ------------------------------------------------------------------------------------


def sweep_directory(storage: str, name: str) -> str:
    """`<storage>/<name>`; a local storage becomes an absolute path (Tune needs one)."""
    if is_uri(storage):
        return f"{storage.rstrip('/')}/{name}"
    return str(Path(storage).expanduser().resolve() / name)


def check_storage(spec: SweepSpec, directory: str, resume: bool) -> dict | None:
    """The stored sweep record of `directory`, or None. A different sweep stored under the same
    name is an error unless `resume` (which then keeps the finished trials it shares with this one)."""
    data = read_file(directory, SWEEP_FILE)
    if data is None:
        return None
    stored = json.loads(data)
    if stored.get("spec_hash") != spec.spec_hash and not resume:
        raise UserInputError(
            f"storage {directory} already holds a different sweep named {spec.name!r} (its settings differ "
            f"from this file's); pass --resume to continue it with this file (finished trials with the same "
            f"trial id are kept), or choose another --name or --storage")
    return stored


def apply_overrides(spec: SweepSpec, storage: str | None = None, name: str | None = None) -> SweepSpec:
    """The spec with --storage / --name from the command line."""
    if name is not None and not re.fullmatch(NAME_PATTERN, name):
        raise UserInputError(f"--name {name!r}: use letters, digits, '.', '_' and '-' (starting with a letter or digit)")
    updates = {k: v for k, v in (("storage", storage), ("name", name)) if v is not None}
    return spec.model_copy(update=updates) if updates else spec


# -- data, baseline, calibration ----------------------------------------------------------------


def _draw_text(spec: SweepSpec, tokenizer) -> dict[str, torch.Tensor]:
    """Eval, calibration and finetuning windows; one draw per distinct source keeps them disjoint."""
    task, cal = spec.task_settings(), spec.calibration_settings()
    wanted = {"eval": (task["eval"], task["eval_windows"], task["seq_len"]),
              "calibration": (cal["source"], cal["samples"], cal["seq_len"])}
    if spec.finetune.steps > 0:
        wanted["train"] = (task["train"], task["train_windows"], task["seq_len"])
    by_source: dict[str, dict] = {}
    for split, (source, count, seq_len) in wanted.items():
        entry = by_source.setdefault(source, {"counts": {}, "seq_len": seq_len, "seed": spec.seed})
        entry["counts"][split] = count
        if split == "calibration":
            entry["seed"] = cal["seed"]
    out: dict[str, torch.Tensor] = {}
    for source, entry in by_source.items():
        out |= draw_windows(source, tokenizer, entry["seq_len"], entry["counts"], seed=entry["seed"])
    return out


def _labelled(spec: SweepSpec) -> dict:
    task, cal = spec.task_settings(), spec.calibration_settings()
    cols = {"text_column": task["text_column"], "label_column": task["label_column"]}
    train = load_labelled(task["train"], seed=spec.seed, **cols)
    evaluation = train if task["eval"] == task["train"] else load_labelled(task["eval"], seed=spec.seed, **cols)
    calibration = train if cal["source"] == task["train"] else load_labelled(cal["source"], seed=cal["seed"], **cols)
    if evaluation.label_names != train.label_names:
        raise UserInputError(f"task.eval {task['eval']!r} has labels {evaluation.label_names} but task.train "
                             f"{task['train']!r} has {train.label_names}")
    examples = getattr(evaluation, task["eval_split"])
    return {"eval": examples[: task["eval_examples"]], "train": train.train[: task["train_examples"]],
            "calibration": calibration.train[: cal["samples"]], "num_labels": len(train.label_names)}


def _calibration_batches(spec: SweepSpec, data: dict, tokenizer) -> list[dict[str, torch.Tensor]]:
    cal = spec.calibration_settings()
    size = cal["batch_size"]
    if spec.task.type == "causal-lm":
        windows = data["calibration"]
        return [{"input_ids": w, "attention_mask": torch.ones_like(w)} for w in windows.split(size)]
    batches = []
    for i in range(0, len(data["calibration"]), size):
        chunk = data["calibration"][i:i + size]
        enc = tokenizer([t for t, _ in chunk], padding=True, truncation=True, max_length=cal["seq_len"],
                        return_tensors="pt")
        batches.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                        "labels": torch.tensor([label for _, label in chunk])})
    return batches


def _stamp(source: str) -> list | None:
    """Size and modification time of the files of a `path:` source, so an edited file is a new key."""
    scheme, _, rest = source.partition(":")
    if scheme != "path":
        return None
    root = Path(rest).expanduser()
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    return [[str(p.relative_to(root)) if root.is_dir() else p.name, p.stat().st_size, p.stat().st_mtime_ns]
            for p in files if p.exists()]


def calibration_key(spec: SweepSpec) -> str:
    """What the statistics depend on: model, task data and dense finetune, calibration settings
    (and, for local `path:` sources, their files' sizes and times)."""
    task = spec.task_settings()
    cal = spec.calibration_settings()
    body = {"format": _CACHE_FORMAT, "model": spec.model, "seed": spec.seed, "calibration": cal,
            "task": task["type"], "files": [_stamp(spec.model), _stamp(cal["source"])]}
    if spec.task.type == "classification":
        body["task"] = {k: task[k] for k in ("type", "train", "text_column", "label_column", "max_length",
                                             "train_examples", "dense_finetune")}
        body["files"].append(_stamp(task["train"]))
    blob = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def calibration_cache() -> Path:
    """Where statistics are cached: `$LRSWEEP_CACHE/calibration` (default: the user cache dir)."""
    return cache_dir() / "calibration"


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


STATS_MEMORY_FRACTION = 0.5  # default limit: this share of the memory available at the start


def available_memory() -> int:
    """Bytes of memory available to new allocations now (psutil, a dependency of accelerate)."""
    import psutil

    return int(psutil.virtual_memory().available)


def check_stats_memory(spec: SweepSpec, model, log=print) -> int:
    """Estimate the calibration statistics of `model` from its shapes, report it, and raise a
    UserInputError (before anything is computed) when it is above `limits.stats_memory_gb`, or
    by default above half the available memory. Returns the estimate in bytes."""
    need = estimate_stats_bytes(model)
    limit_gb = spec.limits.stats_memory_gb
    if limit_gb is None:
        free = available_memory()
        limit, origin = STATS_MEMORY_FRACTION * free, f"half the memory available on this machine ({free / 1e9:.2f} GB)"
    else:
        limit, origin = limit_gb * 1e9, "limits.stats_memory_gb"
    log(f"calibration statistics: {need / 1e9:.3f} GB (estimated from the model's shapes; "
        f"limit {limit / 1e9:.3f} GB)")
    if need > limit:
        raise UserInputError(
            f"limits.stats_memory_gb: the calibration statistics of {spec.model} need about {need / 1e9:.3f} GB "
            f"(float64 Gram matrices and Fisher vectors of every targeted layer), more than the "
            f"{limit / 1e9:.3f} GB allowed by {origin}; run the driver on a machine with more memory, "
            f"or raise limits.stats_memory_gb if you know it fits")
    return need


def prepare(spec: SweepSpec, progress: bool = True, log=print) -> Prepared:
    """Load, (task-finetune,) evaluate the dense model, and calibrate (or load cached statistics)."""
    timings: dict[str, float] = {}
    task = spec.task_settings()
    key = calibration_key(spec)
    folder = calibration_cache()
    stats_path, dense_path = folder / f"{key}.safetensors", folder / f"{key}.dense.safetensors"

    start = time.perf_counter()
    if spec.task.type == "causal-lm":
        loaded = load_model(spec.model, task="causal-lm", seed=spec.seed)
        data = _draw_text(spec, loaded.tokenizer)
    else:
        data = _labelled(spec)
        loaded = load_model(spec.model, task="classification", num_labels=data["num_labels"], seed=spec.seed)
    timings["load"] = time.perf_counter() - start
    log(f"model {spec.model}: {model_size(loaded.model)[0] / 1e6:.1f} M parameters, loaded in {timings['load']:.1f} s")
    check_stats_memory(spec, loaded.model, log=log)  # fail before the dense baseline and calibration

    dense_state = None
    seconds_dense_finetune = 0.0
    if spec.task.type == "classification":
        if dense_path.is_file():
            loaded.model.load_state_dict(load_file(str(dense_path)))
            log(f"dense task finetune: reused {dense_path}")
        else:
            start = time.perf_counter()
            recipe = FinetuneConfig(**task["dense_finetune"], max_length=task["max_length"], seed=spec.seed)
            log(f"dense task finetune: {recipe.steps} steps on {len(data['train'])} examples")
            task_finetune_classifier(loaded.model, loaded.tokenizer, data["train"], recipe)
            seconds_dense_finetune = time.perf_counter() - start
            _save_atomic({k: v.contiguous() for k, v in loaded.model.state_dict().items()}, dense_path,
                         {"format": "lowrank-sweep/dense", "sweep_model": spec.model})
        dense_state = {k: v.detach().clone() for k, v in loaded.model.state_dict().items()}

    eval_kw = {"batch_size": task["eval_batch_size"]}
    if spec.task.type == "classification":
        eval_kw["max_length"] = task["max_length"]
    dense = evaluate(loaded.model, spec.task.type, data["eval"], tokenizer=loaded.tokenizer, **eval_kw)
    log(f"dense baseline: {dense.metric} {dense.value:.4g} ({dense.seconds:.1f} s)")

    start = time.perf_counter()
    cached = stats_path.is_file()
    if cached:
        with safe_open(str(stats_path), framework="pt") as f:
            metadata = f.metadata()
        stats = CalibrationStats.from_tensors(load_file(str(stats_path)), metadata)
        stats.check_matches(loaded.model)
        log(f"calibration: reused {stats_path}")
    else:
        batches = _calibration_batches(spec, data, loaded.tokenizer)
        stats = collect_stats(loaded.model, batches, task=spec.task.type, progress=progress)
        tensors, metadata = stats.to_tensors()
        _save_atomic(tensors, stats_path, metadata)
        (folder / f"{key}.json").write_text(json.dumps(
            {"key": key, "model": spec.model, "task": task["type"], "calibration": spec.calibration_settings(),
             "meta": stats.meta}, indent=2))
        log(f"calibration: {stats.meta.get('sequences')} sequences in {stats.meta.get('seconds')} s, saved to {stats_path}")
    seconds_calibration = time.perf_counter() - start

    params, size_mb = model_size(loaded.model)
    dense_row = {
        "config_id": "dense", "status": "ok", "error": "", "method": "dense", "ratio": 0.0, "allocation": "",
        "options": "{}", "group_ratios": "{}", "target_ratio": 0.0, "achieved_ratio": 0.0,
        "params_dense": params, "params_compressed": params, "size_mb": size_mb, "metric_name": dense.metric,
        "metric": dense.value, "metric_compressed": math.nan, "metric_finetuned": math.nan,
        "metric_dense": dense.value, "finetune_steps": 0, "finetune_loss": math.nan,
        "seconds_calibration": seconds_calibration, "seconds_decompose": 0.0, "seconds_compress": 0.0,
        "seconds_eval": dense.seconds, "seconds_finetune": seconds_dense_finetune, "rank_plan": "{}",
        "calibration_key": key,
    }
    return Prepared(loaded=loaded, data=data, stats=stats, calibration_key=key, calibration_cached=cached,
                    seconds_calibration=seconds_calibration, dense_row=dense_row, dense_state=dense_state,
                    timings=timings)


# -- decompositions (Ray tasks, once per method) --------------------------------------------------


def _decompose_task(model_source: str, task: str, num_labels: int | None, seed: int, dense_state, stats,
                    method: str, options: dict, device: str) -> tuple[dict, float]:
    """Runs in a Ray worker: the ratio-independent decompositions of one method, and their seconds."""
    from compression.apply import decompose_model

    loaded = load_model(model_source, task=task, num_labels=num_labels, seed=seed)
    if dense_state is not None:
        loaded.model.load_state_dict(dense_state)
    start = time.perf_counter()
    out = decompose_model(loaded.model, stats, method, alpha=options.get("alpha", 1.0),
                          device=device if device != "cpu" else None)
    seconds = time.perf_counter() - start
    # back on the CPU before they are shared: trials on CPU-only nodes read the same objects
    return {name: d.to("cpu") for name, d in out.items()}, seconds


# -- Tune -----------------------------------------------------------------------------------------


def _trial_name(trial) -> str:
    c = trial.config.get("trial", trial.config)
    return f"{c.get('method', '?')}-{c.get('allocation', '?')}-{c.get('ratio', '?')}"


def _config_id(trial) -> str:
    """Our id of a Tune trial's config (the `trial_id` column), as `trainables.trial` computes it."""
    return trial_key(trial.config.get("trial", trial.config))


def _trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


class OptunaSpace:
    """Define-by-run space: the grid's multi-valued lists as categorical choices, then one ratio per
    group (block, role or matrix) in `bounds`, rescaled to the budget by the allocation."""

    def __init__(self, choices: dict[str, list], groups: dict[str, list[str]], bounds: tuple[float, float],
                 granularity: str) -> None:
        self.choices, self.groups, self.bounds, self.granularity = choices, groups, bounds, granularity

    def __call__(self, trial) -> dict:
        picked = {}
        for name, values in self.choices.items():
            picked[name] = trial.suggest_categorical(name, values) if len(values) > 1 else values[0]
        lo, hi = self.bounds
        for group in self.groups[picked["method"]]:
            trial.suggest_float(f"group_ratios/{group}", lo, hi)
        constants = {"allocation": "optuna", "granularity": self.granularity,
                     "options": {"alpha": picked["alpha"]} if "alpha" in picked and
                     picked["method"] in ALPHA_METHODS else {}}
        constants |= {k: v for k, v in picked.items() if len(self.choices[k]) == 1 and k != "alpha"}
        return constants


def optuna_groups(model, stats: CalibrationStats, method: str, granularity: str) -> list[str]:
    """Names of the groups Optuna gives one ratio each: block indices, roles, or unit names (a
    unit is a matrix for the SVD family and an MLP for `id`)."""
    from compression.targets import find_mlps

    if method == "id":
        units = [(str(g.block), "mlp", g.name) for g in find_mlps(model)]
    else:
        units = [(str(t.block), t.role, t.name) for t in stats.targets]
    column = {"block": 0, "role": 1, "matrix": 2}[granularity]
    return list(dict.fromkeys(u[column] for u in units))


class ResultsCallback(Callback):
    """Driver side: rewrites trials.parquet after every finished trial and prints one line for it
    (Tune's own output is silenced: it would print every config and metric)."""

    def __init__(self, table: ResultsTable, total: int, log) -> None:
        self.table, self.total, self.log = table, total, log
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
        if not result.get("config_id"):
            self.record_failed(trial, "the trial ended without reporting a result")
            return
        status = result.get("status")
        self._add(row_from_result(result, status="stopped" if status == "running" else status)
                  | {"checkpoint": checkpoint_path(trial)})

    def _add(self, row: dict) -> None:
        self.table.add(row)
        self.done += 1
        what = f"{row['method']} {row['allocation']} {100 * (row['target_ratio'] or 0):.0f}%"
        if row["status"] == "error":
            outcome = f"error: {row['error']}"
        else:
            outcome = f"{row['metric_name']} {row['metric_compressed']:.4g}"
            if row["metric"] != row["metric_compressed"]:
                outcome += f" -> {row['metric']:.4g} finetuned"
            outcome += f", removed {100 * row['achieved_ratio']:.1f}%"
            if row["status"] == "stopped":
                outcome += " (stopped early: ASHA or limits.trial_seconds)"
        self.log(f"[{self.done}/{self.total}] {row['trial_id']} {what}: {outcome}")

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        self.retried += 1
        error = trial.get_error()
        message = str(error).strip().splitlines()[-1] if error else "the trial's worker failed"
        self.log(f"trial {_trial_name(trial)} crashed ({message}); Tune retries it")

    def on_experiment_end(self, trials, **info) -> None:
        self.trials = list(trials)

    def record_unfinished(self) -> int:
        """After a Tune run that ended normally: the trials it left unfinished (Ctrl-C, or the
        sweep's time budget, limits.sweep_seconds) get no final row; those that reported keep a
        "stopped" row with their last result (`--resume` runs both again). Returns how many."""
        cut = [t for t in self.trials if t.trial_id not in self.recorded]
        for trial in cut:
            result = trial.last_result or {}
            if result.get("config_id"):
                self.recorded.add(trial.trial_id)
                self._add(row_from_result(result, status="stopped"))
        return len(cut) + max(0, self.total - len(self.trials))  # an Optuna study creates trials lazily

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.recorded.add(trial.trial_id)
        self.running.pop(trial.trial_id, None)
        error = trial.get_error()
        message = str(error).strip().splitlines()[-1] if error else "the trial's worker failed"
        self.record_failed(trial, message)

    def record_failed(self, trial, message: str) -> None:
        """An error row for `trial` (its last result, or its config when it reported none)."""
        result = dict(trial.last_result or {})
        if not result.get("config_id"):
            config = trial.config.get("trial", trial.config)
            result = {"config_id": _config_id(trial), "method": config.get("method"),
                      "ratio": config.get("ratio"), "target_ratio": config.get("ratio"),
                      "allocation": config.get("allocation"), "options": json.dumps(config.get("options", {})),
                      "group_ratios": json.dumps(config.get("group_ratios") or {})}
        self._add(row_from_result(result, status="error", error=message))


def _kept_rows(spec: SweepSpec, directory: str) -> list[dict]:
    """On --resume: the finished trials of the stored table that this sweep would run again."""
    df = read_trials(directory)
    if df is None:
        return []
    ok = df[(df["status"] == "ok") & (df["method"] != "dense")]
    if spec.optuna is None:
        ok = ok[ok["trial_id"].isin({c["trial_id"] for c in expand(spec)})]
    else:
        choices = optuna_choices(spec)
        ok = ok[(ok["allocation"] == "optuna") & ok["method"].isin(choices["method"])
                & ok["target_ratio"].isin(choices["ratio"])]
    return ok.to_dict("records")


def trial_stats(stats: CalibrationStats) -> CalibrationStats:
    """What a trial reads of the statistics: the targets, token counts and block importance (for
    planning ranks and checking the model), without the Gram matrices and Fisher vectors, which
    only the decomposition tasks need. A trial process then never holds the full statistics
    (gigabytes for a large model): only the decomposition tasks pull them to their nodes."""
    return CalibrationStats(list(stats.targets), {}, dict(stats.tokens), {}, {}, {}, stats.block_importance.clone(),
                            dict(stats.meta))


def _put_shared(spec: SweepSpec, prepared: Prepared, log) -> Shared:
    """Put the statistics, data and dense weights in the object store once; run one decomposition
    task per (method, options) and wait for them all (trials must not wait holding their CPUs).
    Everything reaches the workers through the object store, never through a path on the head;
    all of it is owned by the driver and stored on its node, so a worker node can die mid-sweep
    without taking shared state with it."""
    stats_ref = ray.put(prepared.stats)
    data = {k: prepared.data[k] for k in ("eval", "train") if k in prepared.data}
    data["num_labels"] = prepared.data.get("num_labels")
    data_ref = ray.put(data)
    dense_ref = ray.put(prepared.dense_state) if prepared.dense_state is not None else None
    res = spec.resources
    device = "cuda" if res.gpu > 0 else "cpu"
    # a crashed worker is retried (limits.retries); a Python exception is not (retry_exceptions=False)
    task = ray.remote(num_cpus=res.cpu, num_gpus=res.gpu, num_returns=2,
                      max_retries=spec.limits.retries)(_decompose_task)
    refs = {}
    for method, options in spec.decompositions():
        refs[decomposition_key(method, options)] = task.remote(
            spec.model, spec.task.type, data["num_labels"], spec.seed, dense_ref, stats_ref, method, options, device)
    seconds, decompositions = {}, {}
    for key, (decomposition_ref, seconds_ref) in refs.items():
        try:
            seconds[key] = ray.get(seconds_ref)
            # Owned by the driver from here: the copy the task left lives on the node that ran it,
            # and if that node dies mid-sweep Ray would have to run the task again for the trials
            # that read it, while those trials hold every CPU it could run on (a deadlock we hit).
            decompositions[key] = ray.put(ray.get(decomposition_ref))
            log(f"decomposition {key}: {seconds[key]:.1f} s")
        except Exception as e:  # noqa: BLE001 - its trials fail with this error and the sweep goes on
            seconds[key], decompositions[key] = math.nan, decomposition_ref
            log(f"decomposition {key} failed: {str(e).strip().splitlines()[-1]}")
    refs.clear()  # the tasks' own copies can go
    return Shared(stats=ray.put(trial_stats(prepared.stats)), decompositions=decompositions,
                  data=data_ref, dense_state=dense_ref, metric_dense=prepared.dense_row["metric"],
                  params_dense=prepared.dense_row["params_dense"], seconds_calibration=prepared.seconds_calibration,
                  seconds_decompose=seconds, calibration_key=prepared.calibration_key)


def _sampler(spec: SweepSpec):
    import optuna

    seed = spec.seed if spec.optuna.seed is None else spec.optuna.seed
    return {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler,
            "nsga2": optuna.samplers.NSGAIISampler}[spec.optuna.sampler](seed=seed)


def _restore_search(search, directory: str, log) -> None:
    """Load the Optuna study of the sweep's last Tune run (Tune saves its searcher's state in the
    experiment folder, `searcher-state-*.pkl`) into `search`, so a resumed study goes on learning
    from the trials it has seen instead of starting over."""
    import tempfile

    import pyarrow.fs

    fs, base = pyarrow.fs.FileSystem.from_uri(directory)  # a URI, or the absolute local path
    infos = fs.get_file_info(pyarrow.fs.FileSelector(base, allow_not_found=True))
    states = sorted(i.path for i in infos if re.fullmatch(r"searcher-state-.*\.pkl", i.base_name))
    if not states:
        log("resume: no saved Optuna study in the experiment folder; the study starts over "
            "(its finished trials are kept in the table)")
        return
    with tempfile.TemporaryDirectory() as folder:
        with fs.open_input_stream(states[-1]) as src:
            Path(folder, posixpath.basename(states[-1])).write_bytes(src.read())
        search.restore_from_dir(folder)
    log(f"resume: the Optuna study goes on from its saved state ({posixpath.basename(states[-1])})")


def _tuner(spec: SweepSpec, prepared: Prepared, shared: Shared, directory: str, table: ResultsTable,
           kept: list[dict], log, time_budget: float | None = None,
           restore_search: bool = False) -> tuple[tune.Tuner, ResultsCallback] | None:
    from trainables.trial import trainable

    res = spec.resources
    fn = tune.with_resources(tune.with_parameters(trainable, shared=shared), {"cpu": res.cpu, "gpu": res.gpu})
    scheduler = None
    es = spec.finetune.early_stopping
    if es is not None:
        scheduler = ASHAScheduler(metric="metric", mode=spec.metric_mode, time_attr="training_iteration",
                                  max_t=2 + spec.finetune.steps // spec.finetune.eval_every,
                                  grace_period=es.grace_period, reduction_factor=es.reduction_factor)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0: no experiment banner from Tune
    # reuse_actors: trials run one after another in the same worker process, which keeps its dense
    # model loaded (trainables.trial caches it per process): one model load per worker, not per trial
    common = {"max_concurrent_trials": res.max_concurrent, "scheduler": scheduler, "reuse_actors": True,
              "trial_name_creator": _trial_name, "trial_dirname_creator": _trial_dirname,
              "time_budget_s": time_budget}
    if spec.optuna is None:
        done = {r["trial_id"] for r in kept}
        configs = [c for c in expand(spec) if c["trial_id"] not in done]
        if not configs:
            return None
        param_space = {"trial": tune.grid_search(configs)}
        tune_config = tune.TuneConfig(num_samples=1, **common)
        total = len(configs)
    else:
        from ray.tune.search.optuna import OptunaSearch

        remaining = spec.optuna.trials - len(kept)
        if remaining <= 0:
            return None
        choices = optuna_choices(spec)
        groups = {m: optuna_groups(prepared.loaded.model, prepared.stats, m, spec.optuna.granularity)
                  for m in choices["method"]}
        space = OptunaSpace(choices, groups, spec.optuna.bounds, spec.optuna.granularity)
        metric, mode = ("metric", spec.metric_mode) if not spec.optuna.multi else \
            (["metric", "size_mb"], [spec.metric_mode, "min"])
        search = OptunaSearch(space, metric=metric, mode=mode, sampler=_sampler(spec))
        if restore_search:
            _restore_search(search, directory, log)
        param_space = spec.base_config()
        tune_config = tune.TuneConfig(search_alg=search, num_samples=remaining, **common)
        total = remaining
    storage_path, name = directory.rsplit("/", 1) if is_uri(directory) else (str(Path(directory).parent),
                                                                               Path(directory).name)
    limits = spec.limits
    callback = ResultsCallback(table, total, log)
    run_config = tune.RunConfig(name=name, storage_path=storage_path, verbose=0, callbacks=[callback],
                                stop={"time_total_s": limits.trial_seconds} if limits.trial_seconds else None,
                                failure_config=tune.FailureConfig(max_failures=limits.retries))
    return tune.Tuner(fn, param_space=param_space, tune_config=tune_config, run_config=run_config), callback


def echo(line: str) -> None:
    """The default `log`: print. A function of this module, so that Tune can pickle the results
    callback that holds it even after Ray has replaced `builtins.print` (its tqdm support does)."""
    print(line, flush=True)


def run_sweep(spec: SweepSpec, address: str | None = None, resume: bool = False, log=echo) -> dict:
    """Run a validated sweep to the end. Returns the results directory, the table (a DataFrame),
    whether the statistics came from the cache, wall-time figures, and the fault figures
    (`faults`: attempts retried, Tune restarts, and the trials left unfinished by an interrupt or
    by limits.sweep_seconds, which `resume=True` runs)."""
    directory = sweep_directory(spec.storage, spec.name)
    stored = check_storage(spec, directory, resume)
    started_ray = not ray.is_initialized()
    local = started_ray and address is None and not os.environ.get("RAY_ADDRESS")
    if local:  # a cluster (and its autoscaler) decides for itself what fits
        check_resources(spec, *local_resources())
    elif not started_ray:
        res = ray.cluster_resources()
        check_resources(spec, res.get("CPU", 0), res.get("GPU", 0), where="the running Ray cluster")

    wall = time.perf_counter()
    kept = _kept_rows(spec, directory) if (resume and stored) else []
    prepared = prepare(spec, log=log)
    record = {"name": spec.name, "spec_hash": spec.spec_hash, "version": __version__,
              "calibration_key": prepared.calibration_key, "spec": spec.model_dump(mode="json")}
    write_file(directory, SWEEP_FILE, json.dumps(record, indent=2).encode())
    table = ResultsTable(directory, [row_from_result(prepared.dense_row), *kept],
                         keep_checkpoints=spec.checkpoints.keep)
    table.write()
    if kept:
        log(f"resume: keeping {len(kept)} finished trial(s) from {directory}")
    if started_ray:
        init = {"address": address, "include_dashboard": False, "log_to_driver": False,
                "logging_level": logging.WARNING}
        if local:
            init["num_cpus"] = int(local_resources()[0])
        ray.init(**init)
    try:
        shared = _put_shared(spec, prepared, log)
        deadline = None
        if spec.limits.sweep_seconds is not None:  # what preparation left of the sweep's budget
            deadline = wall + spec.limits.sweep_seconds
            if deadline <= time.perf_counter():
                raise UserInputError(
                    f"limits.sweep_seconds: {spec.limits.sweep_seconds:g} s were spent before the first trial "
                    f"(loading, baseline, calibration, decompositions: {time.perf_counter() - wall:.0f} s); "
                    f"raise it and run again with --resume (the statistics are cached)")
        same_study = bool(stored) and stored.get("spec_hash") == spec.spec_hash and spec.optuna is not None
        faults = _run_trials(spec, prepared, shared, directory, table, log, deadline, restore_search=same_study)
    finally:
        if started_ray:
            ray.shutdown()
    df = table.frame()
    wall = time.perf_counter() - wall
    timing = _timing(df, shared, prepared, {r["trial_id"] for r in kept}, wall)
    about = _about(spec, prepared) | {"time": timing["text"]}
    if faults["retried"] or faults["restarts"]:
        about["faults"] = faults["text"]
    report = write_report(directory, df, f"Sweep {spec.name}", about)
    return {"directory": directory, "report": report, "table": df, "calibration_cached": prepared.calibration_cached,
            "calibration_key": prepared.calibration_key, "wall_seconds": wall, "timing": timing, "faults": faults}


def _run_trials(spec: SweepSpec, prepared: Prepared, shared: Shared, directory: str, table: ResultsTable, log,
                deadline: float | None, restore_search: bool) -> dict:
    """Run every trial without a row in `table` with Tune, and recover from the one failure Tune
    does not retry by itself. Returns the fault figures.

    Tune retries a trial whose worker crashed, was killed or lost its node (FailureConfig). But
    when Ray's memory monitor kills a trial's worker, the actor task fails with an OutOfMemoryError
    that Tune's actor manager (Ray 2.60) does not expect: it raises "Caught unexpected exception"
    and the whole Tune run stops. Then each trial that was running counts one failed attempt,
    and a new Tuner runs what has no row yet (an Optuna study goes on from Tune's saved state);
    a trial that has failed more than `limits.retries` times is recorded as failed."""
    attempts_lost: dict[str, int] = {}  # our trial id -> attempts lost to a stopped Tune run
    faults = {"retried": 0, "restarts": 0, "unfinished": 0}
    most_restarts = (spec.limits.retries + 1) * max(1, trial_count(spec))
    while True:
        budget = None if deadline is None else deadline - time.perf_counter()
        if budget is not None and budget <= 0:
            log("limits.sweep_seconds: no time left to run the remaining trials; `lrsweep run --resume` runs them")
            faults["unfinished"] = trial_count(spec) - sum(r["method"] != "dense" for r in table.rows.values())
            break
        final = [r for r in table.rows.values() if r["method"] != "dense"]
        made = _tuner(spec, prepared, shared, directory, table, final, log, time_budget=budget,
                      restore_search=restore_search)
        if made is None:
            break
        tuner, callback = made
        try:
            tuner.fit()
            faults["retried"] += callback.retried
            faults["unfinished"] = callback.record_unfinished()
            if faults["unfinished"]:
                log(f"the sweep stopped (interrupted, or limits.sweep_seconds ran out) before {faults['unfinished']} "
                    f"trial(s) finished; `lrsweep run --resume` runs them")
            break
        except RuntimeError as e:
            faults["retried"] += callback.retried
            if not isinstance(e.__cause__, ray.exceptions.RayError) or faults["restarts"] >= most_restarts:
                raise
            faults["restarts"] += 1
            cause = str(e.__cause__).strip().splitlines()[0]
            log(f"Tune stopped: {cause}; the {len(callback.running)} running trial(s) count one failed attempt "
                f"each, and Tune starts again on the trials without a row")
            for trial in callback.running.values():
                cid = _config_id(trial)
                attempts_lost[cid] = attempts_lost.get(cid, 0) + 1
                if attempts_lost[cid] > spec.limits.retries:
                    callback.record_failed(trial, f"{cause} ({attempts_lost[cid]} attempts)")
            restore_search = spec.optuna is not None
    retried = faults["retried"] + sum(min(n, spec.limits.retries) for n in attempts_lost.values())
    faults["text"] = f"{retried} failed trial attempt(s) run again (limits.retries = {spec.limits.retries})"
    if faults["restarts"]:
        faults["text"] += (f"; Tune started again {faults['restarts']} time(s) after a failure it does not retry "
                           f"(a worker killed by Ray's memory monitor)")
    faults["retried"] = retried
    return faults


def _timing(df, shared: Shared, prepared: Prepared, kept: set[str], wall: float) -> dict:
    """Sweep overhead: the wall time against the compute the sweep did itself (calibration, dense
    baseline, decompositions once per method, and every trial's compress + evaluate + finetune)."""
    ran = df[(df["method"] != "dense") & ~df["trial_id"].isin(kept)]
    trials = float((ran["seconds_compress"].fillna(0) + ran["seconds_eval"].fillna(0)
                    + ran["seconds_finetune"].fillna(0)).sum())
    dense = prepared.dense_row
    shared_s = (prepared.seconds_calibration + dense["seconds_eval"] + dense["seconds_finetune"]
                + prepared.timings["load"] + sum(v for v in shared.seconds_decompose.values() if math.isfinite(v)))
    compute = trials + shared_s
    return {"wall": wall, "trials": trials, "shared": shared_s, "compute": compute,
            "text": f"{wall:.0f} s wall for the whole sweep, against {compute:.0f} s of its own compute: "
                    f"{shared_s:.0f} s once per sweep (load, dense baseline, calibration, decompositions) + "
                    f"{trials:.0f} s of compress, evaluate and finetune summed over {len(ran)} trials"}


def _about(spec: SweepSpec, prepared: Prepared) -> dict[str, str]:
    task = spec.task_settings()
    cal = spec.calibration_settings()
    if spec.task.type == "causal-lm":
        data = f"held-out perplexity on {task['eval']} ({task['eval_windows']} windows of {task['seq_len']} tokens)"
    else:
        data = f"accuracy on the {task['eval_split']} split of {task['eval']} ({len(prepared.data['eval'])} examples)"
    ft = spec.finetune
    return {
        "model": spec.model,
        "task": f"{spec.task.type}: {data}",
        "calibration": f"{cal['samples']} samples of {cal['source']} ({cal['seq_len']} tokens), "
                       f"{'reused from cache' if prepared.calibration_cached else 'computed'} in "
                       f"{prepared.seconds_calibration:.1f} s (key {prepared.calibration_key})",
        "finetune": f"{ft.steps} steps, lr {ft.lr:g}, batch {ft.batch_size} x {ft.grad_accum}, trains {ft.train}"
                    if ft.steps else "none",
        "sweep hash": spec.spec_hash[:16],
    }


def calibrate(spec: SweepSpec, log=print) -> Prepared:
    """`lrsweep calibrate`: compute (or find) the statistics of a sweep, without Ray."""
    return prepare(spec, log=log)
