"""Frozen linear weights held in the autocast dtype while a model trains under autocast.

Autocast casts a linear layer's float32 weight to bf16 / fp16 at every call and caches the cast
only for weights that train, so a frozen weight (LoRA's base layers, the layers `train` leaves
out) is cast again in every forward pass of every step. Holding those weights in the autocast
dtype while training runs gives the same products, bit for bit (the cast is the same rounding),
without the casts (BENCHMARKS "finetune step": a few per cent of a LoRA step of a compressed
SmolLM2 under CPU bf16).
The float32 tensors are kept and put back for evaluations and when training ends, so nothing is
lost to rounding. Embeddings (and a head tied to them) are left alone: an embedding lookup is not
autocast, its dtype would change the hidden states'.
"""

from __future__ import annotations

import torch
from torch import nn


class FrozenLinearCast:
    """The frozen weights and biases of a model's `nn.Linear` layers, switchable between their own
    tensors (`restore`) and copies in `dtype` (`cast`)."""

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        embeddings = [m.weight for m in (model.get_input_embeddings(), model.get_output_embeddings())
                      if isinstance(getattr(m, "weight", None), torch.Tensor)] \
            if hasattr(model, "get_input_embeddings") else []
        shared = {id(w) for w in embeddings}
        self.dtype = dtype
        self.params = [p for m in model.modules() if type(m) is nn.Linear and id(m.weight) not in shared
                       for p in (m.weight, m.bias) if p is not None and not p.requires_grad
                       and p.dtype.is_floating_point and p.dtype != dtype]
        self.originals = [p.data for p in self.params]

    def cast(self) -> None:
        for p, original in zip(self.params, self.originals):
            p.data = original.to(self.dtype)

    def restore(self) -> None:
        for p, original in zip(self.params, self.originals):
            p.data = original
