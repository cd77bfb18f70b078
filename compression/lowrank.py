"""Layer types of compressed models.

`LowRankLinear` is the rank-k factorisation W' = A @ B of a linear layer as two smaller linears;
`dense_layer` builds a plain `nn.Linear` or GPT-2 `Conv1D` from a weight given as [out, in], so
code that narrows layers does not have to care which of the two the model uses.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


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


def dense_shape(layer: nn.Module) -> tuple[int, int, bool]:
    """(in_features, out_features, has_bias) of an `nn.Linear` or `Conv1D`."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features, layer.bias is not None
    if isinstance(layer, Conv1D):
        return layer.nx, layer.nf, layer.bias is not None
    raise TypeError(f"expected nn.Linear or Conv1D, got {type(layer).__name__}")


def dense_layer(
    kind: str,
    in_features: int,
    out_features: int,
    bias: bool,
    dtype: torch.dtype,
    device: torch.device | str,
) -> nn.Module:
    """A freshly initialised `nn.Linear` (kind "linear") or `Conv1D` (kind "conv1d") of this shape."""
    if kind == "linear":
        return nn.Linear(in_features, out_features, bias=bias, dtype=dtype, device=device)
    if kind == "conv1d":
        if not bias:
            raise ValueError("Conv1D layers always have a bias")
        return Conv1D(out_features, in_features).to(dtype=dtype, device=device)
    raise ValueError(f"layer kind must be 'linear' or 'conv1d', got {kind!r}")


def layer_kind(layer: nn.Module) -> str:
    """"linear" or "conv1d" (the kinds `dense_layer` builds)."""
    if isinstance(layer, nn.Linear):
        return "linear"
    if isinstance(layer, Conv1D):
        return "conv1d"
    raise TypeError(f"expected nn.Linear or Conv1D, got {type(layer).__name__}")


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """The weight of an `nn.Linear` or `Conv1D` as [out, in] (a view)."""
    return layer.weight.T if layer_kind(layer) == "conv1d" else layer.weight


def set_dense_weight(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Copy a weight given as [out, in] (and a bias) into an `nn.Linear` or `Conv1D` of that shape."""
    with torch.no_grad():
        layer.weight.copy_(weight.T if isinstance(layer, Conv1D) else weight)
        if bias is not None:
            layer.bias.copy_(bias)
