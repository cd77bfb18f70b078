"""The identity-block form: the layer equals A B, exact parameter and FLOP counts, allocations with
the exact costs, compress / save / load of whole models."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from tiny_models import random_biases, tiny_batches, tiny_model
from torch import nn

from compression.allocation import ALLOCATIONS, Unit, allocate
from compression.apply import compress, decompose_model, plan_ranks
from compression.calibration import collect_stats
from compression.cost import linear_flops_per_token as flops_per_token
from compression.io import INFO_FILE, load_compressed, save_compressed
from compression.layers import IdentityBlockLinear, LowRankLinear
from compression.methods import method_config
from compression.methods.identity_block import identity_block_params

F64 = torch.float64


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def logits(model, batch):
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


@pytest.fixture(scope="module")
def llama():
    model = tiny_model("llama")
    batches = tiny_batches(model)
    return model, batches, collect_stats(model, batches, progress=False)


# --- the layer -----------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
@pytest.mark.parametrize("m,n,k", [(20, 30, 7), (30, 20, 7), (24, 24, 24), (576, 576, 318), (96, 40, 39)])
@pytest.mark.parametrize("bias", [False, True])
def test_layer_equals_a_b_with_exact_counts(m, n, k, bias):
    gen = torch.Generator().manual_seed(m + n + k)
    # factors with a spread spectrum, like truncated whitened SVD factors
    A = torch.randn(m, k, generator=gen, dtype=F64) * torch.logspace(0, -3, k, dtype=F64)
    B = torch.randn(k, n, generator=gen, dtype=F64)
    b = torch.randn(m, generator=gen, dtype=F64) if bias else None
    layer = IdentityBlockLinear.from_factors(A.float(), B.float(), None if b is None else b.float())
    w = A @ B
    assert layer.side == ("rows" if m <= n else "columns")
    assert float((layer.product().detach().double() - w).norm() / w.norm()) < 1e-5
    x = torch.randn(3, 5, n, generator=gen, dtype=F64)
    want = x @ w.T + (0 if b is None else b)
    with torch.no_grad():
        assert float((layer(x.float()).double() - want).norm() / want.norm()) < 1e-5
    assert n_params(layer) == k * (m + n - k) + (m if bias else 0)
    assert flops_per_token(layer) == 2 * k * (m + n - k)  # the index is a copy, no arithmetic
    assert layer.index.dtype == torch.int64 and sorted(layer.index.tolist()) == list(range(min(m, n)))


def test_layer_block_is_well_conditioned():
    """LU with partial pivoting: the combination matrix C = L2 L1^-1 of nearly dependent rows
    stays bounded, so float32 storage reproduces the product."""
    gen = torch.Generator().manual_seed(1)
    A = torch.randn(64, 16, generator=gen, dtype=F64)
    A[:8] *= 1e-6  # rows that would be terrible pivots
    B = torch.randn(16, 80, generator=gen, dtype=F64)
    layer = IdentityBlockLinear.from_factors(A.float(), B.float())
    chosen = torch.argsort(layer.index)[:16]  # outputs served by the identity block
    assert not set(chosen.tolist()) & set(range(8))
    assert float((layer.product().detach().double() - A @ B).norm() / (A @ B).norm()) < 1e-5


def test_layer_rejects_bad_factors():
    with pytest.raises(ValueError, match="factors"):
        IdentityBlockLinear.from_factors(torch.randn(4, 2), torch.randn(3, 6))
    with pytest.raises(ValueError, match="bias"):
        IdentityBlockLinear.from_factors(torch.randn(4, 2), torch.randn(2, 6), torch.randn(5))
    with pytest.raises(ValueError, match="rank"):
        IdentityBlockLinear(6, 4, 5)


# --- costs and allocations -----------------------------------------------------------------------

def test_identity_costs_and_the_576_example():
    """576 x 576 at 20 % removed: rank 230 as two factors, 318 with an identity block."""
    curve = torch.linspace(1.0, 0.0, 577, dtype=F64)
    two = Unit("w", "o", 0, 576 * 576, 1152, 576, loss_curve=curve)
    ident = Unit("w", "o", 0, 576 * 576, 1152, 576, loss_curve=curve, rank_params=identity_block_params(576, 576, 576))
    assert two.max_profitable_rank == 287 and ident.max_profitable_rank == 575
    assert ident.params(318) == 318 * (1152 - 318) and ident.params(576) == 576 * 576
    assert allocate([two], 0.2, "uniform").ranks == {"w": 230}
    assert allocate([ident], 0.2, "uniform").ranks == {"w": 318}
    marginal = identity_block_params(50, 70, 50).diff()
    assert marginal.tolist() == [50 + 70 - 2 * k + 1 for k in range(1, 51)]


def identity_units(seed: int = 0) -> list[Unit]:
    """SmolLM2's shapes, every matrix in the identity-block form, random decaying spectra."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {"q": (576, 576), "k": (192, 576), "v": (192, 576), "o": (576, 576), "gate": (1536, 576),
              "up": (1536, 576), "down": (576, 1536)}
    units = []
    for b in range(6):
        for role, (m, n) in shapes.items():
            r = min(m, n)
            tau = float(torch.rand(1, generator=gen)) * r / 2 + 2
            sq = (torch.exp(-torch.arange(r, dtype=F64) / tau) + 0.01).square() * float(torch.rand(1, generator=gen))
            curve = torch.cat([torch.flip(torch.cumsum(torch.flip(sq, [0]), 0), [0]), sq.new_zeros(1)])
            units.append(Unit(f"layers.{b}.{role}", role, b, m * n, m + n, r, loss_curve=curve,
                              rank_params=identity_block_params(m, n, r)))
    return units


@pytest.mark.parametrize("allocation", ALLOCATIONS)
@pytest.mark.parametrize("ratio", [0.2, 0.4, 0.6])
def test_allocations_hit_the_budget_with_exact_costs(allocation, ratio):
    units = identity_units()
    total = sum(u.dense_params for u in units)
    plan = allocate(units, ratio, allocation, block_importance=torch.linspace(2, 0.5, 6, dtype=F64),
                    group_ratios={str(b): 1.0 + 0.1 * b for b in range(6)})
    assert abs(plan.achieved_ratio - ratio) <= 0.01
    assert 0 <= plan.removed_params - ratio * total < max(u.cost_per_rank for u in units)
    for u in units:
        k = plan.ranks[u.name]
        assert plan.params[u.name] == (u.dense_params if k is None else k * (u.cost_per_rank - k))


def test_spectrum_with_exact_costs_matches_brute_force():
    """Three small identity-block units: the greedy on the convex hulls of the exact costs is
    within a hair of the exhaustive optimum at every budget tried."""
    gen = torch.Generator().manual_seed(5)
    units = []
    for i, (m, n) in enumerate([(40, 40), (30, 50), (50, 24)]):
        r = min(m, n)
        sq = torch.rand(r, generator=gen, dtype=F64).sort(descending=True).values.square() * (i + 1)
        curve = torch.cat([torch.flip(torch.cumsum(torch.flip(sq, [0]), 0), [0]), sq.new_zeros(1)])
        units.append(Unit(f"u{i}", "q", i, m * n, m + n, r, loss_curve=curve, rank_params=identity_block_params(m, n, r)))
    total = sum(u.dense_params for u in units)
    options = [[None, *range(1, u.max_profitable_rank + 1)] for u in units]
    for ratio in (0.15, 0.3, 0.5):
        best = math.inf
        for a in options[0]:
            for b in options[1]:
                for c in options[2]:
                    ks = (a, b, c)
                    if sum(u.dense_params - u.params(k) for u, k in zip(units, ks)) >= ratio * total:
                        best = min(best, sum(float(u.loss_curve[k or u.max_rank]) for u, k in zip(units, ks)))
        plan = allocate(units, ratio, "spectrum")
        assert plan.predicted_loss <= best * 1.05 + 1e-12


def test_bad_rank_params():
    for bad in (torch.tensor([0, 5, 5, 9]), torch.tensor([0.0, 1.0, 2.0, 3.0]), torch.tensor([0, 1, 2]),
                torch.tensor([0, 4, 30, 31])):
        with pytest.raises(Exception, match="rank_params"):
            allocate([Unit("w", "q", 0, 36, 12, 3, rank_params=bad)], 0.2, "uniform")


# --- whole models --------------------------------------------------------------------------------

@pytest.mark.parametrize("allocation", ["uniform", "spectrum"])
def test_compress_save_load_identity_form(tmp_path, llama, allocation):
    model, batches, stats = llama
    method = method_config("whiten-fd", form="identity")
    decs = decompose_model(model, stats, method)
    plan = plan_ranks(model, stats, method, 0.3, allocation, decs)
    assert abs(plan.achieved_ratio - 0.3) <= 0.01 and plan.method == "whiten-fd"
    small = compress(model, stats, method, plan, decs, inplace=False)
    assert n_params(model) - n_params(small) == plan.removed_params
    for name, k in plan.ranks.items():
        layer = small.get_submodule(name)
        if k is None:
            assert isinstance(layer, nn.Linear)
            continue
        assert isinstance(layer, IdentityBlockLinear) and layer.rank == k
        a, b = decs[name].truncate(k, F64)
        w = a @ b
        assert float((layer.product().detach().double() - w).norm() / w.norm()) < 1e-5
    two = plan_ranks(model, stats, "whiten-fd", 0.3, allocation, decompose_model(model, stats, "whiten-fd"))
    assert plan.predicted_loss < two.predicted_loss  # the same budget buys more rank
    out = logits(small, batches[0])
    folder = save_compressed(small, tmp_path / "m", plan=plan)
    info = json.loads((folder / INFO_FILE).read_text())
    assert info["version"] == 2 and info["low_rank"] == {}
    assert {n for n, k in plan.ranks.items() if k is not None} == set(info["identity_block"])
    loaded, _, _ = load_compressed(folder)
    assert torch.equal(logits(loaded, batches[0]), out)
    assert n_params(loaded) == n_params(small)


def test_identity_form_loss_curve_is_the_methods(llama):
    """The form changes costs and layers, never the decomposition or its loss."""
    model, _, stats = llama
    two = decompose_model(model, stats, "whiten-fd")
    ident = decompose_model(model, stats, method_config("whiten-fd", form="identity"))
    for name in two:
        assert torch.equal(two[name].loss_curve(), ident[name].loss_curve())
        a1, b1 = two[name].truncate(5)
        a2, b2 = ident[name].truncate(5)
        assert torch.equal(a1, a2) and torch.equal(b1, b2)


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_a_sweep_decomposes_once_for_both_forms(llama):
    """whiten-fd, whiten-fd with form identity and identity-form hybrid share one whiten-fd
    decomposition in a sweep's decomposition stage; the shared one compresses exactly as its own
    would."""
    from sweeps.shared import decompose_all

    model, batches, stats = llama
    identity = method_config("whiten-fd", form="identity")
    assert identity.derived_from() == [method_config("whiten-fd")] and identity.key != "whiten-fd{}"
    hybrid = method_config("hybrid", form="identity")
    two, _, shared, _, mixed, _ = decompose_all(model, stats, [method_config("whiten-fd"), identity, hybrid], "cpu", 1)
    assert all(shared[name].factors is two[name] for name in two)
    assert all(mixed[name].inner.factors is two[name] for name in two)
    own = decompose_model(model, stats, identity)
    plan = plan_ranks(model, stats, identity, 0.3, "spectrum", own)
    assert plan == plan_ranks(model, stats, identity, 0.3, "spectrum", shared)
    a = compress(model, stats, identity, plan, own, inplace=False)
    b = compress(model, stats, identity, plan, shared, inplace=False)
    assert torch.equal(logits(a, batches[0]), logits(b, batches[0]))


def test_identity_form_on_gpt2_conv1d_with_biases(tmp_path):
    model = random_biases(tiny_model("gpt2"))
    batches = tiny_batches(model)
    stats = collect_stats(model, batches, progress=False)
    method = method_config("whiten-fd", form="identity")
    decs = decompose_model(model, stats, method)
    plan = plan_ranks(model, stats, method, 0.3, "uniform", decs)
    small = compress(model, stats, method, plan, decs, inplace=False)
    assert n_params(model) - n_params(small) == plan.removed_params
    dense_copy = copy.deepcopy(model)
    for name, k in plan.ranks.items():  # the same rank-k matrices as two factors give the same logits
        if k is not None:
            from compression.layers import replace_low_rank

            a, b = decs[name].truncate(k)
            replace_low_rank(dense_copy, decs[name].unit, a, b)
    torch.testing.assert_close(logits(small, batches[0]), logits(dense_copy, batches[0]), rtol=1e-4, atol=1e-4)
    loaded, _, _ = load_compressed(save_compressed(small, tmp_path / "g"))
    assert torch.equal(logits(loaded, batches[0]), logits(small, batches[0]))


# --- FLOPs ---------------------------------------------------------------------------------------

def test_flops_of_a_tiny_llama_by_hand(llama):
    model, _, stats = llama
    hidden, ffn, kv, vocab = 64, 128, 32, 100
    per_block = 2 * (hidden * hidden * 2 + 2 * kv * hidden + 3 * hidden * ffn)  # q, o; k, v; gate, up, down
    head = 2 * hidden * vocab
    assert flops_per_token(model) == 2 * per_block + head
    method = method_config("whiten-fd", form="identity")
    decs = decompose_model(model, stats, method)
    plan = plan_ranks(model, stats, method, 0.4, "uniform", decs)
    small = compress(model, stats, method, plan, decs, inplace=False)
    by_hand = head
    for t in stats.targets:
        k = plan.ranks[t.name]
        m, n = t.out_features, t.in_features
        by_hand += 2 * (m * n if k is None else k * (m + n - k))
    assert flops_per_token(small) == by_hand
    two = compress(model, stats, "whiten-fd", plan_ranks(model, stats, "whiten-fd", 0.4, "uniform",
                                                          decompose_model(model, stats, "whiten-fd")),
                   inplace=False)
    assert any(isinstance(m, LowRankLinear) for m in two.modules())
    assert flops_per_token(two) == head + sum(
        2 * (m.rank * (m.in_features + m.out_features)) for m in two.modules() if isinstance(m, LowRankLinear)) + sum(
        2 * t.in_features * t.out_features for t in stats.targets if not isinstance(two.get_submodule(t.name),
                                                                                     LowRankLinear))
