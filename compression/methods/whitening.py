"""Whitening (SVD-LLM): S with S S^T = G from an eigendecomposition, never a failing Cholesky;
and the base of the methods that whiten (`whiten`, `whiten-fw`, `whiten-fd`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from compression.errors import UserInputError
from compression.methods.base import LayerStats, MatrixMethod, as_float64


def whitening_factor(gram: Tensor, clamp: float = 1e-12) -> Tensor:
    """S = Q diag(sqrt(max(lambda, clamp * lambda_max))) for G = Q diag(lambda) Q^T, in float64.

    The clamp replaces the zero, tiny and round-off negative eigenvalues of a rank-deficient G
    (fewer tokens than inputs, dead inputs) by a floor, so S is invertible and finite.
    ||(W - W') S||_F^2 then equals ||(W - W') X||_F^2 plus clamp * lambda_max times the squared
    norm of the error on the null space of G: a tie-break that orders the directions the
    calibration data never excites by their weight norm, far below the loss of any real direction.
    An all-zero G (no tokens reached the layer) gives S = I, i.e. plain SVD.
    """
    g = gram.to(torch.float64)
    g = 0.5 * (g + g.T)
    lam, q = torch.linalg.eigh(g)
    top = float(lam[-1]) if lam.numel() else 0.0
    floor = clamp * top if top > 0 else 1.0
    return q * lam.clamp(min=floor).sqrt()


@dataclass(frozen=True)
class WhiteningMethod(MatrixMethod):
    """A matrix method whose right factor is the whitening S of its input's Gram matrix.

    clamp: floor of the eigenvalues of G relative to the largest (see `whitening_factor`)."""

    whitens: ClassVar[bool] = True
    clamp: float = 1e-12

    def validate(self) -> None:
        if not 0 < self.clamp < 1:
            raise UserInputError(f"method {self.name!r}: option clamp must be in (0, 1), got {self.clamp}")

    def whitening(self, gram: Tensor) -> Tensor:
        return whitening_factor(gram, self.clamp)

    def right_factor(self, stats: LayerStats, n: int, device: torch.device, whitening: Tensor | None) -> Tensor:
        """The precomputed whitening, or the one of stats.gram."""
        if whitening is not None:
            return whitening
        return self.whitening(as_float64(stats.gram, "gram", (n, n), device))


def check_eps(method: str, eps: float) -> None:
    """The floor of the Fisher scales, relative to their mean: a number in (0, 1)."""
    if not 0 < eps < 1:
        raise UserInputError(f"method {method!r}: option eps must be in (0, 1), got {eps}")
