"""What a model costs to run, from its structure alone: matrix-product FLOPs per token, and a key
that is the same for two models exactly when their layers have the same types and shapes (what
their speed depends on, whatever their weights)."""

from __future__ import annotations

import hashlib
import json

from torch import nn

from .targets import LINEAR_TYPES, dense_shape, find_blocks


def linear_flops_per_token(model: nn.Module) -> int:
    """2 x the multiply-adds of every `nn.Linear` / `Conv1D` for one token: a `LowRankLinear`
    counts its two factors, a pruned MLP its narrower layers, the LM head and classifier heads
    are included, embeddings (lookups) cost nothing."""
    total = 0
    for module in model.modules():
        if isinstance(module, LINEAR_TYPES):
            n_in, n_out, _ = dense_shape(module)
            total += 2 * n_in * n_out
    return total


def attention_flops_per_token(model: nn.Module, seq_len: int) -> int:
    """2 x the multiply-adds of the attention products (scores Q K^T and the weighted sum of V) for
    one token of a sequence of `seq_len`: 2 x 2 x heads x head_dim x keys per block, with keys the
    average number a token attends to: (seq_len + 1) / 2 in a causal model, seq_len in an encoder.
    Compression does not change it; it is what keeps a speed-up below the linear layers' bound."""
    config = model.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    causal = bool(getattr(config, "is_decoder", False)) or model.can_generate()
    keys = (seq_len + 1) / 2 if causal else seq_len
    return int(round(2 * 2 * heads * head_dim * keys * len(find_blocks(model))))


def flops_per_token(model: nn.Module, seq_len: int) -> int:
    """Matrix-product FLOPs of one token's forward pass at `seq_len` (linear layers + attention)."""
    return linear_flops_per_token(model) + attention_flops_per_token(model, seq_len)


def shape_key(model: nn.Module) -> str:
    """12 hex digits identifying the model's layer types and parameter and buffer shapes."""
    layout = [(name, type(m).__name__) for name, m in model.named_modules()]
    layout += [(name, list(t.shape)) for name, t in (*model.named_parameters(), *model.named_buffers())]
    return hashlib.sha256(json.dumps(layout, separators=(",", ":")).encode()).hexdigest()[:12]
