"""The layers of compressed models and the swaps that put them into a model, in place.

- `LowRankLinear`: the rank-k factorisation W' = A @ B of a linear layer as two smaller linears;
  `replace_low_rank` swaps it in for an `nn.Linear` or GPT-2 `Conv1D`.
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
        if A.ndim != 2 or B.ndim != 2 or A.shape[1] != B.shape[0]:
            raise ValueError(f"factors must be A [out, k] and B [k, in], got {tuple(A.shape)} and {tuple(B.shape)}")
        out_features, rank = A.shape
        if bias is not None and tuple(bias.shape) != (out_features,):
            raise ValueError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")
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

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, bias={self.has_bias}")


def linear_parts(model: nn.Module, name: str) -> list[str]:
    """Names of the plain linear layers (`nn.Linear` / `Conv1D`) that compute layer `name`: the two
    factors of a `LowRankLinear` (none at rank 0), else the layer itself."""
    layer = get_module(model, name)
    if isinstance(layer, LowRankLinear):
        return [f"{name}.first", f"{name}.second"] if layer.rank else []
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


def replace_low_rank(model: nn.Module, target: Target, A: torch.Tensor, B: torch.Tensor) -> None:
    """Swap the layer `target.name` for a `LowRankLinear` computing (A @ B) x + bias, in place.

    A [out, k], B [k, in]; the new layer has the old layer's dtype, device, bias, training mode
    and requires_grad.
    """
    old = _dense(model, target.name)
    n_in, n_out, _ = dense_shape(old)
    if A.shape[0] != n_out or B.shape[1] != n_in:
        raise ValueError(f"factors {tuple(A.shape)} @ {tuple(B.shape)} do not fit layer {target.name!r} "
                         f"[{n_out}, {n_in}]")
    new = LowRankLinear.from_factors(A, B, old.bias, dtype=old.weight.dtype, device=old.weight.device)
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
