"""What one Tune trial does: compress the dense model with one method, ratio and allocation,
evaluate, finetune, evaluate again, and `tune.report` after every evaluation.

The trial receives its config (a `TrialConfig`, as a plain dict through Tune) and a `Shared`
bundle of Ray object refs that the launcher put once: the calibration statistics, each method's
config and ratio-independent decompositions, the token windows / labelled examples (and the
calibration batches when a trial refits), and (classification) the task-finetuned dense weights. Nothing here parses a sweep file or
recomputes what is shared.

Every report carries the full row of the results table (`trainables.contract.TrialRow`). Failures:

- a mistake in the input (`UserInputError`: a rank plan that cannot be met, a bad option) and any
  other Python exception from the trial's own code is deterministic (same config, same seed, same
  error), so retrying it would only burn compute: the trial reports status "error" with the
  message and returns normally, and the sweep goes on;
- what can go differently on another attempt is raised to Tune, which retries the trial up to
  the sweep's `limits.retries` (`FailureConfig(max_failures=...)`) and then records it as failed:
  a crash or OOM kill of the worker process or the loss of its node (Tune sees the actor die;
  nothing in this module runs), running out of CUDA or host memory (a concurrent trial may have
  held it), a lost object or dead actor in Ray, and OS / network errors (storage, a hub download).

On a GPU (`resources.gpu` > 0 and CUDA visible in the worker), the trial compresses, evaluates,
measures and finetunes on its CUDA device: the model and the method's decompositions are moved
there (they arrive on the CPU, so CPU-only trials can read the same objects); the rank plan is
made on the CPU from the decompositions' loss curves, which is cheap and device-independent.
"""

from __future__ import annotations

import copy
import json
import math
import os
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray
import torch
from ray import tune
from torch import nn

from compression.apply import compress, plan_ranks
from compression.cost import shape_key
from compression.errors import UserInputError
from compression.refit import refit, row_scales
from compression.targets import find_targets
from trainables.adapters import Healing
from trainables.contract import TrialConfig, TrialRow
from trainables.evaluation import evaluate
from trainables.finetune import FinetuneConfig, finetune
from trainables.memory import keep_freed_memory, release_memory
from trainables.sources import LoadedModel, load_model

CHECKPOINT_WEIGHTS = "weights.safetensors"  # the finetuned parameters, in a trial's Tune checkpoint


@dataclass
class Shared:
    """What the launcher computed once and every trial reads (object refs, plus their costs).

    methods: method key -> its MethodConfig (a trial plans and compresses with it);
    decompositions: method key -> object ref of its decompositions; decomposition_errors: method
    key -> why its decompositions could not be computed (its trials fail with that message).
    data: {"eval": ..., "train": ...} (token windows [N, T] or (text, label) lists), "num_labels"
    (classification) and, when a trial refits, "calibration" (the batches). dense_state: weights of
    the task-finetuned dense classifier,
    None when the trials start from the model as loaded.
    """

    stats: Any  # CalibrationStats without Grams and Fisher vectors (a trial plans and checks only)
    methods: dict[str, Any]
    decompositions: dict[str, Any]
    data: Any
    decomposition_errors: dict[str, str] = field(default_factory=dict)
    dense_state: Any = None
    metric_dense: float = math.nan
    params_dense: int = 0
    seconds_calibration: float = 0.0
    seconds_decompose: dict[str, float] = field(default_factory=dict)
    calibration_key: str = ""

    def first_row(self, config: TrialConfig) -> TrialRow:
        """The trial's row before it has measured anything: the shared figures filled in."""
        return TrialRow.for_trial(
            config, params_dense=self.params_dense, metric_dense=self.metric_dense, finetune_steps=0,
            seconds_calibration=self.seconds_calibration,
            seconds_decompose=self.seconds_decompose.get(config.method_key, math.nan),
            seconds_compress=0.0, seconds_eval=0.0, seconds_finetune=0.0, calibration_key=self.calibration_key)


# Dense models already loaded by this worker process, keyed by (source, task, num_labels, seed):
# trials that run one after another in a reused actor load the model once.
_MODELS: dict[tuple, LoadedModel] = {}


def _dense_model(source: str, task: str, num_labels: int | None, seed: int) -> LoadedModel:
    key = (source, task, num_labels, seed)
    if key not in _MODELS:
        _MODELS.clear()
        _MODELS[key] = load_model(source, task=task, num_labels=num_labels, seed=seed)
    return _MODELS[key]


def _from_launch_dir(source: str) -> str:
    """Tune runs trials in their own folder: a relative `path:` source is relative to where the
    sweep was launched."""
    scheme, _, rest = source.partition(":")
    origin = os.environ.get("TUNE_ORIG_WORKING_DIR")
    if scheme == "path" and origin and not os.path.isabs(os.path.expanduser(rest)):
        return f"path:{os.path.join(origin, rest)}"
    return source


def model_size(model: nn.Module) -> tuple[int, float]:
    """(parameters, megabytes): every parameter once (tied weights once), MB = 10^6 bytes."""
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() * p.element_size() for p in params) / 1e6


def _report(row: TrialRow, stage: str, step: int = 0, checkpoint=None, **updates) -> None:
    """Update the row and report it to Tune (with the stage and step, which are not columns)."""
    for name, value in updates.items():
        setattr(row, name, value)
    tune.report(row.to_dict() | {"stage": stage, "step": step}, checkpoint=checkpoint)


def _refit(model: nn.Module, dense: nn.Module, batches, stats, decompositions, settings: dict,
           device: torch.device) -> float:
    """The refit stage (`compression.refit`) on the trial's device; its seconds."""
    try:
        dense.to(device)
        report = refit(model, dense, batches, stats.targets, row_scales(decompositions),
                       dense_layers=settings["dense"], damp=settings["damp"])
    finally:
        dense.to("cpu")  # the worker's cached dense model stays on the CPU
    return report.seconds


def _save_weights(weights: dict[str, torch.Tensor], folder: str) -> None:
    """The weights finetuning changed (`Healing.weights`), as safetensors."""
    from safetensors.torch import save_file

    save_file({n: w.contiguous() for n, w in weights.items()}, os.path.join(folder, CHECKPOINT_WEIGHTS),
              metadata={"format": "lowrank-sweep/finetuned"})


def retryable(error: BaseException) -> bool:
    """Whether another attempt of the trial could succeed (see the module docstring): such errors
    go to Tune, which retries the trial; all others become an error row at once."""
    if isinstance(error, UserInputError):
        return False
    return isinstance(error, (torch.OutOfMemoryError, MemoryError, ray.exceptions.RayError, OSError, TimeoutError))


def trainable(config: dict, shared: Shared) -> None:
    """Tune function trainable (wrap with `tune.with_parameters(trainable, shared=...)`).

    Grid sweeps pass each whole trial config as one grid value under "trial"; Optuna sweeps pass
    it flat (constants plus what Optuna chose): `TrialConfig.from_dict` reads both."""
    trial = TrialConfig.from_dict(config)
    keep_freed_memory()
    row = shared.first_row(trial)
    try:
        _run(trial, shared, row)
    except Exception as e:  # noqa: BLE001 - any failure becomes an error row; the sweep goes on
        if retryable(e):
            raise  # Tune retries the trial (limits.retries), then records it as failed
        print(f"trial {row.trial_id} failed:\n{traceback.format_exc()}", flush=True)
        _report(row, "final", status="error", error=f"{type(e).__name__}: {e}", metric=math.nan)
    finally:
        release_memory()


def _run(config: TrialConfig, shared: Shared, row: TrialRow) -> None:
    """The stages of a trial: plan and compress, refit (optional), evaluate, finetune, evaluate.
    (Latency is measured after the trials, once per distinct shape: `sweeps/latency.py`.)"""
    task = config.task
    torch.set_num_threads(max(1, int(config.resources.get("cpu", 1))))
    torch.manual_seed(config.seed)
    gpu = config.resources.get("gpu", 0) > 0 and torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")

    data = ray.get(shared.data)
    stats = ray.get(shared.stats)
    if config.method_key in shared.decomposition_errors:  # the same error on every attempt: not retried
        raise RuntimeError(f"the decompositions of {config.method_key} failed: "
                           f"{shared.decomposition_errors[config.method_key]}")
    method = shared.methods[config.method_key]
    decompositions = ray.get(shared.decompositions[config.method_key])
    loaded = _dense_model(_from_launch_dir(config.model), task["type"], data.get("num_labels"), config.seed)
    if shared.dense_state is not None:  # the cached dense model becomes the task-finetuned classifier
        loaded.model.load_state_dict(ray.get(shared.dense_state))
    model = copy.deepcopy(loaded.model)

    start = time.perf_counter()
    if config.allocation == "optuna":
        plan = plan_ranks(model, stats, method, config.ratio, "explicit", decompositions,
                          group_ratios=config.group_ratios, granularity=config.granularity)
    else:
        plan = plan_ranks(model, stats, method, config.ratio, config.allocation, decompositions)
    if device.type != "cpu":  # compress on the trial's GPU: truncation math (float64) runs there
        model.to(device)
        decompositions = {name: d.to(device) for name, d in decompositions.items()}
    compress(model, stats, method, plan, decompositions)
    if device.type != "cpu":
        torch.cuda.synchronize(device)
    params, size_mb = model_size(model)
    row.seconds_compress = time.perf_counter() - start
    row.achieved_ratio, row.params_compressed, row.size_mb = plan.achieved_ratio, params, size_mb
    row.rank_plan = json.dumps(plan.to_dict(), sort_keys=True)
    if config.refit is not None:
        row.seconds_refit = _refit(model, loaded.model, data["calibration"], stats, decompositions, config.refit,
                                   device)
    row.shape = shape_key(model)
    del stats, decompositions
    model.to(device)

    def run_eval() -> float:
        kw = {"batch_size": task["eval_batch_size"], "device": device}
        if task["type"] == "classification":
            kw["max_length"] = task["max_length"]
        result = evaluate(model, task["type"], data["eval"], tokenizer=loaded.tokenizer, **kw)
        row.seconds_eval += result.seconds
        return result.value

    value = run_eval()
    _report(row, "compressed", metric=value, metric_compressed=value)
    _heal(config, row, model, loaded, plan, data.get("train"), run_eval, device)  # no "train" without steps


def _heal(config: TrialConfig, row: TrialRow, model: nn.Module, loaded: LoadedModel, plan, train_data,
          run_eval: Callable[[], float], device: torch.device) -> None:
    """The finetune stage: heal the compressed `model` (which layers train, and how: LoRA or full;
    the loss: LM or distillation from the dense model, `loaded.model`), evaluating every
    `eval_every` steps. The row's metric is that of the best evaluation so far, and with
    `checkpoints.keep` each evaluation that improves on the best saves the weights (LoRA merged),
    so a trial stopped early (ASHA, a time limit) keeps its best evaluated weights for export."""
    ft = FinetuneConfig(**config.finetune)
    if ft.steps == 0:
        _report(row, "final", status="ok")
        return
    healing = Healing.prepare(model, find_targets(loaded.model), plan, ft)
    row.params_trained = healing.params_trained
    curve = {0: row.metric_compressed}
    better = (lambda a, b: a > b) if config.metric_name == "accuracy" else (lambda a, b: a < b)
    keep = config.checkpoints.get("keep", 0) > 0
    start, outside = time.perf_counter(), 0.0  # outside: seconds spent evaluating and saving

    def evaluated(step: int, value: float, stage: str = "finetune", **final) -> None:
        """Record the evaluation after `step` steps and report it (with the weights, if the best)."""
        nonlocal outside
        began = time.perf_counter()
        curve[step] = value
        improved = math.isnan(row.metric_finetuned) or better(value, row.metric_finetuned)
        updates = {"finetune_steps": step, "finetune_curve": json.dumps(curve),
                   "seconds_finetune": began - start - outside}
        if improved:
            updates |= {"metric": value, "metric_finetuned": value}
        updates |= final
        with tempfile.TemporaryDirectory() as folder:
            checkpoint = None
            if improved and keep:
                _save_weights(healing.weights(), folder)
                checkpoint = tune.Checkpoint.from_directory(folder)
            _report(row, stage, step=step, checkpoint=checkpoint, **updates)
        outside += time.perf_counter() - began

    def on_eval(step: int) -> None:
        nonlocal outside
        began = time.perf_counter()
        value = run_eval()
        outside += time.perf_counter() - began
        evaluated(step, value)

    teacher = loaded.model if ft.loss == "distill" else None
    try:
        result = finetune(model, config.task["type"], train_data, ft, tokenizer=loaded.tokenizer, on_eval=on_eval,
                          device=device, teacher=teacher)
    finally:
        loaded.model.to("cpu")  # the worker's cached dense model stays on the CPU
    healing.merge()
    final = {"status": "ok", "seconds_finetune": result.seconds,
             "finetune_loss": result.losses[-1] if result.losses else math.nan}
    if ft.steps in curve:  # the last step was evaluated (and reported) in on_eval
        _report(row, "final", step=ft.steps, **final)
    else:
        evaluated(ft.steps, run_eval(), "final", **final)
