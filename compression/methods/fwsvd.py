"""`fwsvd`: Fisher-weighted SVD (Hsu et al. 2022).

R = diag(d) with d_j^2 the column sums of the weight Fisher (normalised to RMS 1, floored at eps
times the mean): the SVD of W diag(d), B gets diag(d)^-1 implicitly (B = U_k^T W, see
`factors.py`). Loss: the Fisher-weighted weight error sum_j d_j^2 ||(W - W')_{:, j}||^2.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from compression.methods.base import LayerStats, MatrixMethod, as_float64, check_weight, register
from compression.methods.factors import LowRankDecomposition, importance_scale, weighted_svd
from compression.methods.whitening import Whitening, check_eps
from compression.targets import Target


@register
@dataclass(frozen=True)
class FwSvd(MatrixMethod):
    """eps: floor of the Fisher scales, relative to their mean."""

    name: ClassVar[str] = "fwsvd"
    needs: ClassVar[tuple[str, ...]] = ("col_fisher",)
    eps: float = 1e-6

    def validate(self) -> None:
        check_eps(self.name, self.eps)

    def decompose(self, weight: Tensor, stats: LayerStats | None = None, unit: Target | None = None,
                  whitening: Whitening | None = None, store_dtype: torch.dtype = torch.float32) -> LowRankDecomposition:
        check_weight(weight)
        stats = self.check_stats(stats)
        col = as_float64(stats.col_fisher, "col_fisher", (weight.shape[1],), weight.device)
        right, _ = importance_scale(col, self.eps)
        return weighted_svd(weight, right=right, method=self.name, store_dtype=store_dtype, unit=unit)
