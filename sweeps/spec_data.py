"""The sweep file's sections about what a sweep reads: the task (its data and evaluation), the
optimizer settings a finetune shares, and the calibration pass (`sweeps.spec` composes them)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from compression.calibration import FISHERS
from sweeps.section import PosInt, Section, check_source
from trainables.finetune import SCHEDULES




class TrainSettings(Section):
    """Optimizer settings shared by the per-trial finetune and the dense task finetune."""

    steps: int = Field(0, ge=0)
    lr: float = Field(5e-5, gt=0)
    batch_size: PosInt = 8
    grad_accum: PosInt = 1
    warmup_steps: int | None = Field(None, ge=0)
    warmup_ratio: float = Field(0.0, ge=0, le=1)
    schedule: Literal[SCHEDULES] = "cosine"  # type: ignore[valid-type]
    max_grad_norm: float | None = Field(1.0, gt=0)
    weight_decay: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _one_warmup(self):
        if self.warmup_steps is not None and self.warmup_ratio:
            raise ValueError("warmup_steps and warmup_ratio are exclusive; give one of them")
        return self


class CausalLMTask(Section):
    type: Literal["causal-lm"]
    eval: str = Field(description="text source of the held-out perplexity windows")
    seq_len: int = Field(256, ge=8)
    eval_windows: PosInt = 32
    eval_batch_size: PosInt = 8
    train: str | None = Field(None, description="text source for finetuning (default: calibration.source)")
    train_windows: PosInt | None = Field(None, description="finetuning windows (default: all that remain)")

    _eval = field_validator("eval")(lambda v: check_source(v, "text"))
    _train = field_validator("train")(lambda v: v if v is None else check_source(v, "text"))


class ClassificationTask(Section):
    type: Literal["classification"]
    train: str = Field(description="labelled source; its train split finetunes and calibrates")
    eval: str | None = Field(None, description="labelled source to evaluate on (default: train)")
    eval_split: Literal["validation", "test"] = "validation"
    text_column: str | None = None
    label_column: str | None = None
    max_length: int = Field(128, ge=8)
    eval_examples: PosInt | None = None
    train_examples: PosInt | None = None
    eval_batch_size: PosInt = 32
    dense_finetune: TrainSettings = TrainSettings(
        steps=300, lr=1e-4, batch_size=32, warmup_ratio=0.1, schedule="linear", weight_decay=0.01)

    _train = field_validator("train")(lambda v: check_source(v, "labelled"))
    _eval = field_validator("eval")(lambda v: v if v is None else check_source(v, "labelled"))


TASK_MODELS: dict[str, type[BaseModel]] = {"causal-lm": CausalLMTask, "classification": ClassificationTask}


class Calibration(Section):
    """`fisher`: where the Fisher statistics' labels come from: the data (`empirical`) or draws
    from the model's own prediction (`sampled`, the Monte Carlo Fisher; `fisher_samples` draws per
    token, each one more backward pass, seeded by `seed`). See `compression.calibration`."""

    source: str | None = Field(None, description="default: task.train (classification) or task.eval")
    samples: PosInt = 128
    seq_len: int | None = Field(None, ge=8, description="default: task.seq_len / task.max_length")
    batch_size: PosInt = 8
    seed: int | None = Field(None, description="default: the sweep seed")
    fisher: Literal[FISHERS] = "empirical"  # type: ignore[valid-type]
    fisher_samples: PosInt = 1

    @model_validator(mode="after")
    def _samples_need_sampling(self):
        if self.fisher_samples != 1 and self.fisher != "sampled":
            raise ValueError(f"fisher_samples {self.fisher_samples} applies to fisher: sampled only "
                             f"(fisher is {self.fisher!r})")
        return self
