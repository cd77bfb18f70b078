"""Apply a method to a model: decompose every unit once, plan ranks, swap in the compressed layers.

Typical use (decompositions are ratio-independent: compute them once per method, reuse per trial)::

    decs = decompose_model(model, stats, "whiten-fd")          # or a config: WhitenFd(alpha=0.5)
    plan = plan_ranks(model, stats, "whiten-fd", 0.4, "uniform", decs)
    compress(model, stats, "whiten-fd", plan, decs)

What gets counted ("targeted parameters", the denominator of `ratio`) is each unit's own business
(`Factorization.allocation_unit`):

- matrix methods (`svd`, `fwsvd`, `whiten`, `whiten-fw`, `whiten-fd`): the weights of every target
  in `stats.targets` (m n per matrix; biases are kept as they are and not counted). Rank k costs
  k (m + n); a matrix whose rank would not save parameters stays dense.
- MLP methods (`id`): the MLPs only (attention stays dense). Each kept neuron costs one row (plus
  its bias entry) of every MLP input layer (up/gate/fc1) and one column of the down/fc2 weight;
  the down bias is kept and not counted. So at the same `ratio`, `id` removes the same fraction
  of the MLP parameters that the matrix methods remove of all targeted parameters.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .allocation import RankPlan, Unit, allocate
from .calibration import CalibrationStats
from .errors import UserInputError
from .methods import Factorization, MethodConfig, method_config
from .methods.base import bound_unit
from .targets import get_module

Decompositions = dict[str, Factorization]  # unit name -> its decomposition


def decompose_model(
    model: nn.Module,
    stats: CalibrationStats,
    method: str | MethodConfig,
    device: torch.device | str | None = None,
    store_dtype: torch.dtype = torch.float32,
    progress: bool = False,
    whitenings: dict | None = None,
    **options,
) -> Decompositions:
    """Decompose every unit of the method (every target for a matrix method, keyed by layer name;
    every MLP for an MLP method, keyed by MLP module name) once. The result does not depend on
    the ratio: truncate it per trial.

    `method`: a name (with its `options`, e.g. alpha=0.5) or a config; `device`: where the math
    runs and the result lives (default: the model's device); `store_dtype`: dtype of the stored
    factors (the math is float64); `whitenings`: a dict shared between calls on the same model and
    statistics, so the whitening methods of a sweep whiten each input once.
    """
    config = method_config(method, **options)
    stats.check_matches(model)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    return config.decompose_model(model, stats, device, store_dtype, progress=progress, whitenings=whitenings)


def make_units(decompositions: Decompositions, method: str | MethodConfig | None = None) -> list[Unit]:
    """The allocation units of a set of decompositions, in their order (each says what it costs).
    With `method`, every decomposition must be that method's."""
    name = None if method is None else method_config(method).name
    units = []
    for key, dec in decompositions.items():
        if name is not None and dec.method != name:
            raise UserInputError(f"decompositions: need one for {key!r} with method {name!r}, found one for method "
                                 f"{dec.method!r}; decompose the same model with the same method")
        units.append(dec.allocation_unit())
    return units


def plan_ranks(
    model: nn.Module,
    stats: CalibrationStats,
    method: str | MethodConfig,
    ratio: float,
    allocation: str,
    decompositions: Decompositions,
    **kw,
) -> RankPlan:
    """The rank plan removing `ratio` of the targeted parameters; `kw` goes to `allocate`
    (group_ratios, granularity for "explicit"). Block importance comes from the stats."""
    config = method_config(method)
    names = [u.name for u in config.units(model, stats)]
    missing = [n for n in names if n not in decompositions]
    if missing:
        raise UserInputError(f"decompositions: need one for {missing[0]!r} with method {config.name!r}, found none; "
                             f"decompose the same model with the same method")
    units = make_units({n: decompositions[n] for n in names}, config)
    kw.setdefault("block_importance", stats.block_importance)
    return allocate(units, ratio, allocation, method=config.name, **kw)


def compress(
    model: nn.Module,
    stats: CalibrationStats,
    method: str | MethodConfig,
    plan: RankPlan,
    decompositions: Decompositions | None = None,
    inplace: bool = True,
) -> nn.Module:
    """Compress `model` following `plan` and return it (a deep copy first when `inplace=False`).

    Units with rank None stay dense. Decompositions are computed when not given (pass them to
    reuse one decomposition across ratios and allocations).
    """
    config = method_config(method)
    if plan.method and plan.method != config.name:
        raise UserInputError(f"the rank plan was made for method {plan.method!r}, not {config.name!r}")
    stats.check_matches(model)
    if not inplace:
        model = copy.deepcopy(model)
    if decompositions is None:
        decompositions = decompose_model(model, stats, config)
    unknown = [n for n in plan.ranks if n not in decompositions]
    if unknown:
        raise UserInputError(f"the rank plan names layers this model does not have: {', '.join(unknown[:5])}")
    for name, k in plan.ranks.items():  # check everything before the first layer changes
        dec = decompositions[name]
        if dec.method != config.name:
            raise UserInputError(f"decompositions: need one for {name!r} with method {config.name!r}, found one for "
                                 f"method {dec.method!r}; decompose the same model with the same method")
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= dec.max_rank):
            raise UserInputError(f"rank plan: rank {k!r} of {name!r} is not allowed; use an integer in "
                                 f"[0, {dec.max_rank}] or None (dense)")
        get_module(model, bound_unit(dec).name)  # the unit exists in this model
    for name, k in plan.ranks.items():
        if k is not None:
            decompositions[name].apply(model, k)
    return model
