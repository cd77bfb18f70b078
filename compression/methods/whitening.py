"""Whitening (SVD-LLM) without an eigendecomposition: the regularised Gram matrix of an input, its
Cholesky factor made only where a decomposition needs it; and the base of the methods that whiten
(`whiten`, `whiten-fw`, `whiten-fd`)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from compression.errors import UserInputError
from compression.methods.base import LayerStats, MatrixMethod, as_float64


class Whitening:
    """The whitening of one input: K = G + delta I with delta = clamp * trace(G), and S with
    S S^T = K (a Cholesky factor, lower, computed on first use and kept).

    delta replaces the exact null space of a rank-deficient G (fewer tokens than inputs, dead
    inputs) by a floor, so K is positive definite and S invertible and finite: ||(W - W') S||_F^2
    equals ||(W - W') X||_F^2 plus delta times the squared norm of the error, a tie-break that
    orders the directions the calibration data never excites by their weight norm, far below the
    loss of any real direction (trace(G) >= lambda_max, so delta <= n * clamp * lambda_max). An
    all-zero G (no tokens reached the layer) gives K = S = I, i.e. plain SVD. One Whitening serves
    every layer that reads the same input, in every whitening method: it depends on G and clamp
    only.
    """

    def __init__(self, gram: Tensor, clamp: float = 1e-12) -> None:
        g = gram.to(torch.float64)
        g = 0.5 * (g + g.T)
        trace = float(g.diagonal().sum())
        if trace > 0:
            self.delta = clamp * trace
            g = g + self.delta * torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
        else:
            self.delta = 1.0
            g = torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
        self.gram = g
        self._factor: Tensor | None = None

    def factor(self) -> Tensor:
        """S, lower triangular, S S^T = K. Should round-off make K numerically indefinite, the floor
        grows tenfold until it is not (never for clamp >> machine epsilon)."""
        if self._factor is None:
            eye = torch.eye(self.gram.shape[0], dtype=self.gram.dtype, device=self.gram.device)
            extra = 0.0
            while True:
                factor, info = torch.linalg.cholesky_ex(self.gram + extra * eye)
                if int(info) == 0:
                    break
                extra = 10 * (extra or self.delta)
            self._factor = factor
        return self._factor

    def to(self, device: torch.device | str) -> Whitening:
        out = copy.copy(self)
        out.gram = self.gram.to(device)
        out._factor = None if self._factor is None else self._factor.to(device)
        return out


@dataclass(frozen=True)
class WhiteningMethod(MatrixMethod):
    """A matrix method whose right factor is the whitening S of its input's Gram matrix.

    clamp: the floor added to G, relative to its trace (see `Whitening`)."""

    whitens: ClassVar[bool] = True
    clamp: float = 1e-12

    def validate(self) -> None:
        if not 0 < self.clamp < 1:
            raise UserInputError(f"method {self.name!r}: option clamp must be in (0, 1), got {self.clamp}")

    def whitening(self, gram: Tensor) -> Whitening:
        return Whitening(gram, self.clamp)

    @property
    def whitening_key(self) -> tuple:
        return (self.clamp,)

    def right_factor(self, stats: LayerStats, n: int, device: torch.device,
                     whitening: Whitening | None) -> Whitening:
        """The precomputed whitening, or the one of stats.gram."""
        if whitening is not None:
            return whitening
        return self.whitening(as_float64(stats.gram, "gram", (n, n), device))


def check_eps(method: str, eps: float) -> None:
    """The floor of the Fisher scales, relative to their mean: a number in (0, 1)."""
    if not 0 < eps < 1:
        raise UserInputError(f"method {method!r}: option eps must be in (0, 1), got {eps}")
