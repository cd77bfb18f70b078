"""svd, fwsvd, whiten, whiten-fw, whiten-fd: one weighted-SVD core, five choices of weights.

| method     | row scale L                       | right factor R | loss_curve units                    |
|------------|-----------------------------------|----------------|-------------------------------------|
| svd        | I                                 | I              | ||W - W'||_F^2                      |
| fwsvd      | I                                 | diag(d), d_j^2 = col Fisher (RMS 1) | Fisher-weighted weight error |
| whiten     | I                                 | S, S S^T = G   | ||(W - W') X||_F^2                  |
| whiten-fw  | sqrt(row Fisher), RMS 1           | S              | row-weighted output error           |
| whiten-fd  | g^(alpha/2), RMS 1                | S              | sum_t sum_i g_i^alpha e_ti^2        |

Scales are floored at `eps` times their mean (scale-free, so a zero Fisher entry gives a finite
inverse) and normalised to root-mean-square 1 (||L||_F^2 = m, as for I), which only changes the
units of sigma. whiten-fd reports its loss in un-normalised units (times mean(g^alpha)): with
alpha = 1 a dropped sigma^2 is then sum over tokens of sum_i g_i e_i^2, twice the Fisher estimate
of the increase of the summed token loss (the 1/2 is dropped everywhere), comparable across
layers because every layer sees the same calibration tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor

from compression.errors import UserInputError
from compression.methods.base import Decomposition, LayerStats, as_float64
from compression.methods.whitening import whitening_factor

SVD_METHODS = ("svd", "fwsvd", "whiten", "whiten-fw", "whiten-fd")
_NEEDS = {
    "svd": (),
    "fwsvd": ("col_fisher",),
    "whiten": ("gram",),
    "whiten-fw": ("gram", "row_fisher"),
    "whiten-fd": ("gram", "neuron_fisher"),
}


def weighted_svd(
    weight: Tensor,
    row_scale: Tensor | None = None,
    right: Tensor | None = None,
    method: str = "svd",
    loss_scale: float = 1.0,
    store_dtype: torch.dtype = torch.float32,
) -> Decomposition:
    """Decompose M = diag(row_scale) W R (float64) into a `Decomposition` (see base.py).

    `right` is R [n, n'], a 1-D column scale d (R = diag(d)), or None (R = I).
    """
    lw = weight.to(torch.float64)
    if row_scale is not None:
        lw = row_scale[:, None] * lw
    if right is None:
        m = lw
    else:  # a 1-D `right` is a column scale diag(right)
        m = lw * right if right.dim() == 1 else lw @ right
    u, sigma, _ = torch.linalg.svd(m, full_matrices=False)
    return Decomposition(
        method,
        left=u.to(store_dtype),
        right=(u.T @ lw).to(store_dtype),
        sigma=sigma,
        row_scale=row_scale,
        loss_scale=loss_scale,
    )


def _scale(weights: Tensor, eps: float, power: float = 1.0) -> tuple[Tensor, float]:
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


def decompose_svd_family(
    method: str,
    weight: Tensor,
    stats: LayerStats | None,
    alpha: float = 1.0,
    eps: float = 1e-6,
    clamp: float = 1e-12,
    store_dtype: torch.dtype = torch.float32,
    whitening: Tensor | None = None,
) -> Decomposition:
    """The ratio-independent decomposition of `weight` [m, n] for one SVD-family method.

    `whitening`: a precomputed `whitening_factor(stats.gram, clamp)`, so layers reading the same
    input (q/k/v, gate/up) share one eigendecomposition.
    """
    m, n = weight.shape
    dev = weight.device
    stats = stats if stats is not None else LayerStats()
    for field in _NEEDS[method]:
        if getattr(stats, field) is None:
            raise UserInputError(
                f"method {method!r} needs the calibration statistic {field!r}, which is missing "
                f"for this layer; methods that need no statistics: 'svd'"
            )
    row, right, loss_scale = None, None, 1.0
    if method == "fwsvd":
        col = as_float64(stats.col_fisher, "col_fisher", (n,), dev)
        right, _ = _scale(col, eps)
    if method.startswith("whiten"):
        right = whitening if whitening is not None else whitening_factor(
            as_float64(stats.gram, "gram", (n, n), dev), clamp)
    if method == "whiten-fw":
        row, _ = _scale(as_float64(stats.row_fisher, "row_fisher", (m,), dev), eps)
    if method == "whiten-fd":
        if not alpha >= 0 or alpha == float("inf"):
            raise UserInputError(f"alpha must be a finite number >= 0 (0 = plain whiten), got {alpha}")
        g = as_float64(stats.neuron_fisher, "neuron_fisher", (m,), dev)
        row, loss_scale = _scale(g, eps, power=alpha)
    return weighted_svd(weight, row, right, method, loss_scale, store_dtype)
