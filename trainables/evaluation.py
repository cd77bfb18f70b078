"""Evaluation: perplexity of causal LMs, accuracy and macro-F1 of sequence classifiers.

Both metrics are computed here (perplexity from the logits, classification
metrics with scikit-learn); nothing is fetched from the network.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from compression.errors import UserInputError

TASKS = ("causal-lm", "classification")


@dataclass
class EvalResult:
    """One evaluation: the metric's name and value, extra numbers, and throughput.

    `tokens` counts the input tokens the model processed (padding excluded),
    `tokens_per_s` = tokens / seconds of wall time.
    """

    metric: str
    value: float
    extra: dict[str, float] = field(default_factory=dict)
    tokens: int = 0
    seconds: float = 0.0
    tokens_per_s: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def check_task(task: str) -> None:
    if task not in TASKS:
        raise UserInputError(f"task {task!r} is not supported; allowed: {', '.join(TASKS)}")


def resolve_device(model: nn.Module, device: str | torch.device | None) -> torch.device:
    """`device` if given (the model is moved there), else the device of the model's parameters."""
    if device is not None:
        device = torch.device(device)
        model.to(device)
        return device
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def logits_of(output) -> torch.Tensor:
    """Logits from a Hugging Face model output (or a model that returns the tensor itself)."""
    return output if isinstance(output, torch.Tensor) else output.logits


def upcast(logits: torch.Tensor) -> torch.Tensor:
    """Half-precision logits to float32 for the loss; float32 and float64 stay as they are."""
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserInputError(f"batch_size must be a positive integer, got {batch_size!r}")


def perplexity(
    model: nn.Module,
    windows: torch.Tensor,
    batch_size: int = 8,
    device: str | torch.device | None = None,
) -> EvalResult:
    """exp(mean token NLL) over every predicted token of the windows [N, T].

    Each window is an independent sequence: positions 1..T-1 are predicted from
    the tokens before them, so the mean is over N * (T - 1) tokens. NLLs are
    summed per window in (at least) float32 and accumulated in float64, so the result
    does not depend on `batch_size` (beyond float rounding in the model).
    """
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.dtype.is_floating_point:
        raise UserInputError("windows must be an integer tensor [N, T] of token ids")
    n, seq_len = windows.shape
    if n < 1 or seq_len < 2:
        raise UserInputError(f"windows must hold at least one window of at least 2 tokens, got shape {tuple(windows.shape)}")
    _check_batch_size(batch_size)
    device = resolve_device(model, device)
    was_training = model.training
    model.eval()
    try:
        _sync(device)
        start = time.perf_counter()
        with torch.inference_mode():
            nll = torch.zeros((), dtype=torch.float64, device=device)
            for i in range(0, n, batch_size):
                ids = windows[i : i + batch_size].to(device=device, dtype=torch.long)
                logits = logits_of(model(input_ids=ids, use_cache=False))
                # one window at a time: the float32 copy of [T, vocab] logits stays small
                for row_logits, row_ids in zip(logits, ids):
                    nll += F.cross_entropy(upcast(row_logits[:-1]), row_ids[1:], reduction="sum").double()
            total = nll.item()
        _sync(device)
        seconds = time.perf_counter() - start
    finally:
        model.train(was_training)
    predicted = n * (seq_len - 1)
    mean_nll = total / predicted
    value = math.exp(mean_nll) if mean_nll < 700 else math.inf
    tokens = n * seq_len
    return EvalResult(
        metric="perplexity",
        value=value,
        extra={"nll": mean_nll, "predicted_tokens": predicted, "windows": n},
        tokens=tokens,
        seconds=seconds,
        tokens_per_s=tokens / seconds if seconds > 0 else math.inf,
    )


def check_examples(examples, name: str = "examples", num_labels: int | None = None) -> None:
    """Labelled data must be a non-empty list of (text, int label) within the model's labels."""
    if not examples:
        raise UserInputError(f"{name} is empty; give a list of (text, label) pairs")
    for i, example in enumerate(examples):
        if not (isinstance(example, (tuple, list)) and len(example) == 2 and isinstance(example[0], str)):
            raise UserInputError(f"{name}[{i}] must be a (text, label) pair, got {example!r:.80}")
        label = example[1]
        if isinstance(label, bool) or not isinstance(label, int) or label < 0:
            raise UserInputError(f"{name}[{i}] has label {label!r}; labels must be integers >= 0")
        if num_labels is not None and label >= num_labels:
            raise UserInputError(
                f"{name}[{i}] has label {label} but the model has {num_labels} labels (allowed 0..{num_labels - 1})"
            )


def num_labels_of(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    return getattr(config, "num_labels", None)


def tokenize(tokenizer, texts: list[str], max_length: int, device: torch.device) -> dict[str, torch.Tensor]:
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {k: v.to(device) for k, v in enc.items()}


def classification_metrics(
    model: nn.Module,
    tokenizer,
    examples: list[tuple[str, int]],
    batch_size: int = 32,
    max_length: int = 128,
    device: str | torch.device | None = None,
) -> EvalResult:
    """Accuracy (the metric) and macro-F1 (extra["macro_f1"]) of argmax predictions.

    Macro-F1 averages the per-class F1 over the labels that occur in the
    targets or the predictions (scikit-learn's default), a class never
    predicted correctly scoring 0.
    """
    check_examples(examples, num_labels=num_labels_of(model))
    _check_batch_size(batch_size)
    device = resolve_device(model, device)
    was_training = model.training
    model.eval()
    predictions: list[torch.Tensor] = []
    tokens = 0
    try:
        _sync(device)
        start = time.perf_counter()
        with torch.inference_mode():
            for i in range(0, len(examples), batch_size):
                texts = [text for text, _ in examples[i : i + batch_size]]
                enc = tokenize(tokenizer, texts, max_length, device)
                predictions.append(logits_of(model(**enc)).argmax(-1).cpu())
                tokens += int(enc["attention_mask"].sum()) if "attention_mask" in enc else enc["input_ids"].numel()
        _sync(device)
        seconds = time.perf_counter() - start
    finally:
        model.train(was_training)
    from sklearn.metrics import accuracy_score, f1_score  # imported here: 1.6 s, for classification only

    y_pred = torch.cat(predictions).tolist()
    y_true = [label for _, label in examples]
    return EvalResult(
        metric="accuracy",
        value=float(accuracy_score(y_true, y_pred)),
        extra={"macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)), "examples": len(examples)},
        tokens=tokens,
        seconds=seconds,
        tokens_per_s=tokens / seconds if seconds > 0 else math.inf,
    )


def evaluate(model: nn.Module, task: str, data, tokenizer=None, **kw) -> EvalResult:
    """Perplexity for "causal-lm" (data: windows [N, T]); accuracy for "classification" (data: (text, label) pairs)."""
    check_task(task)
    if task == "causal-lm":
        return perplexity(model, data, **kw)
    if tokenizer is None:
        raise UserInputError("task 'classification' needs a tokenizer to evaluate")
    return classification_metrics(model, tokenizer, data, **kw)
