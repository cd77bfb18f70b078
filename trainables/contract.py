"""The trial contract: what a trial is given (`TrialConfig`) and what it reports (`TrialRow`).

`TrialConfig` is built by the sweep (grid expansion or an Optuna suggestion) and travels through
Tune as a plain dict (`to_dict` / `from_dict`). Its `trial_id` is the one id of a trial: a hash of
everything that changes its results (`identity`), so the same settings are the same trial in every
sweep, and nothing has to be tracked by hand between compression, finetuning and export.

`TrialRow` is one row of the results table: its fields, in order, are the table's columns, and
their types give the column dtypes (`TrialRow.columns`). The trial reports it to Tune after every
evaluation; the dense baseline row, a failed trial's row and export's record are built from it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

from compression.methods import method_key
from trainables.finetune import identity_settings

# TrialConfig fields that do not change a trial's results: left out of its id.
NOT_IDENTITY = ("resources", "checkpoints")


@dataclass(frozen=True)
class TrialConfig:
    """One trial, as the sweep resolved it.

    task, calibration and finetune are the sweep file's sections with every default filled in
    (`sweeps.spec`), finetune with a grid block's or Optuna's finetune values applied; finetune
    holds `FinetuneConfig`'s keyword arguments. options are the method's options that differ from
    its defaults. group_ratios and granularity are set by an Optuna search (allocation "optuna").
    refit holds `compression.refit.refit`'s settings ({"dense": ..., "damp": ...}) when the trial
    refits its compressed layers on the calibration batches (None: it does not)."""

    model: str
    task: dict
    calibration: dict
    finetune: dict
    seed: int
    method: str
    ratio: float
    allocation: str
    options: dict = field(default_factory=dict)
    group_ratios: dict | None = None
    granularity: str | None = None
    refit: dict | None = None
    resources: dict = field(default_factory=lambda: {"cpu": 1.0, "gpu": 0.0})
    checkpoints: dict = field(default_factory=lambda: {"keep": 0})

    def identity(self) -> dict:
        """What changes the trial's results (and nothing else): the body of its id. Fields that are
        None (not set: an option this trial does not use) are left out, so a field added with
        default None keeps every existing trial's id; so do finetune settings added later, at their
        defaults (`trainables.finetune.identity_settings`)."""
        body = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in NOT_IDENTITY and getattr(self, f.name) is not None}
        return body | {"finetune": identity_settings(self.finetune)}

    @property
    def trial_id(self) -> str:
        """The deterministic id of the trial (the `trial_id` column): 12 hex digits of a hash."""
        blob = json.dumps(self.identity(), sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    @property
    def method_key(self) -> str:
        """The key of the shared decompositions this trial reads (`MethodConfig.key`)."""
        return method_key(self.method, self.options)

    @property
    def metric_name(self) -> str:
        return "perplexity" if self.task["type"] == "causal-lm" else "accuracy"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, config: dict) -> TrialConfig:
        """From a dict Tune handed a trial: a grid value ({"trial": {...}}) or an Optuna config
        (constants plus what Optuna chose, flat). Keys that are not fields (Optuna's raw
        parameter values, already folded into `options` and `group_ratios`) are left out."""
        config = config.get("trial", config)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in names})


def _dtype(annotation: str) -> str:
    """The pandas dtype of a TrialRow field annotation."""
    return {"str": "string", "float": "float64", "int | None": "Int64"}[annotation]


@dataclass
class TrialRow:
    """One row of `trials.parquet`. Units: ratios are fractions of the targeted parameters,
    parameter counts whole-model (embeddings included, tied weights once), sizes MB = 10^6 bytes,
    times wall seconds, latencies milliseconds."""

    trial_id: str = ""
    status: str = "running"              # ok | error | stopped (early-stopped or cut by a limit)
    error: str = ""
    method: str = ""                     # "dense" on the baseline row
    ratio: float = math.nan
    allocation: str = ""
    options: str = "{}"                  # JSON, the method's non-default options, e.g. {"alpha": 0.5}
    group_ratios: str = "{}"             # JSON, the per-group ratios Optuna chose ({} otherwise)
    target_ratio: float = math.nan       # fraction of the targeted parameters to remove
    achieved_ratio: float = math.nan     # fraction actually removed
    params_dense: int | None = None      # whole model, embeddings included
    params_compressed: int | None = None
    size_mb: float = math.nan
    metric_name: str = ""                # perplexity | accuracy
    metric: float = math.nan             # the trial's final metric (after finetuning when there was any)
    metric_compressed: float = math.nan
    metric_finetuned: float = math.nan   # NaN when finetune.steps is 0
    metric_dense: float = math.nan
    finetune_steps: int | None = None
    finetune_loss: float = math.nan      # training loss of the last step
    seconds_calibration: float = math.nan  # once per sweep, repeated on every row
    seconds_decompose: float = math.nan    # once per method, repeated on every row of the method
    seconds_compress: float = math.nan
    seconds_eval: float = math.nan
    seconds_finetune: float = math.nan
    rank_plan: str = "{}"                # JSON of compression.allocation.RankPlan.to_dict()
    shape: str = ""                      # compression.cost.shape_key of the compressed model (its layer shapes)
    calibration_key: str = ""            # which cached statistics the trial used (the same for all rows)
    # forward latency of one batch, measured after the trials once per distinct shape (sweeps/latency.py)
    latency_device: str = ""             # where: "cpu (1 thread)", "cuda (NVIDIA H100 ...)"
    latency_batch: int | None = None     # sequences per forward pass
    latency_seq_len: int | None = None   # tokens per sequence
    latency_ms_dense: float = math.nan   # median; the dense model, its runs interleaved with the compressed one's
    latency_ms_compressed: float = math.nan
    latency_iqr_ms_dense: float = math.nan       # interquartile range of the runs: the spread
    latency_iqr_ms_compressed: float = math.nan
    speedup: float = math.nan            # latency_ms_dense / latency_ms_compressed (< 1: slower than dense)
    speedup_flops: float = math.nan      # dense / compressed FLOPs per token at latency_seq_len (compression.cost)
    checkpoint: str = ""                 # folder of the finetuned weights, relative to the sweep folder ("" = none)
    final_eval: str = "{}"               # JSON of the final_eval stage: {"task/metric": value, ...} (see sweeps.table)
    refit: str = "{}"                    # JSON, the refit settings ({} = no refit stage)
    seconds_refit: float = math.nan      # the refit stage (after compress, before evaluation); NaN without one
    finetune: str = "{}"                 # JSON, the trial's finetune settings (`FinetuneConfig` fields)
    params_trained: int | None = None    # parameters the finetune trained (LoRA: the adapters')
    finetune_curve: str = "{}"           # JSON, finetune step -> metric of every evaluation (0: before finetuning)

    @classmethod
    def columns(cls) -> dict[str, str]:
        """column -> pandas dtype, in file order."""
        hints = {f.name: f.type for f in dataclasses.fields(cls)}
        return {name: _dtype(str(hint)) for name, hint in hints.items()}

    @classmethod
    def for_trial(cls, config: TrialConfig, **values: Any) -> TrialRow:
        """The row of a trial before it has measured anything."""
        return cls(trial_id=config.trial_id, method=config.method, ratio=float(config.ratio),
                   allocation=config.allocation, options=json.dumps(config.options, sort_keys=True),
                   group_ratios=json.dumps(config.group_ratios or {}, sort_keys=True),
                   refit=json.dumps(config.refit or {}, sort_keys=True),
                   target_ratio=float(config.ratio), metric_name=config.metric_name,
                   finetune=json.dumps(config.finetune, sort_keys=True), **values)

    @classmethod
    def failed(cls, config: TrialConfig, message: str, last: dict | None = None) -> TrialRow:
        """An error row: the trial's last reported row when there is one, else its config alone."""
        row = cls.from_result(last, config.trial_id) if last else cls.for_trial(config)
        return dataclasses.replace(row, status="error", error=message)

    @classmethod
    def from_result(cls, result: dict, trial_id: str, **overrides: Any) -> TrialRow:
        """A row from a Tune result the trial reported (Tune's own keys are left out; Tune writes
        its own `trial_id` into every result, so ours is given)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in result.items() if k in names} | {"trial_id": trial_id} | overrides)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

