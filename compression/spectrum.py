"""The `spectrum` allocation: all ranks of all units compete for one parameter budget.

Each unit's states are dense, kmax, kmax - 1, ..., 1, points (removed parameters, loss) with the
unit's exact parameter count per rank (`Unit.params`: k (m + n) for two factors, k (m + n - k)
for the identity-block form, whose marginal cost m + n - 2k + 1 falls with k). The greedy walks
the lower convex hull of each unit's points in the global order of hull slopes (loss per removed
parameter), so the knapsack is solved exactly for its convex relaxation whatever the costs; the
last segment is walked rank by rank and stops as soon as the budget is met.

Alternatives (`Unit.alternative_of`): units that are different forms of one thing (an MLP pruned
to k neurons, or its three matrices factorised) exclude each other, and the plan keeps exactly one
alternative of each. Which one is chosen by a Lagrangian relaxation: for a price lambda per removed
parameter every unit takes the hull vertex minimising loss - lambda * removed and every group the
alternative whose units sum lowest; lambda is bisected until the budget is met. The greedy then
places the ranks of the chosen units exactly, and the plan with the lowest loss among that choice
and every "pure" choice (the same alternative everywhere) is kept, so it is never worse than any
pure plan.
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from compression.allocation import Unit


class RankState:
    """Integer state of the units: k in [1, kmax] or kmax + 1 (= dense), with their exact costs."""

    def __init__(self, units: Sequence[Unit]) -> None:
        self.units = units
        self.kmax = [u.max_profitable_rank for u in units]
        self.k = [km + 1 for km in self.kmax]  # all dense
        self.total_dense = sum(u.dense_params for u in units)
        self._params = [[u.params_at(k) for k in range(km + 1)] for u, km in zip(units, self.kmax)]
        self.curves = [
            None if u.loss_curve is None else u.loss_curve.detach().to("cpu", torch.float64).tolist() for u in units
        ]

    def removed(self, i: int, k: int | None = None) -> int:
        k = self.k[i] if k is None else k
        return 0 if k > self.kmax[i] else self.units[i].dense_params - self._params[i][k]

    def loss(self, i: int, k: int | None = None) -> float:
        k = self.k[i] if k is None else k
        curve = self.curves[i]
        return curve[-1] if k > self.kmax[i] else curve[k]

    def total(self) -> int:
        return sum(self.removed(i) for i in range(len(self.units)))

    def rank_for(self, i: int, target: float) -> int:
        """The largest rank in [1, kmax] removing at least `target` (1 when none does; kmax + 1,
        dense, when `target` <= 0): the design's k = floor((dense - fixed - target) / cost) for a
        linear cost, the same search for any increasing cost."""
        if target <= 0:
            return self.kmax[i] + 1
        allowed = self.units[i].dense_params - target + 1e-6
        k = bisect.bisect_right(self._params[i], allowed) - 1
        return min(max(k, 1), self.kmax[i] + 1)


def greedy(state: RankState, budget: float) -> None:
    """Greedy knapsack over the units' hulls (see the module docstring), in place."""
    heap: list[tuple[float, int, int, list[int]]] = []
    for i in range(len(state.units)):
        hull = lower_hull(state, i)
        if len(hull) > 1:
            heap.append((_slope(state, i, hull[0], hull[1]), i, 0, hull))
    heapq.heapify(heap)
    removed = 0
    while removed < budget and heap:
        _, i, pos, hull = heapq.heappop(heap)
        k_from, k_to = hull[pos], hull[pos + 1]
        if removed + state.removed(i, k_to) - state.removed(i, k_from) >= budget:
            for k in range(k_from - 1, k_to - 1, -1):  # walk the last segment rank by rank
                removed += state.removed(i, k) - state.removed(i)
                state.k[i] = k
                if removed >= budget:
                    return
        removed += state.removed(i, k_to) - state.removed(i, k_from)
        state.k[i] = k_to
        if pos + 2 < len(hull):
            heapq.heappush(heap, (_slope(state, i, k_to, hull[pos + 2]), i, pos + 1, hull))


def _slope(state: RankState, i: int, k_from: int, k_to: int) -> float:
    return (state.loss(i, k_to) - state.loss(i, k_from)) / (state.removed(i, k_to) - state.removed(i, k_from))


def lower_hull(state: RankState, i: int) -> list[int]:
    """States (dense = kmax + 1 first, then kmax ... 1) on the lower convex hull of
    (removed params, loss) for unit i (monotone chain)."""
    hull: list[int] = []
    for k in range(state.kmax[i] + 1, 0, -1):
        x, y = state.removed(i, k), state.loss(i, k)
        while len(hull) >= 2:
            x1, y1 = state.removed(i, hull[-2]), state.loss(i, hull[-2])
            x2, y2 = state.removed(i, hull[-1]), state.loss(i, hull[-1])
            if (x2 - x1) * (y - y1) - (y2 - y1) * (x - x1) <= 0:  # hull[-1] not strictly below
                hull.pop()
            else:
                break
        hull.append(k)
    return hull


def choices(units: Sequence[Unit], budget: float) -> list[dict[str, str]]:
    """Candidate choices of one alternative per group ({group: alternative}): the Lagrangian one
    for `budget` first, then every pure one (see the module docstring). Choices whose units cannot
    remove `budget` at rank 1 are left out."""
    groups: dict[str, list[str]] = {}
    for u in units:
        if u.alternative_of is not None and u.alternative not in groups.setdefault(u.alternative_of, []):
            groups[u.alternative_of].append(u.alternative)
    names = sorted({a for alts in groups.values() for a in alts}, key=lambda a: min(
        i for i, u in enumerate(units) if u.alternative == a))
    pure = [{g: a for g, alts in groups.items() if a in alts} for a in names]
    pure = [c for c in pure if len(c) == len(groups)]
    found = [_lagrangian(units, groups, budget)] + pure
    unique = []
    for c in found:
        if c not in unique and _room(units, c) >= budget:
            unique.append(c)
    return unique


def chosen(units: Sequence[Unit], choice: dict[str, str]) -> list[int]:
    """Indices of the units a choice keeps (every unit without alternatives, and the chosen ones)."""
    return [i for i, u in enumerate(units) if u.alternative_of is None or choice.get(u.alternative_of) == u.alternative]


def _room(units: Sequence[Unit], choice: dict[str, str]) -> int:
    kept = [units[i] for i in chosen(units, choice)]
    return sum(u.dense_params - u.params_at(1) for u in kept if u.max_profitable_rank >= 1)


def _lagrangian(units: Sequence[Unit], groups: dict[str, list[str]], budget: float) -> dict[str, str]:
    """The alternatives of the smallest price lambda at which the relaxed plan meets `budget`."""
    state = RankState(units)
    seg_unit, seg_slope, seg_dx, seg_dy = [], [], [], []
    for i in range(len(units)):
        hull = lower_hull(state, i)
        for a, b in zip(hull, hull[1:]):
            seg_unit.append(i)
            seg_dx.append(state.removed(i, b) - state.removed(i, a))
            seg_dy.append(state.loss(i, b) - state.loss(i, a))
            seg_slope.append(seg_dy[-1] / seg_dx[-1])
    f64 = dict(dtype=torch.float64)
    unit_of = torch.tensor(seg_unit, dtype=torch.long)
    slope, dx, dy = torch.tensor(seg_slope, **f64), torch.tensor(seg_dx, **f64), torch.tensor(seg_dy, **f64)
    keys = [(g, a) for g, alts in groups.items() for a in alts]
    plain = len(keys)  # the slot of the units without alternatives
    slot = torch.tensor([keys.index((u.alternative_of, u.alternative)) if u.alternative_of is not None else plain
                         for u in units], dtype=torch.long)

    def solve(price: float) -> tuple[dict[str, str], float]:
        """The relaxed optimum at `price`: the chosen alternatives and the parameters removed."""
        taken = slope <= price
        per_unit_value = torch.zeros(len(units), **f64).index_add_(0, unit_of, torch.where(taken, dy - price * dx, 0.0))
        per_unit_removed = torch.zeros(len(units), **f64).index_add_(0, unit_of, torch.where(taken, dx, 0.0))
        value = torch.zeros(plain + 1, **f64).index_add_(0, slot, per_unit_value).tolist()
        removed = torch.zeros(plain + 1, **f64).index_add_(0, slot, per_unit_removed).tolist()
        choice, total = {}, removed[plain]
        for g, alts in groups.items():
            choice[g] = min(alts, key=lambda a: (value[keys.index((g, a))], alts.index(a)))
            total += removed[keys.index((g, choice[g]))]
        return choice, total

    if not seg_slope:
        return {g: alts[0] for g, alts in groups.items()}
    lo, hi = min(seg_slope) - 1.0, max(seg_slope) + 1.0
    if solve(hi)[1] < budget:  # even every segment cannot reach it: take the most removing choice
        return solve(hi)[0]
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if solve(mid)[1] >= budget:
            hi = mid
        else:
            lo = mid
    return solve(hi)[0]
