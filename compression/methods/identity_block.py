"""The identity-block form of a matrix method's factors (option `form: identity` of `whiten-fd` and
`hybrid`; a method opts in with a `form` option and `MatrixMethod.in_form`).

A rank-k factorisation A B of an m x n matrix costs k (m + n) parameters as two factors, so a rank
above m n / (m + n) saves nothing and the matrix stays dense (a 576 x 576 matrix at most rank 287).
The same rank-k matrix fits in k (m + n - k) parameters: k well-conditioned rows (or columns) of
it become an identity block (`layers.IdentityBlockLinear`), so every rank below min(m, n) saves
parameters (576 x 576 at 20 % removed: rank 318 instead of 230). The decomposition, its loss
curve and the rank-k matrix are those of the method; only the cost per rank and the layer change.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from compression.allocation import Unit
from compression.errors import UserInputError
from compression.layers import IdentityBlockLinear, replace_low_rank
from compression.methods.base import Factorization, bound_unit
from compression.methods.factors import LowRankDecomposition
from compression.targets import get_module

FORMS = ("factors", "identity")  # the values of a method's `form` option


def check_form(method: str, form: str) -> None:
    if form not in FORMS:
        raise UserInputError(f"method {method!r}: option form must be one of {', '.join(FORMS)}, got {form!r}")


def in_form(form: str, factors: Factorization) -> Factorization:
    """`factors` stored as two factors ("factors") or with an identity block ("identity")."""
    return IdentityBlockFactors(factors) if form == "identity" else factors


def identity_block_params(m: int, n: int, max_rank: int) -> Tensor:
    """[max_rank + 1] int64: k (m + n - k), the parameters of rank k in the identity-block form."""
    k = torch.arange(max_rank + 1, dtype=torch.int64)
    return k * (m + n - k)


class IdentityBlockFactors:
    """A `LowRankDecomposition` whose rank-k matrix is stored in the identity-block form."""

    def __init__(self, factors: LowRankDecomposition) -> None:
        self.factors = factors
        self.method, self.unit, self.max_rank = factors.method, factors.unit, factors.max_rank

    @property
    def row_scale(self) -> Tensor | None:
        return self.factors.row_scale

    def truncate(self, k: int, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
        return self.factors.truncate(k, dtype)

    def loss_curve(self) -> Tensor:
        return self.factors.loss_curve()

    def allocation_unit(self) -> Unit:
        """Rank k costs exactly k (m + n - k): the marginal cost m + n - 2k + 1 falls with k."""
        unit = self.factors.allocation_unit()
        f = self.factors
        unit.rank_params = identity_block_params(f.out_features, f.in_features, f.max_rank)
        return unit

    def apply(self, model: nn.Module, k: int) -> None:
        """Swap the layer for an `IdentityBlockLinear` of the rank-k factors (in the layer's dtype)."""
        t = bound_unit(self)
        A, B = self.factors.truncate(k, dtype=get_module(model, t.name).weight.dtype)
        replace_low_rank(model, t, A, B, layer=IdentityBlockLinear)

    def nbytes(self) -> int:
        return self.factors.nbytes()

    def to(self, device: torch.device | str) -> IdentityBlockFactors:
        return IdentityBlockFactors(self.factors.to(device))

    def __repr__(self) -> str:
        return f"IdentityBlockFactors({self.factors!r})"
