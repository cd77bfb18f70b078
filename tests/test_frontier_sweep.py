"""The frontier in sweep files and trials: the `refit` block of a grid block, methods that need one
allocation, the frontier example, and a real tiny sweep whose refit trial exports to its metric."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

import sweeps.runner as runner
from compression.errors import UserInputError
from compression.io import load_compressed
from sweeps import prepare
from sweeps.export import export_trial
from sweeps.spec import load_spec, parse_spec
from sweeps.table import load_results
from sweeps.trials import expand
from test_sweep_e2e import corpus, env, ray_cluster, sweep  # noqa: F401 - the same fixtures
from trainables.contract import TrialConfig
from trainables.evaluation import evaluate

pytestmark = pytest.mark.timeout(900)

BASE = {
    "name": "t",
    "model": "tiny:llama",
    "task": {"type": "causal-lm", "eval": "packaged:lee", "seq_len": 64, "eval_windows": 4},
    "grid": {"method": ["whiten-fd"], "ratio": [0.2], "allocation": ["spectrum"]},
}
EXAMPLE = Path(__file__).resolve().parents[1] / "sweeps" / "examples" / "frontier.yaml"


def with_grid(*blocks):
    data = copy.deepcopy(BASE)
    data["grid"] = list(blocks)
    return data


def test_refit_reaches_the_trial_and_leaves_other_ids_alone():
    plain = {"method": ["whiten-fd"], "ratio": [0.2], "allocation": ["spectrum"]}
    refitted = dict(plain, refit={"dense": True})
    (before,) = expand(parse_spec(with_grid(plain)))
    trials = expand(parse_spec(with_grid(plain, refitted)))
    assert [t.refit for t in trials] == [None, {"dense": True, "damp": 0.0}]
    assert trials[0].trial_id == before.trial_id  # a field added as None keeps every existing id
    assert trials[1].trial_id != before.trial_id
    assert "refit" not in before.identity()
    assert TrialConfig.from_dict(trials[1].to_dict()) == trials[1]


def test_refit_and_allocation_mistakes_name_their_field():
    cases = [
        (with_grid({"method": ["whiten-fd"], "ratio": [0.2], "refit": {"dens": True}}), "grid[0].refit.dens"),
        (with_grid({"method": ["whiten-fd"], "ratio": [0.2], "refit": {"damp": -1}}), "grid[0].refit.damp"),
        (with_grid({"method": ["hybrid"], "ratio": [0.2]}), "method 'hybrid' allows only spectrum, got uniform"),
        (with_grid({"method": ["hybrid"], "ratio": [0.2], "allocation": ["spectrum", "type"]}), "got type"),
        (with_grid({"method": ["whiten-fd"], "ratio": [0.2], "options": {"form": ["dense"]}}),
         "option form must be one of factors, identity"),
    ]
    for data, message in cases:
        with pytest.raises(UserInputError, match=message.replace("[", r"\[").replace("]", r"\]")):
            parse_spec(data)


def test_the_frontier_example():
    spec = load_spec(EXAMPLE)
    trials = expand(spec)
    assert [(t.method, t.ratio, t.options) for t in trials] == [
        ("whiten-fd", 0.2, {}), ("whiten-fd", 0.4, {}), ("whiten-fd", 0.2, {"form": "identity"}),
        ("whiten-fd", 0.4, {"form": "identity"}), ("hybrid", 0.2, {"form": "identity"}),
        ("hybrid", 0.4, {"form": "identity"})]
    assert all(t.allocation == "spectrum" and t.finetune["steps"] == 0 and t.refit is None for t in trials)
    assert spec.model == "packaged:smollm2-135m" and spec.calibration_settings()["samples"] == 32
    assert spec.calibration_settings()["source"] == "packaged:wiki" and spec.task.eval == "packaged:lee"
    assert spec.calibration_settings()["fisher"] == "sampled"


def test_the_sampled_fisher_is_a_calibration_setting_that_leaves_other_keys_and_ids_alone():
    plain = parse_spec(BASE)
    sampled = parse_spec(dict(BASE, calibration={"fisher": "sampled"}))
    four = parse_spec(dict(BASE, calibration={"fisher": "sampled", "fisher_samples": 4}))
    assert "fisher" not in plain.calibration_settings()  # the default adds nothing: old keys and ids stay
    assert parse_spec(dict(BASE, calibration={"fisher": "empirical"})).calibration_settings() == \
        plain.calibration_settings()
    assert sampled.calibration_settings() == plain.calibration_settings() | {"fisher": "sampled", "fisher_samples": 1}
    keys = {prepare.calibration_key(s) for s in (plain, sampled, four)}
    ids = {expand(s)[0].trial_id for s in (plain, sampled, four)}
    assert len(keys) == 3 and len(ids) == 3
    assert len({s.spec_hash for s in (plain, sampled, four)}) == 3
    assert parse_spec(dict(BASE, calibration={"fisher": "empirical"})).spec_hash == plain.spec_hash
    for calibration, message in [({"fisher": "true"}, "calibration.fisher"),
                                 ({"fisher_samples": 4}, "fisher_samples 4 applies to fisher: sampled only"),
                                 ({"fisher": "sampled", "fisher_samples": 0}, "calibration.fisher_samples")]:
        with pytest.raises(UserInputError, match=message):
            parse_spec(dict(BASE, calibration=calibration))


def test_a_sweep_calibrates_with_the_fisher_of_its_calibration_section(monkeypatch, tmp_path):
    from compression.calibration import collect_stats

    monkeypatch.setenv("LRSWEEP_CACHE", str(tmp_path / "cache"))
    data = dict(BASE, calibration={"samples": 4, "batch_size": 2, "fisher": "sampled", "seed": 3})
    spec = parse_spec(data)
    prepared = prepare.stats_for(spec, progress=False)
    assert prepared.stats.meta["fisher"] == "sampled" and prepared.stats.meta["fisher_samples"] == 1
    batches = prepare.calibration_batches(spec, prepared.data, prepared.loaded.tokenizer)
    direct = collect_stats(prepared.loaded.model, batches, progress=False, fisher="sampled", seed=3)
    empirical = collect_stats(prepared.loaded.model, batches, progress=False)
    name = next(iter(direct.neuron_fisher))
    assert torch.equal(prepared.stats.neuron_fisher[name], direct.neuron_fisher[name])
    assert not torch.equal(direct.neuron_fisher[name], empirical.neuron_fisher[name])
    again = prepare.stats_for(spec, progress=False)  # from the cache, under the sampled key
    assert again.calibration_cached and torch.equal(again.stats.neuron_fisher[name], direct.neuron_fisher[name])


def test_a_refit_trial_reports_its_seconds_and_exports_to_its_metric(ray_cluster, corpus, env, tmp_path):  # noqa: F811
    spec = sweep(corpus, env / "results", "frontier", finetune={"steps": 0}, grid=[
        {"method": ["hybrid"], "ratio": [0.3], "allocation": ["spectrum"], "options": {"form": ["identity"]},
         "refit": {"dense": True}},
        {"method": ["whiten-fd"], "ratio": [0.3], "allocation": ["spectrum"]},
    ])
    out = runner.run_sweep(spec)
    df = load_results(out.directory)
    trials = df[df["method"] != "dense"].set_index("method")
    assert set(trials["status"]) == {"ok"}
    hybrid, plain = trials.loc["hybrid"], trials.loc["whiten-fd"]
    assert hybrid["refit"] == {"dense": True, "damp": 0.0} and hybrid["seconds_refit"] > 0
    assert plain["refit"] == {} and math.isnan(plain["seconds_refit"])
    assert abs(hybrid["achieved_ratio"] - 0.3) <= 0.01
    assert set(hybrid["rank_plan"]["extra"]["alternatives"].values()) <= {"prune", "factorise"}

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the trial ran
    try:
        path, _ = export_trial(out.directory, tmp_path / "h", trial=hybrid["trial_id"])
        model, tokenizer, info = load_compressed(path)
        windows = prepare.draw_text(spec, tokenizer)["eval"]
        assert evaluate(model, "causal-lm", windows, batch_size=8).value == hybrid["metric"]
    finally:
        torch.set_num_threads(threads)
    assert info["version"] == 2 and info["method"] == "hybrid"
