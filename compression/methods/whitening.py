"""Whitening factor S with S S^T = G from an eigendecomposition (never a failing Cholesky)."""

from __future__ import annotations

import torch
from torch import Tensor


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
