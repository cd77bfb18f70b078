"""Rank allocation: how many ranks (or MLP neurons) each unit keeps for one parameter budget.

`ratio` is the fraction of the targeted parameters REMOVED. A unit at rank k costs its exact
parameter count `Unit.params(k)`: fixed_params + k * cost_per_rank by default (k (m + n) for an
m x n matrix as two factors, plus a kept bias), or any increasing count per rank given as
`rank_params` (k (m + n - k) for the identity-block form); a rank that would not save parameters
leaves the unit dense. Every allocation works in two steps:

1. a per-unit target (how many parameters it should lose), from the allocation's rule, with
   clipping to what each unit can lose (rank >= 1) and the surplus redistributed so the targets
   sum to the budget (`_waterfill`); `spectrum` instead solves the knapsack greedily;
2. integer ranks: the largest rank removing at least the target (k = floor((dense - fixed -
   target) / cost) for a linear cost, the design's uniform formula), then a fix-up that moves single ranks until the plan removes at least the budget and less
   than one more rank's worth: the unit furthest below its target loses a rank while short, the
   unit furthest above its target gets a rank back while that keeps the budget (`spectrum` gives
   back the rank whose loss per parameter is highest). So every plan lands within one rank cost
   of the target, far inside the required 1% (checked; a set of units too coarse for 1% raises).

Units may be alternatives of one another (`Unit.alternative_of`, e.g. an MLP pruned or its matrices
factorised); only `spectrum` chooses between them (`compression.spectrum`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from compression.errors import UserInputError
from compression.spectrum import RankState, chosen, choices, greedy

ALLOCATIONS = ("uniform", "layer", "type", "spectrum", "explicit")
GRANULARITIES = ("block", "role", "matrix")
TOLERANCE = 0.01  # |achieved - target| as a fraction of the targeted parameters
LAYER_STRENGTH = 0.4  # `layer`: ratios span (1 -/+ strength) x the rescaled target
TYPE_LOG_ANCHOR = 1e3  # `type`: the smallest positive loss of a group maps to log(1e3)


@dataclass
class Unit:
    """One thing that gets a rank: a matrix (SVD family) or an MLP (`id`, rank = kept neurons).

    params(k) = fixed_params + k * cost_per_rank, or rank_params[k] when given (the exact count of
    every rank 0..max_rank, increasing; cost_per_rank is then the largest cost of one rank);
    dense_params includes fixed_params (a bias).
    loss_curve[k] ([max_rank + 1]) = the method's loss when keeping rank k (type / spectrum).
    alternative_of / alternative: units with the same `alternative_of` (say an MLP's name) and
    different `alternative`s ("prune", "factorise") are exclusive forms of one thing; a plan keeps
    the units of one alternative of each (the others are not in it).
    """

    name: str
    role: str
    block: int
    dense_params: int
    cost_per_rank: int
    max_rank: int
    dense_when_unprofitable: bool = True
    loss_curve: Tensor | None = None
    fixed_params: int = 0
    rank_params: Tensor | None = None
    alternative_of: str | None = None
    alternative: str | None = None

    def params_at(self, k: int) -> int:
        """Parameters of the unit at rank k in its low-rank form (however many that is)."""
        if self.rank_params is not None:
            return int(self.rank_params[k])
        return self.fixed_params + k * self.cost_per_rank

    def params(self, k: int | None) -> int:
        """Parameters at rank k (None = dense; a rank that saves nothing stays dense)."""
        if k is None:
            return self.dense_params
        p = self.params_at(k)
        return self.dense_params if self.dense_when_unprofitable and p >= self.dense_params else p

    @property
    def max_profitable_rank(self) -> int:
        """Largest rank that saves parameters (0: the unit can only stay dense)."""
        if self.rank_params is None:
            return max(0, min(self.max_rank, (self.dense_params - self.fixed_params - 1) // self.cost_per_rank))
        cheaper = (self.rank_params < self.dense_params).nonzero()
        return int(cheaper.max()) if cheaper.numel() else 0


@dataclass
class RankPlan:
    """Ranks per unit for one method, allocation and target ratio (None = left dense)."""

    method: str
    allocation: str
    target_ratio: float
    ranks: dict[str, int | None]
    dense_params: dict[str, int]
    params: dict[str, int]
    predicted_loss: float | None = None  # sum of the units' loss_curve at their ranks
    extra: dict = field(default_factory=dict)  # JSON-safe details (e.g. per-group ratios)
    # name -> {"block": int, "role": str} of every unit, in the model's order (role "mlp": a whole
    # MLP, whose rank is its number of kept neurons)
    units: dict[str, dict] = field(default_factory=dict)

    @property
    def targeted_params(self) -> int:
        return sum(self.dense_params.values())

    @property
    def removed_params(self) -> int:
        return sum(self.dense_params[n] - self.params[n] for n in self.dense_params)

    @property
    def achieved_ratio(self) -> float:
        return self.removed_params / self.targeted_params if self.targeted_params else 0.0

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "allocation": self.allocation,
            "target_ratio": float(self.target_ratio),
            "achieved_ratio": self.achieved_ratio,
            "targeted_params": self.targeted_params,
            "removed_params": self.removed_params,
            "predicted_loss": self.predicted_loss,
            "ranks": {k: (None if v is None else int(v)) for k, v in self.ranks.items()},
            "dense_params": {k: int(v) for k, v in self.dense_params.items()},
            "params": {k: int(v) for k, v in self.params.items()},
            "extra": self.extra,
            "units": [{"name": k, "block": int(v["block"]), "role": str(v["role"])} for k, v in self.units.items()],
        }

    @classmethod
    def from_dict(cls, d: dict) -> RankPlan:
        """Inverse of to_dict (derived fields are recomputed, not read)."""
        try:
            return cls(
                method=str(d["method"]),
                allocation=str(d["allocation"]),
                target_ratio=float(d["target_ratio"]),
                ranks={k: (None if v is None else int(v)) for k, v in d["ranks"].items()},
                dense_params={k: int(v) for k, v in d["dense_params"].items()},
                params={k: int(v) for k, v in d["params"].items()},
                predicted_loss=None if d.get("predicted_loss") is None else float(d["predicted_loss"]),
                extra=dict(d.get("extra") or {}),
                units={u["name"]: {"block": int(u["block"]), "role": str(u["role"])} for u in d.get("units") or []},
            )
        except (KeyError, AttributeError, TypeError, ValueError) as err:
            raise UserInputError(f"rank plan is malformed ({err!r}); expected RankPlan.to_dict() output") from err


def allocate(
    units: list[Unit],
    ratio: float,
    allocation: str,
    block_importance: Tensor | None = None,
    group_ratios: dict[str, float] | None = None,
    granularity: str = "block",
    method: str = "",
    strength: float = LAYER_STRENGTH,
) -> RankPlan:
    """A `RankPlan` removing `ratio` of the units' parameters (within 1%) by `allocation`.

    block_importance: [n_blocks], higher = more important (`layer`).
    group_ratios: relative ratios per group (`explicit`): keys str(block), role or unit name
        for granularity "block", "role" or "matrix"; rescaled to the budget.
    strength: spread of `layer` (a block's ratio is (1 + strength (1 - 2 z)) x a common factor,
        z the block's importance min-max normalised over the blocks).
    """
    if allocation not in ALLOCATIONS:
        raise UserInputError(f"unknown allocation {allocation!r}; allowed: {', '.join(ALLOCATIONS)}")
    if granularity not in GRANULARITIES:
        raise UserInputError(f"unknown granularity {granularity!r}; allowed: {', '.join(GRANULARITIES)}")
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < 1:
        raise UserInputError(f"ratio must be a number strictly between 0 and 1 (fraction removed), got {ratio!r}")
    _check_units(units)
    if allocation in ("type", "spectrum"):
        missing = [u.name for u in units if u.loss_curve is None]
        if missing:
            raise UserInputError(
                f"allocation {allocation!r} needs a loss curve for every unit; missing for "
                f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"
            )
    if any(u.alternative_of is not None for u in units):
        if allocation != "spectrum":
            raise UserInputError(f"allocation {allocation!r} cannot choose between alternative forms of a unit "
                                 f"(e.g. an MLP pruned or factorised); use 'spectrum'")
        return _with_alternatives(units, ratio, method)
    state = RankState(units)
    dense = torch.tensor([float(u.dense_params) for u in units], dtype=torch.float64)
    room = torch.tensor([float(state.removed(i, 1)) for i in range(len(units))], dtype=torch.float64)
    total = float(dense.sum())
    budget = ratio * total
    if budget > float(room.sum()):
        raise UserInputError(
            f"ratio {ratio} cannot be reached: with at least rank 1 per unit the maximum possible ratio "
            f"is {float(room.sum()) / total:.4f}"
        )
    extra: dict = {}
    if allocation == "spectrum":
        _spectrum(state, budget)
    else:
        if allocation == "uniform":
            targets = _waterfill(torch.ones_like(dense), dense, room, budget)
        elif allocation == "layer":
            targets = _waterfill(_layer_weights(units, block_importance, strength), dense, room, budget)
        elif allocation == "type":
            targets = _type_targets(units, state, room, budget, extra)
        else:
            base = _explicit_weights(units, group_ratios, granularity)
            if float(room[base > 0].sum()) < budget:
                raise UserInputError(
                    f"ratio {ratio} cannot be reached with these group_ratios (groups at 0 stay dense): "
                    f"the maximum is {float(room[base > 0].sum()) / total:.4f}"
                )
            targets = _waterfill(base, dense, room, budget)
        for i in range(len(units)):
            state.k[i] = state.rank_for(i, float(targets[i]))
        _fix_up(state, budget, targets.tolist(), None)
    return _plan(state, ratio, allocation, method, extra)


def _spectrum(state: RankState, budget: float) -> None:
    """The greedy knapsack (`compression.spectrum.greedy`), then single-rank give-backs where they
    recover the most loss per parameter."""
    greedy(state, budget)
    _fix_up(state, budget, None, lambda i: (state.loss(i) - state.loss(i, state.k[i] + 1)))


def _with_alternatives(units: list[Unit], ratio: float, method: str) -> RankPlan:
    """`spectrum` over units with alternatives: the lowest-loss plan over the candidate choices of
    `compression.spectrum.choices` (the units of the other alternatives are left out of it)."""
    groups = {u.alternative_of: u.alternative for u in reversed(units) if u.alternative_of is not None}
    budget = ratio * sum(units[i].dense_params for i in chosen(units, groups))  # alternatives cost the same dense
    best = None
    for choice in choices(units, budget):
        state = RankState([units[i] for i in chosen(units, choice)])
        _spectrum(state, budget)
        plan = _plan(state, ratio, "spectrum", method, {"alternatives": dict(sorted(choice.items()))})
        if best is None or plan.predicted_loss < best.predicted_loss:
            best = plan
    if best is None:
        raise UserInputError(f"ratio {ratio} cannot be reached with any choice of alternatives")
    return best


def _plan(state: RankState, ratio: float, allocation: str, method: str, extra: dict) -> RankPlan:
    units = state.units
    budget = ratio * state.total_dense
    total = state.total_dense
    removed = state.total()
    if abs(removed - budget) > TOLERANCE * total:
        raise UserInputError(
            f"ratio {ratio} cannot be met within 1% with these units (ranks are too coarse): "
            f"the closest plan removes {removed / total:.4f}"
        )
    ranks = {u.name: (None if state.k[i] > state.kmax[i] else state.k[i]) for i, u in enumerate(units)}
    has_loss = all(c is not None for c in state.curves)
    return RankPlan(
        method=method,
        allocation=allocation,
        target_ratio=float(ratio),
        ranks=ranks,
        dense_params={u.name: u.dense_params for u in units},
        params={u.name: u.params(ranks[u.name]) for u in units},
        predicted_loss=sum(state.loss(i) for i in range(len(units))) if has_loss else None,
        extra=extra,
        units={u.name: {"block": u.block, "role": u.role} for u in units},
    )


def _check_units(units: list[Unit]) -> None:
    if not units:
        raise UserInputError("no units to allocate ranks to (no targeted layers)")
    names = [u.name for u in units]
    if len(set(names)) != len(names):
        raise UserInputError("unit names must be unique")
    for u in units:
        if u.dense_params <= 0 or u.cost_per_rank <= 0 or u.max_rank < 1 or u.fixed_params < 0:
            raise UserInputError(f"unit {u.name!r} needs dense_params, cost_per_rank, max_rank > 0")
        if u.loss_curve is not None:
            if tuple(u.loss_curve.shape) != (u.max_rank + 1,) or not bool(torch.isfinite(u.loss_curve).all()):
                raise UserInputError(f"unit {u.name!r}: loss_curve must be finite with max_rank + 1 entries")
        if u.rank_params is not None:
            p = u.rank_params
            if (tuple(p.shape) != (u.max_rank + 1,) or p.is_floating_point() or int(p[0]) < 0
                    or not bool((p[1:] > p[:-1]).all()) or int((p[1:] - p[:-1]).max()) > u.cost_per_rank):
                raise UserInputError(f"unit {u.name!r}: rank_params must be max_rank + 1 increasing integers from "
                                     f">= 0, each rank costing at most cost_per_rank")
        if (u.alternative_of is None) != (u.alternative is None):
            raise UserInputError(f"unit {u.name!r}: give both alternative_of and alternative, or neither")
    dense_of: dict[tuple[str, str], int] = {}
    for u in units:
        if u.alternative_of is not None:
            key = (u.alternative_of, u.alternative)
            dense_of[key] = dense_of.get(key, 0) + u.dense_params
    for group in {g for g, _ in dense_of}:
        other = {a: d for (g, a), d in dense_of.items() if g == group}
        if len(set(other.values())) > 1:
            raise UserInputError(f"the alternatives of {group!r} must target the same parameters, got {other}")


def _waterfill(weights: Tensor, dense: Tensor, room: Tensor, budget: float) -> Tensor:
    """Per-unit targets (parameters to remove) t_i = min(s * weights_i * dense_i, room_i), with the
    common factor s >= 0 found by bisection so that sum t = budget.

    weights are relative ratios: units are rescaled multiplicatively, a unit that cannot lose its
    share (room_i = what rank 1 removes) keeps its maximum and the others absorb the surplus.
    The caller makes sure sum of room over units with weight > 0 reaches the budget.
    """
    want = weights * dense
    lo, hi = 0.0, 1.0
    while float(torch.minimum(hi * want, room).sum()) < budget and hi < 1e30:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if float(torch.minimum(mid * want, room).sum()) < budget:
            lo = mid
        else:
            hi = mid
    return torch.minimum(hi * want, room)


def _fix_up(
    state: RankState,
    budget: float,
    targets: list[float] | None,
    give_back_gain: Callable[[int], float] | None,
) -> None:
    """Single-rank moves until budget <= removed < budget + one rank's worth (or, for units
    too coarse for that to be within the tolerance, the closest plan).

    With targets: the unit furthest below its target loses a rank while short; the unit furthest
    above its target gets one back while that keeps the budget. With give_back_gain (spectrum):
    ranks are given back where they recover the most loss per parameter.
    """
    n = len(state.units)
    removed = state.total()
    while removed < budget:  # reachable: allocate() checked the budget against rank 1 everywhere
        movable = [i for i in range(n) if state.k[i] > 1 and (targets is None or targets[i] > 0)]
        movable = movable or [i for i in range(n) if state.k[i] > 1]
        i = min(movable, key=lambda j: (state.removed(j) - targets[j], j)) if targets else movable[0]
        removed += state.removed(i, state.k[i] - 1) - state.removed(i)
        state.k[i] -= 1
    while True:
        excess = removed - budget
        steps = {
            i: state.removed(i) - state.removed(i, state.k[i] + 1)
            for i in range(n)
            if state.k[i] <= state.kmax[i]
        }
        # keep the budget; only when that leaves more than the tolerance (very coarse units)
        # accept going below it if that gets closer
        limit = excess if excess <= TOLERANCE * state.total_dense else 2 * excess
        movable = [i for i, step in steps.items() if step <= excess or step < limit]
        if not movable:
            return
        if targets is not None:
            i = max(movable, key=lambda j: (state.removed(j) - targets[j], -j))
        else:
            i = max(movable, key=lambda j: (give_back_gain(j) / steps[j], -j))
        removed -= steps[i]
        state.k[i] += 1


def _layer_weights(units: list[Unit], block_importance: Tensor | None, strength: float) -> Tensor:
    """Relative ratio per unit from its block's importance (more important -> loses less).

    OWL-style linear map (Yin et al. 2024, outlier-weighted layerwise sparsity): z = min-max
    normalised importance over the blocks present, weight = 1 + strength (1 - 2 z), i.e. the most
    important block gets (1 - strength) and the least important (1 + strength) times the common
    ratio; the common factor is then rescaled to the budget with clipping. OWL spreads +-lambda
    around the target with lambda = 0.08 at sparsity 0.7; strength 0.4 is that spread at
    ratio 0.2 and grows with the ratio (multiplicative), so low ratios stay nearly uniform.
    Min-max normalisation makes it independent of the importance's units.
    """
    if block_importance is None:
        raise UserInputError("allocation 'layer' needs block_importance (one value per block, from calibration)")
    if not 0 <= strength < 1:
        raise UserInputError(f"layer strength must be in [0, 1), got {strength}")
    imp = torch.as_tensor(block_importance).detach().to("cpu", torch.float64).flatten()
    blocks = sorted({u.block for u in units})
    if blocks[0] < 0 or blocks[-1] >= imp.numel():
        raise UserInputError(
            f"block_importance has {imp.numel()} entries but the units use blocks {blocks[0]}..{blocks[-1]}"
        )
    if not bool(torch.isfinite(imp).all()):
        raise UserInputError("block_importance contains NaN or inf")
    present = imp[blocks]
    lo, hi = float(present.min()), float(present.max())
    spread = hi - lo
    z = {b: 0.5 if spread <= 1e-12 * max(abs(hi), abs(lo), 1e-300) else (float(imp[b]) - lo) / spread for b in blocks}
    return torch.tensor([1.0 + strength * (1.0 - 2.0 * z[u.block]) for u in units], dtype=torch.float64)


def _type_targets(units: list[Unit], state: RankState, room: Tensor, budget: float, extra: dict) -> Tensor:
    """SVD-LLM v2: every role group removes the target ratio (groups that cannot are clipped and
    the others absorb the rest); within a group a matrix's ratio is inversely proportional to
    the log of its truncation loss at the group's uniform rank.

    Our losses have arbitrary units (the paper's are large raw losses), so the log is anchored:
    ell = log(TYPE_LOG_ANCHOR * L / L_min) with L_min the smallest positive loss of the group and
    zero losses raised to L_min; ell >= log(1e3) ~ 6.9, so no division by a small or negative log,
    and the result does not depend on the loss units. A loss 1000x the group's smallest gets
    half its ratio.
    """
    dense = torch.tensor([float(u.dense_params) for u in units], dtype=torch.float64)
    roles = sorted({u.role for u in units})
    members = {r: [i for i, u in enumerate(units) if u.role == r] for r in roles}
    g_dense = torch.tensor([float(dense[members[r]].sum()) for r in roles], dtype=torch.float64)
    g_room = torch.tensor([float(room[members[r]].sum()) for r in roles], dtype=torch.float64)
    g_target = _waterfill(torch.ones_like(g_dense), g_dense, g_room, budget)
    targets = torch.zeros(len(units), dtype=torch.float64)
    ratios = {}
    for r, idx, t in zip(roles, members.values(), g_target.tolist()):
        ratios[r] = t / float(dense[idx].sum())
        losses = []
        for i in idx:
            k = min(state.rank_for(i, ratios[r] * units[i].dense_params), state.kmax[i])
            losses.append(state.loss(i, k) if k >= 1 else 0.0)
        positive = [x for x in losses if x > 0]
        if positive:
            l_min = min(positive)
            ell = [math.log(TYPE_LOG_ANCHOR * max(x, l_min) / l_min) for x in losses]
        else:
            ell = [1.0] * len(idx)
        weights = torch.tensor([1.0 / e for e in ell], dtype=torch.float64)
        targets[idx] = _waterfill(weights, dense[idx], room[idx], t)
    extra["group_ratios"] = ratios
    return targets


def _explicit_weights(units: list[Unit], group_ratios: dict[str, float] | None, granularity: str) -> Tensor:
    """Relative ratio per unit from the caller's per-group ratios (validated)."""
    key: Callable[[Unit], str] = {
        "block": lambda u: str(u.block),
        "role": lambda u: u.role,
        "matrix": lambda u: u.name,
    }[granularity]
    allowed = sorted({key(u) for u in units}, key=lambda s: (len(s), s))
    if not group_ratios:
        raise UserInputError(
            f"allocation 'explicit' needs group_ratios at granularity {granularity!r}, keys: {', '.join(allowed)}"
        )
    unknown = sorted(set(group_ratios) - set(allowed))
    missing = [k for k in allowed if k not in group_ratios]
    if unknown or missing:
        raise UserInputError(
            f"group_ratios at granularity {granularity!r} must have exactly the keys {', '.join(allowed)}"
            + (f"; unknown: {', '.join(map(str, unknown))}" if unknown else "")
            + (f"; missing: {', '.join(missing)}" if missing else "")
        )
    for k, v in group_ratios.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < math.inf:
            raise UserInputError(f"group_ratios[{k!r}] must be a finite number >= 0, got {v!r}")
    return torch.tensor([float(group_ratios[key(u)]) for u in units], dtype=torch.float64)
