"""Apply a method to a model: decompose every target once, turn the decompositions into allocation
units, plan ranks, and swap in the compressed layers.

Typical use (decompositions are ratio-independent: compute them once per method, reuse per trial)::

    decs = decompose_model(model, stats, "whiten-fd")
    plan = plan_ranks(model, stats, "whiten-fd", 0.4, "uniform", decs)
    compress(model, stats, "whiten-fd", plan, decs)

What gets counted ("targeted parameters", the denominator of `ratio`):

- SVD family (`svd`, `fwsvd`, `whiten`, `whiten-fw`, `whiten-fd`): the weights of every target in
  `stats.targets` (m n per matrix; biases are kept as they are and not counted). Rank k costs
  k (m + n); a matrix whose rank would not save parameters stays dense.
- `id`: the MLPs only (attention stays dense). Each kept neuron costs one row (plus its bias entry)
  of every MLP input layer (up/gate/fc1) and one column of the down/fc2 weight; the down bias is
  kept and not counted. So at the same `ratio`, `id` removes the same fraction of the MLP
  parameters that the SVD family removes of all targeted parameters.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from tqdm.auto import tqdm

from .allocation import RankPlan, Unit, allocate
from .calibration import CalibrationStats
from .errors import UserInputError
from .lowrank import LowRankLinear, dense_layer, dense_shape, dense_weight, layer_kind, set_dense_weight
from .methods import METHODS, Decomposition, LayerStats, NeuronDecomposition, decompose, whitening_factor
from .targets import MlpGroup, Target, find_mlps, get_module, set_module, weight_matrix

Decompositions = dict[str, Decomposition | NeuronDecomposition]  # unit name -> its decomposition


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


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise UserInputError(f"unknown method {method!r}; allowed: {', '.join(METHODS)}")


def _mlps(model: nn.Module, stats: CalibrationStats) -> list[MlpGroup]:
    """The MLP groups of the model whose layers all have statistics."""
    mlps = find_mlps(model)
    names = {t.name for t in stats.targets}
    missing = [n for g in mlps for n in (*g.inputs, g.down) if n not in names]
    if missing:
        raise UserInputError(f"method 'id' needs calibration statistics for every MLP layer; missing: "
                             f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    return mlps


def decompose_model(
    model: nn.Module,
    stats: CalibrationStats,
    method: str,
    alpha: float = 1.0,
    device: torch.device | str | None = None,
    store_dtype: torch.dtype = torch.float32,
    progress: bool = False,
) -> Decompositions:
    """Decompose every target (SVD family, keyed by layer name) or every MLP (`id`, keyed by MLP
    module name, from the Gram of its down-projection input) once. The result does not depend on
    the ratio: truncate it per trial.

    `device`: where the math runs and the result lives (default: the model's device);
    `alpha`: exponent of the importance weighting of `whiten-fd`; `store_dtype`: dtype of the stored
    factors (the math is float64).
    """
    _check_method(method)
    stats.check_matches(model)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if method == "id":
        jobs = [(g.name, g.down) for g in _mlps(model, stats)]
    else:
        jobs = [(t.name, t.name) for t in stats.targets]
    by_name = {t.name: t for t in stats.targets}
    whitenings: dict[str, torch.Tensor] = {}  # input group -> its whitening factor, computed once
    out = {}
    for key, layer in tqdm(jobs, desc=f"{method}: decompose", disable=not progress):
        ls = stats.layer(layer)
        layer_stats = LayerStats(gram=_to(ls.gram, device), tokens=ls.tokens, row_fisher=_to(ls.row_fisher, device),
                                 col_fisher=_to(ls.col_fisher, device), neuron_fisher=_to(ls.neuron_fisher, device))
        weight = weight_matrix(model, by_name[layer]).detach().to(device)
        whitening = None
        if method.startswith("whiten"):
            group = by_name[layer].input_group
            if group not in whitenings:
                whitenings[group] = whitening_factor(layer_stats.gram)
            whitening = whitenings[group]
        out[key] = decompose(method, weight, layer_stats, alpha=alpha, store_dtype=store_dtype, whitening=whitening)
    return out


def _to(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if t is None else t.to(device)


def make_units(model: nn.Module, stats: CalibrationStats, method: str, decompositions: Decompositions) -> list[Unit]:
    """The allocation units of a method: one per target matrix (SVD family) or per MLP (`id`).

    See the module docstring for what each unit's parameters count.
    """
    _check_method(method)
    if method == "id":
        units = []
        for g in _mlps(model, stats):
            cost = dense_shape(_dense(model, g.down))[1]
            for name in g.inputs:
                n_in, _, has_bias = dense_shape(_dense(model, name))
                cost += n_in + int(has_bias)
            dec = _decomposition(decompositions, g.name, method)
            units.append(Unit(name=g.name, role="mlp", block=g.block, dense_params=g.width * cost,
                              cost_per_rank=cost, max_rank=g.width, dense_when_unprofitable=False,
                              loss_curve=dec.loss_curve()))
        return units
    units = []
    for t in stats.targets:
        dec = _decomposition(decompositions, t.name, method)
        m, n = t.out_features, t.in_features
        units.append(Unit(name=t.name, role=t.role, block=t.block, dense_params=m * n,
                          cost_per_rank=m + n, max_rank=dec.max_rank, dense_when_unprofitable=True,
                          loss_curve=dec.loss_curve()))
    return units


def _decomposition(decompositions: Decompositions, name: str, method: str) -> Decomposition | NeuronDecomposition:
    dec = decompositions.get(name)
    if dec is None or dec.method != method:
        found = "none" if dec is None else f"one for method {dec.method!r}"
        raise UserInputError(f"decompositions: need one for {name!r} with method {method!r}, found {found}; "
                             f"decompose the same model with the same method")
    return dec


def plan_ranks(
    model: nn.Module,
    stats: CalibrationStats,
    method: str,
    ratio: float,
    allocation: str,
    decompositions: Decompositions,
    **kw,
) -> RankPlan:
    """The rank plan removing `ratio` of the targeted parameters; `kw` goes to `allocate`
    (group_ratios, granularity for "explicit"). Block importance comes from the stats."""
    _check_method(method)
    units = make_units(model, stats, method, decompositions)
    kw.setdefault("block_importance", stats.block_importance)
    return allocate(units, ratio, allocation, method=method, **kw)


def compress(
    model: nn.Module,
    stats: CalibrationStats,
    method: str,
    plan: RankPlan,
    decompositions: Decompositions | None = None,
    inplace: bool = True,
    alpha: float = 1.0,
) -> nn.Module:
    """Compress `model` following `plan` and return it (a deep copy first when `inplace=False`).

    Units with rank None stay dense. Decompositions are computed when not given (pass them to
    reuse one decomposition across ratios and allocations).
    """
    _check_method(method)
    if plan.method and plan.method != method:
        raise UserInputError(f"the rank plan was made for method {plan.method!r}, not {method!r}")
    stats.check_matches(model)
    if not inplace:
        model = copy.deepcopy(model)
    if decompositions is None:
        decompositions = decompose_model(model, stats, method, alpha=alpha)
    if method == "id":
        units = {g.name: g for g in _mlps(model, stats)}
    else:
        units = {t.name: t for t in stats.targets}
    unknown = [n for n in plan.ranks if n not in units]
    if unknown:
        raise UserInputError(f"the rank plan names layers this model does not have: {', '.join(unknown[:5])}")
    for name, k in plan.ranks.items():  # check everything before the first layer changes
        dec = _decomposition(decompositions, name, method)
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= dec.max_rank):
            raise UserInputError(f"rank plan: rank {k!r} of {name!r} is not allowed; use an integer in "
                                 f"[0, {dec.max_rank}] or None (dense)")
    for name, k in plan.ranks.items():
        if k is None:
            continue
        dec = decompositions[name]
        if method == "id":
            kept, down_weight = dec.truncate(k, dtype=get_module(model, units[name].down).weight.dtype)
            prune_mlp(model, units[name], kept, down_weight)
        else:
            A, B = dec.truncate(k, dtype=get_module(model, name).weight.dtype)
            replace_low_rank(model, units[name], A, B)
    return model
