"""The low-rank core of the SVD-family methods: one weighted SVD, truncated to any rank.

Every SVD-family method reduces to one weighted problem. With a row scale L (diagonal or I) and
a right factor R (whitening S with S S^T = G, a feature scale diag(d), or I), the method minimises
||L (W - W') R||_F over rank-k W'. Let M = L W R = U Sigma V^T. Then

    W' = L^-1 U_k U_k^T L W,     A = L^-1 U_k Sigma_k^1/2,     B = Sigma_k^-1/2 U_k^T L W

is a minimiser: L W' R = U_k U_k^T M is the best rank-k approximation of M (Eckart-Young), and
W' has rank k. R is never inverted, so the identity holds when R is singular, and at full rank
U U^T L W = L W whenever the column space of L W equals that of M (R invertible, which the
regularised whitening guarantees). The loss of keeping rank k is the sum of the dropped sigma^2.
W' = P W with P = L^-1 U_k U_k^T L a projection on the output side, so W' stays bounded on
inputs the calibration data never excited.

Only U and Sigma^2 are needed, and they come from the smaller side of M (`weighted_svd`), in
float64, with no SVD and no eigendecomposition of G:

- m <= n: M M^T = L W (R R^T) W^T L (m x m) gives U and Sigma^2 directly; for whitening,
  R R^T is the (regularised) Gram matrix itself, so S is never formed;
- m > n: M^T M = R^T W^T L^2 W R (n x n) gives V and Sigma^2; U is M V with its columns
  normalised where Sigma is large enough for that to be orthonormal, completed by a QR where it is
  not (`_orthonormal`), exact at full rank even where Sigma is zero or tiny.

Both sides' products are symmetric and computed as their lower block triangle, the triangle
`eigh` reads; the whitening S is lower triangular and multiplied as such.

The methods differ only in L, R and the units of the loss (each method's module says which).
`importance_scale` is the diagonal scale of the Fisher-weighted ones: floored at `eps` times its
mean (scale-free, so a zero Fisher entry gives a finite inverse) and normalised to root-mean-square
1 (||L||_F^2 = m, as for I), which only changes the units of sigma.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from compression.allocation import Unit
from compression.layers import replace_low_rank
from compression.methods.base import bound_unit, check_rank
from compression.methods.whitening import Whitening
from compression.targets import Target, get_module


class LowRankDecomposition:
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
        unit: Target | None = None,
    ) -> None:
        self.method = method
        self.unit = unit
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
    def row_scale(self) -> Tensor | None:
        """The row scale L of the weighted problem ([m] float64; None: L = I)."""
        return None if self._row_inv is None else self._row_inv.reciprocal()

    @property
    def cost_per_rank(self) -> int:
        """Parameters one rank costs: a column of A and a row of B."""
        return self.out_features + self.in_features

    def truncate(self, k: int, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
        """Factors A [m, k], B [k, n] with A @ B the rank-k solution of the method."""
        k = check_rank(k, self.max_rank)
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

    def allocation_unit(self) -> Unit:
        """A matrix: rank k costs k (m + n); a rank that saves nothing leaves it dense."""
        t = bound_unit(self)
        return Unit(name=t.name, role=t.role, block=t.block, dense_params=self.out_features * self.in_features,
                    cost_per_rank=self.cost_per_rank, max_rank=self.max_rank, dense_when_unprofitable=True,
                    loss_curve=self.loss_curve())

    def apply(self, model: nn.Module, k: int) -> None:
        """Swap the layer for a `LowRankLinear` holding the rank-k factors (in the layer's dtype)."""
        t = bound_unit(self)
        A, B = self.truncate(k, dtype=get_module(model, t.name).weight.dtype)
        replace_low_rank(model, t, A, B)

    def nbytes(self) -> int:
        return sum(
            t.numel() * t.element_size()
            for t in (self._left, self._right, self.sigma, self._row_inv)
            if t is not None
        )

    def to(self, device: torch.device | str) -> LowRankDecomposition:
        """A copy with every tensor on `device` (dtypes kept: float64 stays float64). Truncating
        the copy gives the same factors on that device."""
        out = copy.copy(self)
        for name in ("_left", "_right", "sigma", "_row_inv", "_balance"):
            t = getattr(self, name)
            setattr(out, name, None if t is None else t.to(device))
        return out

    def __repr__(self) -> str:
        return (
            f"LowRankDecomposition(method={self.method!r}, shape=({self.out_features}, "
            f"{self.in_features}), max_rank={self.max_rank})"
        )


def weighted_svd(
    weight: Tensor,
    row_scale: Tensor | None = None,
    right: Tensor | Whitening | None = None,
    method: str = "svd",
    loss_scale: float = 1.0,
    store_dtype: torch.dtype = torch.float32,
    unit: Target | None = None,
) -> LowRankDecomposition:
    """Decompose M = diag(row_scale) W R (float64) into a `LowRankDecomposition` (see above).

    `right` is R: None (R = I), a 1-D column scale d (R = diag(d)), a `Whitening` (R R^T = its
    regularised Gram, R its Cholesky factor) or a matrix R [n, n].
    """
    lw = weight.to(torch.float64)
    if row_scale is not None:
        lw = row_scale[:, None] * lw
    u, squares = _output_side(lw, right) if lw.shape[0] <= lw.shape[1] else _input_side(lw, right)
    return LowRankDecomposition(
        method,
        left=u.to(store_dtype),
        right=(u.T @ lw).to(store_dtype),
        sigma=squares.clamp(min=0).sqrt(),
        row_scale=row_scale,
        loss_scale=loss_scale,
        unit=unit,
    )


_BLOCK = 128  # rows of one block of the triangular products below
_ORTHOGONAL = 1e-3  # sigma_j / sigma_1 from which M v_j / ||M v_j|| is orthonormal to ~1e-10 (see `_orthonormal`)


def _lower_product(a: Tensor, b: Tensor) -> Tensor:
    """The lower block triangle of a @ b.T (the blocks above the diagonal left zero), for a product
    known to be symmetric: `eigh` reads only the lower triangle, and the blocks above are 40 % of
    the multiply-adds of a 576 x 576 result."""
    out = a.new_zeros(a.shape[0], b.shape[0])
    for start in range(0, a.shape[0], _BLOCK):
        end = min(start + _BLOCK, a.shape[0])
        out[start:end, :end] = a[start:end] @ b[:end].T
    return out


def _times_lower(a: Tensor, lower: Tensor) -> Tensor:
    """a @ lower for a lower-triangular matrix, block column by block column (about 60 % of the
    multiply-adds of a full product: the zero blocks above the diagonal are skipped)."""
    out = torch.empty(a.shape[0], lower.shape[1], dtype=a.dtype, device=a.device)
    for start in range(0, lower.shape[1], _BLOCK):
        end = min(start + _BLOCK, lower.shape[1])
        out[:, start:end] = a[:, start:] @ lower[start:, start:end]
    return out


def _descending_eigh(lower: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues (descending) and eigenvectors of the symmetric matrix whose lower triangle is given."""
    values, vectors = torch.linalg.eigh(lower)
    return values.flip(0), vectors.flip(1)


def _output_side(lw: Tensor, right: Tensor | Whitening | None) -> tuple[Tensor, Tensor]:
    """U [m, m] and Sigma^2 from M M^T = (L W) (R R^T) (L W)^T."""
    if right is None:
        gram = _lower_product(lw, lw)
    elif isinstance(right, Whitening):
        gram = _lower_product(lw @ right.gram, lw)
    elif right.dim() == 1:
        gram = _lower_product(lw * right.square(), lw)
    else:
        lwr = lw @ right
        gram = _lower_product(lwr, lwr)
    squares, u = _descending_eigh(gram)
    return u, squares


def _input_side(lw: Tensor, right: Tensor | Whitening | None) -> tuple[Tensor, Tensor]:
    """U [m, n] and Sigma^2 from M^T M (n x n): V, then U orthonormal with M V = U Sigma."""
    if right is None:
        m = lw
    elif isinstance(right, Whitening):
        m = _times_lower(lw, right.factor())
    else:
        m = lw * right if right.dim() == 1 else lw @ right
    squares, v = _descending_eigh(_lower_product(m.T, m.T))
    return _orthonormal(m @ v), squares


def _orthonormal(mv: Tensor) -> Tensor:
    """Orthonormal U [m, n] whose first j columns span those of M V, for every j.

    The columns of M V = U Sigma are orthogonal up to round-off: V^T M^T M V is diagonal to
    eps sigma_1^2, so columns i, j normalised are orthogonal to about eps sigma_1^2 / (sigma_i
    sigma_j), below 1e-9 while sigma_j >= 1e-3 sigma_1: those are simply normalised. The columns
    after them (small or zero sigma, where normalising would amplify round-off) are orthogonalised
    against the first ones (twice, which is enough) and completed by a QR, as accurate as a QR of
    all of M V and exact at full rank even where Sigma is zero."""
    norms = mv.norm(dim=0)
    top = float(norms.max()) if norms.numel() else 0.0
    small = (norms <= _ORTHOGONAL * top).nonzero()  # all of them when M V is zero
    good = int(small[0]) if small.numel() else mv.shape[1]
    if good == mv.shape[1]:
        return mv / norms
    u = mv[:, :good] / norms[:good]
    rest = mv[:, good:]
    for _ in range(2):
        rest = rest - u @ (u.T @ rest)
    return torch.cat([u, torch.linalg.qr(rest)[0]], dim=1)


def importance_scale(weights: Tensor, eps: float, power: float = 1.0) -> tuple[Tensor, float]:
    """Diagonal scale sqrt(w^power) with w floored at eps * mean(w), normalised to RMS 1.

    Returns (scale, mean of the squared un-normalised scale). power 0 gives exactly ones and 1;
    an all-zero w gives ones and 0 (the layer does not move the loss).
    """
    if power == 0:
        return torch.ones_like(weights), 1.0
    mean = float(weights.mean())
    if mean <= 0:
        return torch.ones_like(weights), 0.0
    w = weights.clamp(min=eps * mean).pow(power)
    norm = float(w.mean())
    return (w / norm).sqrt(), norm
