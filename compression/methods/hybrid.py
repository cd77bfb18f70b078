"""`hybrid`: every MLP is either pruned (`id-fd`) or has its matrices factorised (`whiten-fd`), and
the attention matrices are factorised; one `spectrum` budget decides all of it.

Both methods score in the same units, the Fisher estimate of the loss increase (with alpha 1 a
dropped sigma^2 of `whiten-fd` and a loss step of `id-fd` are both sum over tokens of
sum_i g_i e_i^2 at a layer's outputs), so neurons and singular values compete fairly. Each MLP
offers two alternatives to the allocation (`Unit.alternative_of` = the MLP): "prune" (one unit,
rank = kept neurons) and "factorise" (its gate/up/down or fc1/fc2 matrices, each with its rank);
the plan keeps one of them per MLP, so `RankPlan.units` says which MLPs were pruned (role "mlp")
and which matrices factorised (their roles), and `RankPlan.extra["alternatives"]` lists the choice.
Both alternatives target the MLP's weights (a pruned neuron's bias entries are not counted, as no
method counts biases). Only `spectrum` can choose between alternatives.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from compression.allocation import Unit
from compression.errors import UserInputError
from compression.methods.base import Factorization, MethodConfig, register
from compression.methods.id_fd import IdFd
from compression.methods.whiten_fd import WhitenFd
from compression.targets import MlpGroup, Target

PRUNE, FACTORISE = "prune", "factorise"


class Alternative:
    """A decomposition of `hybrid`: a `whiten-fd` or `id-fd` one, as one alternative of an MLP
    (or, for attention matrices, of nothing)."""

    def __init__(self, inner: Factorization, method: str, alternative_of: str | None = None,
                 alternative: str | None = None, dense_params: int | None = None) -> None:
        self.inner, self.method = inner, method
        self.alternative_of, self.alternative, self.dense_params = alternative_of, alternative, dense_params
        self.unit, self.max_rank = inner.unit, inner.max_rank

    @property
    def row_scale(self) -> Tensor | None:
        return getattr(self.inner, "row_scale", None)

    def loss_curve(self) -> Tensor:
        return self.inner.loss_curve()

    def allocation_unit(self) -> Unit:
        unit = dataclasses.replace(self.inner.allocation_unit(), alternative_of=self.alternative_of,
                                   alternative=self.alternative)
        if self.dense_params is not None:  # a pruned MLP: its weights only, like its factorised matrices
            unit = dataclasses.replace(unit, dense_params=self.dense_params, fixed_params=0,
                                       cost_per_rank=self.dense_params // unit.max_rank)
        return unit

    def apply(self, model: nn.Module, k: int) -> None:
        self.inner.apply(model, k)

    def to(self, device: torch.device | str) -> Alternative:
        return Alternative(self.inner.to(device), self.method, self.alternative_of, self.alternative,
                           self.dense_params)

    def nbytes(self) -> int:
        return self.inner.nbytes()

    def __repr__(self) -> str:
        return f"Alternative({self.alternative or 'only'} of {self.alternative_of or 'itself'}: {self.inner!r})"


@register
@dataclass(frozen=True)
class Hybrid(MethodConfig):
    """clamp, form: those of `whiten-fd`; alpha, eps: the Fisher exponent and floor of both
    methods; rtol: that of `id-fd`."""

    name: ClassVar[str] = "hybrid"
    needs: ClassVar[tuple[str, ...]] = ("gram", "neuron_fisher")
    factorizes: ClassVar[str] = "matrix or mlp"
    allocations: ClassVar[tuple[str, ...] | None] = ("spectrum",)
    clamp: float = 1e-12
    alpha: float = 1.0
    eps: float = 1e-6
    rtol: float = 1e-10
    form: str = "factors"

    def validate(self) -> None:
        for part in (self.matrices, self.neurons):  # their checks of the shared options
            try:
                part()
            except UserInputError as e:
                raise UserInputError(f"method {self.name!r}: {str(e).split(': ', 1)[-1]}") from None

    def matrices(self) -> WhitenFd:
        return WhitenFd(clamp=self.clamp, alpha=self.alpha, eps=self.eps, form=self.form)

    def neurons(self) -> IdFd:
        return IdFd(rtol=self.rtol, alpha=self.alpha, eps=self.eps)

    def units(self, model: nn.Module, stats) -> list[Target | MlpGroup]:
        return [*self.matrices().units(model, stats), *self.neurons().units(model, stats)]

    def decompose_model(self, model: nn.Module, stats, device: torch.device, store_dtype: torch.dtype,
                        progress: bool = False, whitenings: dict | None = None) -> dict[str, Factorization]:
        matrices = self.matrices().decompose_model(model, stats, device, store_dtype, progress=progress,
                                                   whitenings=whitenings)
        mlps = self.neurons().decompose_model(model, stats, device, store_dtype, progress=progress)
        return self.combine(matrices, mlps)

    def derived_from(self) -> list[MethodConfig]:
        return [self.matrices(), self.neurons()]

    def derive(self, decompositions: list[dict[str, Factorization]]) -> dict[str, Factorization]:
        return self.combine(*decompositions)

    def combine(self, matrices: dict[str, Factorization], mlps: dict[str, Factorization]) -> dict[str, Factorization]:
        """This method's decompositions from those of `self.matrices()` (every target) and
        `self.neurons()` (every MLP): what `decompose_model` returns, without decomposing again."""
        owner = {name: dec.unit for dec in mlps.values() for name in (*dec.unit.inputs, dec.unit.down)}
        out: dict[str, Factorization] = {}
        for name, dec in matrices.items():
            mlp = owner.get(name)
            out[name] = Alternative(dec, self.name, None if mlp is None else mlp.name, None if mlp is None else FACTORISE)
        for name, dec in mlps.items():
            weights = sum(matrices[n].unit.params for n in (*dec.unit.inputs, dec.unit.down))
            out[name] = Alternative(dec, self.name, name, PRUNE, dense_params=weights)
        return out
