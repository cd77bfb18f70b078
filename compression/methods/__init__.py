"""Low-rank and neuron-selection methods: pure tensor math, ratio-independent decompositions.

`decompose(method, weight, stats)` is computed once per layer and method; the caller truncates
the result to any rank (`Decomposition.truncate(k)` -> A, B; `NeuronDecomposition.truncate(k)`
-> kept neurons, new down weight) and reads `loss_curve()` for the allocations.
"""

from __future__ import annotations

import torch
from torch import Tensor

from compression.errors import UserInputError
from compression.methods.base import Decomposition, LayerStats
from compression.methods.interpolative import NeuronDecomposition, pivoted_cholesky, select_neurons
from compression.methods.svd_family import SVD_METHODS, decompose_svd_family, weighted_svd
from compression.methods.whitening import whitening_factor

METHODS = (*SVD_METHODS, "id")

__all__ = [
    "METHODS",
    "Decomposition",
    "LayerStats",
    "NeuronDecomposition",
    "decompose",
    "pivoted_cholesky",
    "select_neurons",
    "weighted_svd",
    "whitening_factor",
]


def decompose(
    method: str,
    weight: Tensor,
    stats: LayerStats | None = None,
    alpha: float = 1.0,
    eps: float = 1e-6,
    clamp: float = 1e-12,
    store_dtype: torch.dtype = torch.float32,
    whitening: Tensor | None = None,
) -> Decomposition | NeuronDecomposition:
    """Decompose one weight [out, in] (float, on any device; results stay on that device).

    alpha: exponent of the neuron Fisher in `whiten-fd` (0 = `whiten`).
    eps: floor of the Fisher scales, relative to their mean (fwsvd, whiten-fw, whiten-fd).
    clamp: floor of the eigenvalues of G relative to the largest (whitening).
    store_dtype: dtype of the stored singular vectors / factors (float32 halves the memory;
        all arithmetic is float64).
    whitening: a precomputed `whitening_factor(stats.gram, clamp)` to share between layers that
        read the same input (whitening methods only).
    For `id`, `weight` is the MLP's down projection [h, f] and `stats.gram` the Gram of its
    input (the intermediate activations); the result selects neurons (`select_neurons` with its
    default rank tolerance).
    """
    if method not in METHODS:
        raise UserInputError(f"unknown method {method!r}; allowed: {', '.join(METHODS)}")
    if not isinstance(weight, Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise UserInputError("weight must be a 2-D floating-point tensor [out_features, in_features]")
    if not bool(torch.isfinite(weight).all()):
        raise UserInputError("weight contains NaN or inf")
    if method == "id":
        if stats is None or stats.gram is None:
            raise UserInputError(
                "method 'id' needs the Gram matrix of the down-projection input (stats.gram)"
            )
        return select_neurons(stats.gram, weight, store_dtype=store_dtype)
    return decompose_svd_family(method, weight, stats, alpha, eps, clamp, store_dtype, whitening)
