"""Healing a compressed model: which layers train, LoRA on the low-rank factors (only the adapters
train; merged, the logits do not change), distillation from the dense teacher (closed forms),
precision and gradient checkpointing, and a trial's finetune stage (its curve, and the best
evaluated weights kept, also when the trial is stopped early)."""

import copy
import dataclasses
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_batches, tiny_model

import trainables.trial as trial
from compression.apply import compress, decompose_model, plan_ranks
from compression.calibration import collect_stats
from compression.errors import UserInputError
from compression.io import load_compressed, save_compressed
from compression.layers import LowRankLinear
from compression.methods import method_config
from compression.targets import find_targets, get_module
from sweeps.shared import trial_stats
from sweeps.spec import parse_spec
from sweeps.trials import expand
from trainables.adapters import Healing, layers_to_train
from trainables.distill import distillation_loss
from trainables.evaluation import perplexity
from trainables.finetune import FinetuneConfig, finetune
from trainables.sources import load_model

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module")
def dense():
    """A float64 tiny llama, its statistics, and its whiten-fd decompositions."""
    model = tiny_model("llama").double()
    batches = tiny_batches(model)
    stats = collect_stats(model, batches, progress=False)
    return model, stats, decompose_model(model, stats, "whiten-fd")


@pytest.fixture(scope="module")
def plan(dense):
    model, stats, decs = dense
    plan = plan_ranks(model, stats, "whiten-fd", 0.3, "spectrum", decs)
    assert {k is None for k in plan.ranks.values()} == {True, False}  # some layers stay dense
    return plan


def compressed(dense, plan):
    model, stats, decs = dense
    return compress(model, stats, "whiten-fd", plan, decs, inplace=False)


def windows(n=8, seq_len=16, seed=0):
    return torch.randint(3, 100, (n, seq_len), generator=torch.Generator().manual_seed(seed))


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


# -- which layers heal ------------------------------------------------------------------------------


def test_layers_to_train_from_the_plan_and_roles(dense, plan):
    model, stats, decs = dense
    small = compressed(dense, plan)
    targets = find_targets(model)

    def parts(name):
        return [f"{name}.first", f"{name}.second"] if plan.ranks[name] is not None else [name]

    assert layers_to_train(small, targets, plan, "all") == [p for t in targets for p in parts(t.name)]
    assert layers_to_train(small, targets, plan, "compressed") == \
        [p for t in targets if plan.ranks[t.name] is not None for p in parts(t.name)]
    assert layers_to_train(small, targets, plan, ["q", "down"]) == \
        [p for t in targets if t.role in ("q", "down") for p in parts(t.name)]
    # `id` prunes whole MLPs: "compressed" is the layers of the pruned MLPs, which stay plain layers
    id_decs = decompose_model(model, stats, "id")
    id_plan = plan_ranks(model, stats, "id", 0.3, "uniform", id_decs)
    pruned = compress(model, stats, "id", id_plan, id_decs, inplace=False)
    mlp = [t.name for t in targets if t.role in ("gate", "up", "down")]
    assert layers_to_train(pruned, targets, id_plan, "compressed") == mlp
    assert layers_to_train(pruned, targets, id_plan, "all") == [t.name for t in targets]


def test_full_finetune_of_the_compressed_layers_trains_their_parameters_only(dense, plan):
    small = compressed(dense, plan)
    healing = Healing.prepare(small, find_targets(dense[0]), plan, FinetuneConfig(steps=2, train="compressed"))
    trained = {n for n, p in small.named_parameters() if p.requires_grad}
    assert trained == {n for n, _ in small.named_parameters() if any(n.startswith(f"{layer}.") for layer in healing.layers)}
    assert healing.params_trained == sum(p.numel() for p in small.parameters() if p.requires_grad)
    assert set(healing.weights()) == trained


# -- LoRA ---------------------------------------------------------------------------------------------


def test_lora_trains_only_adapters_and_merges_into_the_factors(dense, plan, tmp_path):
    model, _, _ = dense
    small = compressed(dense, plan)
    before = {n: p.detach().clone() for n, p in small.named_parameters()}
    ids = windows(2, 12, seed=5)
    untrained = logits(small, ids)
    config = FinetuneConfig(steps=4, lr=1e-2, batch_size=4, kind="lora", lora_rank=2, lora_alpha=4, train="all")
    healing = Healing.prepare(small, find_targets(model), plan, config)

    trained = [n for n, p in small.named_parameters() if p.requires_grad]
    assert trained and all(".lora_A." in n or ".lora_B." in n for n in trained)
    expected = sum(2 * (get_module(small, layer).in_features + get_module(small, layer).out_features)
                   for layer in healing.layers)  # A [r, in] and B [out, r] per adapted layer
    assert healing.params_trained == expected == sum(p.numel() for p in small.parameters() if p.requires_grad)

    finetune(small, "causal-lm", windows(), config)
    for name, p in small.named_parameters():  # nothing but the adapters moved
        if "lora_" not in name:
            assert torch.equal(p, before[name.replace(".base_layer", "")]), name
    unmerged = logits(small, ids)
    assert not torch.allclose(unmerged, untrained)  # the adapters learnt something
    weights = healing.weights()
    assert set(weights) == {f"{layer}.weight" for layer in healing.layers}

    healing.merge()
    assert not any(type(m).__module__.startswith("peft") for m in small.modules())
    assert {type(get_module(small, t.name)) for t in find_targets(model)} == {LowRankLinear, torch.nn.Linear}
    merged = logits(small, ids)
    torch.testing.assert_close(merged, unmerged, rtol=1e-10, atol=1e-10)
    params = dict(small.named_parameters())
    for name, weight in weights.items():  # what a checkpoint keeps is the merged weight
        torch.testing.assert_close(params[name], weight, rtol=0, atol=1e-12)
    save_compressed(small, tmp_path / "healed")  # plain layers: the folder needs no adapter code
    reloaded, _, _ = load_compressed(tmp_path / "healed")
    torch.testing.assert_close(logits(reloaded, ids), merged, rtol=0, atol=0)


def test_lora_with_gradient_checkpointing_trains_the_same(dense, plan):
    def run(checkpointing):
        small = compressed(dense, plan)
        config = FinetuneConfig(steps=3, lr=1e-2, batch_size=4, kind="lora", lora_rank=2,
                                gradient_checkpointing=checkpointing)
        Healing.prepare(small, find_targets(dense[0]), plan, config)
        return finetune(small, "causal-lm", windows(), config).losses

    assert run(True) == pytest.approx(run(False), rel=1e-9)


# -- distillation -----------------------------------------------------------------------------------


def test_distillation_loss_closed_forms():
    T = 2.0
    s = torch.tensor([[1.0, -0.5, 2.0], [0.3, 0.3, -1.0]], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([[0.2, 0.1, 1.0], [2.0, -1.0, 0.0]], dtype=torch.float64)
    p, q = torch.softmax(t / T, -1), torch.softmax(s / T, -1)
    loss = distillation_loss(s, t, T)
    expected = T ** 2 * (p * (p.log() - q.log())).sum()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    torch.testing.assert_close(s.grad, T * (q - p).detach())  # d/ds of T^2 KL = T (q - p)
    same = torch.randn(4, 5, 7)
    assert distillation_loss(same, same.clone(), 3.0) == 0  # KL(p || p) = 0, exactly
    student = torch.randn(4, 5, 7, requires_grad=True)
    distillation_loss(student, same, 0.5).backward()
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0


def test_distilling_a_copy_of_the_teacher_has_zero_loss_and_gradient(dense):
    teacher = dense[0]
    student = copy.deepcopy(teacher)
    config = FinetuneConfig(steps=1, batch_size=4, loss="distill", temperature=2.0)
    assert finetune(student, "causal-lm", windows(), config, teacher=teacher).losses == [0.0]
    # the gradient is zero up to rounding (which Adam's normalised step would still turn into a move)
    student = copy.deepcopy(teacher).train()
    ids = windows(4)
    loss = distillation_loss(student(input_ids=ids).logits, teacher(input_ids=ids).logits.detach(), 2.0)
    loss.backward()
    assert loss == 0 and max(p.grad.abs().max() for p in student.parameters()) < 1e-12  # rounding only


@pytest.mark.parametrize("loss, w", [("distill", 0.25), ("lm", 1.0)])
def test_the_first_step_loss_is_the_hand_computed_mix(dense, plan, loss, w):
    """The loss of the first step by hand: the next-token cross-entropy of every position but the
    last (the loop reads the logits whole and ignores the last position's target), mixed with the
    distillation loss."""
    teacher, small, data = dense[0], compressed(dense, plan), windows(4, 16)
    T = 3.0
    with torch.no_grad():
        s, t = small(input_ids=data).logits[:, :-1], teacher(input_ids=data).logits[:, :-1]
        ce = F.cross_entropy(s.flatten(0, 1), data[:, 1:].flatten(), reduction="sum")
        expected = (w * ce + (1 - w) * distillation_loss(s, t, T)) / (4 * 15)
    config = FinetuneConfig(steps=1, batch_size=4, loss=loss, temperature=T, lm_weight=w if loss == "distill" else 0.0)
    result = finetune(small, "causal-lm", data, config, teacher=teacher)
    assert result.losses[0] == pytest.approx(expected.item(), rel=1e-6)


def test_distillation_needs_a_teacher(dense, plan):
    with pytest.raises(UserInputError, match="distill.*teacher"):
        finetune(compressed(dense, plan), "causal-lm", windows(), FinetuneConfig(steps=1, loss="distill"))


# -- precision --------------------------------------------------------------------------------------


def test_half_precision_trains_in_float32_on_the_cpu():
    def run(precision):
        model = tiny_model("llama")
        return finetune(model, "causal-lm", windows(), FinetuneConfig(steps=3, lr=1e-3, batch_size=4,
                                                                       precision=precision)).losses

    assert run("bf16") == run("float32") == run("fp16")


def test_cpu_bf16_autocasts_student_and_teacher_and_trains():
    model = tiny_model("llama")
    teacher = copy.deepcopy(model)
    seen = {}

    def record(name):
        return lambda module, args, output: seen.setdefault(name, set()).add(output.dtype)

    get_module(model, "model.layers.0.mlp.down_proj").register_forward_hook(record("student"))
    get_module(teacher, "model.layers.0.mlp.down_proj").register_forward_hook(record("teacher"))
    data = (torch.arange(16) + torch.randint(0, 50, (32, 1), generator=torch.Generator().manual_seed(0))) % 100
    config = FinetuneConfig(steps=30, lr=3e-3, batch_size=8, cpu_precision="bf16", loss="distill", lm_weight=0.5)
    result = finetune(model, "causal-lm", data, config, teacher=teacher)
    assert seen == {"student": {torch.bfloat16}, "teacher": {torch.bfloat16}}
    assert all(math.isfinite(x) for x in result.losses)
    assert sum(result.losses[-5:]) < sum(result.losses[:5])
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast: the weights stay float32
    float32 = finetune(tiny_model("llama"), "causal-lm", data, dataclasses.replace(config, cpu_precision="float32"),
                       teacher=teacher).losses
    assert result.losses[0] == pytest.approx(float32[0], rel=0.05) and result.losses != float32


def test_cpu_precision_names_what_is_allowed():
    with pytest.raises(UserInputError, match="cpu_precision 'fp16'.*allowed: float32, bf16"):
        FinetuneConfig(cpu_precision="fp16")


@cuda
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_on_cuda_trains(precision):
    model = tiny_model("llama")
    teacher = copy.deepcopy(model)
    data = (torch.arange(16) + torch.randint(0, 50, (32, 1))) % 100
    config = FinetuneConfig(steps=30, lr=3e-3, batch_size=8, precision=precision, loss="distill", lm_weight=0.5)
    result = finetune(model, "causal-lm", data, config, device="cuda", teacher=teacher)
    assert all(math.isfinite(x) for x in result.losses)
    assert sum(result.losses[-5:]) < sum(result.losses[:5])
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast: the weights stay float32


# -- the finetune stage of a trial ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_trial():
    """A trial config (tiny:llama, whiten-fd, LoRA + distillation, 5 steps, evaluated every 2) and
    the `Shared` bundle a sweep would put in the object store (plain objects here)."""
    loaded = load_model("tiny:llama")
    data = {"eval": windows(4, 16, seed=1) % 200 + 3, "train": windows(16, 16, seed=2) % 200 + 3}
    stats = collect_stats(loaded.model, [{"input_ids": data["train"][:8]}], progress=False)
    spec = parse_spec({
        "name": "t", "model": "tiny:llama", "task": {"type": "causal-lm", "eval": "packaged:lee", "seq_len": 16},
        "grid": {"method": ["whiten-fd"], "ratio": [0.4], "allocation": ["spectrum"]},
        "finetune": {"steps": 5, "lr": 3e-3, "batch_size": 4, "eval_every": 2, "kind": "lora", "lora_rank": 4,
                     "loss": "distill", "lm_weight": 0.5},
        "latency": {"repeats": 0}, "checkpoints": {"keep": 1}})
    (config,) = expand(spec)
    method = method_config("whiten-fd")
    shared = trial.Shared(stats=trial_stats(stats), methods={config.method_key: method},
                          decompositions={config.method_key: decompose_model(loaded.model, stats, method)}, data=data)
    return config, shared, stats


class Stopped(Exception):
    """What Tune does to a trial it stops: its next report does not return."""


def run_trial(monkeypatch, config, shared, stop_after: int | None = None):
    """Run the trial without Ray; return its reports and the weights of each checkpoint."""
    from safetensors.torch import load_file

    reports, checkpoints = [], []

    def report(result, checkpoint=None):
        reports.append(result)
        checkpoints.append(None if checkpoint is None else load_file(Path(checkpoint.path) / trial.CHECKPOINT_WEIGHTS))
        if stop_after is not None and len(reports) == stop_after:
            raise Stopped

    monkeypatch.setattr(trial.ray, "get", lambda ref: ref)
    monkeypatch.setattr(trial.tune, "report", report)
    if stop_after is None:
        trial.trainable(config.to_dict(), shared)
    else:
        with pytest.raises(Stopped):
            trial._run(config, shared, shared.first_row(config))
    return reports, checkpoints


def reload(config, shared, stats, weights):
    """The trial's compressed model with checkpoint weights loaded (what `lrsweep export` rebuilds)."""
    model = load_model("tiny:llama").model
    method = shared.methods[config.method_key]
    plan = plan_ranks(model, stats, method, config.ratio, config.allocation, shared.decompositions[config.method_key])
    compress(model, stats, method, plan, shared.decompositions[config.method_key])
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, w in weights.items():
            params[name].copy_(w)
    return model


def test_a_trial_reports_its_healing_curve_and_keeps_its_best_weights(monkeypatch, tiny_trial):
    config, shared, stats = tiny_trial
    reports, checkpoints = run_trial(monkeypatch, config, shared)
    assert [(r["stage"], r["step"]) for r in reports] == [("compressed", 0), ("finetune", 2), ("finetune", 4),
                                                         ("final", 5)]
    final = reports[-1]
    assert final["status"] == "ok" and final["error"] == "" and final["finetune_steps"] == 5
    curve = {int(k): v for k, v in __import__("json").loads(final["finetune_curve"]).items()}
    assert list(curve) == [0, 2, 4, 5] and curve[0] == final["metric_compressed"]
    best_step = min((s for s in curve if s), key=lambda s: curve[s])
    assert final["metric"] == final["metric_finetuned"] == curve[best_step]
    # LoRA: the adapters' parameters trained (rank 4: 4 (in + out) per adapted layer)
    assert 0 < final["params_trained"] < final["params_compressed"] / 4
    # a checkpoint at every evaluation that improved on the best so far, the last one the best
    running = [min(curve[s] for s in curve if 0 < s <= step) for step in (2, 4, 5)]
    saved = [c is not None for c in checkpoints[1:]]
    assert saved == [True] + [running[i] < running[i - 1] for i in (1, 2)]
    last = [c for c in checkpoints if c is not None][-1]
    assert all(name.endswith(".weight") for name in last)  # merged LoRA weights, no adapter tensors
    healed = reload(config, shared, stats, last)
    assert perplexity(healed, shared.data["eval"]).value == pytest.approx(final["metric"], rel=1e-5)


def test_a_trial_stopped_early_keeps_its_best_evaluated_weights(monkeypatch, tiny_trial):
    config, shared, stats = tiny_trial
    reports, checkpoints = run_trial(monkeypatch, config, shared, stop_after=3)  # stopped at step 4
    last = reports[-1]
    assert (last["stage"], last["step"], last["status"], last["finetune_steps"]) == ("finetune", 4, "running", 4)
    weights = [c for c in checkpoints if c is not None][-1]
    healed = reload(config, shared, stats, weights)
    assert perplexity(healed, shared.data["eval"]).value == pytest.approx(last["metric_finetuned"], rel=1e-5)
    assert last["metric"] == last["metric_finetuned"] <= min(r["metric"] for r in reports[1:])
