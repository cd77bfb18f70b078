"""FLOP counts and shape keys of compressed models against closed forms; the latency timer's
interleaving and statistics."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import tiny_batches, tiny_model

from compression.apply import compress, decompose_model, plan_ranks
from compression.calibration import collect_stats
from compression.cost import attention_flops_per_token, flops_per_token, linear_flops_per_token, shape_key
from compression.io import load_compressed, save_compressed
from trainables.latency import Latency, measure, random_inputs


@pytest.fixture(scope="module")
def llama():
    model = tiny_model("llama")
    stats = collect_stats(model, tiny_batches(model), progress=False)
    return model, stats


def test_linear_flops_are_twice_the_weights_and_fall_by_twice_the_removed_parameters(llama):
    model, stats = llama
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert linear_flops_per_token(model) == 2 * weights  # every linear, the LM head included
    for method, allocation in (("whiten-fd", "spectrum"), ("svd", "uniform"), ("id", "uniform")):
        decs = decompose_model(model, stats, method)
        plan = plan_ranks(model, stats, method, 0.4, allocation, decs)
        small = compress(model, stats, method, plan, decs, inplace=False)
        # tiny llama has no biases: a unit's parameters are its weights, so FLOPs fall by 2 x removed
        assert linear_flops_per_token(model) - linear_flops_per_token(small) == 2 * plan.removed_params, method


@pytest.mark.parametrize("arch, task, causal", [("llama", "causal-lm", True), ("gpt2", "causal-lm", True),
                                                ("gemma3", "causal-lm", True), ("bert", "classification", False)])
def test_attention_flops_closed_form(arch, task, causal):
    model = tiny_model(arch, task)
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    keys = (33 + 1) / 2 if causal else 33
    assert attention_flops_per_token(model, 33) == round(4 * c.num_attention_heads * head_dim * keys * 2)
    assert flops_per_token(model, 33) == linear_flops_per_token(model) + attention_flops_per_token(model, 33)


def test_shape_key_is_the_layer_shapes(llama, tmp_path):
    model, stats = llama
    models = {}
    for method in ("svd", "whiten"):
        decs = decompose_model(model, stats, method)
        for ratio in (0.2, 0.4):
            plan = plan_ranks(model, stats, method, ratio, "uniform", decs)
            models[(method, ratio)] = compress(model, stats, method, plan, decs, inplace=False)
    # uniform ranks depend only on the shapes and the ratio, not on the method's weights
    assert shape_key(models[("svd", 0.2)]) == shape_key(models[("whiten", 0.2)])
    assert shape_key(models[("svd", 0.2)]) != shape_key(models[("svd", 0.4)]) != shape_key(model)
    save_compressed(models[("svd", 0.4)], tmp_path / "m")
    assert shape_key(load_compressed(tmp_path / "m")[0]) == shape_key(models[("svd", 0.4)])


def test_latency_runs_are_interleaved_and_summarised():
    a, b = tiny_model("llama"), copy.deepcopy(tiny_model("llama"))
    calls = []
    for name, m in (("a", a), ("b", b)):
        original = m.forward
        m.forward = lambda *args, _o=original, _n=name, **kw: calls.append(_n) or _o(*args, **kw)
    ids = random_inputs(a, 2, 16)
    la, lb = measure([a, b], ids, repeats=3, warmup=1, threads=1)
    # per round and model: the Timer's untimed estimate, then one timed pass; rounds interleave models
    assert calls == ["a", "a", "b", "b"] * 4
    assert len(la.runs_ms) == len(lb.runs_ms) == 3 and all(t > 0 for t in la.runs_ms + lb.runs_ms)
    assert not a.training and not b.training


def test_latency_statistics_and_bad_settings():
    lat = Latency.of([0.010, 0.030, 0.020, 0.040])
    assert lat.median_ms == pytest.approx(25.0) and lat.runs_ms == pytest.approx([10, 30, 20, 40])
    assert lat.iqr_ms == pytest.approx(32.5 - 17.5)  # inclusive quartiles
    assert Latency.of([0.005]).iqr_ms == 0
    model = tiny_model("llama")  # 64 positions
    from compression.errors import UserInputError

    with pytest.raises(UserInputError, match="exceeds the model's 64 positions"):
        random_inputs(model, 1, 65)
    with pytest.raises(UserInputError, match="repeats must be a positive integer"):
        measure([model], random_inputs(model, 1, 8), repeats=0)


def test_latency_groups_hold_what_half_the_free_memory_holds(monkeypatch):
    import sweeps.latency as latency
    import sweeps.prepare as prepare

    model = tiny_model("llama")
    size = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    for free, expected in ((0, 1), (7 * size, 3), (10**15, latency.MAX_GROUP)):
        monkeypatch.setattr(prepare, "available_memory", lambda free=free: free)
        assert latency._group_size(model, torch.device("cpu")) == expected
