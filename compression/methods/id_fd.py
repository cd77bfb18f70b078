"""`id-fd`: interpolative decomposition of each MLP, neurons chosen by their Fisher-weighted output.

`id` picks the neurons that best reconstruct the intermediate activations, every neuron weighted
alike, whatever its down-projection column and however much its outputs move the loss. Here the
error that matters is the one at the down projection's outputs weighted by their neuron Fisher g
(the down layer's `neuron_fisher`, as `whiten-fd` weights its matrices): sum_i g_i e_i^2 is the
second-order estimate of the loss increase. An error of size delta in neuron j's activation
costs about delta^2 d_j with d_j = sum_i g_i W_d[i, j]^2, so the pivots are those of the pivoted
Cholesky of diag(d)^alpha/2 G diag(d)^alpha/2 (`neurons.py`); the interpolation into the down
projection is the least-squares one, as in `id` (no output weighting changes it), and the loss
curve is the exact Fisher-weighted output error of the down projection for each k, in the units
of `whiten-fd`'s (un-normalised: with alpha 1 a dropped sigma^2 there and a loss step here are the
same estimate), so `spectrum` can rank neurons and singular values against each other.

alpha 0 is `id` exactly (d and g to the power 0: every scale 1); alpha 1 the full weighting.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from compression.errors import UserInputError
from compression.methods.base import LayerStats, MlpMethod, as_float64, check_weight, register
from compression.methods.factors import importance_scale
from compression.methods.neurons import NeuronDecomposition, select_neurons
from compression.methods.whitening import check_eps
from compression.targets import MlpGroup


@register
@dataclass(frozen=True)
class IdFd(MlpMethod):
    """rtol: numerical rank of the activation Gram (as `id`); alpha: exponent of the Fisher
    weighting (0 = `id`); eps: floor of the scales relative to their mean."""

    name: ClassVar[str] = "id-fd"
    needs: ClassVar[tuple[str, ...]] = ("gram", "neuron_fisher")
    rtol: float = 1e-10
    alpha: float = 1.0
    eps: float = 1e-6

    def validate(self) -> None:
        if not 0 < self.rtol < 1:
            raise UserInputError(f"method {self.name!r}: option rtol must be in (0, 1), got {self.rtol}")
        check_eps(self.name, self.eps)
        if self.alpha < 0:
            raise UserInputError(f"method {self.name!r}: option alpha must be a finite number >= 0 "
                                 f"(0 = id), got {self.alpha}")

    def decompose(self, down_weight: Tensor, stats: LayerStats | None = None, unit: MlpGroup | None = None,
                  store_dtype: torch.dtype = torch.float32) -> NeuronDecomposition:
        """From the down weight [h, f] and the down layer's statistics (the Gram of its input and
        the neuron Fisher of its outputs)."""
        check_weight(down_weight)
        stats = self.check_stats(stats)
        h, f = down_weight.shape
        g = as_float64(stats.neuron_fisher, "neuron_fisher of the down projection", (h,), down_weight.device)
        row, loss_scale = importance_scale(g, self.eps, power=self.alpha)
        w = down_weight.to(torch.float64)
        neuron_weight = (g[:, None] * w.square()).sum(0)  # d_j = sum_i g_i W_d[i, j]^2
        pivot, _ = importance_scale(neuron_weight, self.eps, power=self.alpha)
        return select_neurons(stats.gram, down_weight, self.rtol, store_dtype, method=self.name, unit=unit,
                              pivot_scale=pivot, row_scale=row, loss_scale=loss_scale)
