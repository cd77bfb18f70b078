"""The next-token loss through the output layer, a chunk of rows at a time.

For a causal LM whose logits are `head(hidden)` (a plain linear layer on the backbone's last
hidden states), the summed cross-entropy sum_i [logsumexp(z_i) - z_i[t_i]] with z_i = W h_i + b
has the closed-form gradient dL/dz_i = softmax(z_i) - onehot(t_i). `chunked_cross_entropy`
computes the loss and that gradient for a chunk of rows, turns it at once into the gradients of
h (and of W, b when they train) and drops the chunk's logits. So the [tokens, vocab] logits and
their gradient never exist whole: with a 49k vocabulary they are ~200 MB per 1,024 tokens, read
and written several times per step by the plain loss. The backward pass only scales the saved
gradients by the incoming one (1 / tokens, or the fp16 loss scale).
"""

from __future__ import annotations

import torch
from torch import nn

from trainables.evaluation import logits_of

IGNORE = -100  # the target of a position that predicts nothing (cross_entropy's ignore_index)
_CHUNK_ELEMENTS = 128 * 49152  # logits per chunk: ~25 MB in float32, about the CPU's last-level cache


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, dtype):
        hidden_c = hidden.detach().to(dtype)
        weight_c = weight.detach().to(dtype)
        bias_c = None if bias is None else bias.detach().to(dtype)
        rows = max(1, _CHUNK_ELEMENTS // weight.shape[0])
        exact = torch.promote_types(weight.dtype, torch.float32)  # of the loss, the softmax, the sums
        grad_hidden = torch.empty_like(hidden, dtype=exact)
        grad_weight = torch.zeros_like(weight, dtype=exact) if ctx.needs_input_grad[1] else None
        grad_bias = torch.zeros_like(bias, dtype=exact) if ctx.needs_input_grad[2] else None
        total = torch.zeros((), dtype=exact, device=hidden.device)
        for start in range(0, hidden.shape[0], rows):
            h = hidden_c[start:start + rows]
            z = (h @ weight_c.T if bias_c is None else torch.addmm(bias_c, h, weight_c.T)).to(exact)
            t = targets[start:start + rows]
            kept = t != IGNORE
            index = t.clamp_min(0).unsqueeze(1)
            picked = z.gather(1, index).squeeze(1)
            top = z.amax(1, keepdim=True)
            norm = z.sub_(top).exp_().sum(1, keepdim=True)  # in place: z holds exp(z - max) from here
            total += ((top + norm.log()).squeeze(1) - picked)[kept].sum()
            grad = z.div_(norm).scatter_add_(1, index, z.new_full(index.shape, -1.0))  # softmax - onehot
            if not kept.all():
                grad.index_fill_(0, (~kept).nonzero().squeeze(1), 0.0)
            grad_c = grad.to(dtype)
            grad_hidden[start:start + rows] = grad_c @ weight_c
            if grad_weight is not None:
                grad_weight += grad_c.T @ h
            if grad_bias is not None:
                grad_bias += grad.sum(0)
        ctx.dtypes = hidden.dtype, weight.dtype, None if bias is None else bias.dtype
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        # scaled before the cast: an fp16 loss scale may not fit the input's dtype times the gradient
        scaled = (None if g is None else (g * grad_output).to(d) for g, d in zip(ctx.saved_tensors, ctx.dtypes))
        return *scaled, None, None


def chunked_cross_entropy(hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor) -> torch.Tensor:
    """sum of cross_entropy(head(hidden), targets, ignore_index=IGNORE) over the rows of hidden
    [tokens, d] and targets [tokens], in float32, its logits a chunk at a time. Under autocast
    the products run in the autocast dtype, as `head(hidden)` would."""
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else head.weight.dtype
    with torch.autocast(device, enabled=False):
        return _ChunkedCrossEntropy.apply(hidden, head.weight, head.bias, targets, dtype)


def split_head(model: nn.Module, input_ids: torch.Tensor) -> tuple[nn.Module, nn.Linear] | None:
    """(backbone, head) when the model's logits are exactly head(backbone(...)[0]), a plain linear
    layer on the last hidden states of its base model (checked on `input_ids`, in eval mode); else
    None: models that scale or cap their logits, an adapted or factored head, no base model."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    backbone = getattr(model, "base_model", model)
    if type(head) is not nn.Linear or backbone is model:
        return None
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            full = logits_of(model(input_ids=input_ids, use_cache=False))
            hidden = backbone(input_ids=input_ids, use_cache=False)[0]
            split = head(hidden) if hidden.shape[-1] == head.in_features else None
    finally:
        model.train(training)
    same = split is not None and full.shape == split.shape and torch.allclose(full, split, rtol=1e-4, atol=1e-4 * float(full.abs().max()))
    return (backbone, head) if same else None
