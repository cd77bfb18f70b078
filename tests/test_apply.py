"""LowRankLinear, layer surgery (replace_low_rank, prune_mlp) and the compress pipeline."""

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from tiny_models import random_biases, tiny_batches, tiny_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from compression.allocation import RankPlan
from compression.apply import compress, decompose_model, make_units, plan_ranks
from compression.layers import LowRankLinear, prune_mlp, replace_low_rank
from compression.calibration import collect_stats
from compression.errors import UserInputError
from compression.io import load_compressed, save_compressed
from compression.targets import dense_weight
from compression.methods import METHODS, method_config
from compression.targets import find_mlps, find_targets

ARCHS = ("llama", "gpt2", "bert", "opt", "distilbert", "gemma3", "mpnet")


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def logits(model, batch):
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


@pytest.fixture(scope="module")
def llama():
    """A tiny llama, its calibration batches and statistics (shared: tests deep-copy the model)."""
    model = tiny_model("llama")
    batches = tiny_batches(model)
    return model, batches, collect_stats(model, batches, progress=False)


# --- LowRankLinear -------------------------------------------------------------------------------

def test_low_rank_linear_computes_a_b_x_plus_bias():
    A, B, bias = torch.randn(5, 3), torch.randn(3, 7), torch.randn(5)
    layer = LowRankLinear.from_factors(A, B, bias)
    x = torch.randn(2, 4, 7)
    torch.testing.assert_close(layer(x), x @ (A @ B).T + bias)
    assert (layer.in_features, layer.out_features, layer.rank, layer.has_bias) == (7, 5, 3, True)
    assert layer.first.bias is None and layer.first.weight.shape == (3, 7) and layer.second.weight.shape == (5, 3)
    assert sum(p.numel() for p in layer.parameters()) == 3 * (5 + 7) + 5
    assert "rank=3" in repr(layer)


def test_low_rank_linear_without_bias_and_dtype():
    A, B = torch.randn(4, 2, dtype=torch.float64), torch.randn(2, 6, dtype=torch.float64)
    layer = LowRankLinear.from_factors(A, B, dtype=torch.bfloat16)
    assert layer.second.bias is None and layer.first.weight.dtype == torch.bfloat16
    assert torch.equal(layer.second.weight, A.to(torch.bfloat16))


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_low_rank_linear_rank_zero_outputs_bias():
    bias = torch.randn(4)
    layer = LowRankLinear.from_factors(torch.zeros(4, 0), torch.zeros(0, 6), bias)
    assert torch.equal(layer(torch.randn(3, 6)), bias.expand(3, 4))


def test_low_rank_linear_rejects_bad_factors():
    with pytest.raises(ValueError, match="factors"):
        LowRankLinear.from_factors(torch.randn(4, 2), torch.randn(3, 6))
    with pytest.raises(ValueError, match="bias"):
        LowRankLinear.from_factors(torch.randn(4, 2), torch.randn(2, 6), torch.randn(5))


# --- replace_low_rank ----------------------------------------------------------------------------

def full_rank_factors(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    U, S, Vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)
    return U * S, Vh


@pytest.mark.parametrize("arch,name", [("llama", "model.layers.1.self_attn.q_proj"),
                                       ("llama", "model.layers.0.mlp.down_proj"),
                                       ("gpt2", "transformer.h.0.attn.c_attn"),
                                       ("gpt2", "transformer.h.1.mlp.c_fc"),
                                       ("opt", "model.decoder.layers.0.fc1")])
def test_full_rank_replacement_keeps_outputs(arch, name):
    model = random_biases(tiny_model(arch))
    batch = tiny_batches(model)[0]
    before = logits(model, batch)
    target = next(t for t in find_targets(model) if t.name == name)
    old = model.get_submodule(name)
    A, B = full_rank_factors(dense_weight(old))
    replace_low_rank(model, target, A, B)
    new = model.get_submodule(name)
    assert isinstance(new, LowRankLinear) and new.rank == min(target.in_features, target.out_features)
    assert new.first.weight.dtype == torch.float32
    if old.bias is not None:
        assert torch.equal(new.second.bias, old.bias)
    torch.testing.assert_close(logits(model, batch), before, atol=1e-5, rtol=0)


def test_replacement_keeps_mode_and_requires_grad():
    model = tiny_model("gpt2")
    target = find_targets(model)[0]
    model.get_submodule(target.name).requires_grad_(False)
    replace_low_rank(model, target, torch.randn(target.out_features, 2), torch.randn(2, target.in_features))
    new = model.get_submodule(target.name)
    assert not new.training and not any(p.requires_grad for p in new.parameters())


def test_replacement_rejects_non_linear_and_bad_shapes():
    model = tiny_model("llama")
    target = find_targets(model)[0]
    with pytest.raises(ValueError, match="do not fit"):
        replace_low_rank(model, target, torch.randn(3, 2), torch.randn(2, 64))
    replace_low_rank(model, target, torch.randn(target.out_features, 2), torch.randn(2, target.in_features))
    with pytest.raises(UserInputError, match="LowRankLinear"):
        replace_low_rank(model, target, torch.randn(target.out_features, 2), torch.randn(2, target.in_features))


# --- prune_mlp -----------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_prune_all_neurons_identity_keeps_outputs(arch):
    model = random_biases(tiny_model(arch))
    batch = tiny_batches(model)[0]
    before = logits(model, batch)
    for g in find_mlps(model):
        prune_mlp(model, g, torch.arange(g.width), dense_weight(model.get_submodule(g.down)).detach().clone())
    torch.testing.assert_close(logits(model, batch), before, atol=1e-6, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "bert", "gpt2", "opt"])
def test_prune_equals_zeroing_removed_neurons(arch):
    """Keeping neurons J with the down columns J is the dense MLP with the other down columns zeroed."""
    model = random_biases(tiny_model(arch))
    batch = tiny_batches(model)[0]
    reference = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(3)
    for g, k in zip(find_mlps(model), (50, 9)):
        kept = torch.randperm(g.width, generator=gen)[:k]  # unsorted on purpose
        down = dense_weight(model.get_submodule(g.down)).detach()
        prune_mlp(model, g, kept, down[:, kept].clone())
        removed = torch.ones(g.width, dtype=torch.bool)
        removed[kept] = False
        with torch.no_grad():
            dense_weight(reference.get_submodule(g.down))[:, removed] = 0.0
        for name in g.inputs:
            layer = model.get_submodule(name)
            assert type(layer) in (nn.Linear, Conv1D) and dense_weight(layer).shape[0] == k
        assert dense_weight(model.get_submodule(g.down)).shape[1] == k
    torch.testing.assert_close(logits(model, batch), logits(reference, batch), atol=1e-5, rtol=0)


def test_prune_keeps_input_rows_and_biases_by_hand():
    model = random_biases(tiny_model("gpt2"))
    g = find_mlps(model)[0]
    fc1 = model.get_submodule(g.inputs[0])
    w, b = fc1.weight.detach().clone(), fc1.bias.detach().clone()  # Conv1D: [in, out]
    down = model.get_submodule(g.down)
    new_down = torch.randn(down.nf, 2)
    prune_mlp(model, g, torch.tensor([7, 3]), new_down)
    fc1, down2 = model.get_submodule(g.inputs[0]), model.get_submodule(g.down)
    assert isinstance(fc1, Conv1D) and isinstance(down2, Conv1D)
    assert torch.equal(fc1.weight, w[:, [7, 3]]) and torch.equal(fc1.bias, b[[7, 3]])
    assert torch.equal(down2.weight, new_down.T) and torch.equal(down2.bias, down.bias)


def test_prune_rejects_bad_input():
    model = tiny_model("llama")
    g = find_mlps(model)[0]
    with pytest.raises(ValueError, match="distinct"):
        prune_mlp(model, g, torch.tensor([1, 1]), torch.randn(64, 2))
    with pytest.raises(ValueError, match="distinct"):
        prune_mlp(model, g, torch.tensor([g.width]), torch.randn(64, 1))
    with pytest.raises(ValueError, match="down weight"):
        prune_mlp(model, g, torch.tensor([0, 1]), torch.randn(64, 3))


# --- the pipeline --------------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_end_to_end(tmp_path, llama, method):
    model, batches, stats = llama
    model = copy.deepcopy(model)
    decs = decompose_model(model, stats, method)
    allocation = (method_config(method).allocations or ("uniform",))[0]
    plan = plan_ranks(model, stats, method, 0.4, allocation, decs)
    assert plan.method == method and abs(plan.achieved_ratio - 0.4) <= 0.01
    before = n_params(model)
    compressed = compress(model, stats, method, plan, decs)
    assert compressed is model
    assert before - n_params(model) == plan.removed_params
    out = logits(model, batches[0])
    assert torch.isfinite(out).all()
    mlps = {g.name: g for g in find_mlps(tiny_model("llama"))}
    for name, k in plan.ranks.items():
        if plan.units[name]["role"] == "mlp":  # a pruned MLP: a narrower dense one
            assert model.get_submodule(mlps[name].down).in_features == k
        else:
            assert (k is None) == (not isinstance(model.get_submodule(name), LowRankLinear))
            assert k is None or model.get_submodule(name).rank == k
    loaded, _, info = load_compressed(save_compressed(model, tmp_path / "m", plan=plan))
    assert torch.equal(logits(loaded, batches[0]), out)
    assert info["method"] == method and info["plan"]["ranks"] == plan.ranks


@pytest.mark.parametrize("arch,task", [("gpt2", "causal-lm"), ("opt", "causal-lm"), ("bert", "classification")])
def test_end_to_end_other_architectures(tmp_path, arch, task):
    model = random_biases(tiny_model(arch, task))
    batches = tiny_batches(model)
    stats = collect_stats(model, batches, task=task, progress=False)
    for method in ("whiten-fd", "id"):
        decs = decompose_model(model, stats, method)
        plan = plan_ranks(model, stats, method, 0.4, "uniform", decs)
        out = compress(model, stats, method, plan, decs, inplace=False)
        assert n_params(model) - n_params(out) == plan.removed_params
        assert abs(plan.achieved_ratio - 0.4) <= 0.01
        before = logits(out, batches[0])
        assert torch.isfinite(before).all()
        loaded, _, _ = load_compressed(save_compressed(out, tmp_path / method))
        assert torch.equal(logits(loaded, batches[0]), before)


def test_units_count_parameters_by_hand(llama):
    model, _, stats = llama
    svd_units = make_units(decompose_model(model, stats, "svd"))
    q = next(u for u in svd_units if u.name == "model.layers.0.self_attn.q_proj")
    k = next(u for u in svd_units if u.name == "model.layers.0.self_attn.k_proj")  # 2 KV heads of 16
    assert (q.dense_params, q.cost_per_rank, q.max_rank, q.dense_when_unprofitable) == (64 * 64, 128, 64, True)
    assert (k.dense_params, k.cost_per_rank, k.max_rank) == (32 * 64, 96, 32)
    assert len(svd_units) == 14 and q.loss_curve.shape == (65,)
    id_units = make_units(decompose_model(model, stats, "id"))
    assert [u.name for u in id_units] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    u = id_units[0]  # a neuron owns a row of gate and of up (no bias) and a column of down
    assert (u.cost_per_rank, u.dense_params, u.max_rank) == (3 * 64, 3 * 64 * 128, 128)
    assert not u.dense_when_unprofitable


def test_id_units_count_biases():
    model = tiny_model("gpt2")
    stats = collect_stats(model, tiny_batches(model, n_batches=1), progress=False)
    u = make_units(decompose_model(model, stats, "id"))[0]
    assert u.cost_per_rank == (64 + 1) + 64 and u.dense_params == 128 * 129


def test_decompositions_are_reused_and_copy_leaves_original(llama):
    model, batches, stats = llama
    before = logits(model, batches[0])
    decs = decompose_model(model, stats, "whiten")
    plan = plan_ranks(model, stats, "whiten", 0.3, "uniform", decs)
    a = compress(model, stats, "whiten", plan, decs, inplace=False)
    b = compress(model, stats, "whiten", plan, inplace=False)  # decomposes itself
    assert a is not model and not any(isinstance(m, LowRankLinear) for m in model.modules())
    assert torch.equal(logits(model, batches[0]), before)
    assert torch.equal(logits(a, batches[0]), logits(b, batches[0]))


def test_rank_none_stays_dense(llama):
    model, _, stats = llama
    decs = decompose_model(model, stats, "svd")
    plan = plan_ranks(model, stats, "svd", 0.2, "uniform", decs)
    plan.ranks["model.layers.0.self_attn.q_proj"] = None
    out = compress(model, stats, "svd", plan, decs, inplace=False)
    assert type(out.get_submodule("model.layers.0.self_attn.q_proj")) is nn.Linear
    assert isinstance(out.get_submodule("model.layers.0.self_attn.k_proj"), LowRankLinear)


def test_other_allocations_and_explicit_kwargs(llama):
    model, _, stats = llama
    decs = decompose_model(model, stats, "whiten-fd")
    for allocation in ("layer", "type", "spectrum"):
        plan = plan_ranks(model, stats, "whiten-fd", 0.4, allocation, decs)
        assert plan.allocation == allocation and abs(plan.achieved_ratio - 0.4) <= 0.01
    plan = plan_ranks(model, stats, "whiten-fd", 0.4, "explicit", decs, group_ratios={"0": 1.0, "1": 2.0})
    block_ratio = [sum(plan.dense_params[n] - plan.params[n] for n in plan.ranks if f"layers.{b}." in n)
                   / sum(plan.dense_params[n] for n in plan.ranks if f"layers.{b}." in n) for b in (0, 1)]
    assert block_ratio[1] > block_ratio[0]


class _Attention(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        scores = self.q(x) @ self.k(x).transpose(1, 2) / math.sqrt(x.shape[-1])
        return self.o(scores.softmax(-1) @ self.v(x))


class _Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.attention = _Attention(d)

    def forward(self, x):
        return x + self.attention(x)


class AttentionOnlyLM(nn.Module):
    """A language model whose blocks have attention and no MLP."""

    def __init__(self, vocab: int = 20, d: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(_Block(d) for _ in range(2))
        self.head = nn.Linear(d, vocab)

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        for block in self.layers:
            h = block(h)
        return SimpleNamespace(logits=self.head(h))


def test_errors(llama):
    model, _, stats = llama
    decs = decompose_model(model, stats, "svd")
    plan = plan_ranks(model, stats, "svd", 0.4, "uniform", decs)
    with pytest.raises(UserInputError, match="unknown method 'nope'"):
        decompose_model(model, stats, "nope")
    with pytest.raises(UserInputError, match="unknown method"):
        compress(model, stats, "nope", plan, decs)
    with pytest.raises(UserInputError, match="unknown allocation 'best'"):
        plan_ranks(model, stats, "svd", 0.4, "best", decs)
    with pytest.raises(UserInputError, match="ratio"):
        plan_ranks(model, stats, "svd", 1.5, "uniform", decs)
    with pytest.raises(UserInputError, match="made for method 'svd'"):
        compress(model, stats, "whiten", plan, decs, inplace=False)
    with pytest.raises(UserInputError, match="method 'whiten'"):
        plan_ranks(model, stats, "whiten", 0.4, "uniform", decs)  # svd decompositions
    gpt2 = tiny_model("gpt2")
    with pytest.raises(UserInputError, match="calibration statistics"):
        compress(gpt2, stats, "svd", plan, decs)
    compressed = compress(model, stats, "svd", plan, decs, inplace=False)
    with pytest.raises(UserInputError, match="calibration statistics"):
        compress(compressed, stats, "svd", plan, decs)  # already compressed
    bad = copy.deepcopy(plan)
    bad.ranks["model.layers.9.self_attn.q_proj"] = 3
    with pytest.raises(UserInputError, match="layers.9"):
        compress(model, stats, "svd", bad, decs, inplace=False)
    bad = copy.deepcopy(plan)
    bad.ranks["model.layers.1.mlp.down_proj"] = 65
    untouched = copy.deepcopy(model)
    with pytest.raises(UserInputError, match="rank 65"):
        compress(untouched, stats, "svd", bad, decs)
    assert not any(isinstance(m, LowRankLinear) for m in untouched.modules())  # nothing half-done


def test_id_needs_mlp_statistics_and_an_mlp(llama):
    model, batches, _ = llama
    attention_only = collect_stats(model, batches, targets=find_targets(model, roles=["q", "k", "v", "o"]),
                                   progress=False)
    with pytest.raises(UserInputError, match="every MLP layer"):
        decompose_model(model, attention_only, "id")
    torch.manual_seed(0)
    no_mlp = AttentionOnlyLM().eval()
    stats = collect_stats(no_mlp, [{"input_ids": torch.randint(0, 20, (2, 6))}], progress=False)
    assert len(decompose_model(no_mlp, stats, "svd")) == 8
    with pytest.raises(UserInputError, match="no MLP"):
        decompose_model(no_mlp, stats, "id")
    with pytest.raises(UserInputError, match="no MLP"):
        plan_ranks(no_mlp, stats, "id", 0.4, "uniform", {})
    plan = RankPlan(method="id", allocation="uniform", target_ratio=0.4, ranks={}, dense_params={}, params={})
    with pytest.raises(UserInputError, match="no MLP"):
        compress(no_mlp, stats, "id", plan)


def test_package_exports():
    import compression

    assert compression.compress is compress and compression.LowRankLinear is LowRankLinear
    assert {"save_compressed", "load_compressed", "plan_ranks", "collect_stats", "METHODS"} <= set(compression.__all__)
    with pytest.raises(AttributeError):
        compression.nope


def test_shared_whitening_equals_per_layer_decomposition(llama):
    """decompose_model computes one whitening per input group (q/k/v, gate/up); the factors must
    equal those of decomposing every layer on its own."""
    from compression.methods import LayerStats, decompose
    from compression.targets import weight_matrix

    model, _, stats = llama
    shared = decompose_model(model, stats, "whiten-fd", store_dtype=torch.float64)
    for t in stats.targets:
        ls = stats.layer(t.name)
        alone = decompose("whiten-fd", weight_matrix(model, t).detach(),
                          LayerStats(ls.gram, ls.tokens, ls.row_fisher, ls.col_fisher, ls.neuron_fisher),
                          store_dtype=torch.float64)
        k = max(1, alone.max_rank // 2)
        a1, b1 = shared[t.name].truncate(k, torch.float64)
        a2, b2 = alone.truncate(k, torch.float64)
        torch.testing.assert_close(a1 @ b1, a2 @ b2, rtol=0, atol=1e-10)


def test_the_whitening_methods_of_a_sweep_whiten_each_input_once(llama, monkeypatch):
    """With one `whitenings` dict shared by the calls, whiten, whiten-fw and whiten-fd build one
    Whitening per input group between them, and decompose exactly as they do alone."""
    from compression.methods import whitening

    model, _, stats = llama
    built = []
    original = whitening.Whitening.__init__

    def counting(self, gram, clamp=1e-12):
        built.append(1)
        original(self, gram, clamp)

    monkeypatch.setattr(whitening.Whitening, "__init__", counting)
    cache: dict = {}
    together = {m: decompose_model(model, stats, m, store_dtype=torch.float64, whitenings=cache)
                for m in ("whiten", "whiten-fw", "whiten-fd")}
    assert len(built) == len({t.input_group for t in stats.targets})
    for m, decs in together.items():
        alone = decompose_model(model, stats, m, store_dtype=torch.float64)
        for name, dec in decs.items():
            assert torch.equal(dec.sigma, alone[name].sigma)
