"""Finetuning: one training loop for causal LMs and sequence classifiers.

AdamW over the parameters that require grad, the standard schedules of transformers
(`transformers.get_scheduler`: linear warmup from 0, then cosine / linear decay or constant),
gradient clipping, gradient accumulation, a seeded data order that cycles through the data for as
many steps as asked, and an optional callback every `eval_every` optimizer steps. The loss is the
task's cross-entropy (`loss: lm`) or distillation from a teacher model (`loss: distill`,
`trainables.distill`), optionally mixed with it. On CUDA the forward passes can run under bf16 or
fp16 autocast (fp16 with a gradient scaler); on the CPU in float32, or under bf16 autocast when
asked (`cpu_precision`: fast where the CPU has bf16 instructions). Which parameters
train (all, the compressed layers, some roles; LoRA adapters) is `trainables.adapters`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
import transformers
from torch import nn

from compression.errors import UserInputError
from compression.targets import ROLES
from trainables.distill import distillation_loss, teacher_logits
from trainables.evaluation import (
    check_examples,
    check_task,
    logits_of,
    num_labels_of,
    resolve_device,
    tokenize,
    upcast,
)
from trainables.frozen_cast import FrozenLinearCast
from trainables.head_loss import IGNORE, chunked_cross_entropy, split_head

SCHEDULES = ("cosine", "linear", "constant")
_SCHEDULERS = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}  # transformers' names
KINDS = ("full", "lora")
LOSSES = ("lm", "distill")
PRECISIONS = ("float32", "bf16", "fp16")
CPU_PRECISIONS = ("float32", "bf16")  # fp16 autocast is not a CPU path
log = logging.getLogger("lrsweep")
TRAIN_LAYERS = ("all", "compressed")
_HEAD_CHECK_TOKENS = 16  # the tokens on which the split into backbone and output layer is checked
# Bumped when the same settings train differently (part of the cache key of task-finetuned dense
# weights). 2: transformers' schedules, whose warmup starts at lr 0.
FINETUNE_FORMAT = 2


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_train(value):
    """`train`: "all" (every parameter; LoRA: every targeted layer), "compressed" (the layers the
    method replaced) or a list of roles (the targeted layers of those roles). UserInputError otherwise."""
    if isinstance(value, str) and value in TRAIN_LAYERS:
        return value
    if isinstance(value, (list, tuple)) and value and all(isinstance(r, str) and r in ROLES for r in value) \
            and len(set(value)) == len(value):
        return list(value)
    raise UserInputError(f"finetune train must be {' or '.join(TRAIN_LAYERS)}, or a list of distinct roles "
                         f"(allowed: {', '.join(ROLES)}), got {value!r}")


@dataclass
class FinetuneConfig:
    """How to finetune. `steps` counts optimizer steps; each one sees batch_size * grad_accum examples.

    Warmup is `warmup_steps` if given, else round(warmup_ratio * steps).
    `max_grad_norm` None disables clipping. `max_length` truncates
    classification texts (tokens). `eval_every` 0 never calls back.

    What trains (`trainables.adapters`): `kind` "full" trains the parameters of the `train`
    layers; "lora" adds LoRA adapters of rank `lora_rank` (scale lora_alpha / lora_rank, dropout
    `lora_dropout`) to them and trains only those. The loss: "lm" is the task's cross-entropy;
    "distill" is (1 - lm_weight) T^2 KL(teacher || student) at temperature T + lm_weight times the
    cross-entropy. `precision` bf16 / fp16 autocasts the forward passes on CUDA; on the CPU they run
    in float32 unless `cpu_precision` is bf16 (bf16 autocast: 1.1-2.8x faster steps on a CPU with
    AVX512-BF16 or AMX, slower on one without); `gradient_checkpointing` trades compute for
    activation memory.
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
    train: str | list[str] = "all"
    # Fields added after trial ids were first recorded: at their defaults they are left out of a
    # trial's id (`identity_settings`), so the trials of older sweeps keep their ids.
    kind: str = "full"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    loss: str = "lm"
    temperature: float = 2.0
    lm_weight: float = 0.0
    precision: str = "float32"
    gradient_checkpointing: bool = False
    cpu_precision: str = "float32"

    def __post_init__(self) -> None:
        for name in ("steps", "eval_every", "seed"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise UserInputError(f"finetune {name} must be an integer >= 0, got {value!r}")
        for name in ("batch_size", "grad_accum", "max_length", "lora_rank"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise UserInputError(f"finetune {name} must be an integer >= 1, got {value!r}")
        for name in ("lr", "lora_alpha", "temperature"):
            if not _is_number(getattr(self, name)) or getattr(self, name) <= 0:
                raise UserInputError(f"finetune {name} must be a number > 0, got {getattr(self, name)!r}")
        if self.warmup_steps is not None and (not _is_int(self.warmup_steps) or self.warmup_steps < 0):
            raise UserInputError(f"finetune warmup_steps must be an integer >= 0 or null, got {self.warmup_steps!r}")
        for name, hi in (("warmup_ratio", 1), ("lm_weight", 1), ("lora_dropout", 0.99)):
            if not _is_number(getattr(self, name)) or not 0 <= getattr(self, name) <= hi:
                raise UserInputError(f"finetune {name} must be a number in [0, {hi}], got {getattr(self, name)!r}")
        if self.warmup_steps is not None and self.warmup_ratio:
            raise UserInputError("finetune warmup_steps and warmup_ratio are exclusive; give one of them")
        for name, allowed in (("schedule", SCHEDULES), ("kind", KINDS), ("loss", LOSSES), ("precision", PRECISIONS),
                              ("cpu_precision", CPU_PRECISIONS)):
            if getattr(self, name) not in allowed:
                raise UserInputError(f"finetune {name} {getattr(self, name)!r} is not known; allowed: {', '.join(allowed)}")
        if self.max_grad_norm is not None and (not _is_number(self.max_grad_norm) or self.max_grad_norm <= 0):
            raise UserInputError(f"finetune max_grad_norm must be a number > 0 or null (no clipping), got {self.max_grad_norm!r}")
        if not _is_number(self.weight_decay) or self.weight_decay < 0:
            raise UserInputError(f"finetune weight_decay must be a number >= 0, got {self.weight_decay!r}")
        if not isinstance(self.gradient_checkpointing, bool):
            raise UserInputError(f"finetune gradient_checkpointing must be true or false, got {self.gradient_checkpointing!r}")
        self.train = check_train(self.train)

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


# The fields of FinetuneConfig added after trial ids were first recorded, and the settings each
# one applies to (None: always).
LATER_FIELDS = {"kind": None, "lora_rank": ("kind", "lora"), "lora_alpha": ("kind", "lora"),
                "lora_dropout": ("kind", "lora"), "loss": None, "temperature": ("loss", "distill"),
                "lm_weight": ("loss", "distill"), "precision": None, "gradient_checkpointing": None,
                "cpu_precision": None}
_DEFAULTS = {f.name: f.default for f in fields(FinetuneConfig)}


def applies(name: str, settings: dict) -> bool:
    """Whether setting `name` has any effect given the other `settings` (lora_* only train LoRA,
    temperature and lm_weight only distillation)."""
    condition = LATER_FIELDS.get(name)
    return condition is None or settings.get(condition[0], _DEFAULTS[condition[0]]) == condition[1]


def recipe(settings: dict) -> dict:
    """How a trial heals, in short: the later fields (kind, loss, LoRA and distillation settings,
    precision, ...) that are set and apply; {} for a plain full finetune on the LM loss."""
    return {k: v for k, v in identity_settings(settings).items() if k in LATER_FIELDS}


def identity_settings(settings: dict) -> dict:
    """The finetune settings that make a trial what it is (the body of its id): without the later
    fields that hold their defaults or do not apply, so a sweep written before they existed keeps
    its trial ids and recipes that train alike are one trial."""
    return {k: v for k, v in settings.items()
            if k not in LATER_FIELDS or (v != _DEFAULTS[k] and applies(k, settings))}


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


def _autocast_dtype(config: FinetuneConfig, device: torch.device) -> torch.dtype | None:
    """The forward passes' autocast dtype (None: float32, no autocast): `precision` on CUDA,
    `cpu_precision` on the CPU, float32 on other devices."""
    if device.type == "cpu" and config.cpu_precision == "bf16":
        if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            log.warning("finetune cpu_precision bf16: this CPU has no bf16 instructions, bf16 autocast may be "
                        "slower than float32")
        return torch.bfloat16
    if device.type != "cuda" or config.precision == "float32":
        return None
    return torch.bfloat16 if config.precision == "bf16" else torch.float16


def _checkpointing(model: nn.Module, enable: bool) -> None:
    """Gradient checkpointing of a transformers model on or off (non-reentrant: it works when the
    embeddings are frozen, as with LoRA)."""
    if not enable:
        return
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise UserInputError(f"finetune gradient_checkpointing: {type(model).__name__} does not support it; "
                             f"set it to false")
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def finetune(
    model: nn.Module,
    task: str,
    train_data,
    config: FinetuneConfig,
    tokenizer=None,
    on_eval: Callable[[int], None] | None = None,
    device: str | torch.device | None = None,
    teacher: nn.Module | None = None,
) -> FinetuneResult:
    """Train the parameters of `model` that require grad; return per-step losses.

    causal-lm: train_data is a LongTensor of windows [N, T]; the loss is the
    mean next-token loss over the N' * (T - 1) predicted tokens of an
    optimizer step. classification: train_data is a list of (text, label),
    tokenized with padding and truncation to config.max_length; the loss is
    the mean over the examples of a step. With grad_accum > 1
    every micro-batch's summed loss is divided by the step's total count, so
    the update equals that of one batch of batch_size * grad_accum.

    `teacher` (loss "distill"): a model with the same outputs, evaluated on the same inputs in
    inference mode (`trainables.distill`); it is moved to the training device and not trained.

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
    distill = config.loss == "distill"
    if distill:
        if teacher is None:
            raise UserInputError("finetune loss 'distill' needs the teacher model (the dense model) to distil from")
        teacher.to(device).eval()
    dtype = _autocast_dtype(config, device)
    autocast = contextlib.nullcontext if dtype is None else (lambda: torch.autocast(device.type, dtype=dtype))
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None

    optimizer = torch.optim.AdamW(_param_groups(params, config.weight_decay), lr=config.lr)
    scheduler = transformers.get_scheduler(_SCHEDULERS[config.schedule], optimizer, num_warmup_steps=config.warmup,
                                           num_training_steps=config.steps)
    generator = torch.Generator().manual_seed(config.seed)
    batches = _index_batches(n, config.batch_size, generator)
    result = FinetuneResult()

    def micro_batch(indices: list[int]) -> tuple[dict[str, torch.Tensor], torch.Tensor, int, int]:
        """Model inputs, the targets, number of loss terms, number of input tokens."""
        if task == "causal-lm":
            ids = train_data[indices].to(device=device, dtype=torch.long)
            following = F.pad(ids[:, 1:], (0, 1), value=IGNORE)  # the last position predicts nothing
            return {"input_ids": ids, "use_cache": False}, following, ids.shape[0] * (ids.shape[1] - 1), ids.numel()
        enc = tokenize(tokenizer, [train_data[i][0] for i in indices], config.max_length, device)
        labels = torch.tensor([train_data[i][1] for i in indices], device=device)
        tokens = int(enc["attention_mask"].sum()) if "attention_mask" in enc else enc["input_ids"].numel()
        return enc, labels, len(indices), tokens

    def predicting(logits: torch.Tensor) -> torch.Tensor:
        """The logits that predict a next token (causal LM: all positions but the last)."""
        return logits[:, :-1] if task == "causal-lm" else logits

    lm_weight = config.lm_weight if distill else 1.0
    # The next-token loss alone: through the output layer a chunk of tokens at a time when the
    # logits are a plain linear layer on the backbone's hidden states (trainables.head_loss).
    split = split_head(model, train_data[:1, :_HEAD_CHECK_TOKENS].to(device)) \
        if task == "causal-lm" and lm_weight == 1 else None

    def summed_loss(inputs: dict, targets: torch.Tensor) -> torch.Tensor:
        """The loss summed over the micro-batch's loss terms (see FinetuneConfig for the mix). The
        cross-entropy reads the logits whole (the last position's target is ignored): slicing
        [batch, len, vocab] logits copies them and zero-fills their size again in the backward pass."""
        if split is not None:
            backbone, head = split
            return chunked_cross_entropy(backbone(**inputs)[0].flatten(0, -2), head, targets.flatten())
        logits = logits_of(model(**inputs))
        loss = torch.zeros((), device=device)
        if lm_weight > 0:
            cross_entropy = F.cross_entropy(upcast(logits).flatten(0, -2), targets.flatten(), ignore_index=IGNORE,
                                            reduction="sum")
            loss = loss + lm_weight * cross_entropy
        if distill and lm_weight < 1:
            taught = predicting(teacher_logits(teacher, inputs, autocast))
            loss = loss + (1 - lm_weight) * distillation_loss(predicting(logits), taught, config.temperature)
        return loss

    frozen = None if dtype is None else FrozenLinearCast(model, dtype)
    cuda_devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    start, callback_seconds = time.perf_counter(), 0.0
    try:
        _checkpointing(model, config.gradient_checkpointing)
        if frozen is not None:
            frozen.cast()
        # Seeded dropout without touching the caller's global RNG state.
        with torch.random.fork_rng(devices=cuda_devices):
            torch.manual_seed(config.seed)
            model.train()
            for step in range(1, config.steps + 1):
                micro = [micro_batch(next(batches)) for _ in range(config.grad_accum)]
                count = sum(m[2] for m in micro)
                step_loss = torch.zeros((), dtype=torch.float64, device=device)
                for inputs, targets, _, tokens in micro:
                    with autocast():
                        loss = summed_loss(inputs, targets) / count
                    (scaler.scale(loss) if scaler else loss).backward()
                    step_loss += loss.detach()
                    result.tokens += tokens
                if scaler:
                    scaler.unscale_(optimizer)  # clip the true gradients
                if config.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                result.lrs.append(optimizer.param_groups[0]["lr"])
                if scaler:
                    scaler.step(optimizer)  # skipped when the scaled gradients overflowed
                    scaler.update()
                else:
                    optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                result.losses.append(step_loss.item())
                result.steps = step
                if on_eval is not None and config.eval_every and step % config.eval_every == 0:
                    eval_start = time.perf_counter()
                    if frozen is not None:
                        frozen.restore()  # evaluations (and saved weights) see the float32 weights
                    on_eval(step)
                    model.train()
                    if frozen is not None:
                        frozen.cast()
                    callback_seconds += time.perf_counter() - eval_start
    finally:
        if frozen is not None:
            frozen.restore()
        optimizer.zero_grad(set_to_none=True)
        if config.gradient_checkpointing and getattr(model, "supports_gradient_checkpointing", False):
            model.activation_checkpointing_disable()
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
