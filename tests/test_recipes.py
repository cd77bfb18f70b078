"""Healing recipes in sweep files: finetune values in grid blocks (trials and their ids),
Optuna's finetune choices and distributions, the ids of sweeps written before them, bad input."""

import copy
import json

import optuna
import pytest
import yaml

from compression.errors import UserInputError
from sweeps.recipes import largest, suggest
from sweeps.spec import parse_spec
from sweeps.trials import base_config, expand, trial_count
from sweeps.tuning import OptunaSpace
from test_spec import EXAMPLES, spec_with


def block(**finetune):
    return {"method": ["whiten-fd"], "ratio": [0.2, 0.4], "allocation": ["spectrum"], "finetune": finetune}


def test_sweeps_without_recipes_keep_their_trial_ids_and_hash():
    """Ids and hash of the quickstart (as it was: 18 trials, an 8-step full finetune) as the code
    computed them before finetune kinds existed."""
    raw = yaml.safe_load((EXAMPLES / "quickstart.yaml").read_text())
    raw["grid"] = [{"method": ["svd", "fwsvd", "whiten", "whiten-fw", "whiten-fd", "id"], "ratio": [0.2, 0.4],
                    "allocation": ["uniform"]},
                   {"method": ["whiten-fd"], "ratio": [0.2, 0.4], "allocation": ["uniform", "layer", "type", "spectrum"]}]
    raw["finetune"] = {"steps": 8, "lr": 1.0e-4, "batch_size": 2, "warmup_steps": 1, "train": "compressed"}
    quickstart = parse_spec(raw)
    assert [t.trial_id for t in expand(quickstart)[:3]] == ["6c0cde73a5d5", "bafcf59ba34c", "3cb3e09fdf09"]
    assert quickstart.spec_hash.startswith("72a8ff960c105f82")
    # the new settings spelt out at their defaults (or not applying) are the same sweep
    plain = parse_spec(spec_with(finetune={"steps": 3}))
    spelt = parse_spec(spec_with(finetune={"steps": 3, "kind": "full", "loss": "lm", "precision": "float32", "cpu_precision": "float32",
                                           "lora_rank": 64, "temperature": 5.0}))
    assert [t.trial_id for t in expand(spelt)] == [t.trial_id for t in expand(plain)]
    assert spelt.spec_hash == plain.spec_hash
    in_grid = parse_spec(spec_with(finetune={"steps": 3}, grid={"method": ["svd"], "ratio": [0.2],
                                                                "finetune": {"kind": ["full"], "loss": ["lm"]}}))
    assert [t.trial_id for t in expand(in_grid)] == [t.trial_id for t in expand(plain)]


def test_a_grid_over_finetune_kinds_expands_into_distinct_trials():
    spec = parse_spec(spec_with(finetune={"steps": 4, "lr": 1e-4},
                                grid=block(kind=["full", "lora"], loss=["lm", "distill"])))
    trials = expand(spec)
    assert trial_count(spec) == len(trials) == 8  # 2 ratios x 2 kinds x 2 losses
    recipes = {(t.ratio, t.finetune["kind"], t.finetune["loss"]) for t in trials}
    assert recipes == {(r, k, l) for r in (0.2, 0.4) for k in ("full", "lora") for l in ("lm", "distill")}
    assert len({t.trial_id for t in trials}) == 8
    assert all(t.finetune["steps"] == 4 and t.finetune["lr"] == 1e-4 for t in trials)  # the section's settings
    # the same recipes in another block are the same trials; a LoRA rank does not split full finetunes
    again = parse_spec(spec_with(finetune={"steps": 4, "lr": 1e-4}, grid=[
        block(kind=["full", "lora"], loss=["lm", "distill"]), block(kind=["lora"], loss=["lm"]),
        block(kind=["full", "lora"], lora_rank=[4, 16])]))
    ids = [t.trial_id for t in expand(again)]
    assert ids[:8] == [t.trial_id for t in trials]
    assert len(ids) == 8 + 2 * 2  # full x {4, 16} is block 1's full/lm trial; lora x {4, 16} are new
    # a finetune setting of the section that a block varies: one value per trial, distinct ids
    lrs = expand(parse_spec(spec_with(finetune={"steps": 4}, grid=block(lr=[1e-4, 3e-4]))))
    assert sorted({t.finetune["lr"] for t in lrs}) == [1e-4, 3e-4] and len({t.trial_id for t in lrs}) == 4


def test_the_finetune_column_and_the_most_steps():
    spec = parse_spec(spec_with(finetune={"steps": 4, "eval_every": 2, "early_stopping": {}},
                                grid=[block(steps=[2, 10]), block()]))
    assert largest(spec, "steps") == 10


def test_optuna_samples_finetune_settings_that_apply():
    values = {"kind": ["full", "lora"], "lr": {"loguniform": [1e-5, 1e-3]}, "lora_rank": {"int": [2, 32]},
              "temperature": {"uniform": [1.0, 4.0]}, "loss": {"choice": ["distill"]}}
    spec = parse_spec(spec_with(finetune={"steps": 4}, grid=block(**values) | {"ratio": [0.3], "allocation": ["optuna"]},
                                optuna={"trials": 8}))
    base = base_config(spec)["finetune"]
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    kinds = set()
    for _ in range(12):
        trial = study.ask()
        settings = suggest(trial, spec.grid[0].finetune, base)
        kinds.add(settings["kind"])
        assert 1e-5 <= settings["lr"] <= 1e-3 and 1.0 <= settings["temperature"] <= 4.0
        assert settings["loss"] == "distill" and settings["steps"] == 4
        assert ("finetune.lora_rank" in trial.params) == (settings["kind"] == "lora")
        if settings["kind"] == "lora":
            assert 2 <= settings["lora_rank"] <= 32 and isinstance(settings["lora_rank"], int)
        else:
            assert settings["lora_rank"] == base["lora_rank"]  # not sampled: it does not apply
        assert "finetune.loss" not in trial.params  # a choice of one is a constant
    assert kinds == {"full", "lora"}
    # the define-by-run space hands Tune the whole finetune section with the choices applied
    space = OptunaSpace({"method": ["whiten-fd"], "ratio": [0.3]}, {"whiten-fd": ["0", "1"]}, (0.1, 0.5), "block",
                        finetune=base, finetune_values=spec.grid[0].finetune)
    config = space(study.ask())
    assert set(config["finetune"]) == set(base) and config["finetune"]["loss"] == "distill"


BAD = {
    "unknown finetune setting": (block(optimiser=["adam"]), ["grid[0].finetune", "optimiser", "allowed: steps, lr"]),
    "the evaluation interval": (block(eval_every=[2, 4]), ["grid[0].finetune", "'eval_every' is not a finetune setting"]),
    "empty list": (block(kind=[]), ["grid[0].finetune: kind", "at least one value"]),
    "a bare value": (block(kind="lora"), ["grid[0].finetune: kind", "give a list of values"]),
    "unknown kind": (block(kind=["full", "qlora"]), ["grid[0].finetune.kind[1]", "'full' or 'lora'"]),
    "negative lr": (block(lr=[1e-4, -1.0]), ["grid[0].finetune.lr[1]", "greater than 0"]),
    "a role that does not exist": (block(train=[["q", "attention"]]), ["finetune.train[0]", "list of distinct roles"]),
    "a distribution without optuna": (block(lr={"loguniform": [1e-5, 1e-3]}),
                                      ["grid[0].finetune.lr", "sampled by Optuna", "add an `optuna` section"]),
    "an unknown distribution": (block(lr={"normal": [0, 1]}), ["finetune: lr", "uniform, loguniform, int, choice"]),
    "a log range through 0": (block(lr={"loguniform": [0, 1e-3]}), ["finetune: lr", "lo > 0"]),
    "a combination that is not valid": (block(warmup_steps=[2], warmup_ratio=[0.1]), ["grid[0].finetune", "exclusive"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_finetune_values_name_their_field(case):
    grid, expected = BAD[case]
    with pytest.raises(UserInputError) as info:
        parse_spec(spec_with(finetune={"steps": 2}, grid=grid), origin="s.yaml")
    message = str(info.value)
    assert message.startswith("s.yaml: ")
    for part in expected:
        assert part in message, message


def test_bad_section_settings_name_their_field():
    for finetune, expected in (({"kind": "adapter"}, "finetune.kind"), ({"train": "attention"}, "finetune.train"),
                               ({"lm_weight": 1.5}, "finetune.lm_weight"), ({"precision": "int8"}, "finetune.precision"),
                               ({"cpu_precision": "fp16"}, "finetune.cpu_precision")):
        with pytest.raises(UserInputError, match=expected):
            parse_spec(spec_with(finetune=finetune))
    roles = parse_spec(spec_with(finetune={"steps": 1, "train": ["q", "v", "down"]}))
    assert expand(roles)[0].finetune["train"] == ["q", "v", "down"]
    assert copy.deepcopy(roles) == roles


# -- the report's view of healing --------------------------------------------------------------------


def healed_rows():
    from trainables.contract import TrialRow

    def row(trial_id, ratio, settings, compressed, finetuned, seconds, status="ok"):
        curve = {0: compressed, 5: (compressed + finetuned) / 2, 10: finetuned}
        return TrialRow(trial_id=trial_id, status=status, method="whiten-fd", allocation="spectrum", ratio=ratio,
                        target_ratio=ratio, metric_name="perplexity", metric=finetuned, metric_compressed=compressed,
                        metric_finetuned=finetuned, metric_dense=30.0, finetune_steps=10, seconds_finetune=seconds,
                        params_trained=1000, finetune=json.dumps(settings), finetune_curve=json.dumps(curve),
                        size_mb=100.0, achieved_ratio=ratio)

    dense = TrialRow(trial_id="dense", status="ok", method="dense", target_ratio=0.0, metric_name="perplexity",
                     metric=30.0, metric_dense=30.0, size_mb=120.0)
    return [dense, row("a", 0.2, {"kind": "full", "lr": 1e-4}, 60.0, 40.0, 120.0),
            row("b", 0.2, {"kind": "lora", "lora_rank": 8, "loss": "distill", "temperature": 2.0, "lr": 1e-3},
                60.0, 36.0, 60.0),
            row("c", 0.4, {"kind": "full", "lr": 1e-4}, 200.0, 90.0, 30.0, status="stopped")]


def test_recovery_per_finetune_minute_and_the_gap_closed(tmp_path):
    from sweeps.analysis import healing
    from sweeps.plots import finetune_curves
    from sweeps.report import render
    from sweeps.table import frame, typed

    df = typed(frame(healed_rows()))
    table = healing(df).set_index("trial_id")
    assert table.loc["a", "recovery_per_minute"] == pytest.approx((60 - 40) / 2)  # 20 ppl in 2 minutes
    assert table.loc["b", "recovery_per_minute"] == pytest.approx((60 - 36) / 1)
    assert table.loc["a", "gap_closed"] == pytest.approx(20 / 30) and table.loc["b", "gap_closed"] == pytest.approx(0.8)
    assert table.loc["c", "status"] == "stopped"  # stopped early: in the view with its best metric
    assert table.loc["a", "recipe"] == "full / lm, lr 0.0001"  # lr differs between the trials
    assert table.loc["b", "recipe"] == "lora r8 / distill T2, lr 0.001"
    assert finetune_curves(df)[:8] == b"\x89PNG\r\n\x1a\n"
    text, figures = render(df, "t", {})
    assert "## Healing" in text and "finetune_curves.png" in figures and "| b | whiten-fd |" in text
    assert "c (stopped)" in text
