"""A real Ray Tune sweep on a tiny model: grid trials (one of which fails), an Optuna study, and a
resumed run that reuses the cached calibration statistics."""

import json
import math
import pickle
import random
from pathlib import Path

import pandas as pd
import pytest
import ray

import sweeps.prepare as prepare
import sweeps.runner as runner
import trainables.trial
from sweeps.spec import parse_spec
from sweeps.table import COLUMNS
from sweeps.trials import expand

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """About 25k characters of text: enough 32-token windows of the byte-level tiny tokenizer."""
    rng = random.Random(0)
    words = ("the model layer rank low compress matrix weight sweep trial data token window small large "
             "fast value loss").split()
    docs = [" ".join(rng.choice(words) for _ in range(120)) + "." for _ in range(40)]
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text("\n\n".join(docs))
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Its own statistics cache and results root."""
    root = tmp_path_factory.mktemp("sweep")
    mp = pytest.MonkeyPatch()
    mp.setenv("LRSWEEP_CACHE", str(root / "cache"))
    yield root
    mp.undo()


def sweep(corpus, storage, name, **extra):
    data = {
        "name": name,
        "model": "tiny:llama",
        "task": {"type": "causal-lm", "eval": f"path:{corpus}", "seq_len": 32, "eval_windows": 4,
                 "train_windows": 16},
        "calibration": {"samples": 8, "batch_size": 4},
        "finetune": {"steps": 2, "batch_size": 2, "lr": 1e-3, "eval_every": 1},
        "resources": {"cpu": 1, "max_concurrent": 2},
        "latency": {"batch_size": 2, "seq_len": 32, "repeats": 3},
        "storage": str(storage),
        **extra,
    }
    return parse_spec(data)


GRID = [
    {"method": ["svd", "whiten-fd", "id"], "ratio": [0.3]},
    {"method": ["whiten-fd"], "ratio": [0.3], "allocation": ["spectrum"]},
    # the tiny model cannot lose 99% of its targeted parameters (every matrix keeps rank >= 1):
    # this trial fails, the others go on
    {"method": ["svd"], "ratio": [0.99]},
]


@pytest.fixture(scope="module")
def grid_run(ray_cluster, corpus, env):
    calls = []
    original = prepare.collect_stats

    def counting(*args, **kw):
        calls.append(1)
        return original(*args, **kw)

    mp = pytest.MonkeyPatch()
    mp.setattr(prepare, "collect_stats", counting)
    try:
        spec = sweep(corpus, env / "results", "grid", grid=GRID)
        out = runner.run_sweep(spec)
    finally:
        mp.undo()
    return spec, out, len(calls)


def test_every_column_of_the_table(grid_run):
    spec, out, _ = grid_run
    df = pd.read_parquet(f"{out.directory}/trials.parquet")
    assert list(df.columns) == list(COLUMNS)
    trials = {c.trial_id: c for c in expand(spec)}
    assert set(df["trial_id"]) == set(trials) | {"dense"}
    dense = df.set_index("trial_id").loc["dense"]
    ok = df[(df["status"] == "ok") & (df["method"] != "dense")]
    assert len(ok) == 4

    # the dense baseline row
    assert dense["method"] == "dense" and dense["status"] == "ok" and dense["target_ratio"] == 0
    assert dense["params_compressed"] == dense["params_dense"] > 0
    assert dense["metric_name"] == "perplexity" and 1 < dense["metric"] == dense["metric_dense"] < 400
    assert dense["size_mb"] == pytest.approx(dense["params_dense"] * 4 / 1e6)  # float32

    for row in ok.itertuples():
        config = trials[row.trial_id]
        assert (row.method, row.ratio, row.allocation) == (config.method, config.ratio, config.allocation)
        assert json.loads(row.options) == config.options and row.group_ratios == "{}"
        assert row.error == ""
        assert row.target_ratio == 0.3 and abs(row.achieved_ratio - 0.3) <= 0.01
        assert row.params_dense == dense["params_dense"] and row.params_compressed < row.params_dense
        assert row.size_mb == pytest.approx(row.params_compressed * 4 / 1e6)
        assert row.metric_name == "perplexity" and row.metric_dense == dense["metric"]
        assert 1 < row.metric_compressed < 1e4 and 1 < row.metric_finetuned < 1e4
        assert row.metric == row.metric_finetuned and row.finetune_steps == 2 and math.isfinite(row.finetune_loss)
        for col in ("seconds_decompose", "seconds_compress", "seconds_eval", "seconds_finetune"):
            assert getattr(row, col) > 0, col
        assert row.seconds_calibration == dense["seconds_calibration"] > 0  # shared, not per trial
        plan = json.loads(row.rank_plan)
        assert plan["method"] == row.method and plan["allocation"] == row.allocation and plan["ranks"]
        # the removed fraction recomputed from the plan itself
        removed = sum(plan["dense_params"][n] - plan["params"][n] for n in plan["ranks"])
        assert removed / sum(plan["dense_params"].values()) == pytest.approx(row.achieved_ratio)
    # `id` prunes whole neurons; the SVD family replaces matrices by factor pairs
    assert all(v is not None for v in json.loads(ok.set_index("method").loc["id", "rank_plan"])["ranks"].values())


def test_a_failing_trial_leaves_an_error_row(grid_run):
    _, out, _ = grid_run
    df = out.table
    failed = df[df["status"] == "error"]
    assert len(failed) == 1
    row = failed.iloc[0]
    assert row["ratio"] == 0.99 and "cannot be reached" in row["error"] and "UserInputError" in row["error"]
    assert pd.isna(row["metric"]) and pd.isna(row["params_compressed"])
    report = open(out.report).read()
    assert "## Errors" in report and row["trial_id"] in report and "## Best trial per ratio" in report
    assert (Path(out.directory) / "metric_vs_ratio.png").stat().st_size > 1000


def test_calibration_ran_once_and_is_shared(grid_run):
    _, out, calls = grid_run
    assert calls == 1
    assert not out.calibration_cached
    assert not hasattr(trainables.trial, "collect_stats")  # trials have no way to calibrate
    df = out.table
    assert df["calibration_key"].nunique() == 1 and df["calibration_key"].iloc[0] == out.calibration_key


def test_optuna_study_reuses_the_cached_statistics(grid_run, corpus, env, monkeypatch):
    _, grid_out, _ = grid_run
    monkeypatch.setattr(prepare, "collect_stats", lambda *a, **k: pytest.fail("statistics recomputed"))
    spec = sweep(corpus, env / "results", "optuna",
                 grid={"method": ["whiten-fd", "svd"], "ratio": [0.3], "allocation": ["optuna"]},
                 optuna={"trials": 3, "granularity": "role", "bounds": [0.1, 0.7], "sampler": "random"})
    out = runner.run_sweep(spec)
    assert out.calibration_cached and out.calibration_key == grid_out.calibration_key
    df = out.table
    trials = df[df["method"] != "dense"]
    assert len(trials) == 3 and set(trials["status"]) == {"ok"} and set(trials["allocation"]) == {"optuna"}
    roles = {"q", "k", "v", "o", "gate", "up", "down"}
    for row in trials.itertuples():
        chosen = json.loads(row.group_ratios)
        assert set(chosen) == roles and all(0.1 <= v <= 0.7 for v in chosen.values())
        assert abs(row.achieved_ratio - 0.3) <= 0.01  # rescaled to the budget
    assert trials["trial_id"].nunique() == 3


def test_a_resumed_optuna_study_goes_on_from_its_saved_state(grid_run, corpus, env, caplog, tmp_path):
    """The last trial of a finished study is dropped from the table, as if the driver had died
    while it ran, and a malicious .pkl file is planted where Tune keeps its searcher state (and its
    own Tuner): --resume keeps the other trials, runs nothing from the planted files, goes on with
    the study from its Optuna journal, and runs one trial to reach the study's size."""
    import optuna

    from sweeps.study import JOURNAL_FILE, read_study

    spec = sweep(corpus, env / "results", "optuna-resume",
                 grid={"method": ["whiten-fd"], "ratio": [0.3], "allocation": ["optuna"]},
                 optuna={"trials": 3, "granularity": "role", "bounds": [0.1, 0.7], "sampler": "tpe"})
    first = runner.run_sweep(spec).table
    folder = Path(env / "results" / "optuna-resume")
    assert (folder / JOURNAL_FILE).is_file() and not list(folder.glob("searcher-state-*.pkl"))
    before = read_study(str(folder)).trials
    assert [t.state for t in before] == [optuna.trial.TrialState.COMPLETE] * 3
    dropped = first.iloc[-1]["trial_id"]
    first[first["trial_id"] != dropped].to_parquet(folder / "trials.parquet", index=False)
    marker = tmp_path / "payload-ran"
    payload = pickle.dumps(_Payload(str(marker)))
    for name in ("searcher-state-2026-01-01_00-00-00.pkl", "tuner.pkl"):
        (folder / name).write_bytes(payload)
    with caplog.at_level("INFO", logger="lrsweep"):
        out = runner.run_sweep(spec, resume=True)
    assert not marker.exists()
    lines = caplog.messages
    assert "resume: keeping 2 finished trial(s)" in " ".join(lines)
    assert any(line.startswith("resume: the Optuna study goes on from its journal") and "(3 finished" in line
               for line in lines)
    trials = out.table[out.table["method"] != "dense"]
    assert len(trials) == 3 and trials["trial_id"].is_unique and set(trials["status"]) == {"ok"}
    kept = first[(first["trial_id"] != dropped) & (first["method"] != "dense")]
    assert set(kept["trial_id"]) < set(trials["trial_id"])
    # the study went on: its first three trials are the ones it had, the new one is its fourth
    after = read_study(str(folder)).trials
    assert len(after) == 4 and after[3].state == optuna.trial.TrialState.COMPLETE
    assert [t.params for t in after[:3]] == [t.params for t in before]
    assert not marker.exists()


class _Payload:
    """Unpickling this runs code: it writes `marker`."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('unpickled')",)


def test_resume_keeps_finished_trials_and_reuses_the_statistics(grid_run, monkeypatch):
    spec, first, _ = grid_run
    monkeypatch.setattr(prepare, "collect_stats", lambda *a, **k: pytest.fail("statistics recomputed"))
    out = runner.run_sweep(spec, resume=True)
    assert out.calibration_cached
    before = first.table.set_index("trial_id")
    after = out.table.set_index("trial_id")
    ok = before.index[(before["status"] == "ok") & (before["method"] != "dense")]
    pd.testing.assert_frame_equal(after.loc[ok], before.loc[ok])
    # the failed trial ran again (and failed again)
    assert after.loc[before.index[before["status"] == "error"], "status"].tolist() == ["error"]
