"""Rank allocation: budgets, closed forms and bad inputs on realistic synthetic unit sets."""

from __future__ import annotations

import json
import math

import pytest
import torch

from compression.allocation import ALLOCATIONS, RankPlan, Unit, allocate
from compression.errors import UserInputError

ROLES = ("q", "k", "v", "o", "gate", "up", "down")
RATIOS = (0.2, 0.4, 0.6)


def decaying_curve(rank: int, gen: torch.Generator) -> torch.Tensor:
    """loss_curve[k] = sum_{j >= k} sigma_j^2 for a random decaying spectrum."""
    scale = float(torch.rand(1, generator=gen)) * 10 + 0.1
    tau = float(torch.rand(1, generator=gen)) * rank / 2 + 2
    sigma = scale * torch.exp(-torch.arange(rank, dtype=torch.float64) / tau) + 0.01 * scale
    tail = torch.flip(torch.cumsum(torch.flip(sigma.square(), [0]), 0), [0])
    return torch.cat([tail, tail.new_zeros(1)])


def matrix_units(hidden: int, ffn: int, kv: int, blocks: int, seed: int = 0) -> list[Unit]:
    gen = torch.Generator().manual_seed(seed)
    shapes = {"q": (hidden, hidden), "k": (kv, hidden), "v": (kv, hidden), "o": (hidden, hidden),
              "gate": (ffn, hidden), "up": (ffn, hidden), "down": (hidden, ffn)}
    units = []
    for b in range(blocks):
        for role in ROLES:
            m, n = shapes[role]
            units.append(Unit(name=f"layers.{b}.{role}", role=role, block=b, dense_params=m * n,
                              cost_per_rank=m + n, max_rank=min(m, n), dense_when_unprofitable=True,
                              loss_curve=decaying_curve(min(m, n), gen)))
    return units


def mlp_units(hidden: int, ffn: int, blocks: int, seed: int = 0) -> list[Unit]:
    """`id` units: a neuron costs a row of gate and up and a column of down (+ the up bias)."""
    gen = torch.Generator().manual_seed(seed)
    per = 3 * hidden + 1
    return [Unit(name=f"layers.{b}.mlp", role="mlp", block=b, dense_params=per * ffn + hidden,
                 cost_per_rank=per, max_rank=ffn, dense_when_unprofitable=False,
                 loss_curve=decaying_curve(ffn, gen), fixed_params=hidden) for b in range(blocks)]


SETS = {
    "llama-tiny": lambda: matrix_units(64, 128, 64, 2),
    "smollm2": lambda: matrix_units(576, 1536, 192, 30),
    "id-mlps": lambda: mlp_units(576, 1536, 30),
}


def explicit_ratios(units: list[Unit], granularity: str, seed: int = 0) -> dict[str, float]:
    key = {"block": lambda u: str(u.block), "role": lambda u: u.role, "matrix": lambda u: u.name}[granularity]
    gen = torch.Generator().manual_seed(seed)
    return {k: 0.5 + float(torch.rand(1, generator=gen)) for k in sorted({key(u) for u in units})}


def run(units, ratio, allocation, granularity="block"):
    blocks = max(u.block for u in units) + 1
    return allocate(
        units, ratio, allocation,
        block_importance=torch.linspace(2.0, 0.5, blocks, dtype=torch.float64),
        group_ratios=explicit_ratios(units, granularity), granularity=granularity, method="whiten",
    )


def check_plan(units: list[Unit], plan: RankPlan, ratio: float) -> None:
    total = sum(u.dense_params for u in units)
    assert plan.targeted_params == total
    assert abs(plan.achieved_ratio - ratio) <= 0.01
    # tighter: at least the budget, less than one more rank's worth above it
    assert 0 <= plan.removed_params - ratio * total < max(u.cost_per_rank for u in units)
    for u in units:
        k = plan.ranks[u.name]
        assert k is None or 1 <= k <= u.max_profitable_rank
        assert plan.params[u.name] == u.params(k) and (k is None or u.params(k) < u.dense_params)


@pytest.mark.parametrize("unit_set", SETS)
@pytest.mark.parametrize("allocation", ALLOCATIONS)
@pytest.mark.parametrize("ratio", RATIOS)
def test_every_allocation_hits_the_budget(unit_set, allocation, ratio):
    units = SETS[unit_set]()
    plan = run(units, ratio, allocation)
    check_plan(units, plan, ratio)
    assert plan.allocation == allocation and plan.method == "whiten"


@pytest.mark.parametrize("granularity", ["block", "role", "matrix"])
def test_explicit_granularities_hit_the_budget(granularity):
    units = SETS["smollm2"]()
    for ratio in RATIOS:
        check_plan(units, run(units, ratio, "explicit", granularity), ratio)


def test_uniform_follows_the_design_formula():
    units = SETS["smollm2"]()
    for ratio in RATIOS:
        plan = allocate(units, ratio, "uniform")
        for u in units:
            m_n = u.dense_params
            k = math.floor(m_n * (1 - ratio) / u.cost_per_rank)
            assert plan.ranks[u.name] in (k, k + 1)


def test_dense_threshold_square_matrix():
    """64 x 64 saves parameters only below rank 32: rank 31 removes 1/32."""
    u = Unit("w", "q", 0, 64 * 64, 128, 64)
    assert u.max_profitable_rank == 31 and u.params(32) == 4096 and u.params(31) == 31 * 128
    with pytest.raises(UserInputError, match="within 1%"):
        allocate([u], 0.015, "uniform")  # one 64 x 64 matrix removes 0 or >= 3.1%
    assert allocate([u], 0.025, "uniform").ranks == {"w": 31}
    assert allocate([u], 0.005, "uniform").ranks == {"w": None}  # closest within 1%
    big = [Unit(f"w{i}", "q", i, 64 * 64, 128, 64) for i in range(20)]
    plan = allocate(big, 0.01, "uniform")  # most stay dense, some go to rank 31
    assert set(plan.ranks.values()) <= {None, 31} and None in plan.ranks.values()
    check_plan(big, plan, 0.01)


@pytest.mark.parametrize("unit_set", SETS)
def test_spectrum_loss_not_above_uniform(unit_set):
    units = SETS[unit_set]()
    for ratio in RATIOS:
        spec = allocate(units, ratio, "spectrum")
        uni = allocate(units, ratio, "uniform")
        assert spec.predicted_loss <= uni.predicted_loss
        manual = sum(float(u.loss_curve[spec.ranks[u.name] or u.max_rank]) for u in units)
        assert spec.predicted_loss == pytest.approx(manual, rel=1e-12)
    assert spec.predicted_loss < 0.9 * uni.predicted_loss  # heterogeneous spectra: clearly better


def test_spectrum_takes_free_ranks_first_and_matches_brute_force():
    units = matrix_units(16, 24, 16, 1, seed=3)[:4]
    units[2].loss_curve = torch.zeros(units[2].max_rank + 1, dtype=torch.float64)
    room = units[2].dense_params - units[2].cost_per_rank
    total = sum(u.dense_params for u in units)
    plan = allocate(units, room / total - 1e-9, "spectrum")
    assert plan.ranks[units[2].name] == 1
    assert all(plan.ranks[u.name] is None for i, u in enumerate(units) if i != 2)
    # exhaustive search over all rank combinations of three units at one budget
    small = units[:2] + units[3:4]
    tot = sum(u.dense_params for u in small)
    ratio = 0.45
    best = math.inf
    options = [[None, *range(1, u.max_profitable_rank + 1)] for u in small]
    for a in options[0]:
        for b in options[1]:
            for c in options[2]:
                ks = (a, b, c)
                removed = sum(u.dense_params - u.params(k) for u, k in zip(small, ks))
                if removed >= ratio * tot:
                    best = min(best, sum(float(u.loss_curve[k or u.max_rank]) for u, k in zip(small, ks)))
    plan = allocate(small, ratio, "spectrum")
    assert plan.predicted_loss <= best * 1.02


def test_layer_important_blocks_lose_less():
    units = matrix_units(64, 128, 64, 4)
    plan = allocate(units, 0.4, "layer", block_importance=torch.tensor([3.0, 1.0, 2.0, 0.0]))
    per_block = {}
    for b in range(4):
        us = [u for u in units if u.block == b]
        per_block[b] = sum(u.dense_params - plan.params[u.name] for u in us) / sum(u.dense_params for u in us)
    assert per_block[0] < per_block[2] < per_block[1] < per_block[3]
    # strength 0.4: least / most important block ratio ~ (1 + 0.4) / (1 - 0.4)
    assert per_block[3] / per_block[0] == pytest.approx(1.4 / 0.6, rel=0.05)
    flat = allocate(units, 0.4, "layer", block_importance=torch.ones(4))
    assert flat.ranks == allocate(units, 0.4, "uniform").ranks


def test_type_groups_remove_the_target_and_high_loss_loses_less():
    units = matrix_units(576, 1536, 192, 6)
    ups = [u for u in units if u.role == "up"]
    ups[0].loss_curve = ups[0].loss_curve * 1e4  # one very sensitive matrix
    plan = allocate(units, 0.4, "type")
    for role, r in plan.extra["group_ratios"].items():
        assert r == pytest.approx(0.4, abs=1e-9)
        us = [u for u in units if u.role == role]
        removed = sum(u.dense_params - plan.params[u.name] for u in us) / sum(u.dense_params for u in us)
        assert removed == pytest.approx(0.4, abs=0.01)
    assert plan.ranks[ups[0].name] > max(plan.ranks[u.name] for u in ups[1:])
    # log(1e3 * L / L_min) weighting: equal curves -> equal ranks within the group
    same = matrix_units(64, 128, 64, 3)
    first = {}
    for u in same:
        u.loss_curve = first.setdefault(u.role, u.loss_curve)
    plan = allocate(same, 0.4, "type")
    for role in ROLES:
        ks = [plan.ranks[u.name] for u in same if u.role == role]
        assert max(ks) - min(ks) <= 1


def test_explicit_respects_relative_group_ratios():
    units = SETS["smollm2"]()
    wanted = {"q": 0.2, "k": 0.1, "v": 0.1, "o": 0.2, "gate": 0.4, "up": 0.4, "down": 0.3}
    plan = allocate(units, 0.3, "explicit", group_ratios=wanted, granularity="role")
    got = {}
    for role in wanted:
        us = [u for u in units if u.role == role]
        got[role] = sum(u.dense_params - plan.params[u.name] for u in us) / sum(u.dense_params for u in us)
    scale = got["gate"] / wanted["gate"]
    for role in wanted:
        assert got[role] == pytest.approx(scale * wanted[role], rel=0.03)
    assert scale > 0.7  # rescaled up to the budget
    # zero keeps a group dense
    for role in ("k", "gate"):  # k: mn / (m + n) = 144 exactly; gate: 418.9, kmax 418
        zero = dict(wanted, **{role: 0.0})
        plan = allocate(units, 0.3, "explicit", group_ratios=zero, granularity="role")
        assert all(plan.ranks[u.name] is None for u in units if u.role == role)
    # clipping: a group asked far more than it can give is capped at rank 1, the rest absorbs it
    plan = allocate(units, 0.6, "explicit", group_ratios={str(b): (100.0 if b == 0 else 1.0) for b in range(30)})
    assert all(plan.ranks[u.name] == 1 for u in units if u.block == 0)
    check_plan(units, plan, 0.6)


def test_rank_plan_round_trip():
    units = SETS["llama-tiny"]()
    plan = allocate(units, 0.4, "spectrum", method="whiten-fd")
    d = json.loads(json.dumps(plan.to_dict()))
    back = RankPlan.from_dict(d)
    assert back == plan
    assert back.achieved_ratio == plan.achieved_ratio and d["achieved_ratio"] == plan.achieved_ratio
    with pytest.raises(UserInputError, match="malformed"):
        RankPlan.from_dict({"method": "svd"})


def test_unit_params():
    u = Unit("w", "q", 0, 100 * 50, 150, 50)
    assert u.params(None) == 5000 and u.params(10) == 1500 and u.params(40) == 5000
    assert u.max_profitable_rank == 33
    n = mlp_units(8, 20, 1)[0]
    assert n.params(20) == n.dense_params and n.params(5) == 8 + 5 * 25 and n.max_profitable_rank == 19


def test_bad_inputs():
    units = SETS["llama-tiny"]()
    with pytest.raises(UserInputError, match="uniform, layer, type, spectrum, explicit"):
        allocate(units, 0.4, "owl")
    for bad in (0, 1, 1.2, -0.1, float("nan"), True, "0.4"):
        with pytest.raises(UserInputError, match="between 0 and 1"):
            allocate(units, bad, "uniform")
    total = sum(u.dense_params for u in units)
    best = sum(u.dense_params - u.cost_per_rank for u in units) / total
    with pytest.raises(UserInputError, match=f"maximum possible ratio is {best:.4f}"):
        allocate(units, 0.99, "uniform")
    with pytest.raises(UserInputError, match="block_importance"):
        allocate(units, 0.4, "layer")
    with pytest.raises(UserInputError, match="block_importance has 1 entries"):
        allocate(units, 0.4, "layer", block_importance=torch.ones(1))
    no_curve = [Unit(u.name, u.role, u.block, u.dense_params, u.cost_per_rank, u.max_rank) for u in units]
    for alloc in ("type", "spectrum"):
        with pytest.raises(UserInputError, match="loss curve"):
            allocate(no_curve, 0.4, alloc)
    assert allocate(no_curve, 0.4, "uniform").predicted_loss is None
    with pytest.raises(UserInputError, match="needs group_ratios"):
        allocate(units, 0.4, "explicit", granularity="role")
    with pytest.raises(UserInputError, match="missing: up"):
        allocate(units, 0.4, "explicit", granularity="role",
                 group_ratios={r: 1.0 for r in ROLES if r != "up"})
    with pytest.raises(UserInputError, match="unknown: 7"):
        allocate(units, 0.4, "explicit", group_ratios={"0": 1.0, "1": 1.0, "7": 1.0})
    with pytest.raises(UserInputError, match=">= 0"):
        allocate(units, 0.4, "explicit", group_ratios={"0": 1.0, "1": -1.0})
    with pytest.raises(UserInputError, match="groups at 0 stay dense"):
        allocate(units, 0.6, "explicit", group_ratios={"0": 1.0, "1": 0.0})
    with pytest.raises(UserInputError, match="granularity"):
        allocate(units, 0.4, "explicit", granularity="head")
    with pytest.raises(UserInputError, match="no units"):
        allocate([], 0.4, "uniform")
