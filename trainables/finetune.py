"""Finetuning: one plain training loop for causal LMs and sequence classifiers.

AdamW over the parameters that require grad, linear warmup then cosine /
linear decay (or constant), gradient clipping, gradient accumulation, a
seeded data order that cycles through the data for as many steps as asked,
and an optional callback every `eval_every` optimizer steps.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn

from compression.errors import UserInputError
from trainables.evaluation import (
    check_examples,
    check_task,
    logits_of,
    num_labels_of,
    resolve_device,
    tokenize,
    upcast,
)

SCHEDULES = ("cosine", "linear", "constant")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class FinetuneConfig:
    """How to finetune. `steps` counts optimizer steps; each one sees batch_size * grad_accum examples.

    Warmup is `warmup_steps` if given, else round(warmup_ratio * steps).
    `max_grad_norm` None disables clipping. `max_length` truncates
    classification texts (tokens). `eval_every` 0 never calls back.
    """

    steps: int = 0
    lr: float = 5e-5
    batch_size: int = 8
    grad_accum: int = 1
    warmup_steps: int | None = None
    warmup_ratio: float = 0.0
    schedule: str = "cosine"
    max_grad_norm: float | None = 1.0
    weight_decay: float = 0.0
    seed: int = 0
    eval_every: int = 0
    max_length: int = 128

    def __post_init__(self) -> None:
        for name in ("steps", "eval_every", "seed"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise UserInputError(f"finetune {name} must be an integer >= 0, got {value!r}")
        for name in ("batch_size", "grad_accum", "max_length"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise UserInputError(f"finetune {name} must be an integer >= 1, got {value!r}")
        if not _is_number(self.lr) or self.lr <= 0:
            raise UserInputError(f"finetune lr must be a number > 0, got {self.lr!r}")
        if self.warmup_steps is not None and (not _is_int(self.warmup_steps) or self.warmup_steps < 0):
            raise UserInputError(f"finetune warmup_steps must be an integer >= 0 or null, got {self.warmup_steps!r}")
        if not _is_number(self.warmup_ratio) or not 0 <= self.warmup_ratio <= 1:
            raise UserInputError(f"finetune warmup_ratio must be a number in [0, 1], got {self.warmup_ratio!r}")
        if self.warmup_steps is not None and self.warmup_ratio:
            raise UserInputError("finetune warmup_steps and warmup_ratio are exclusive; give one of them")
        if self.schedule not in SCHEDULES:
            raise UserInputError(f"finetune schedule {self.schedule!r} is not known; allowed: {', '.join(SCHEDULES)}")
        if self.max_grad_norm is not None and (not _is_number(self.max_grad_norm) or self.max_grad_norm <= 0):
            raise UserInputError(f"finetune max_grad_norm must be a number > 0 or null (no clipping), got {self.max_grad_norm!r}")
        if not _is_number(self.weight_decay) or self.weight_decay < 0:
            raise UserInputError(f"finetune weight_decay must be a number >= 0, got {self.weight_decay!r}")

    @classmethod
    def from_dict(cls, values: dict) -> FinetuneConfig:
        """Build from a plain mapping (a sweep file section); unknown keys are a UserInputError."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserInputError(f"unknown finetune field(s) {', '.join(unknown)}; allowed: {', '.join(sorted(known))}")
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else round(self.warmup_ratio * self.steps)

    def lr_factor(self, step: int) -> float:
        """Multiplier of `lr` for optimizer step `step` (0-based).

        Warmup: (step + 1) / W for step < W, so the first update is not wasted at 0.
        Then, with progress p = (step - W) / (steps - W) in [0, 1): cosine
        0.5 (1 + cos(pi p)), linear 1 - p, constant 1.
        """
        warmup = self.warmup
        if step < warmup:
            return (step + 1) / warmup
        if self.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, self.steps - warmup)
        if self.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress


@dataclass
class FinetuneResult:
    """losses[i] and lrs[i]: mean training loss and learning rate of optimizer step i + 1.

    `tokens` counts the input tokens trained on (padding excluded); `seconds`
    is the wall time of training, the time spent in on_eval excluded.
    """

    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    steps: int = 0
    tokens: int = 0
    lrs: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _index_batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[list[int]]:
    """Endless full batches of example indices: a fresh seeded permutation every epoch."""
    batch: list[int] = []
    while True:
        for i in torch.randperm(n, generator=generator).tolist():
            batch.append(i)
            if len(batch) == batch_size:
                yield batch
                batch = []


def _check_train_data(model: nn.Module, task: str, train_data, tokenizer) -> int:
    """Validate the training data for the task; return the number of examples."""
    if task == "causal-lm":
        if not isinstance(train_data, torch.Tensor) or train_data.dim() != 2 or train_data.dtype.is_floating_point:
            raise UserInputError("causal-lm train_data must be an integer tensor [N, T] of token windows")
        if train_data.shape[0] < 1 or train_data.shape[1] < 2:
            raise UserInputError(f"causal-lm train_data needs windows of at least 2 tokens, got shape {tuple(train_data.shape)}")
        return train_data.shape[0]
    if tokenizer is None:
        raise UserInputError("task 'classification' needs a tokenizer to finetune")
    check_examples(train_data, name="train_data", num_labels=num_labels_of(model))
    return len(train_data)


def _param_groups(params: list[nn.Parameter], weight_decay: float) -> list[dict]:
    """Weight decay on matrices only; biases and norm scales (1-d) are not decayed."""
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def finetune(
    model: nn.Module,
    task: str,
    train_data,
    config: FinetuneConfig,
    tokenizer=None,
    on_eval: Callable[[int], None] | None = None,
    device: str | torch.device | None = None,
) -> FinetuneResult:
    """Train the parameters of `model` that require grad; return per-step losses.

    causal-lm: train_data is a LongTensor of windows [N, T]; the loss is the
    mean next-token cross-entropy over the N' * (T - 1) predicted tokens of an
    optimizer step. classification: train_data is a list of (text, label),
    tokenized with padding and truncation to config.max_length; the loss is
    the mean cross-entropy over the examples of a step. With grad_accum > 1
    every micro-batch's summed loss is divided by the step's total count, so
    the update equals that of one batch of batch_size * grad_accum.

    on_eval(step) is called after optimizer steps eval_every, 2 eval_every, ...;
    the model is put back in train mode afterwards. The model ends in eval mode.
    """
    check_task(task)
    if config.steps == 0:
        return FinetuneResult()
    n = _check_train_data(model, task, train_data, tokenizer)
    device = resolve_device(model, device)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UserInputError("the model has no trainable parameters (none requires grad); nothing to finetune")

    optimizer = torch.optim.AdamW(_param_groups(params, config.weight_decay), lr=config.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, config.lr_factor)
    generator = torch.Generator().manual_seed(config.seed)
    batches = _index_batches(n, config.batch_size, generator)
    result = FinetuneResult()

    def micro_batch(indices: list[int]) -> tuple[dict[str, torch.Tensor], int, int]:
        """Model inputs, number of loss terms, number of input tokens."""
        if task == "causal-lm":
            ids = train_data[indices].to(device=device, dtype=torch.long)
            return {"input_ids": ids}, ids.shape[0] * (ids.shape[1] - 1), ids.numel()
        enc = tokenize(tokenizer, [train_data[i][0] for i in indices], config.max_length, device)
        enc["labels"] = torch.tensor([train_data[i][1] for i in indices], device=device)
        tokens = int(enc["attention_mask"].sum()) if "attention_mask" in enc else enc["input_ids"].numel()
        return enc, len(indices), tokens

    def summed_loss(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        if task == "causal-lm":
            ids = inputs["input_ids"]
            logits = logits_of(model(input_ids=ids, use_cache=False))
            return F.cross_entropy(upcast(logits[:, :-1].flatten(0, 1)), ids[:, 1:].flatten(), reduction="sum")
        labels = inputs.pop("labels")
        return F.cross_entropy(upcast(logits_of(model(**inputs))), labels, reduction="sum")

    cuda_devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    start, callback_seconds = time.perf_counter(), 0.0
    try:
        # Seeded dropout without touching the caller's global RNG state.
        with torch.random.fork_rng(devices=cuda_devices):
            torch.manual_seed(config.seed)
            model.train()
            for step in range(1, config.steps + 1):
                micro = [micro_batch(next(batches)) for _ in range(config.grad_accum)]
                count = sum(m[1] for m in micro)
                step_loss = torch.zeros((), dtype=torch.float64, device=device)
                for inputs, _, tokens in micro:
                    loss = summed_loss(inputs) / count
                    loss.backward()
                    step_loss += loss.detach()
                    result.tokens += tokens
                if config.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                result.lrs.append(optimizer.param_groups[0]["lr"])
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                result.losses.append(step_loss.item())
                result.steps = step
                if on_eval is not None and config.eval_every and step % config.eval_every == 0:
                    eval_start = time.perf_counter()
                    on_eval(step)
                    model.train()
                    callback_seconds += time.perf_counter() - eval_start
    finally:
        optimizer.zero_grad(set_to_none=True)
        model.eval()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    result.seconds = time.perf_counter() - start - callback_seconds
    return result


# Full finetune of a dense classifier whose head is freshly initialised (MiniLM on
# tweets), run once before compression: the model the sweep compresses and its baseline.
CLASSIFIER_RECIPE = FinetuneConfig(
    steps=300, lr=1e-4, batch_size=32, warmup_ratio=0.1, schedule="linear", weight_decay=0.01, max_length=64
)


def task_finetune_classifier(
    model: nn.Module,
    tokenizer,
    train: list[tuple[str, int]],
    config: FinetuneConfig | None = None,
    on_eval: Callable[[int], None] | None = None,
    device: str | torch.device | None = None,
) -> FinetuneResult:
    """Task-finetune a dense sequence classifier (default recipe: CLASSIFIER_RECIPE)."""
    return finetune(model, "classification", train, config or CLASSIFIER_RECIPE, tokenizer, on_eval, device)
