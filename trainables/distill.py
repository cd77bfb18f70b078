"""Knowledge distillation from the dense teacher: the loss and the teacher's logits.

With temperature T, p = softmax(teacher / T) and q = softmax(student / T), the loss of one
prediction is T^2 KL(p || q) = T^2 sum_i p_i (log p_i - log q_i) (Hinton et al. 2015). Its
gradient with respect to the student's logits is T (q - p): the T^2 keeps the gradient's scale
independent of T, so the loss mixes with the cross-entropy at any temperature. KL(p || p) = 0.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from trainables.evaluation import logits_of, upcast


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 KL(softmax(teacher / T) || softmax(student / T)), summed over the rows of [..., classes]
    logits (in float32 at least)."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape")
    student = F.log_softmax(upcast(student_logits) / temperature, dim=-1)
    teacher = F.log_softmax(upcast(teacher_logits) / temperature, dim=-1)
    kl = F.kl_div(student.flatten(0, -2), teacher.flatten(0, -2), log_target=True, reduction="sum")
    return temperature ** 2 * kl


def teacher_logits(teacher: nn.Module, inputs: dict, autocast: Callable[[], contextlib.AbstractContextManager]
                   = contextlib.nullcontext) -> torch.Tensor:
    """The teacher's logits for the model inputs `inputs`, in inference mode (no graph, no
    gradients) and under the student's `autocast()` (so in the training dtype); returned as a
    normal tensor, which the student's loss may keep for its backward pass."""
    with torch.inference_mode(), autocast():
        logits = logits_of(teacher(**inputs))
    return logits.clone()
