"""Propagated refitting: the closed form, X-hat = X reproduces the method, refitting lowers the
block output error, dense layers and pruned MLPs, bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import tiny_batches, tiny_model

from compression.allocation import RankPlan
from compression.apply import compress, decompose_model, plan_ranks
from compression.calibration import collect_stats
from compression.errors import UserInputError
from compression.layers import IdentityBlockLinear, LowRankLinear
from compression.methods import LayerStats, decompose, method_config, weighted_svd
from compression.refit import current_weight, refit, row_scales, solve

F64 = torch.float64


@pytest.fixture(scope="module")
def llama():
    """A tiny llama with more calibration tokens (4 x 3 x 32) than any layer has inputs."""
    model = tiny_model("llama")
    batches = tiny_batches(model, n_batches=4, seq_len=32)
    return model, batches, collect_stats(model, batches, progress=False)


def layer_problem(m: int = 12, n: int = 20, tokens: int = 300, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=gen).to(F64)  # float32 values: the methods take float weights
    x = torch.randn(n, tokens, generator=gen, dtype=F64) * torch.logspace(0, -1, n, dtype=F64)[:, None]
    x_hat = x + 0.3 * torch.randn(n, tokens, generator=gen, dtype=F64)
    g = torch.rand(m, generator=gen, dtype=F64) + 0.1
    return w, x, x_hat, g


def test_refit_with_x_hat_equal_x_is_the_method():
    w, x, _, g = layer_problem()
    gram = x @ x.T
    dec = decompose("whiten-fd", w.float(), LayerStats(gram=gram, tokens=300, neuron_fisher=g), store_dtype=F64)
    w_ls, s = solve(w, w, gram, gram, damp=0.0, clamp=1e-12)
    # W G (G + delta I)^-1: the whitening's floor delta = clamp trace(G) moves it by ~ delta / lambda_min
    torch.testing.assert_close(w_ls, w, rtol=0, atol=1e-8)
    refitted = weighted_svd(w_ls, row_scale=dec.row_scale, right=s, store_dtype=F64)
    for k in (1, 4, 9):
        a1, b1 = dec.truncate(k, F64)
        a2, b2 = refitted.truncate(k, F64)
        torch.testing.assert_close(a2 @ b2, a1 @ b1, rtol=0, atol=1e-8 * float((a1 @ b1).abs().max()))


def test_refit_solves_the_weighted_problem():
    """W_ls meets the normal equations of min ||W X - W' X_hat||, and the rank-k refit beats the
    method's factors (fitted on X) on the inputs the layer really sees."""
    w, x, x_hat, g = layer_problem(seed=1)
    gram, cross = x_hat @ x_hat.T, x @ x_hat.T
    w_ls, s = solve(w, w, gram, cross, damp=0.0, clamp=1e-12)
    normal = (w @ x - w_ls @ x_hat) @ x_hat.T
    assert float(normal.abs().max()) < 1e-8 * float((w @ x @ x_hat.T).abs().max())
    d = g.sqrt()
    dec = decompose("whiten-fd", w.float(), LayerStats(gram=x @ x.T, tokens=300, neuron_fisher=g), store_dtype=F64)
    for k in (2, 6):
        a, b = weighted_svd(w_ls, row_scale=dec.row_scale, right=s, store_dtype=F64).truncate(k, F64)
        a0, b0 = dec.truncate(k, F64)

        def loss(w2):
            return float((d[:, None] * (w @ x - w2 @ x_hat)).square().sum())

        assert loss(a @ b) < loss(a0 @ b0)
        # the objective is ||D (W_ls - W') S||^2 plus a constant: the same for every W'
        const = loss(a @ b) - float((d[:, None] * (w_ls - a @ b) @ s).square().sum())
        assert loss(a0 @ b0) - float((d[:, None] * (w_ls - a0 @ b0) @ s).square().sum()) == pytest.approx(const)


def test_ridge_pulls_toward_the_current_weight():
    w, x, x_hat, _ = layer_problem(seed=2)
    current = w + 0.5
    gram, cross = x_hat @ x_hat.T, x @ x_hat.T
    free, _ = solve(w, current, gram, cross, damp=0.0, clamp=1e-12)
    damped, _ = solve(w, current, gram, cross, damp=1e3, clamp=1e-12)
    assert float((damped - current).norm()) < 0.01 * float((free - current).norm())


def plan_for(model, stats, decs, method, ranks: dict[str, int]) -> RankPlan:
    plan = plan_ranks(model, stats, method, 0.3, "uniform", decs)
    return RankPlan.from_dict(plan.to_dict() | {"ranks": {n: ranks.get(n) for n in plan.ranks}})


def test_model_refit_with_unchanged_inputs_reproduces_the_factors(llama):
    """Only block 0's q/k/v are compressed: their inputs are the embeddings, the same in both
    models, so refitting gives the same matrices back."""
    model, batches, stats = llama
    method = method_config("whiten-fd", form="identity")
    decs = decompose_model(model, stats, method)
    names = [t.name for t in stats.targets if t.block == 0 and t.role in ("q", "k", "v")]
    small = compress(model, stats, method, plan_for(model, stats, decs, method, dict.fromkeys(names, 9)), decs,
                     inplace=False)
    before = {n: current_weight(small.get_submodule(n)).detach().double() for n in names}
    report = refit(small, model, batches, stats.targets, row_scales(decs))
    assert report.low_rank == 3 and report.dense == 0
    for n in names:
        layer = small.get_submodule(n)
        assert isinstance(layer, IdentityBlockLinear) and layer.rank == 9
        after = current_weight(layer).detach().double()
        assert float((after - before[n]).norm() / before[n].norm()) < 1e-5


def hidden_errors(model, dense, batches) -> list[float]:
    """Squared error of every block's output against the dense model's, on the batches."""
    errors = None
    with torch.no_grad():
        for b in batches:
            mask = b["attention_mask"].bool()
            h = model(**b, output_hidden_states=True).hidden_states[1:]
            r = dense(**b, output_hidden_states=True).hidden_states[1:]
            e = [float((x[mask] - y[mask]).square().sum()) for x, y in zip(h, r)]
            errors = e if errors is None else [a + c for a, c in zip(errors, e)]
    return errors


@pytest.mark.parametrize("form", ["factors", "identity"])
def test_refit_lowers_every_block_output_error(llama, form):
    model, batches, stats = llama
    method = method_config("whiten-fd", form=form)
    decs = decompose_model(model, stats, method)
    plan = plan_ranks(model, stats, method, 0.4, "uniform", decs)
    small = compress(model, stats, method, plan, decs, inplace=False)
    layer_type = IdentityBlockLinear if form == "identity" else LowRankLinear
    before = hidden_errors(small, model, batches)
    n_params = sum(p.numel() for p in small.parameters())
    report = refit(small, model, batches, stats.targets, row_scales(decs))
    after = hidden_errors(small, model, batches)
    assert report.low_rank == sum(k is not None for k in plan.ranks.values()) and report.seconds > 0
    assert all(a < b for a, b in zip(after, before)), (before, after)
    assert sum(p.numel() for p in small.parameters()) == n_params  # same ranks, same form
    for name, k in plan.ranks.items():
        assert k is None or (isinstance(small.get_submodule(name), layer_type) and small.get_submodule(name).rank == k)


def test_dense_layers_and_pruned_mlps(llama):
    """With dense_layers, layers left dense and pruned MLPs' down projections are refitted by
    least squares; the narrowed gate/up rows are kept."""
    model, batches, stats = llama
    decs = decompose_model(model, stats, "id")
    small = compress(model, stats, "id", plan_ranks(model, stats, "id", 0.4, "uniform", decs), decs, inplace=False)
    before = hidden_errors(small, model, batches)
    gate = small.get_submodule("model.layers.1.mlp.gate_proj").weight.detach().clone()
    assert refit(copy.deepcopy(small), model, batches, stats.targets).dense == 0  # nothing low-rank, nothing dense
    report = refit(small, model, batches, stats.targets, dense_layers=True)
    assert report.low_rank == 0 and report.dense == 2 * 4 + 2  # attention of both blocks, both downs
    assert torch.equal(small.get_submodule("model.layers.1.mlp.gate_proj").weight, gate)
    after = hidden_errors(small, model, batches)
    assert after[-1] < before[-1]


@pytest.mark.parametrize("arch", ["gpt2", "gemma3"])
def test_refit_other_architectures(arch):
    """GPT-2 (Conv1D, biases, the cache passed by position) and Gemma 3 (per-layer masks)."""
    model = tiny_model(arch)
    batches = tiny_batches(model, n_batches=3, seq_len=32)
    stats = collect_stats(model, batches, progress=False)
    decs = decompose_model(model, stats, "whiten-fd")
    small = compress(model, stats, "whiten-fd", plan_ranks(model, stats, "whiten-fd", 0.4, "uniform", decs), decs,
                     inplace=False)
    before = hidden_errors(small, model, batches)
    refit(small, model, batches, stats.targets, row_scales(decs), dense_layers=True)
    assert hidden_errors(small, model, batches)[-1] < before[-1]


def test_bad_input(llama):
    model, batches, stats = llama
    with pytest.raises(UserInputError, match="damp"):
        refit(copy.deepcopy(model), model, batches, stats.targets, damp=-1.0)
    with pytest.raises(UserInputError, match="no calibration batches"):
        refit(copy.deepcopy(model), model, [], stats.targets)
    with pytest.raises(UserInputError, match="input_ids"):
        refit(copy.deepcopy(model), model, [{"attention_mask": torch.ones(1, 4)}], stats.targets)
