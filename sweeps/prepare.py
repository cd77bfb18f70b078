"""What a sweep computes once, in the driver, before any trial: the model, the data, the
(classification) task-finetuned dense weights, the dense baseline, and the calibration statistics,
cached on disk by a hash of what they depend on (`calibration_key`) so a later sweep, `export` and
`calibrate` reuse them. A memory guard estimates the statistics from the model's shapes first.
When the sweep reserves GPUs, the calibration pass runs on one (the driver's, or a worker's).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import ray
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from compression.calibration import CalibrationStats, collect_stats, estimate_stats_bytes
from compression.errors import UserInputError
from sweeps.recipes import largest
from sweeps.spec import SweepSpec
from sweeps.trials import method_configs
from trainables.contract import TrialRow
from trainables.evaluation import evaluate
from trainables.finetune import FINETUNE_FORMAT, FinetuneConfig, task_finetune_classifier
from sweeps.storage import check_location, write_file
from trainables.sources import LoadedModel, draw_windows, load_labelled, load_model, max_positions
from trainables.sources.packaged import CACHE_ENV, cache_dir
from trainables.trial import model_size

log = logging.getLogger("lrsweep")

_CACHE_FORMAT = 1  # bump when what goes into the calibration cache key changes
STATS_MEMORY_FRACTION = 0.5  # default limit: this share of the memory available at the start


@dataclass
class Prepared:
    """What the driver computes once per sweep (`dense_row` is None when the baseline was not
    evaluated: `stats_for`)."""

    loaded: LoadedModel
    data: dict                      # "eval", "train", "calibration", "num_labels"
    stats: CalibrationStats
    calibration_key: str
    calibration_cached: bool
    seconds_calibration: float
    dense_row: TrialRow | None = None
    dense_state: dict | None = None  # task-finetuned classifier weights
    timings: dict[str, float] = field(default_factory=dict)


# -- data -----------------------------------------------------------------------------------------


def draw_text(spec: SweepSpec, tokenizer) -> dict[str, torch.Tensor]:
    """Eval, calibration and finetuning windows; one draw per distinct source keeps them disjoint."""
    task, cal = spec.task_settings(), spec.calibration_settings()
    wanted = {"eval": (task["eval"], task["eval_windows"], task["seq_len"]),
              "calibration": (cal["source"], cal["samples"], cal["seq_len"])}
    if largest(spec, "steps") > 0:
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


def labelled(spec: SweepSpec) -> dict:
    """Evaluation, finetuning and calibration examples of a classification sweep, and its label count."""
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


def calibration_batches(spec: SweepSpec, data: dict, tokenizer) -> list[dict[str, torch.Tensor]]:
    """The calibration batches (input_ids, attention_mask, and labels for classification) of the
    data `draw_text` or `labelled` gave: what the statistics and the refit stage run on."""
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


def redraw_calibration(spec: SweepSpec, tokenizer) -> list[dict[str, torch.Tensor]]:
    """The calibration batches of a sweep, drawn again from its sources (deterministic)."""
    data = draw_text(spec, tokenizer) if spec.task.type == "causal-lm" else labelled(spec)
    return calibration_batches(spec, data, tokenizer)


# -- the calibration cache ------------------------------------------------------------------------


def _stamp(source: str) -> list | None:
    """Size and modification time of the files of a `path:` source, so an edited file is a new key."""
    scheme, _, rest = source.partition(":")
    if scheme != "path":
        return None
    root = Path(rest).expanduser()
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    return [[str(p.relative_to(root)) if root.is_dir() else p.name, p.stat().st_size, p.stat().st_mtime_ns]
            for p in files if p.exists()]


def needs_gradients(spec: SweepSpec) -> bool:
    """Whether a method of the sweep reads Fisher statistics (the calibration's backward pass)."""
    return any(m.needs_gradients for m in method_configs(spec))


def needs_weight_fisher(spec: SweepSpec) -> bool:
    """Whether a method of the sweep reads the weight Fisher (the weights' gradients in that pass)."""
    return any(m.needs_weight_fisher for m in method_configs(spec))


# what a calibration pass collects, the most first: (gradients, weight_fisher) -> what the log says of it
PASSES = {(True, True): "",
          (True, False): " (no weight gradients: no method of the sweep reads the weight Fisher)",
          (False, False): " (forward only: no method of the sweep needs gradients)"}


def calibration_key(spec: SweepSpec, gradients: bool | None = None, weight_fisher: bool | None = None) -> str:
    """What the statistics depend on: model, task data and dense finetune, calibration settings
    (and, for local `path:` sources, their files' sizes and times), and what the pass collected:
    gradients, and the weight Fisher among them (default: what the sweep needs)."""
    gradients = needs_gradients(spec) if gradients is None else gradients
    weight_fisher = needs_weight_fisher(spec) if weight_fisher is None else weight_fisher
    task = spec.task_settings()
    cal = spec.calibration_settings()
    body = {"format": _CACHE_FORMAT, "model": spec.model, "seed": spec.seed, "calibration": cal,
            "task": task["type"], "files": [_stamp(spec.model), _stamp(cal["source"])]}
    if not gradients:  # keys of the full statistics are what they always were
        body["gradients"] = False
    elif not weight_fisher:
        body["weight_fisher"] = False
    if spec.task.type == "classification":
        body["task"] = {k: task[k] for k in ("type", "train", "text_column", "label_column", "max_length",
                                             "train_examples", "dense_finetune")}
        body["finetune_format"] = FINETUNE_FORMAT  # the cache holds the task-finetuned dense weights
        body["files"].append(_stamp(task["train"]))
    blob = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def calibration_cache() -> Path:
    """Where statistics are cached: `$LRSWEEP_CACHE/calibration` (default: the user cache dir)."""
    return cache_dir() / "calibration"


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write a safetensors file whole or not at all: a temporary file renamed over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _cached(path: Path, what: str, read):
    """`read(path)` of a cache file; None when there is none, or when it is damaged or does not fit
    the model (a warning: it is computed again, and the new file replaces it)."""
    if not path.is_file():
        return None
    try:
        return read(path)
    except Exception as e:  # noqa: BLE001 - a cache is only a cache: whatever is wrong with it, recompute it
        log.warning(f"the cached {what} {path} cannot be used ({type(e).__name__}: {str(e).strip()[:200]}); "
                    f"computed again, the file is replaced")
        return None


def cached_stats(key: str, model=None) -> CalibrationStats | None:
    """The cached calibration statistics of `key` (checked against `model` when given), or None."""
    def read(path: Path) -> CalibrationStats:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata()
        stats = CalibrationStats.from_tensors(load_file(str(path)), metadata)
        if model is not None:
            stats.check_matches(model)
        return stats

    return _cached(calibration_cache() / f"{key}.safetensors", "calibration statistics", read)


def cached_dense_weights(key: str, model=None) -> dict[str, torch.Tensor] | None:
    """The cached task-finetuned dense weights of `key` (loaded into `model` when given), or None."""
    def read(path: Path) -> dict[str, torch.Tensor]:
        state = load_file(str(path))
        if model is not None:
            own = model.state_dict()
            if state.keys() != own.keys() or any(state[k].shape != own[k].shape for k in own):
                raise ValueError(f"its tensors are not those of {type(model).__name__}")
            model.load_state_dict(state)
        return state

    return _cached(calibration_cache() / f"{key}.dense.safetensors", "dense task-finetuned weights", read)


def check_cache() -> None:
    """UserInputError, before anything is computed, when the calibration cache cannot be written."""
    check_location(str(calibration_cache()), f"the calibration cache ({CACHE_ENV})")


# -- the memory guard -----------------------------------------------------------------------------


def available_memory() -> int:
    """Bytes of memory available to new allocations now (psutil, a dependency of accelerate)."""
    import psutil

    return int(psutil.virtual_memory().available)


def check_stats_memory(spec: SweepSpec, model) -> int:
    """Estimate the calibration statistics of `model` from its shapes, log it, and raise a
    UserInputError (before anything is computed) when it is above `limits.stats_memory_gb`, or
    by default above half the available memory. Returns the estimate in bytes."""
    need = estimate_stats_bytes(model, gradients=needs_gradients(spec), weight_fisher=needs_weight_fisher(spec))
    limit_gb = spec.limits.stats_memory_gb
    if limit_gb is None:
        free = available_memory()
        limit, origin = STATS_MEMORY_FRACTION * free, f"half the memory available on this machine ({free / 1e9:.2f} GB)"
    else:
        limit, origin = limit_gb * 1e9, "limits.stats_memory_gb"
    log.info(f"calibration statistics: {need / 1e9:.3f} GB (estimated from the model's shapes; "
             f"limit {limit / 1e9:.3f} GB)")
    if need > limit:
        raise UserInputError(
            f"limits.stats_memory_gb: the calibration statistics of {spec.model} need about {need / 1e9:.3f} GB "
            f"(float64 Gram matrices and Fisher vectors of every targeted layer), more than the "
            f"{limit / 1e9:.3f} GB allowed by {origin}; run the driver on a machine with more memory, "
            f"or raise limits.stats_memory_gb if you know it fits")
    return need


# -- the steps --------------------------------------------------------------------------------------


def check_positions(spec: SweepSpec, model) -> None:
    """UserInputError when a token window of the sweep is longer than the model has positions
    (GPT-2 would fail on it, rotary models would run beyond what they were trained for)."""
    limit = max_positions(model.config)
    if limit is None:
        return
    task, cal = spec.task_settings(), spec.calibration_settings()
    for where, length in (("task.seq_len", task.get("seq_len")), ("task.max_length", task.get("max_length")),
                          ("calibration.seq_len", cal["seq_len"]), ("latency.seq_len", spec.latency.seq_len)):
        if length is not None and length > limit:
            raise UserInputError(f"{where}: {length} tokens, but {spec.model} has {limit} positions "
                                 f"(max_position_embeddings); allowed: at most {limit}")


def _load(spec: SweepSpec, timings: dict[str, float]) -> tuple[LoadedModel, dict]:
    start = time.perf_counter()
    if spec.task.type == "causal-lm":
        loaded = load_model(spec.model, task="causal-lm", seed=spec.seed)
        check_positions(spec, loaded.model)
        data = draw_text(spec, loaded.tokenizer)
    else:
        data = labelled(spec)
        loaded = load_model(spec.model, task="classification", num_labels=data["num_labels"], seed=spec.seed)
        check_positions(spec, loaded.model)
    timings["load"] = time.perf_counter() - start
    log.info(f"model {spec.model}: {model_size(loaded.model)[0] / 1e6:.1f} M parameters, loaded in "
             f"{timings['load']:.1f} s")
    return loaded, data


def _dense_weights(spec: SweepSpec, loaded: LoadedModel, data: dict, key: str, timings: dict[str, float]) -> dict | None:
    """Classification: task-finetune the dense classifier once (cached with the statistics)."""
    timings["dense_finetune"] = 0.0
    if spec.task.type != "classification":
        return None
    path = calibration_cache() / f"{key}.dense.safetensors"
    if cached_dense_weights(key, loaded.model) is not None:
        log.info(f"dense task finetune: reused {path}")
    else:
        start = time.perf_counter()
        task = spec.task_settings()
        recipe = FinetuneConfig(**task["dense_finetune"], max_length=task["max_length"], seed=spec.seed)
        log.info(f"dense task finetune: {recipe.steps} steps on {len(data['train'])} examples")
        task_finetune_classifier(loaded.model, loaded.tokenizer, data["train"], recipe)
        timings["dense_finetune"] = time.perf_counter() - start
        _save_atomic({k: v.contiguous() for k, v in loaded.model.state_dict().items()}, path,
                     {"format": "lowrank-sweep/dense", "sweep_model": spec.model})
    return {k: v.detach().clone() for k, v in loaded.model.state_dict().items()}


def calibration_keys(spec: SweepSpec) -> list[str]:
    """The keys of every pass of the sweep's settings (`PASSES`), the most collected first."""
    return [calibration_key(spec, *p) for p in PASSES]


def cache_key(spec: SweepSpec) -> str:
    """The calibration key the sweep uses: its own when cached, else that of cached statistics of a
    pass that collected more (a superset: with gradients, or with the weight Fisher too), else its own."""
    key = calibration_key(spec)
    folder = calibration_cache()
    if (folder / f"{key}.safetensors").is_file():
        return key
    keys = calibration_keys(spec)
    return next((k for k in keys[:keys.index(key)] if (folder / f"{k}.safetensors").is_file()), key)


def _pass_settings(spec: SweepSpec, key: str) -> dict:
    """`collect_stats`' arguments for the statistics of calibration key `key`: what that key's pass
    collects (`PASSES`) and the sweep's Fisher settings."""
    gradients, weight_fisher = next(p for p, k in zip(PASSES, calibration_keys(spec)) if k == key)
    cal = spec.calibration
    return {"gradients": gradients, "weight_fisher": weight_fisher, "fisher": cal.fisher,
            "fisher_samples": cal.fisher_samples, "seed": spec.calibration_settings()["seed"]}


def _calibration_task(model_source: str, task: str, num_labels: int | None, seed: int, dense_state,
                      batches: list[dict[str, torch.Tensor]], settings: dict) -> CalibrationStats:
    """Runs in a Ray worker with a GPU: the calibration pass there (statistics back on the CPU)."""
    loaded = load_model(model_source, task=task, num_labels=num_labels, seed=seed)
    if dense_state is not None:
        loaded.model.load_state_dict(dense_state)
    return collect_stats(loaded.model.to("cuda"), batches, task=task, progress=False, **settings)


def _collect(spec: SweepSpec, loaded: LoadedModel, data: dict, batches, settings: dict, progress: bool
             ) -> CalibrationStats:
    """The calibration pass (`collect_stats(**settings)`) on a GPU when the sweep reserves one: this
    machine's, or else (a CPU head node of a cluster) a GPU worker's through Ray; on the CPU otherwise."""
    if spec.resources.gpu > 0 and torch.cuda.is_available():
        try:
            return collect_stats(loaded.model.to("cuda"), batches, task=spec.task.type, progress=progress,
                                 **settings)
        finally:
            loaded.model.to("cpu")
    if spec.resources.gpu > 0 and ray.is_initialized():
        log.info("calibration: on a GPU worker of the cluster")
        dense_state = loaded.model.state_dict() if spec.task.type == "classification" else None
        task = ray.remote(num_gpus=spec.resources.gpu, num_cpus=spec.resources.cpu,
                          max_retries=spec.limits.retries)(_calibration_task)
        return ray.get(task.remote(spec.model, spec.task.type, data.get("num_labels"), spec.seed, dense_state,
                                   batches, settings))
    return collect_stats(loaded.model, batches, task=spec.task.type, progress=progress, **settings)


def _statistics(spec: SweepSpec, loaded: LoadedModel, data: dict, key: str, progress: bool
                ) -> tuple[CalibrationStats, bool, float]:
    """(statistics of key `key`, whether they came from the cache, seconds)."""
    folder = calibration_cache()
    settings = _pass_settings(spec, key)  # what the key promises, also when it is a superset's
    path = folder / f"{key}.safetensors"
    start = time.perf_counter()
    stats = cached_stats(key, loaded.model)
    cached = stats is not None
    if cached:
        log.info(f"calibration: reused {path}")
    else:
        batches = calibration_batches(spec, data, loaded.tokenizer)
        stats = _collect(spec, loaded, data, batches, settings, progress)
        tensors, metadata = stats.to_tensors()
        _save_atomic(tensors, path, metadata)
        write_file(str(folder), f"{key}.json", json.dumps(
            {"key": key, "model": spec.model, "task": spec.task.type, "calibration": spec.calibration_settings(),
             "meta": stats.meta}, indent=2).encode())
        scope = PASSES[settings["gradients"], settings["weight_fisher"]]
        log.info(f"calibration: {stats.meta.get('sequences')} sequences in {stats.meta.get('seconds')} s{scope}, "
                 f"saved to {path}")
    return stats, cached, time.perf_counter() - start


def stats_for(spec: SweepSpec, progress: bool = True) -> Prepared:
    """The model, data, dense weights and calibration statistics of a sweep (from the cache, or
    computed), without evaluating the dense baseline: what `export` rebuilds a trial from."""
    timings: dict[str, float] = {}
    key = cache_key(spec)
    check_cache()
    loaded, data = _load(spec, timings)
    check_stats_memory(spec, loaded.model)  # fail before the dense finetune and calibration
    dense_state = _dense_weights(spec, loaded, data, key, timings)
    stats, cached, seconds = _statistics(spec, loaded, data, key, progress)
    return Prepared(loaded=loaded, data=data, stats=stats, calibration_key=key, calibration_cached=cached,
                    seconds_calibration=seconds, dense_state=dense_state, timings=timings)


def prepare(spec: SweepSpec, progress: bool = True) -> Prepared:
    """Load, (task-finetune,) evaluate the dense model, and calibrate (or load cached statistics)."""
    timings: dict[str, float] = {}
    key = cache_key(spec)
    check_cache()
    loaded, data = _load(spec, timings)
    check_stats_memory(spec, loaded.model)  # fail before the dense baseline and calibration
    dense_state = _dense_weights(spec, loaded, data, key, timings)
    task = spec.task_settings()
    eval_kw = {"batch_size": task["eval_batch_size"]}
    if spec.task.type == "classification":
        eval_kw["max_length"] = task["max_length"]
    dense = evaluate(loaded.model, spec.task.type, data["eval"], tokenizer=loaded.tokenizer, **eval_kw)
    log.info(f"dense baseline: {dense.metric} {dense.value:.4g} ({dense.seconds:.1f} s)")
    stats, cached, seconds = _statistics(spec, loaded, data, key, progress)
    params, size_mb = model_size(loaded.model)
    dense_row = TrialRow(
        trial_id="dense", status="ok", method="dense", ratio=0.0, target_ratio=0.0, achieved_ratio=0.0,
        params_dense=params, params_compressed=params, size_mb=size_mb, metric_name=dense.metric,
        metric=dense.value, metric_dense=dense.value, finetune_steps=0, seconds_calibration=seconds,
        seconds_decompose=0.0, seconds_compress=0.0, seconds_eval=dense.seconds,
        seconds_finetune=timings["dense_finetune"], calibration_key=key)
    return Prepared(loaded=loaded, data=data, stats=stats, calibration_key=key, calibration_cached=cached,
                    seconds_calibration=seconds, dense_row=dense_row, dense_state=dense_state, timings=timings)
