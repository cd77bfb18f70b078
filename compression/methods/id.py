"""`id`: interpolative decomposition of each MLP (structured neuron pruning).

Column-pivoted QR on the intermediate activations (through the Gram of the down-projection input,
`neurons.py`) picks k real neurons; the rows of up/gate/fc1 of those neurons are kept and the
interpolation matrix is folded into the down projection: a smaller dense model, real speed-ups and
no custom layers. Loss: the squared output error of the down projection on the calibration data,
in the units of `whiten`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from compression.errors import UserInputError
from compression.methods.base import LayerStats, MlpMethod, check_weight, register
from compression.methods.neurons import NeuronDecomposition, select_neurons
from compression.targets import MlpGroup


@register
@dataclass(frozen=True)
class Id(MlpMethod):
    """rtol: the pivoted factorisation stops at this fraction of the largest diagonal of G
    (numerical rank); the remaining neurons are ordered by their residual output energy."""

    name: ClassVar[str] = "id"
    needs: ClassVar[tuple[str, ...]] = ("gram",)
    rtol: float = 1e-10

    def validate(self) -> None:
        if not 0 < self.rtol < 1:
            raise UserInputError(f"method {self.name!r}: option rtol must be in (0, 1), got {self.rtol}")

    def decompose(self, down_weight: Tensor, stats: LayerStats | None = None, unit: MlpGroup | None = None,
                  store_dtype: torch.dtype = torch.float32) -> NeuronDecomposition:
        check_weight(down_weight)
        if stats is None or stats.gram is None:
            raise UserInputError(f"method {self.name!r} needs the Gram matrix of the down-projection input "
                                 f"(stats.gram)")
        return select_neurons(stats.gram, down_weight, self.rtol, store_dtype, method=self.name, unit=unit)
