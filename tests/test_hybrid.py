"""`id-fd` (Fisher-weighted interpolative decomposition) and `hybrid` (MLPs pruned or factorised in
one spectrum budget): closed forms, the plan, compress / save / load, alternatives in the
allocation."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_batches, tiny_model

from compression.allocation import Unit, allocate
from compression.apply import compress, decompose_model, make_units, plan_ranks
from compression.calibration import collect_stats
from compression.errors import UserInputError
from compression.io import load_compressed, save_compressed
from compression.layers import IdentityBlockLinear
from compression.methods import LayerStats, decompose, method_config
from compression.targets import find_mlps

F64 = torch.float64


@pytest.fixture(scope="module")
def llama():
    """A tiny llama with more calibration tokens (6 x 3 x 32) than its MLPs have neurons (128)."""
    model = tiny_model("llama")
    batches = tiny_batches(model, n_batches=6, seq_len=32)
    return model, batches, collect_stats(model, batches, progress=False)


def down_problem(h: int = 10, f: int = 24, tokens: int = 200, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(h, f, generator=gen).to(F64)
    acts = torch.randn(f, tokens, generator=gen, dtype=F64) * torch.logspace(0, -1, f, dtype=F64)[:, None]
    acts[5] = acts[3] + 0.01 * acts[5]  # a nearly redundant neuron
    g = torch.rand(h, generator=gen, dtype=F64) * torch.logspace(0, -2, h, dtype=F64)
    return w, acts, g


def test_id_fd_with_alpha_zero_is_id():
    """D = I (alpha 0: every scale 1) is today's `id`: the same neurons, fold and loss."""
    w, acts, g = down_problem()
    stats = LayerStats(gram=acts @ acts.T, tokens=200, neuron_fisher=g)
    a = decompose("id", w.float(), stats, store_dtype=F64)
    b = decompose("id-fd", w.float(), stats, store_dtype=F64, alpha=0.0)
    assert torch.equal(a.order, b.order) and torch.equal(a.loss_curve(), b.loss_curve())
    for k in (3, 12):
        ka, da = a.select(k, F64)
        kb, db = b.select(k, F64)
        assert torch.equal(ka, kb) and torch.equal(da, db)


def test_id_fd_loss_is_the_fisher_weighted_output_error():
    """loss_curve[k] = sum over tokens of sum_i g_i e_i^2 at the down projection's outputs, for the
    neurons kept and the folded down weight: in the units of whiten-fd's loss."""
    w, acts, g = down_problem(seed=1)
    stats = LayerStats(gram=acts @ acts.T, tokens=200, neuron_fisher=g)
    dec = decompose("id-fd", w.float(), stats, store_dtype=F64)
    curve = dec.loss_curve()
    for k in (0, 4, 11, 20, 24):
        kept, down = dec.select(k, F64)
        err = w @ acts - down @ acts[kept]
        assert float(curve[k]) == pytest.approx(float((g[:, None] * err.square()).sum()), rel=1e-8, abs=1e-12)
    full = decompose("whiten-fd", w.float(), stats, store_dtype=F64).loss_curve()
    assert float(curve[0]) == pytest.approx(float(full[0]), rel=1e-8)  # dropping everything: the same loss


def test_id_fd_keeps_neurons_that_move_the_loss():
    """A neuron with little activation energy but a large, Fisher-heavy output column: `id` drops
    it early, `id-fd` keeps it among the first."""
    w, acts, g = down_problem(seed=2)
    acts[7] *= 0.05
    w[:, 7] *= 60.0
    stats = LayerStats(gram=acts @ acts.T, tokens=200, neuron_fisher=g)
    assert 7 not in decompose("id", w.float(), stats).order[:12].tolist()
    assert 7 in decompose("id-fd", w.float(), stats).order[:3].tolist()
    plain, weighted = decompose("id", w.float(), stats, store_dtype=F64), decompose("id-fd", w.float(), stats,
                                                                                   store_dtype=F64)
    for k in (4, 8):  # lower Fisher-weighted error at the same number of neurons
        errors = []
        for dec in (plain, weighted):
            kept, down = dec.select(k, F64)
            errors.append(float((g[:, None] * (w @ acts - down @ acts[kept]).square()).sum()))
        assert errors[1] < errors[0]


def test_id_fd_options():
    with pytest.raises(UserInputError, match="alpha"):
        method_config("id-fd", alpha=-1)
    with pytest.raises(UserInputError, match="rtol"):
        method_config("id-fd", rtol=2.0)
    with pytest.raises(UserInputError, match="neuron_fisher"):
        decompose("id-fd", torch.randn(4, 6), LayerStats(gram=torch.eye(6, dtype=F64)))


# --- hybrid ---------------------------------------------------------------------------------------

def pure_plans(model, stats, method, ratio):
    """The best plans with every MLP factorised, and with every MLP pruned (same scores)."""
    decs = decompose_model(model, stats, method)
    units = make_units(decs)
    factorised = allocate([u for u in units if u.alternative != "prune"], ratio, "spectrum")
    pruned = allocate([u for u in units if u.alternative != "factorise"], ratio, "spectrum")
    return decs, factorised, pruned


@pytest.mark.parametrize("ratio", [0.2, 0.4, 0.6])
def test_hybrid_plan_meets_the_budget_and_beats_both_pure_plans(llama, ratio):
    model, _, stats = llama
    method = method_config("hybrid", form="identity")
    decs, factorised, pruned = pure_plans(model, stats, method, ratio)
    plan = plan_ranks(model, stats, method, ratio, "spectrum", decs)
    assert abs(plan.achieved_ratio - ratio) <= 0.01
    assert plan.predicted_loss <= min(factorised.predicted_loss, pruned.predicted_loss) + 1e-12
    assert plan.targeted_params == factorised.targeted_params == pruned.targeted_params
    chosen = plan.extra["alternatives"]
    for mlp in find_mlps(model):
        roles = {u["role"] for n, u in plan.units.items() if u["block"] == mlp.block}
        if chosen[mlp.name] == "prune":
            assert mlp.name in plan.ranks and plan.units[mlp.name]["role"] == "mlp"
            assert roles == {"q", "k", "v", "o", "mlp"}
        else:
            assert mlp.name not in plan.ranks and roles == {"q", "k", "v", "o", "gate", "up", "down"}


def test_hybrid_compress_save_load(tmp_path, llama):
    model, batches, stats = llama
    method = method_config("hybrid", form="identity")
    decs = decompose_model(model, stats, method)
    units = {u.name: u for u in make_units(decs)}
    # a plan that prunes block 0's MLP and factorises block 1's (from a synthetic choice)
    keep = [u for u in units.values() if u.alternative_of is None or
            (u.alternative_of.endswith("layers.0.mlp")) == (u.alternative == "prune")]
    plan = allocate(keep, 0.4, "spectrum", method="hybrid")
    small = compress(model, stats, method, plan, decs, inplace=False)
    n = sum(p.numel() for p in small.parameters())
    assert sum(p.numel() for p in model.parameters()) - n == plan.removed_params
    assert small.get_submodule("model.layers.0.mlp.down_proj").in_features == plan.ranks["model.layers.0.mlp"]
    for name, k in plan.ranks.items():
        if plan.units[name]["role"] != "mlp" and k is not None:
            assert isinstance(small.get_submodule(name), IdentityBlockLinear)
    with torch.no_grad():
        out = small(**batches[0]).logits
    loaded, _, info = load_compressed(save_compressed(small, tmp_path / "h", plan=plan))
    with torch.no_grad():
        assert torch.equal(loaded(**batches[0]).logits, out)
    assert info["method"] == "hybrid" and info["plan"]["units"] == plan.to_dict()["units"]


def test_hybrid_needs_spectrum(llama):
    model, _, stats = llama
    decs = decompose_model(model, stats, "hybrid")
    for allocation in ("uniform", "layer", "type"):
        with pytest.raises(UserInputError, match="alternative forms"):
            plan_ranks(model, stats, "hybrid", 0.4, allocation, decs)
    with pytest.raises(UserInputError, match="alpha"):
        method_config("hybrid", alpha=-0.5)
    with pytest.raises(UserInputError, match="form"):
        method_config("hybrid", form="dense")


# --- alternatives in the allocation -----------------------------------------------------------------

def curve(sq: list[float]) -> torch.Tensor:
    t = torch.tensor(sq, dtype=F64)
    return torch.cat([torch.flip(torch.cumsum(torch.flip(t, [0]), 0), [0]), t.new_zeros(1)])


def two_mlps() -> list[Unit]:
    """Two MLPs (64 neurons of 12 parameters each, or two 32 x 12 matrices): the first is cheap to
    prune and expensive to factorise, the second the other way round; and a fine-grained matrix
    that lets every plan land within 1 %."""
    units = [Unit("attn", "o", 0, 2000, 4, 400, loss_curve=curve([0.02 * 0.99 ** j for j in range(400)]))]
    for b, (prune_scale, factor_scale) in enumerate([(0.01, 5.0), (5.0, 0.01)]):
        mlp = f"mlp{b}"
        sq = [prune_scale * 0.95 ** j for j in range(64)]
        units.append(Unit(mlp, "mlp", b, 768, 12, 64, dense_when_unprofitable=False, loss_curve=curve(sq),
                          alternative_of=mlp, alternative="prune"))
        for role in ("up", "down"):
            sq = [factor_scale * 0.8 ** j for j in range(12)]
            units.append(Unit(f"{mlp}.{role}", role, b, 384, 44, 12, loss_curve=curve(sq),
                              alternative_of=mlp, alternative="factorise"))
    return units


def test_alternatives_mix_and_match():
    """The plan prunes the MLP that is cheap to prune and factorises the other, and its loss is
    the lowest of all four choices (each planned on its own)."""
    units = two_mlps()
    for ratio in (0.2, 0.4):
        plan = allocate(units, ratio, "spectrum")
        assert plan.extra["alternatives"] == {"mlp0": "prune", "mlp1": "factorise"}
        assert abs(plan.achieved_ratio - ratio) <= 0.01 and plan.targeted_params == 2000 + 2 * 768
        assert set(plan.ranks) == {"attn", "mlp0", "mlp1.up", "mlp1.down"}
        for first in ("prune", "factorise"):
            for second in ("prune", "factorise"):
                kept = [u for u in units if u.alternative is None or u.alternative == (first, second)[u.block]]
                alone = allocate(kept, ratio, "spectrum")
                assert plan.predicted_loss <= alone.predicted_loss + 1e-15
                if (first, second) != ("prune", "factorise"):
                    assert plan.predicted_loss < alone.predicted_loss


def test_alternatives_must_target_the_same_parameters():
    units = two_mlps()
    units[1].dense_params = 767
    with pytest.raises(UserInputError, match="same parameters"):
        allocate(units, 0.3, "spectrum")
    with pytest.raises(UserInputError, match="both alternative_of and alternative"):
        allocate([Unit("w", "q", 0, 36, 12, 3, alternative_of="x")], 0.2, "uniform")


def test_combine_builds_the_same_decompositions(llama):
    """hybrid's decompositions are whiten-fd's and id-fd's: combining existing ones (in another
    form) gives what decomposing again gives."""
    from compression.methods.identity_block import in_form

    model, _, stats = llama
    method = method_config("hybrid", form="identity")
    direct = decompose_model(model, stats, method)
    svds = decompose_model(model, stats, "whiten-fd")
    combined = method.combine({n: in_form("identity", d) for n, d in svds.items()},
                              decompose_model(model, stats, "id-fd"))
    assert plan_ranks(model, stats, method, 0.4, "spectrum", combined) == plan_ranks(
        model, stats, method, 0.4, "spectrum", direct)
