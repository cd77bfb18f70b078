"""`svd`: plain truncated SVD of the weight, W = U S V^T (L = R = I); loss ||W - W'||_F^2."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from compression.methods.base import LayerStats, MatrixMethod, check_weight, register
from compression.methods.factors import LowRankDecomposition, weighted_svd
from compression.methods.whitening import Whitening
from compression.targets import Target


@register
@dataclass(frozen=True)
class Svd(MatrixMethod):
    """Plain truncated SVD: needs no calibration statistics."""

    name: ClassVar[str] = "svd"
    needs: ClassVar[tuple[str, ...]] = ()

    def decompose(self, weight: Tensor, stats: LayerStats | None = None, unit: Target | None = None,
                  whitening: Whitening | None = None, store_dtype: torch.dtype = torch.float32) -> LowRankDecomposition:
        check_weight(weight)
        return weighted_svd(weight, method=self.name, store_dtype=store_dtype, unit=unit)
