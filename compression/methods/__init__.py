"""The methods: one module each, a frozen config registered by name (see `base.py`).

| name        | module        | factorises | needs                    |
|-------------|---------------|------------|--------------------------|
| `svd`       | svd.py        | matrix     | -                        |
| `fwsvd`     | fwsvd.py      | matrix     | col_fisher               |
| `whiten`    | whiten.py     | matrix     | gram                     |
| `whiten-fw` | whiten_fw.py  | matrix     | gram, row_fisher         |
| `whiten-fd` | whiten_fd.py  | matrix     | gram, neuron_fisher      |
| `id`        | id.py         | mlp        | gram (of the down input) |
| `id-fd`     | id_fd.py      | mlp        | gram, neuron_fisher (of the down layer) |
| `hybrid`    | hybrid.py     | matrix or mlp (alternatives) | gram, neuron_fisher |

A new method is one module: a frozen dataclass subclassing `MatrixMethod` or `MlpMethod` with
`@register`, its options as fields, `name`, `needs` and `decompose`; import it once (in every
process that resolves its name) and sweep files, the allocations, compress, save and load take it.

`decompose(method, weight, stats, **options)` decomposes one bare weight tensor; the caller
truncates the result to any rank and reads `loss_curve()` for the allocations.
"""

from __future__ import annotations

import torch
from torch import Tensor

# the built-in methods register themselves on import, in the order of the table above
from compression.methods import svd  # noqa: F401, I001
from compression.methods import fwsvd  # noqa: F401
from compression.methods import whiten  # noqa: F401
from compression.methods import whiten_fw  # noqa: F401
from compression.methods import whiten_fd  # noqa: F401
from compression.methods import id  # noqa: F401
from compression.methods import id_fd  # noqa: F401
from compression.methods import hybrid  # noqa: F401
from compression.methods.base import (
    Factorization,
    LayerStats,
    MatrixMethod,
    MethodConfig,
    MlpMethod,
    method_config,
    method_key,
    register,
    registered,
)
from compression.methods.factors import LowRankDecomposition, weighted_svd
from compression.methods.neurons import NeuronDecomposition, pivoted_cholesky, select_neurons
from compression.methods.whitening import Whitening

METHODS = tuple(registered())  # the built-in methods, in the order of the table above

__all__ = [
    "METHODS",
    "Factorization",
    "LayerStats",
    "LowRankDecomposition",
    "MatrixMethod",
    "MethodConfig",
    "MlpMethod",
    "NeuronDecomposition",
    "decompose",
    "method_config",
    "method_key",
    "pivoted_cholesky",
    "register",
    "registered",
    "select_neurons",
    "Whitening",
    "weighted_svd",
]


def decompose(
    method: str | MethodConfig,
    weight: Tensor,
    stats: LayerStats | None = None,
    store_dtype: torch.dtype = torch.float32,
    whitening: Whitening | None = None,
    **options,
) -> Factorization:
    """Decompose one weight [out, in] (float, on any device; results stay on that device) by
    `method` with `options` (e.g. alpha=0.5 for whiten-fd).

    store_dtype: dtype of the stored singular vectors / factors (float32 halves the memory; all
    arithmetic is float64). whitening: a precomputed `Whitening` of stats.gram to share between
    layers that read the same input (whitening methods). For an MLP method, `weight` is
    the MLP's down projection [h, f] and `stats.gram` the Gram of its input.
    """
    config = method_config(method, **options)
    if isinstance(config, MatrixMethod):
        return config.in_form(config.decompose(weight, stats, whitening=whitening, store_dtype=store_dtype))
    return config.decompose(weight, stats, store_dtype=store_dtype)
