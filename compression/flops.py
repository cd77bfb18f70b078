"""FLOPs per token of a model's weight multiplications, and the FLOP-bound speed-up.

Counted exactly, per token: every `nn.Linear` and GPT-2 `Conv1D` the token passes through (the
blocks' layers, the small linears inside `LowRankLinear` and `IdentityBlockLinear`, and the LM or
classifier head) costs 2 in out FLOPs (one multiply and one add per weight) plus `out` for its
bias. So a dense m x n layer costs 2 m n, rank k as two factors 2 k (m + n), rank k with an
identity block 2 k (m + n - k) (its index is a copy, no arithmetic). Not counted: embedding
lookups (no arithmetic), norms, activations and residual adds (a few FLOPs per hidden unit), and
attention's score and value products, which grow with the context rather than with the weights
(4 x context x attention width per token and layer) and which no method changes. The ratio of two
models' counts is the speed-up a forward pass can reach when it is bound by these
multiplications (large batches on a GPU); `bench/inference.py` measures the real one.
"""

from __future__ import annotations

from torch import nn

from compression.targets import LINEAR_TYPES, dense_shape


def flops_per_token(model: nn.Module) -> int:
    """FLOPs of one token's forward pass through the weight multiplications (see the module
    docstring); a module shared by several parents (a tied head is its own `nn.Linear`) once."""
    total = 0
    for module in model.modules():
        if isinstance(module, LINEAR_TYPES):
            n_in, n_out, bias = dense_shape(module)
            total += 2 * n_in * n_out + (n_out if bias else 0)
    return total


def flop_speedup(dense: nn.Module, compressed: nn.Module) -> float:
    """Dense FLOPs per token / compressed FLOPs per token (> 1: the compressed model does less)."""
    return flops_per_token(dense) / flops_per_token(compressed)
