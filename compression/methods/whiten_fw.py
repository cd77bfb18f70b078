"""`whiten-fw`: whitening with parameter importance.

L = diag(sqrt of the row sums of the weight Fisher), normalised to RMS 1 and floored at eps times
the mean; R = S (whitening). The SVD of L W S; A = L^-1 U_k Sigma_k^1/2. Loss: the output error
weighted per output row by the row's parameter Fisher.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from compression.methods.base import LayerStats, as_float64, check_weight, register
from compression.methods.factors import LowRankDecomposition, importance_scale, weighted_svd
from compression.methods.whitening import Whitening, WhiteningMethod, check_eps
from compression.targets import Target


@register
@dataclass(frozen=True)
class WhitenFw(WhiteningMethod):
    """eps: floor of the Fisher scales, relative to their mean."""

    name: ClassVar[str] = "whiten-fw"
    needs: ClassVar[tuple[str, ...]] = ("gram", "row_fisher")
    eps: float = 1e-6

    def validate(self) -> None:
        super().validate()
        check_eps(self.name, self.eps)

    def decompose(self, weight: Tensor, stats: LayerStats | None = None, unit: Target | None = None,
                  whitening: Whitening | None = None, store_dtype: torch.dtype = torch.float32) -> LowRankDecomposition:
        check_weight(weight)
        stats = self.check_stats(stats)
        m, n = weight.shape
        right = self.right_factor(stats, n, weight.device, whitening)
        row, _ = importance_scale(as_float64(stats.row_fisher, "row_fisher", (m,), weight.device), self.eps)
        return weighted_svd(weight, row, right, method=self.name, store_dtype=store_dtype, unit=unit)
