"""The sections of a sweep file that say how it runs, not what it computes (none is part of the
sweep hash or of a trial id): resources, the latency measurement, checkpoints and limits."""

from __future__ import annotations

from pydantic import Field

from sweeps.section import PosInt, Section


class Resources(Section):
    cpu: float = Field(1.0, gt=0)
    gpu: float = Field(0.0, ge=0)
    max_concurrent: PosInt | None = None


class Latency(Section):
    """Forward latency, measured after the trials, once per distinct compressed shape, in one Ray
    task with a trial's resources (nothing else runs then): one batch of random token ids, the
    dense and the compressed model's runs interleaved, `warmup` untimed rounds then `repeats` timed
    ones (torch.utils.benchmark); median and interquartile range (0 repeats: not measured). Does
    not change results: not part of the trial id."""

    batch_size: PosInt = 8
    seq_len: PosInt = 256
    repeats: int = Field(5, ge=0)
    warmup: int = Field(1, ge=0)


class Checkpoints(Section):
    """Trials save their finetuned weights (safetensors) for `lrsweep export`; only the best `keep`
    trials of each target ratio keep them (so `export --best` with any ratio bound finds its
    weights), the rest are deleted as trials finish. 0 keeps none. Does not change results."""

    keep: int = Field(1, ge=0)


class Limits(Section):
    """What a sweep may spend. Time limits go to Ray Tune (`TuneConfig(time_budget_s)`, a stop on
    each trial's `time_total_s`, checked whenever the trial reports: after compression and at each
    finetuning evaluation); trials they cut are recorded "stopped" and `--resume` runs them again.
    `retries`: how often Tune retries a trial whose worker crashed (OOM kill, lost node, CUDA out of
    memory; `FailureConfig(max_failures)`); errors in the input are never retried.
    `stats_memory_gb`: the largest calibration statistics the sweep may compute (estimated from the
    model's shapes before they are computed); default: half the memory available when the sweep
    starts (the driver holds them and the object store a second copy)."""

    sweep_seconds: float | None = Field(None, gt=0, description="wall-time budget of the whole sweep")
    trial_seconds: float | None = Field(None, gt=0, description="wall-time limit of one trial")
    stats_memory_gb: float | None = Field(None, gt=0, description="largest calibration statistics, in GB")
    retries: int = Field(2, ge=0, description="retries of a trial whose worker crashed")
