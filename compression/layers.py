"""The layers of compressed models and the swaps that put them into a model, in place.

- `LowRankLinear`: the rank-k factorisation W' = A @ B of a linear layer as two smaller linears,
  k (m + n) parameters;
- `IdentityBlockLinear`: the same W' with k of its rows (or columns) made an identity block,
  k (m + n - k) parameters, so every rank below min(m, n) saves parameters;
  `replace_low_rank` swaps either in for an `nn.Linear` or GPT-2 `Conv1D`.
- `linear_parts`: the plain linear layers that compute a layer, compressed or not (what a
  finetune adapts).
- `prune_mlp`: keeps some intermediate neurons of an MLP; its layers stay plain dense layers of
  the model's own kind (`targets.dense_layer`), only narrower.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import UserInputError
from .targets import MlpGroup, Target, dense_layer, dense_shape, dense_weight, get_module, layer_kind, set_dense_weight, set_module


def check_factors(A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None) -> None:
    """ValueError unless A [out, k], B [k, in] and bias [out] (or None) fit together."""
    if A.ndim != 2 or B.ndim != 2 or A.shape[1] != B.shape[0]:
        raise ValueError(f"factors must be A [out, k] and B [k, in], got {tuple(A.shape)} and {tuple(B.shape)}")
    if bias is not None and tuple(bias.shape) != (A.shape[0],):
        raise ValueError(f"bias must have shape ({A.shape[0]},), got {tuple(bias.shape)}")


class LowRankLinear(nn.Module):
    """y = A (B x) + b with A [out, k], B [k, in]: `first` holds B, `second` holds A and the bias.

    A drop-in for `nn.Linear` and for GPT-2's `Conv1D` (which computes x @ W + b with W stored
    [in, out]): both map inputs [..., in] to outputs [..., out], and so does this module. It costs
    k (in + out) parameters (plus the bias) instead of in * out. Rank 0 is allowed (the layer then
    outputs its bias only).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if rank < 0:
            raise ValueError(f"rank must be non-negative, got {rank}")
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.first = nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device)
        self.second = nn.Linear(rank, out_features, bias=bias, dtype=dtype, device=device)

    @classmethod
    def from_factors(
        cls,
        A: torch.Tensor,
        B: torch.Tensor,
        bias: torch.Tensor | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> LowRankLinear:
        """The layer computing (A @ B) x + bias; dtype and device default to those of A."""
        check_factors(A, B, bias)
        out_features, rank = A.shape
        layer = cls(B.shape[1], out_features, rank, bias=bias is not None,
                    dtype=dtype or A.dtype, device=device or A.device)
        with torch.no_grad():
            layer.first.weight.copy_(B)
            layer.second.weight.copy_(A)
            if bias is not None:
                layer.second.bias.copy_(bias)
        return layer

    @property
    def has_bias(self) -> bool:
        return self.second.bias is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))

    def product(self) -> torch.Tensor:
        """W' = A B [out, in] (without the bias)."""
        return self.second.weight @ self.first.weight

    def bias_vector(self) -> torch.Tensor | None:
        """b [out] (None without a bias)."""
        return None if self.second.bias is None else self.second.bias.detach().clone()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, bias={self.has_bias}")


class IdentityBlockLinear(nn.Module):
    """y = W' x + b for a rank-k W' = A B stored as an identity block and two small linears.

    Any rank-k W' has k linearly independent rows J (or columns): the other rows are combinations
    C of them, W' = P^T [I_k; C] W'_J, so W'_J [k, n] and C [m - k, k] hold it in k (m + n - k)
    numbers, never more than the dense m n (equal at k = min(m, n)). J comes from an LU
    factorisation with partial pivoting of A (A = P L U): W'_J = A_J B with A_J = L_1 U, and
    C = A_R A_J^-1 = L_2 L_1^-1 with |L| <= 1 (unit triangular L_1, always invertible), so the
    block is well conditioned whatever the spectrum.

    side "rows" (m <= n): `core` (n -> k) computes z = W'_J x, `coef` (k -> m - k) the other outputs
    C z; `index` puts the m outputs back in order. side "columns" (m > n): the transpose,
    W' = W'^J [I_k, C] P: u = x_J + C x_R (`index` gathers the n inputs, `coef` n - k -> k), then
    `core` (k -> m) computes W'^J u. Both cost k (m + n - k) parameters (plus the bias) and
    2 k (m + n - k) FLOPs per token; the side puts the index on the shorter of the two vectors.
    The bias sits in the two linears (for "rows", coef's is b_R - C b_J), so y = W' x + b exactly.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if not 0 <= rank <= min(in_features, out_features):
            raise ValueError(f"rank must be in [0, {min(in_features, out_features)}], got {rank}")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.side = "rows" if out_features <= in_features else "columns"
        kw = dict(dtype=dtype, device=device)
        if self.side == "rows":
            self.core = nn.Linear(in_features, rank, bias=bias, **kw)
            self.coef = nn.Linear(rank, out_features - rank, bias=bias, **kw)
        else:
            self.coef = nn.Linear(in_features - rank, rank, bias=False, **kw)
            self.core = nn.Linear(rank, out_features, bias=bias, **kw)
        size = out_features if self.side == "rows" else in_features
        self.register_buffer("index", torch.arange(size, device=device))

    @classmethod
    def from_factors(
        cls,
        A: torch.Tensor,
        B: torch.Tensor,
        bias: torch.Tensor | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> IdentityBlockLinear:
        """The layer computing (A @ B) x + bias; dtype and device default to those of A."""
        check_factors(A, B, bias)
        (m, k), n = A.shape, B.shape[1]
        layer = cls(n, m, k, bias=bias is not None, dtype=dtype or A.dtype, device=device or A.device)
        a, b = A.to(torch.float64), B.to(torch.float64)
        if layer.side == "columns":  # the rows of W'^T = B^T A^T
            a, b = b.T, a.T
        order, block, coef = _identity_block(a, b)
        with torch.no_grad():
            if layer.side == "rows":
                layer.core.weight.copy_(block)
                layer.coef.weight.copy_(coef)
                layer.index.copy_(torch.argsort(order))
                if bias is not None:
                    b64 = bias.to(torch.float64)
                    layer.core.bias.copy_(b64[order[:k]])
                    layer.coef.bias.copy_(b64[order[k:]] - coef @ b64[order[:k]])
            else:
                layer.core.weight.copy_(block.T)
                layer.coef.weight.copy_(coef.T)
                layer.index.copy_(order)
                if bias is not None:
                    layer.core.bias.copy_(bias)
        return layer

    @property
    def has_bias(self) -> bool:
        return self.core.bias is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.side == "rows":
            z = self.core(x)
            return torch.cat([z, self.coef(z)], dim=-1).index_select(-1, self.index)
        xp = x.index_select(-1, self.index)
        return self.core(xp[..., : self.rank] + self.coef(xp[..., self.rank:]))

    def bias_vector(self) -> torch.Tensor | None:
        """b [out] (None without a bias): the output at x = 0."""
        if not self.has_bias:
            return None
        with torch.no_grad():
            return self(self.core.weight.new_zeros(self.in_features))

    def product(self) -> torch.Tensor:
        """W' [out, in] (without the bias)."""
        core, coef = self.core.weight, self.coef.weight
        if self.side == "rows":
            return torch.cat([core, coef @ core]).index_select(0, self.index)
        eye = torch.eye(self.rank, dtype=core.dtype, device=core.device)
        full = core @ torch.cat([eye, coef], dim=1)  # columns in `index` order
        return full.index_select(1, torch.argsort(self.index))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, side={self.side}, bias={self.has_bias}")


def _identity_block(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For W' = a b (a [p, k], float64): (row order, J first [p]; W'_J [k, q]; C [p - k, k])."""
    p, k = a.shape
    if k == 0:
        return torch.arange(p, device=a.device), b.new_zeros(0, b.shape[1]), a.new_zeros(p, 0)
    perm_matrix, lower, _ = torch.linalg.lu(a)  # a = P L U
    order = perm_matrix.argmax(dim=0)  # row i of P^T a is a[order[i]]
    l1, l2 = lower[:k], lower[k:]
    coef = torch.linalg.solve_triangular(l1, l2, upper=False, left=False, unitriangular=True)  # C L1 = L2
    return order, a[order[:k]] @ b, coef


def linear_parts(model: nn.Module, name: str) -> list[str]:
    """Names of the plain linear layers (`nn.Linear` / `Conv1D`) that compute layer `name`: the two
    factors of a `LowRankLinear` or the two linears of an `IdentityBlockLinear` (none at rank 0),
    else the layer itself."""
    layer = get_module(model, name)
    if isinstance(layer, LowRankLinear):
        return [f"{name}.first", f"{name}.second"] if layer.rank else []
    if isinstance(layer, IdentityBlockLinear):
        return [f"{name}.{part}" for part in ("core", "coef")
                if layer.rank and get_module(model, f"{name}.{part}").weight.numel()]
    dense_shape(layer)  # a TypeError for anything that is not a linear layer
    return [name]


def _dense(model: nn.Module, name: str) -> nn.Module:
    layer = get_module(model, name)
    try:
        dense_shape(layer)
    except TypeError:
        raise UserInputError(
            f"layer {name!r} is a {type(layer).__name__}; only nn.Linear and Conv1D layers can be "
            f"compressed (was the model compressed already?)") from None
    return layer


def replace_low_rank(model: nn.Module, target: Target, A: torch.Tensor, B: torch.Tensor,
                     layer: type[LowRankLinear | IdentityBlockLinear] = LowRankLinear) -> None:
    """Swap the layer `target.name` for a `LowRankLinear` (or `layer`, e.g. `IdentityBlockLinear`)
    computing (A @ B) x + bias, in place.

    A [out, k], B [k, in]; the new layer has the old layer's dtype, device, bias, training mode
    and requires_grad.
    """
    old = _dense(model, target.name)
    n_in, n_out, _ = dense_shape(old)
    if A.shape[0] != n_out or B.shape[1] != n_in:
        raise ValueError(f"factors {tuple(A.shape)} @ {tuple(B.shape)} do not fit layer {target.name!r} "
                         f"[{n_out}, {n_in}]")
    new = layer.from_factors(A, B, old.bias, dtype=old.weight.dtype, device=old.weight.device)
    new.train(old.training).requires_grad_(old.weight.requires_grad)
    set_module(model, target.name, new)


def _narrowed(old: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """A dense layer of `old`'s kind, dtype and device holding `weight` [out, in] and `bias`."""
    new = dense_layer(layer_kind(old), weight.shape[1], weight.shape[0], bias is not None,
                      dtype=old.weight.dtype, device=old.weight.device)
    set_dense_weight(new, weight, bias)
    return new.train(old.training).requires_grad_(old.weight.requires_grad)


def prune_mlp(model: nn.Module, mlp: MlpGroup, kept: torch.Tensor, down_weight: torch.Tensor) -> None:
    """Keep only the intermediate neurons `kept` of an MLP, in place: a narrower dense MLP.

    Every input layer (up/gate/fc1) keeps the rows `kept` (and their bias entries); the down/fc2
    layer gets the new weight `down_weight` [hidden, k] (for `id`, the old columns `kept` times the
    interpolation matrix) and keeps its bias. Layers stay `nn.Linear` / `Conv1D`.
    """
    kept = torch.as_tensor(kept, dtype=torch.long).flatten().cpu()
    if kept.numel() and (kept.min() < 0 or kept.max() >= mlp.width or kept.unique().numel() != kept.numel()):
        raise ValueError(f"kept neurons of {mlp.name!r} must be distinct indices in [0, {mlp.width})")
    down = _dense(model, mlp.down)
    d_in, d_out, _ = dense_shape(down)
    if d_in != mlp.width or tuple(down_weight.shape) != (d_out, kept.numel()):
        raise ValueError(f"down weight of {mlp.name!r} must be [{d_out}, {kept.numel()}] for a layer "
                         f"[{d_out}, {d_in}], got {tuple(down_weight.shape)}")
    for name in mlp.inputs:
        old = _dense(model, name)
        w = dense_weight(old)
        idx = kept.to(w.device)
        bias = None if old.bias is None else old.bias[idx]
        set_module(model, name, _narrowed(old, w[idx], bias))
    set_module(model, mlp.down, _narrowed(down, down_weight.to(down.weight.device), down.bias))
