"""`whiten-fd`: whitening with output-neuron importance (the full method).

L = diag(g^(alpha/2)) from the output-neuron Fisher g_i = mean over tokens of (dl/dy_i)^2,
normalised to RMS 1 and floored at eps times the mean; R = S (whitening). The SVD of D W S.

Why: the loss increase from an output error e is about 1/2 sum_i g_i e_i^2 (a second-order
estimate), so minimising ||D (W - W') X|| with D = diag(sqrt(g)) minimises it. alpha is an
exponent on D (0 = `whiten`). `form: identity` stores each rank-k matrix with an identity block,
k (m + n - k) parameters instead of k (m + n) (`identity_block.py`). The loss curve is reported in un-normalised units (times
mean(g^alpha)): with alpha = 1 a dropped sigma^2 is then sum over tokens of sum_i g_i e_i^2, twice
the Fisher estimate of the increase of the summed token loss (the 1/2 is dropped everywhere),
comparable across layers because every layer sees the same calibration tokens: what the
`spectrum` allocation needs to rank singular values of different layers fairly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from compression.errors import UserInputError
from compression.methods.base import LayerStats, as_float64, check_weight, register
from compression.methods.base import Factorization
from compression.methods.factors import LowRankDecomposition, importance_scale, weighted_svd
from compression.methods.identity_block import check_form, in_form
from compression.methods.whitening import Whitening, WhiteningMethod, check_eps
from compression.targets import Target


@register
@dataclass(frozen=True)
class WhitenFd(WhiteningMethod):
    """alpha: exponent of the neuron Fisher (0 = plain whiten); eps: floor of the scales; form:
    "factors" (A B) or "identity" (an identity block)."""

    name: ClassVar[str] = "whiten-fd"
    needs: ClassVar[tuple[str, ...]] = ("gram", "neuron_fisher")
    alpha: float = 1.0
    eps: float = 1e-6
    form: str = "factors"

    def validate(self) -> None:
        super().validate()
        check_eps(self.name, self.eps)
        check_form(self.name, self.form)
        if self.alpha < 0:  # finite: MethodConfig checks every float option
            raise UserInputError(f"method {self.name!r}: option alpha must be a finite number >= 0 "
                                 f"(0 = plain whiten), got {self.alpha}")

    def in_form(self, factors: Factorization) -> Factorization:
        return in_form(self.form, factors)

    def decompose(self, weight: Tensor, stats: LayerStats | None = None, unit: Target | None = None,
                  whitening: Whitening | None = None, store_dtype: torch.dtype = torch.float32) -> LowRankDecomposition:
        check_weight(weight)
        stats = self.check_stats(stats)
        m, n = weight.shape
        right = self.right_factor(stats, n, weight.device, whitening)
        g = as_float64(stats.neuron_fisher, "neuron_fisher", (m,), weight.device)
        row, loss_scale = importance_scale(g, self.eps, power=self.alpha)
        return weighted_svd(weight, row, right, method=self.name, loss_scale=loss_scale, store_dtype=store_dtype,
                            unit=unit)
