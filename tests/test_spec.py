"""Sweep files: validation (every bad input names its field), expansion and trial ids."""

import copy
from pathlib import Path

import pytest
import yaml

from compression.errors import UserInputError
from trainables.contract import TrialConfig
from sweeps.spec import load_spec, parse_spec
from sweeps.trials import check_resources, expand, method_configs, optuna_choices, trial_count

EXAMPLES = Path(__file__).resolve().parents[1] / "sweeps" / "examples"

BASE = {
    "name": "t",
    "model": "tiny:llama",
    "task": {"type": "causal-lm", "eval": "packaged:lee", "seq_len": 64, "eval_windows": 4},
    "grid": {"method": ["svd"], "ratio": [0.2]},
}


def spec_with(**changes):
    data = copy.deepcopy(BASE)
    for key, value in changes.items():
        data[key] = value
    return data


def grid(**kw):
    return {"method": ["svd"], "ratio": [0.2], **kw}


def test_examples_validate_with_their_trial_counts():
    counts = {p.stem: trial_count(load_spec(p)) for p in sorted(EXAMPLES.glob("*.yaml"))}
    # quickstart: 6 methods x 2 ratios (uniform) + whiten-fd x 3 more allocations x 2 ratios
    # + identity-form whiten-fd / spectrum healed by LoRA x 2 ratios;
    # heal: 2 ratios x ((full, lora) x (lm, distill) + identity-form hybrid x lora x (lm, distill));
    # frontier: 2 ratios x (whiten-fd, whiten-fd identity, hybrid identity)
    assert counts == {"quickstart": 20, "minilm-tweets": 18, "gemma3": 14, "optuna-ranks": 16,
                      "llama-cluster": 32, "standard-eval": 4, "heal": 12, "frontier": 6}


def test_expansion_is_the_union_of_the_blocks_without_duplicates():
    spec = parse_spec(spec_with(grid=[
        {"method": ["svd", "whiten-fd"], "ratio": [0.2, 0.4]},
        {"method": ["whiten-fd"], "ratio": [0.2, 0.4], "allocation": ["uniform", "spectrum"],
         "options": {"alpha": [0.5, 1.0]}},
    ]))
    trials = expand(spec)
    # block 1: 4 trials; block 2: 2 ratios x 2 allocations x 2 alphas = 8, of which the 2 uniform
    # ones with alpha 1.0 (the default) are block 1's whiten-fd trials
    assert len(trials) == 10
    combos = {(t.method, t.ratio, t.allocation, t.options.get("alpha")) for t in trials}
    assert ("whiten-fd", 0.4, "spectrum", 0.5) in combos and ("svd", 0.2, "uniform", None) in combos
    assert ("whiten-fd", 0.4, "spectrum", None) in combos  # alpha 1.0 is the default: no option
    assert len({t.trial_id for t in trials}) == 10


def test_an_option_a_method_lacks_is_an_error_naming_its_options():
    with pytest.raises(UserInputError, match=r"grid\[0\].*method 'svd' has no option 'alpha'; its options: none"):
        parse_spec(spec_with(grid=[grid(method=["svd", "whiten-fd"], options={"alpha": [0.5, 1.0]})]))
    with pytest.raises(UserInputError, match=r"method 'whiten-fd' has no option 'beta'; its options: clamp, alpha, eps"):
        parse_spec(spec_with(grid=[grid(method=["whiten-fd"], options={"beta": [1]})]))
    with pytest.raises(UserInputError, match=r"option alpha must be a finite number >= 0"):
        parse_spec(spec_with(grid=[grid(method=["whiten-fd"], options={"alpha": [-1]})]))


def test_equal_method_configs_are_one_trial():
    """whiten-fd without alpha, with alpha 1.0 (the default) and with alpha 1 are the same trial."""
    spec = parse_spec(spec_with(grid=[grid(method=["whiten-fd"]), grid(method=["whiten-fd"], options={"alpha": [1.0]}),
                                      grid(method=["whiten-fd"], options={"alpha": [1, 0.5]})]))
    trials = expand(spec)
    assert sorted(str(t.options) for t in trials) == ["{'alpha': 0.5}", "{}"]
    assert [m.key for m in method_configs(spec)] == ["whiten-fd{}", 'whiten-fd{"alpha":0.5}']


def test_trial_ids_are_deterministic_and_depend_on_what_changes_results():
    spec = parse_spec(spec_with(grid=grid(ratio=[0.2, 0.4])))
    ids = [t.trial_id for t in expand(spec)]
    assert ids == [t.trial_id for t in expand(parse_spec(spec_with(grid=grid(ratio=[0.2, 0.4]))))]
    assert all(len(i) == 12 and int(i, 16) >= 0 for i in ids)
    # where results go and how many run at once do not change a trial
    moved = parse_spec(spec_with(grid=grid(ratio=[0.2, 0.4]), name="other", storage="elsewhere",
                                 resources={"cpu": 2, "max_concurrent": 1}))
    assert [t.trial_id for t in expand(moved)] == ids
    assert moved.spec_hash == spec.spec_hash
    # what a trial computes does
    tuned = parse_spec(spec_with(grid=grid(ratio=[0.2, 0.4]), finetune={"steps": 5}))
    assert not set(ids) & {t.trial_id for t in expand(tuned)}
    assert tuned.spec_hash != spec.spec_hash


def test_trial_config_is_plain_and_complete():
    spec = parse_spec(spec_with(calibration={"samples": 8, "batch_size": 2}, finetune={"steps": 3, "lr": 1e-4}))
    (trial,) = expand(spec)
    assert trial.method == "svd" and trial.ratio == 0.2 and trial.allocation == "uniform"
    assert trial.calibration == {"source": "packaged:lee", "samples": 8, "seq_len": 64, "batch_size": 2, "seed": 0}
    assert trial.task["train"] == "packaged:lee"  # finetuning text defaults to the calibration source
    assert trial.finetune["steps"] == 3 and trial.finetune["train"] == "all"
    plain = trial.to_dict()
    assert yaml.safe_load(yaml.safe_dump(plain)) == plain  # what travels through Tune: nothing but plain data
    assert TrialConfig.from_dict(plain) == trial and TrialConfig.from_dict({"trial": plain}).trial_id == trial.trial_id


def test_optuna_sweep_has_choices_and_no_grid_trials():
    spec = parse_spec(spec_with(grid=grid(method=["whiten", "whiten-fd"], ratio=[0.2, 0.5]),
                                optuna={"trials": 7, "objective": ["metric", "size"]}))
    assert expand(spec) == [] and trial_count(spec) == 7
    assert optuna_choices(spec) == {"method": ["whiten", "whiten-fd"], "ratio": [0.2, 0.5]}
    with_options = parse_spec(spec_with(grid=grid(method=["whiten-fd"], options={"alpha": [0.5, 1.0]}),
                                        optuna={"trials": 2}))
    assert optuna_choices(with_options)["option/alpha"] == [0.5, 1.0]


BAD = {
    "unknown top-level key": (spec_with(colour="red"), ["unknown key 'colour'", "allowed: name, model"]),
    "unknown nested key": (spec_with(finetune={"step": 3}), ["unknown key 'finetune.step'", "steps"]),
    "unknown grid key": (spec_with(grid={"methods": ["svd"], "ratio": [0.2]}), ["unknown key 'grid[0].methods'"]),
    "unknown method": (spec_with(grid=grid(method=["svd", "tucker"])),
                       ["grid[0].method", "'tucker'", "allowed: svd, fwsvd, whiten, whiten-fw, whiten-fd, id"]),
    "unknown allocation": (spec_with(grid=grid(allocation=["greedy"])),
                           ["grid[0].allocation", "'greedy'", "allowed: uniform, layer, type, spectrum, optuna"]),
    "ratio of 1": (spec_with(grid=grid(ratio=[0.2, 1.0])), ["grid[0].ratio", "outside (0, 1)"]),
    "ratio of 0": (spec_with(grid=grid(ratio=[0])), ["grid[0].ratio", "outside (0, 1)"]),
    "negative ratio": (spec_with(grid=grid(ratio=[-0.1])), ["grid[0].ratio", "outside (0, 1)"]),
    "empty grid list": (spec_with(grid=[]), ["grid", "empty"]),
    "empty grid block": (spec_with(grid={}), ["grid", "empty"]),
    "empty method list": (spec_with(grid=grid(method=[])), ["grid[0].method", "at least 1"]),
    "negative steps": (spec_with(finetune={"steps": -1}), ["finetune.steps", "greater than or equal to 0"]),
    "unknown scheme": (spec_with(model="s3:model"), ["model", "allowed: packaged:, hf:, path:, tiny:"]),
    "unknown packaged name": (spec_with(model="packaged:gpt5"), ["model", "packaged:smollm2-135m"]),
    "model where text goes": (spec_with(task={**BASE["task"], "eval": "packaged:minilm"}),
                              ["task.eval", "not a text source"]),
    "unknown tiny arch": (spec_with(model="tiny:t5"), ["model", "tiny:llama"]),
    "missing path": (spec_with(model="path:no/such/folder"), ["model", "no file or folder"]),
    "unknown task type": (spec_with(task={"type": "translation", "eval": "packaged:lee"}),
                          ["task", "allowed: causal-lm, classification"]),
    "missing model": ({k: v for k, v in BASE.items() if k != "model"}, ["model: missing"]),
    "bad name": (spec_with(name="my sweep"), ["name", "letters, digits"]),
    "optuna with other allocations": (spec_with(grid=grid(allocation=["optuna", "spectrum"]), optuna={"trials": 4}),
                                      ["grid.allocation", "['spectrum']", "Optuna drives the allocation"]),
    "optuna allocation without optuna": (spec_with(grid=grid(allocation=["optuna"])),
                                         ["grid.allocation", "needs an `optuna` section"]),
    "single objective over several budgets": (spec_with(grid=grid(ratio=[0.2, 0.4]), optuna={"trials": 4}),
                                              ["grid.ratio", "one budget"]),
    "unknown objective": (spec_with(optuna={"trials": 4, "objective": "size"}), ["optuna.objective", "[metric, size]"]),
    "bad optuna bounds": (spec_with(optuna={"trials": 4, "bounds": [0.6, 0.3]}), ["optuna.bounds", "lo < hi"]),
    "unknown sampler": (spec_with(optuna={"trials": 4, "sampler": "cmaes"}), ["optuna.sampler", "'tpe'"]),
    "both warmups": (spec_with(finetune={"steps": 5, "warmup_steps": 1, "warmup_ratio": 0.1}),
                     ["finetune", "exclusive"]),
    "early stopping without evaluations": (spec_with(finetune={"steps": 5, "early_stopping": {}}),
                                           ["finetune.early_stopping", "eval_every"]),
    "zero cpus": (spec_with(resources={"cpu": 0}), ["resources.cpu", "greater than 0"]),
    "calibration length differs on a shared source": (
        spec_with(calibration={"source": "packaged:lee", "seq_len": 32}), ["calibration.seq_len", "task.seq_len 64"]),
    "not a mapping": (["name", "t"], ["expected a mapping"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_names_the_field_and_what_is_allowed(case):
    data, expected = BAD[case]
    with pytest.raises(UserInputError) as info:
        parse_spec(data, origin="s.yaml")
    message = str(info.value)
    assert message.startswith("s.yaml: ")
    for part in expected:
        assert part in message, message


def test_path_sources_and_classification_defaults(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("some text\n\nmore text\n")
    spec = parse_spec(spec_with(task={"type": "causal-lm", "eval": f"path:{text}"}))
    assert spec.calibration_settings()["source"] == f"path:{text}"
    cls = parse_spec(spec_with(model="tiny:bert", task={"type": "classification", "train": "packaged:tweets"}))
    assert cls.task_settings()["eval"] == "packaged:tweets" and cls.metric_mode == "max"
    assert cls.calibration_settings()["seq_len"] == 128  # task.max_length


def test_resources_must_fit_the_machine():
    spec = parse_spec(spec_with(resources={"cpu": 1, "max_concurrent": 3}))
    check_resources(spec, cpus=3, gpus=0)
    with pytest.raises(UserInputError, match=r"resources.max_concurrent: 3 trials x 1 CPUs = 3 CPUs.*has 2.*<= 2"):
        check_resources(spec, cpus=2, gpus=0)
    with pytest.raises(UserInputError, match=r"resources.cpu: a trial asks for 4 CPUs"):
        check_resources(parse_spec(spec_with(resources={"cpu": 4})), cpus=2, gpus=0)
    with pytest.raises(UserInputError, match=r"resources.gpu"):
        check_resources(parse_spec(spec_with(resources={"gpu": 1})), cpus=2, gpus=0)


def test_load_spec_file_errors(tmp_path):
    with pytest.raises(UserInputError, match="does not exist"):
        load_spec(tmp_path / "missing.yaml")
    with pytest.raises(UserInputError, match="is a directory"):
        load_spec(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: t\ngrid: [unclosed\n")
    with pytest.raises(UserInputError, match=r"not valid YAML \(line \d+, column \d+\)"):
        load_spec(bad)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00name")
    with pytest.raises(UserInputError, match="cannot be read"):
        load_spec(binary)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(UserInputError, match="expected a mapping"):
        load_spec(empty)
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(BASE))
    assert load_spec(good).name == "t"
