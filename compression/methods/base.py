"""Shared types of the methods: the per-layer statistics and the ratio-independent decomposition.

Every SVD-family method reduces to one weighted problem. With a row scale L (diagonal or I) and
a right factor R (whitening S with S S^T = G, a feature scale diag(d), or I), the method minimises
||L (W - W') R||_F over rank-k W'. Let M = L W R = U Sigma V^T. Then

    W' = L^-1 U_k U_k^T L W,     A = L^-1 U_k Sigma_k^1/2,     B = Sigma_k^-1/2 U_k^T L W

is a minimiser: L W' R = U_k U_k^T M is the best rank-k approximation of M (Eckart-Young), and
W' has rank k. R is never inverted, so the identity holds when R is singular, and at full rank
U U^T L W = L W whenever the column space of L W equals that of M (R invertible, which the
clamped whitening guarantees). The loss of keeping rank k is the sum of the dropped sigma^2.
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass

import torch
from torch import Tensor

from compression.errors import UserInputError


@dataclass
class LayerStats:
    """Calibration statistics of one linear layer y = W x + b, W [m, n].

    gram: G = sum over tokens of x x^T, [n, n] float64 (shared by layers reading the same input).
    tokens: number of tokens in G.
    row_fisher: [m] row sums of the empirical weight Fisher (sum_j F_ij).
    col_fisher: [n] column sums of the weight Fisher (sum_i F_ij).
    neuron_fisher: [m] g_i = mean over tokens of (dl/dy_i)^2.
    """

    gram: Tensor | None = None
    tokens: int = 0
    row_fisher: Tensor | None = None
    col_fisher: Tensor | None = None
    neuron_fisher: Tensor | None = None


class Decomposition:
    """Weighted SVD of one weight matrix for one method; truncation to any rank is cheap.

    Stores U [m, r] and P = U^T L W [r, n] (r = min(m, n)) in `store_dtype`, the singular values
    of M in float64, and the inverse row scale. `truncate(k)` slices them: O(k (m + n)).
    """

    def __init__(
        self,
        method: str,
        left: Tensor,
        right: Tensor,
        sigma: Tensor,
        row_scale: Tensor | None,
        loss_scale: float = 1.0,
    ) -> None:
        self.method = method
        self._left = left  # U [m, r]
        self._right = right  # U^T L W [r, n]
        self.sigma = sigma  # [r] float64, descending
        self._row_inv = None if row_scale is None else row_scale.reciprocal()  # [m] float64
        self.loss_scale = float(loss_scale)
        self.out_features, self.in_features = left.shape[0], right.shape[1]
        self.max_rank = sigma.numel()
        # Balancing guard for the factors only: A B = L^-1 U_k U_k^T L W for any positive value.
        top = float(sigma[0]) if self.max_rank else 0.0
        self._balance = sigma.clamp(min=top * 1e-8 if top > 0 else 1.0).sqrt()

    @property
    def cost_per_rank(self) -> int:
        """Parameters one rank costs: a column of A and a row of B."""
        return self.out_features + self.in_features

    def truncate(self, k: int, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
        """Factors A [m, k], B [k, n] with A @ B the rank-k solution of the method."""
        k = _check_rank(k, self.max_rank)
        s = self._balance[:k]
        a = self._left[:, :k].to(torch.float64) * s
        if self._row_inv is not None:
            a = self._row_inv[:, None] * a
        b = self._right[:k].to(torch.float64) / s[:, None]
        return a.to(dtype), b.to(dtype)

    def loss_curve(self) -> Tensor:
        """[max_rank + 1] float64: loss_curve[k] = loss_scale * sum of sigma_j^2 for j >= k."""
        sq = self.sigma.square()
        tail = torch.flip(torch.cumsum(torch.flip(sq, [0]), 0), [0])
        return torch.cat([tail, sq.new_zeros(1)]) * self.loss_scale

    def nbytes(self) -> int:
        return sum(
            t.numel() * t.element_size()
            for t in (self._left, self._right, self.sigma, self._row_inv)
            if t is not None
        )

    def to(self, device: torch.device | str) -> Decomposition:
        """A copy with every tensor on `device` (dtypes kept: float64 stays float64). Truncating
        the copy gives the same factors on that device."""
        out = copy.copy(self)
        for name in ("_left", "_right", "sigma", "_row_inv", "_balance"):
            t = getattr(self, name)
            setattr(out, name, None if t is None else t.to(device))
        return out

    def __repr__(self) -> str:
        return (
            f"Decomposition(method={self.method!r}, shape=({self.out_features}, "
            f"{self.in_features}), max_rank={self.max_rank})"
        )


def _check_rank(k: int, max_rank: int) -> int:
    """k as a Python int, or UserInputError if it is not an integer in [0, max_rank]."""
    try:
        value = operator.index(k)
    except TypeError:
        value = None
    if value is None or isinstance(k, bool) or not 0 <= value <= max_rank:
        raise UserInputError(f"rank {k!r} is not allowed: use an integer in [0, {max_rank}]")
    return value


def as_float64(t: Tensor, name: str, shape: tuple[int, ...], device: torch.device) -> Tensor:
    """A statistic as float64 on `device`, checked for shape and finiteness."""
    if tuple(t.shape) != shape:
        raise UserInputError(f"{name} has shape {tuple(t.shape)}, expected {shape} for this layer")
    t = t.to(device=device, dtype=torch.float64)
    if not bool(torch.isfinite(t).all()):
        raise UserInputError(f"{name} contains NaN or inf; recollect the calibration statistics")
    return t
