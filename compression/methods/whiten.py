"""`whiten`: SVD-LLM truncation-aware whitening.

R = S with S S^T = G (`whitening.py`): the SVD of W S; B = Sigma_k^-1/2 U_k^T W, which equals
Sigma_k^1/2 V_k^T S^-1 without inverting S. Loss: the output error on the calibration data,
||(W - W') X||_F^2 = sum of the dropped sigma^2.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from compression.methods.base import LayerStats, check_weight, register
from compression.methods.factors import LowRankDecomposition, weighted_svd
from compression.methods.whitening import Whitening, WhiteningMethod
from compression.targets import Target


@register
@dataclass(frozen=True)
class Whiten(WhiteningMethod):
    name: ClassVar[str] = "whiten"
    needs: ClassVar[tuple[str, ...]] = ("gram",)

    def decompose(self, weight: Tensor, stats: LayerStats | None = None, unit: Target | None = None,
                  whitening: Whitening | None = None, store_dtype: torch.dtype = torch.float32) -> LowRankDecomposition:
        check_weight(weight)
        stats = self.check_stats(stats) if whitening is None else stats
        right = self.right_factor(stats, weight.shape[1], weight.device, whitening)
        return weighted_svd(weight, right=right, method=self.name, store_dtype=store_dtype, unit=unit)
