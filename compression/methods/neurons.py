"""Neuron selection: interpolative decomposition of an MLP's intermediate activations (`id`).

H [f, tokens] are the activations entering the down projection (W_d [h, f]), G = H H^T their
Gram. Keeping neurons J and folding an interpolation matrix C [f, k] into the down projection
gives W_d H ~ (W_d C) H_J: a narrower dense MLP (the caller keeps rows J of up/gate/fc1).

Neuron order: column-pivoted QR of any square-root factor R of G (R^T R = G) picks, at each
step, the column with the largest residual norm after projecting out the chosen ones; that
residual norm^2 is the diagonal of the Schur complement of G, so greedy pivoted Cholesky on G
itself gives the same pivots and never needs R. It is LAPACK's blocked `dpstrf` (through SciPy,
on the CPU whatever the device of G: it takes well under a second for a 1536-wide MLP, where a
step-by-step loop in torch took seven).

With G[p, p] = L L^T (pivot order p = (J, rest)), the least-squares interpolation
C = G[:, J] G[J, J]^-1 is [I; L21 L11^-1]: identity on the kept neurons (so k = f reproduces the
MLP exactly) and a triangular solve for the others. The error of keeping the first k pivots is
tr(W_d (G - G[:, J] G[J, J]^-1 G[J, :]) W_d^T) = sum_{j >= k} ||W_d l_j||^2 (l_j = Cholesky
column j): `loss_curve` is this exact value, in the same units as `whiten` (squared output error
of the down projection summed over calibration tokens).

Weighted (`id-fd`): with a scale per intermediate neuron d [f] the pivots are those of the
pivoted Cholesky of diag(d) G diag(d) (the neurons' residual activation energy weighted by how
much each one's output matters); the factor of G in that order is the weighted one with its rows
divided by d, so the interpolation is still the least-squares one (which no output weighting
changes: it is optimal for every row of the down projection). With a row scale D [h] on the down
projection's outputs the loss is sum_{j >= k} ||D W_d l_j||^2, times `loss_scale`. d = 1 and
D = I give `id` exactly.

Rank deficiency (fewer tokens than neurons, dead or collinear neurons): the factorisation stops
when the largest residual diagonal falls below `rtol` times the largest diagonal of G; the
remaining neurons are appended in order of their residual output energy d_i ||W_d[:, i]||^2,
interpolated from the numerically independent pivots only (no ill-conditioned solve), and their
loss_curve part uses that diagonal estimate (it is below rtol of the total anyway).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from scipy.linalg import lapack
from torch import Tensor, nn

from compression.allocation import Unit
from compression.errors import UserInputError
from compression.layers import prune_mlp
from compression.methods.base import as_float64, bound_unit, check_rank
from compression.targets import MLP_ROLE, MlpGroup, get_module


def pivoted_cholesky(gram: Tensor, rtol: float = 1e-10) -> tuple[Tensor, Tensor, Tensor]:
    """Greedy pivoted Cholesky of a PSD G [f, f] (float64): at each step the largest remaining
    diagonal is the pivot, until it falls to `rtol` times the largest diagonal of G.

    Returns (order [f] long, factor [f, r] with G ~ factor @ factor.T in ORIGINAL row order and
    column j belonging to pivot order[j], residual diagonal [f] after r steps), r = numerical rank,
    on the device of G.
    """
    f = gram.shape[0]
    g = gram.detach().to("cpu", torch.float64)
    diag = g.diagonal().clamp(min=0)
    top = float(diag.max()) if f else 0.0
    if top <= 0:
        empty = torch.zeros(0, dtype=torch.long)
        return empty.to(gram.device), g.new_zeros(f, 0).to(gram.device), diag.to(gram.device)
    lower, piv, rank, _ = lapack.dpstrf(g.numpy(), lower=1, tol=rtol * top)
    order = torch.from_numpy(piv[:rank].astype("int64") - 1)
    factor = g.new_zeros(f, rank)
    factor[torch.from_numpy(piv.astype("int64") - 1)] = torch.from_numpy(np.tril(lower)[:, :rank])
    resid = (diag - factor.square().sum(1)).clamp(min=0)
    resid[order] = 0.0
    return order.to(gram.device), factor.to(gram.device), resid.to(gram.device)


class NeuronDecomposition:
    """Neuron order and interpolation data of one MLP; `select(k)` keeps k neurons.

    pivot_scale: d [f], the weight of each neuron in the choice of pivots (None: 1);
    row_scale, loss_scale: D [h] on the down projection's outputs and a factor, for the loss
    (see the module docstring)."""

    def __init__(
        self,
        down_weight: Tensor,
        gram: Tensor,
        rtol: float = 1e-10,
        store_dtype: torch.dtype = torch.float32,
        method: str = "id",
        unit: MlpGroup | None = None,
        pivot_scale: Tensor | None = None,
        row_scale: Tensor | None = None,
        loss_scale: float = 1.0,
    ) -> None:
        self.method = method
        self.unit = unit
        w = down_weight.to(torch.float64)
        self.out_features, self.max_rank = w.shape
        gram = gram.to(torch.float64)
        if pivot_scale is None:
            pivots, factor, resid = pivoted_cholesky(gram, rtol)
        else:
            d = pivot_scale.to(torch.float64)
            pivots, factor, resid = pivoted_cholesky(d[:, None] * gram * d[None, :], rtol)
            factor, resid = factor / d[:, None], resid / d.square()
        self.rank = pivots.numel()  # numerical rank of G
        if row_scale is not None:
            w = row_scale.to(torch.float64)[:, None] * w  # the loss weights the outputs; the fold does not
        w_sq = w.square().sum(0)  # ||D W_d[:, i]||^2
        rest = torch.ones(self.max_rank, dtype=torch.bool, device=w.device)
        rest[pivots] = False
        rest_idx = rest.nonzero().squeeze(1)
        # neurons left after the numerical rank: by residual output energy d_i ||W_d[:, i]||^2
        energy, idx = torch.sort(resid[rest_idx] * w_sq[rest_idx], descending=True, stable=True)
        tail = rest_idx[idx]
        self.order = torch.cat([pivots, tail])
        self._factor = factor[self.order].to(store_dtype)  # rows in pivot order, lower triangular
        self._down = down_weight.to(torch.float64)[:, self.order].to(store_dtype)  # columns in pivot order
        contrib = (w @ factor).square().sum(0)  # ||D W_d l_j||^2, j < rank
        per_step = torch.cat([contrib, energy]) * loss_scale
        self._loss = torch.cat(
            [torch.flip(torch.cumsum(torch.flip(per_step, [0]), 0), [0]), per_step.new_zeros(1)]
        )

    def select(self, k: int, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
        """(kept neuron indices [k] sorted ascending, new down weight [h, k] in that order)."""
        k = check_rank(k, self.max_rank)
        r = min(k, self.rank)
        down = self._down.to(torch.float64)
        new = down[:, :k].clone()
        if r > 0 and k < self.max_rank:
            lf = self._factor.to(torch.float64)
            # interp [f - k, r]: H_rest ~ interp @ H_{J[:r]}, solves interp @ L11 = L21
            interp = torch.linalg.solve_triangular(lf[:r, :r], lf[k:, :r], upper=False, left=False)
            new[:, :r] += down[:, k:] @ interp
        kept, perm = torch.sort(self.order[:k])
        return kept, new[:, perm].to(dtype)

    def loss_curve(self) -> Tensor:
        """[max_rank + 1] float64: squared output error of the down projection keeping k neurons."""
        return self._loss

    def allocation_unit(self) -> Unit:
        """An MLP: each kept neuron costs `MlpGroup.neuron_cost`; it never stays dense for lack of
        profit (every neuron removed saves parameters)."""
        mlp = bound_unit(self)
        return Unit(name=mlp.name, role=MLP_ROLE, block=mlp.block, dense_params=mlp.width * mlp.neuron_cost,
                    cost_per_rank=mlp.neuron_cost, max_rank=mlp.width, dense_when_unprofitable=False,
                    loss_curve=self.loss_curve())

    def apply(self, model: nn.Module, k: int) -> None:
        """Keep the k first neurons in pivot order: a narrower dense MLP (`layers.prune_mlp`)."""
        mlp = bound_unit(self)
        kept, down_weight = self.select(k, dtype=get_module(model, mlp.down).weight.dtype)
        prune_mlp(model, mlp, kept, down_weight)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self._factor, self._down, self.order))

    def to(self, device: torch.device | str) -> NeuronDecomposition:
        """A copy with every tensor on `device` (dtypes kept); truncating it gives the same
        neurons and down weight on that device."""
        out = copy.copy(self)
        for name in ("order", "_factor", "_down", "_loss"):
            setattr(out, name, getattr(self, name).to(device))
        return out

    def __repr__(self) -> str:
        return f"NeuronDecomposition(neurons={self.max_rank}, out={self.out_features}, rank={self.rank})"


def select_neurons(
    gram_down_input: Tensor,
    down_weight: Tensor,
    rtol: float = 1e-10,
    store_dtype: torch.dtype = torch.float32,
    method: str = "id",
    unit: MlpGroup | None = None,
    pivot_scale: Tensor | None = None,
    row_scale: Tensor | None = None,
    loss_scale: float = 1.0,
) -> NeuronDecomposition:
    """The neuron selection of an MLP from the Gram of its down-projection input [f, f] and
    its down weight [h, f] (see module docstring)."""
    if down_weight.dim() != 2:
        raise UserInputError(f"down weight must be 2-D [hidden, neurons], got shape {tuple(down_weight.shape)}")
    f = down_weight.shape[1]
    gram = as_float64(gram_down_input, "gram of the down-projection input", (f, f), down_weight.device)
    return NeuronDecomposition(down_weight, 0.5 * (gram + gram.T), rtol, store_dtype, method=method, unit=unit,
                               pivot_scale=pivot_scale, row_scale=row_scale, loss_scale=loss_scale)
