"""Propagated refitting: after compression, refit every compressed layer to the dense model's
output from the inputs the compressed model really gives it.

Every method fits a layer on the dense model's inputs X, but in the compressed model the layer
sees X-hat, the output of the compressed layers before it, and the errors add up with depth.
Refitting goes block by block: the calibration batches run through the blocks compressed (and
refitted) so far, and for each layer W of the block, in order (q/k/v, then o, then gate/up, then
down: each stage sees the refitted layers before it), the new rank-k W' solves

    min ||D (W X - W' X-hat)||_F^2 + delta ||D (W_c - W')||_F^2

with the dense weight W, the neuron-importance row scale D of the method (`whiten-fd`'s
diag(sqrt g); I for the plain methods), the layer's current weight W_c and a ridge delta =
damp x mean diag(X-hat X-hat^T) (0 by default). With G = X-hat X-hat^T + delta I and its whitening
S (S S^T = G, the Cholesky factor of `methods.whitening.Whitening`, floored by clamp x trace), the unconstrained solution is
W_ls = (W X X-hat^T + delta W_c) G^-1, and the objective equals ||D (W_ls - W') S||_F^2 plus a
constant, so W' is the rank-k truncation of D W_ls S: `weighted_svd(W_ls, D, S)` at the layer's
rank, stored in the layer's own form (two factors or an identity block). With X-hat = X and no
ridge this is the method's own solution again. With `dense_layers`, layers the plan left dense
(and the down projection of a pruned MLP, whose input is narrower) are refitted too, by least
squares (W' = W_ls, D does not matter), as `id` folds its interpolation into the down projection.
Biases are kept; their layers' weights are fitted to W X.

Memory: the hidden states of the calibration batches at one block boundary (dense and
compressed) and the dense inputs of one block's layers; the Gram matrices are float64.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers.cache_utils import Cache

from compression.errors import UserInputError
from compression.layers import IdentityBlockLinear, LowRankLinear
from compression.methods.factors import weighted_svd
from compression.methods.whitening import Whitening
from compression.targets import (
    LINEAR_TYPES,
    Target,
    dense_shape,
    dense_weight,
    find_blocks,
    get_module,
    set_dense_weight,
    set_module,
)

LOW_RANK = (LowRankLinear, IdentityBlockLinear)


@dataclass
class RefitReport:
    """What a refit did: layers refitted at their rank and by least squares, and its seconds."""

    low_rank: int = 0
    dense: int = 0
    seconds: float = 0.0


def row_scales(decompositions: dict) -> dict[str, Tensor]:
    """layer name -> the row scale D of its decomposition (`LowRankDecomposition.row_scale`), for
    the decompositions that weight their outputs."""
    scales = {}
    for name, dec in decompositions.items():
        scale = getattr(dec, "row_scale", None)
        if scale is not None:
            scales[name] = scale
    return scales


def refit(
    model: nn.Module,
    dense: nn.Module,
    batches: Iterable[dict[str, Tensor]],
    targets: Sequence[Target],
    scales: dict[str, Tensor] | None = None,
    dense_layers: bool = False,
    damp: float = 0.0,
    clamp: float = 1e-12,
    progress: bool = False,
) -> RefitReport:
    """Refit the compressed `model` in place against `dense` (the model it was compressed from) on
    `batches` (dicts with input_ids and attention_mask); `targets` are the calibrated layers,
    `scales` the row scales D by layer name (see the module docstring)."""
    if damp < 0 or not 0 < clamp < 1:
        raise UserInputError(f"refit: damp must be >= 0 and clamp in (0, 1), got damp {damp}, clamp {clamp}")
    start = time.perf_counter()
    report = RefitReport()
    scales = scales or {}
    was_training = model.training, dense.training
    model.eval(), dense.eval()
    try:
        with torch.no_grad():
            calls = _block_calls(dense, list(batches))
            if not calls:
                raise UserInputError("refit: got no calibration batches")
            hidden_dense = [c.hidden for c in calls]
            hidden = [h.clone() for h in hidden_dense]  # the embeddings are never compressed
            blocks_dense, blocks = find_blocks(dense), find_blocks(model)
            for b in tqdm(range(len(blocks)), desc="refit", disable=not progress):
                groups: dict[str, list[Target]] = {}
                for t in targets:
                    if t.block == b:
                        groups.setdefault(t.input_group, []).append(t)
                inputs = _inputs(dense, blocks_dense[b], b, groups, calls, hidden_dense)
                for group, members in groups.items():
                    todo = [t for t in members if _kind(model, t, dense_layers) is not None]
                    if todo:
                        gram, cross = _grams(model, blocks[b], b, group, calls, hidden, inputs[group])
                        for t in todo:
                            _refit_layer(model, dense, t, gram, cross, scales.get(t.name), damp, clamp, report)
                    del inputs[group]
                for i, c in enumerate(calls):
                    hidden[i] = _output(blocks[b](hidden[i], *c.args[b], **c.kwargs[b]))
    finally:
        model.train(was_training[0]), dense.train(was_training[1])
    report.seconds = time.perf_counter() - start
    return report


@dataclass
class _Call:
    """One batch: the first block's input, each block's other arguments, the token mask."""

    hidden: Tensor
    args: list[tuple]
    kwargs: list[dict]
    mask: Tensor


class _Stop(Exception):
    """Raised by a hook to end a forward pass once it has what it needs."""


class _Recorder(nn.Module):
    """Stands in for a block during `_block_calls`: records its arguments, passes the input on."""

    def __init__(self, index: int, last: bool, sink: dict) -> None:
        super().__init__()
        self.index, self.last, self.sink = index, last, sink

    def forward(self, hidden: Tensor, *args, **kwargs):
        if self.index == 0:
            self.sink["hidden"] = hidden
        # the blocks run again and again: no key-value cache, wherever it is passed
        args = tuple(None if isinstance(a, Cache) else a for a in args)
        kwargs = {k: None if isinstance(v, Cache) else v for k, v in kwargs.items()}
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        self.sink[self.index] = (args, kwargs)
        if self.last:
            raise _Stop
        return hidden


def _block_calls(dense: nn.Module, batches: list[dict[str, Tensor]]) -> list[_Call]:
    """The arguments every block receives (attention masks, rotary embeddings, ...), from one
    forward pass per batch in which the blocks are stand-ins that only record them (nothing is
    computed but the embeddings); the model is restored after."""
    blocks = find_blocks(dense)
    names = {id(m): n for n, m in dense.named_modules()}
    block_names = [names[id(b)] for b in blocks]
    device = next(dense.parameters()).device
    calls = []
    for batch in batches:
        if "input_ids" not in batch:
            raise UserInputError("refit: calibration batches need 'input_ids'")
        batch = {k: v.to(device) for k, v in batch.items() if k != "labels"}
        sink: dict = {}
        try:
            for i, name in enumerate(block_names):
                set_module(dense, name, _Recorder(i, i == len(blocks) - 1, sink))
            dense(**batch, **({"use_cache": False} if getattr(dense.config, "use_cache", None) else {}))
        except _Stop:
            pass
        finally:
            for name, block in zip(block_names, blocks):
                set_module(dense, name, block)
        mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).reshape(-1).bool()
        calls.append(_Call(sink["hidden"], [sink[i][0] for i in range(len(blocks))],
                           [sink[i][1] for i in range(len(blocks))], mask))
    return calls


def _output(out) -> Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _rows(x: Tensor, mask: Tensor) -> Tensor:
    """The token rows of an activation [..., d] that the attention mask keeps, as [tokens, d]."""
    return x.reshape(-1, x.shape[-1])[mask]


def _inputs(dense: nn.Module, block: nn.Module, b: int, groups: dict[str, list[Target]], calls: list[_Call],
            hidden: list[Tensor]) -> dict[str, list[Tensor]]:
    """Run the dense block on every batch (updating `hidden` to its outputs) and keep the input of
    every input group: group -> one [tokens, n] tensor per batch."""
    out: dict[str, list[Tensor]] = {g: [] for g in groups}
    handles = []
    current: list[Tensor] = []
    for group in groups:
        def hook(module, args, group=group):
            out[group].append(_rows(args[0], current[0]).float())

        handles.append(get_module(dense, group).register_forward_pre_hook(hook))
    try:
        for i, c in enumerate(calls):
            current[:] = [c.mask]
            hidden[i] = _output(block(hidden[i], *c.args[b], **c.kwargs[b]))
    finally:
        for h in handles:
            h.remove()
    return out


def _grams(model: nn.Module, block: nn.Module, b: int, group: str, calls: list[_Call], hidden: list[Tensor],
           dense_inputs: list[Tensor]) -> tuple[Tensor, Tensor]:
    """(X-hat X-hat^T [n', n'], X X-hat^T [n, n']) of one input group, float64: the compressed block
    runs on every batch up to the group's layers."""
    seen: list[Tensor] = []

    def hook(module, args):
        seen.append(args[0])
        raise _Stop

    handle = get_module(model, group).register_forward_pre_hook(hook)
    gram = cross = None
    try:
        for i, c in enumerate(calls):
            seen.clear()
            try:
                block(hidden[i], *c.args[b], **c.kwargs[b])
            except _Stop:
                pass
            x_hat = _rows(seen[0], c.mask).to(torch.float64)
            x = dense_inputs[i].to(device=x_hat.device, dtype=torch.float64)
            if gram is None:
                gram = x_hat.new_zeros(x_hat.shape[1], x_hat.shape[1])
                cross = x_hat.new_zeros(x.shape[1], x_hat.shape[1])
            gram.addmm_(x_hat.T, x_hat)
            cross.addmm_(x.T, x_hat)
    finally:
        handle.remove()
    return gram, cross


def _kind(model: nn.Module, t: Target, dense_layers: bool) -> str | None:
    """"low-rank", "dense" (least squares) or None (left as it is) for layer `t`."""
    layer = get_module(model, t.name)
    if isinstance(layer, LOW_RANK):
        return "low-rank"
    if dense_layers and isinstance(layer, LINEAR_TYPES):
        if dense_shape(layer)[1] == t.out_features:  # a pruned MLP's gate/up rows are copies: kept
            return "dense"
    return None


def current_weight(layer: nn.Module) -> Tensor:
    """The [out, in] matrix a dense, low-rank or identity-block layer applies (without bias)."""
    if isinstance(layer, LOW_RANK):
        return layer.product()
    return dense_weight(layer)


def solve(weight: Tensor, current: Tensor, gram: Tensor, cross: Tensor, damp: float, clamp: float
          ) -> tuple[Tensor, Tensor]:
    """(W_ls, S) of the module docstring: the unconstrained refit [m, n'] and the whitening of
    G = X-hat X-hat^T + delta I, from the dense weight [m, n], the current one [m, n'] and the
    Grams (float64)."""
    delta = damp * float(gram.diagonal().mean()) if damp > 0 else 0.0
    g = gram + delta * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    target = weight.to(torch.float64) @ cross + delta * current.to(torch.float64)
    s = Whitening(g, clamp).factor()
    u = torch.linalg.solve(s, target.T).T  # T S^-T
    return torch.linalg.solve(s.T, u.T).T, s  # T S^-T S^-1 = T G^-1


def _refit_layer(model: nn.Module, dense: nn.Module, t: Target, gram: Tensor, cross: Tensor, scale: Tensor | None,
                 damp: float, clamp: float, report: RefitReport) -> None:
    layer = get_module(model, t.name)
    w = dense_weight(get_module(dense, t.name)).detach()
    w_ls, s = solve(w, current_weight(layer).detach(), gram, cross, damp, clamp)
    if isinstance(layer, LOW_RANK):
        first = next(layer.parameters())
        a, b = weighted_svd(w_ls, row_scale=None if scale is None else scale.to(w_ls), right=s,
                            store_dtype=torch.float64).truncate(layer.rank, dtype=torch.float64)
        new = type(layer).from_factors(a, b, layer.bias_vector(), dtype=first.dtype, device=first.device)
        set_module(model, t.name, new.train(layer.training).requires_grad_(first.requires_grad))
        report.low_rank += 1
    else:
        set_dense_weight(layer, w_ls.to(layer.weight.dtype), None)
        report.dense += 1
