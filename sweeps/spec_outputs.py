"""Sweep-file sections of what a sweep produces besides its trials' rows (none of them changes a
result or a trial id): `final_eval` (standard numbers after the trials, `sweeps.final_eval`) and
`tracking` (experiment trackers fed while the trials run, `sweeps.tracking`)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from sweeps.section import PosInt, Section, check_source


class FinalEval(Section):
    """After the trials, in the driver: lm-eval tasks (local ones such as lrsweep_local, or the
    standard names with a network) and perplexity at the model's full context over a text source,
    for the dense model and the chosen trials (the best of each ratio, or the Pareto front of
    size and metric)."""

    tasks: list[str] = Field(default_factory=list, description="lm-eval task names, tags or groups")
    limit: PosInt | None = Field(None, description="documents per task (default: all)")
    num_fewshot: int | None = Field(None, ge=0, description="default: each task's own")
    batch_size: PosInt = 8
    perplexity: str | None = Field(None, description="text source of the full-context perplexity")
    seq_len: int | None = Field(None, ge=8, description="perplexity context (default: the model's, at most 8192)")
    max_windows: PosInt | None = Field(None, description="a seeded subset of the perplexity windows")
    trials: Literal["best_per_ratio", "pareto"] = "best_per_ratio"
    device: str = Field("cpu", description="where the driver evaluates (cpu, cuda, cuda:1, ...)")

    _perplexity = field_validator("perplexity")(lambda v: v if v is None else check_source(v, "text"))

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, v: list[str]) -> list[str]:
        bad = [t for t in v if not re.fullmatch(r"[A-Za-z0-9][\w.:-]*", t)]
        if bad:
            raise ValueError(f"{bad} are not lm-eval task names (e.g. lrsweep_local, arc_easy)")
        return list(dict.fromkeys(v))

    @model_validator(mode="after")
    def _something(self):
        if not self.tasks and not self.perplexity:
            raise ValueError("give tasks (lm-eval names) and/or perplexity (a text source)")
        return self


class MLflowTracking(Section):
    """Ray Tune's MLflowLoggerCallback (needs `pip install lowrank-sweep[tracking]`), run by the
    driver: one MLflow run per trial, its config as params, every report as metrics. tracking_uri
    default: file:<sweep folder>/mlruns for a local storage; with a URI storage (s3://...) give the
    URI of an MLflow server (or set MLFLOW_TRACKING_URI)."""

    tracking_uri: str | None = None
    experiment: str | None = Field(None, description="default: the sweep name")
    tags: dict[str, str] = Field(default_factory=dict)


class WandbTracking(Section):
    """Ray Tune's WandbLoggerCallback (needs `pip install wandb`): one W&B run per trial. Mode
    offline (the default) writes the runs under `dir` (default: <sweep folder>/wandb) for a later
    `wandb sync`; online needs WANDB_API_KEY in the environment."""

    project: str | None = Field(None, description="default: the sweep name")
    group: str | None = None
    mode: Literal["online", "offline", "disabled"] = "offline"
    dir: str | None = None


class Tracking(Section):
    mlflow: MLflowTracking | None = None
    wandb: WandbTracking | None = None
