"""Limits of a sweep (time budget, trial timeout, retries, memory guard for the statistics), which
errors a trial hands to Tune for a retry, and what a trial reads of the statistics. No Ray."""

import copy
from pathlib import Path

import pytest
import torch
import yaml
from tiny_models import tiny_batches, tiny_model

from compression.apply import compress, decompose_model, plan_ranks
from compression.calibration import collect_stats, estimate_stats_bytes
from compression.errors import UserInputError
from sweeps import prepare, runner, shared, tuning
from sweeps.cli import main
from sweeps.spec import parse_spec
from trainables import trial

BASE = {
    "name": "t",
    "model": "tiny:llama",
    "task": {"type": "causal-lm", "eval": "packaged:lee", "seq_len": 32, "eval_windows": 2},
    "calibration": {"samples": 2, "batch_size": 2},
    "grid": {"method": ["svd"], "ratio": [0.2]},
    "resources": {"cpu": 1, "max_concurrent": 1},
}


def spec(**limits):
    return parse_spec({**BASE, "limits": limits})


def test_limits_defaults_and_values():
    s = parse_spec(BASE)
    assert (s.limits.sweep_seconds, s.limits.trial_seconds, s.limits.stats_memory_gb, s.limits.retries) == \
        (None, None, None, 2)
    s = spec(sweep_seconds=3600, trial_seconds=600, stats_memory_gb=0.5, retries=0)
    assert (s.limits.sweep_seconds, s.limits.trial_seconds, s.limits.stats_memory_gb, s.limits.retries) == \
        (3600, 600, 0.5, 0)


def test_limits_change_neither_the_sweep_hash_nor_the_trial_ids():
    from sweeps.trials import expand

    plain, limited = parse_spec(BASE), spec(sweep_seconds=10, trial_seconds=5, retries=0)
    assert plain.spec_hash == limited.spec_hash
    assert [c.trial_id for c in expand(plain)] == [c.trial_id for c in expand(limited)]


@pytest.mark.parametrize("limits, field", [
    ({"sweep_seconds": 0}, "limits.sweep_seconds"),
    ({"trial_seconds": -5}, "limits.trial_seconds"),
    ({"stats_memory_gb": 0}, "limits.stats_memory_gb"),
    ({"retries": -1}, "limits.retries"),
    ({"retries": 1.5}, "limits.retries"),
    ({"timeout": 5}, "limits.timeout"),
])
def test_bad_limits_name_their_field(limits, field):
    with pytest.raises(UserInputError, match=field.replace(".", r"\.")):
        spec(**limits)


def test_unknown_limit_lists_the_allowed_keys():
    with pytest.raises(UserInputError, match="allowed: sweep_seconds, trial_seconds, stats_memory_gb, retries"):
        spec(memory=1)


# -- memory guard ---------------------------------------------------------------------------------


def test_memory_guard_reports_and_passes_under_the_limit(caplog):
    model = tiny_model("llama")
    need = estimate_stats_bytes(model, gradients=False)  # the sweep's only method, svd, reads no Fisher
    with caplog.at_level("INFO", logger="lrsweep"):
        assert prepare.check_stats_memory(spec(stats_memory_gb=1.0), model) == need
    assert "calibration statistics:" in caplog.messages[0] and "estimated" in caplog.messages[0]


def test_memory_guard_default_is_half_the_available_memory(monkeypatch):
    model = tiny_model("llama")
    need = estimate_stats_bytes(model, gradients=False)
    monkeypatch.setattr(prepare, "available_memory", lambda: 2 * need + 2)
    prepare.check_stats_memory(spec(), model)
    monkeypatch.setattr(prepare, "available_memory", lambda: 2 * need - 2)
    with pytest.raises(UserInputError, match="half the memory available"):
        prepare.check_stats_memory(spec(), model)


def test_the_estimate_is_what_calibration_returns():
    model = tiny_model("llama")
    stats = collect_stats(model, tiny_batches(model, n_batches=1), progress=False)
    assert estimate_stats_bytes(model) == stats.nbytes()


def test_calibrate_over_the_limit_fails_up_front_with_exit_2(tmp_path, monkeypatch, capsys):
    """The estimate is printed, nothing is evaluated or calibrated, nothing is written."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LRSWEEP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(prepare, "collect_stats", lambda *a, **k: pytest.fail("statistics computed"))
    monkeypatch.setattr(prepare, "evaluate", lambda *a, **k: pytest.fail("dense model evaluated"))
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({**BASE, "limits": {"stats_memory_gb": 1e-6}}))
    code = main(["calibrate", str(path)])
    out, err = capsys.readouterr()
    assert code == 2
    assert "calibration statistics:" in out and "estimated" in out
    assert err.startswith("lrsweep: error: limits.stats_memory_gb:") and "Traceback" not in err
    assert not (tmp_path / "cache" / "calibration").exists() and not (tmp_path / "results").exists()


def test_validate_prints_the_limits(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({**BASE, "limits": {"sweep_seconds": 7200, "trial_seconds": 900}}))
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert "limits: sweep 7200 s, trial 900 s, calibration statistics half the available memory, 2 retries" in out


# -- failures: retried by Tune, or an error row at once ----------------------------------------------


@pytest.mark.parametrize("error, retried", [
    (UserInputError("rank plan cannot be met"), False),
    (ValueError("a bug"), False),
    (RuntimeError("a bug"), False),
    (torch.OutOfMemoryError("CUDA out of memory"), True),
    (MemoryError(), True),
    (OSError("storage unreachable"), True),
    (ConnectionError("hub"), True),
    (TimeoutError(), True),
])
def test_which_errors_are_retried(error, retried):
    assert trial.retryable(error) is retried


def test_ray_errors_are_retried():
    import ray.exceptions

    assert trial.retryable(ray.exceptions.ObjectLostError("00" * 28, "owner", "call site"))


def _config():
    from sweeps.trials import expand

    return expand(parse_spec(BASE))[0]


def _shared():
    return trial.Shared(stats=None, methods={}, decompositions={}, data=None)


def test_a_deterministic_error_becomes_an_error_row(monkeypatch):
    reports = []
    monkeypatch.setattr(trial.tune, "report", lambda result, checkpoint=None: reports.append(result))
    monkeypatch.setattr(trial, "_run", lambda *a: (_ for _ in ()).throw(UserInputError("no such rank")))
    trial.trainable({"trial": _config().to_dict()}, _shared())
    assert len(reports) == 1
    assert (reports[0]["status"], reports[0]["error"], reports[0]["trial_id"]) == \
        ("error", "UserInputError: no such rank", _config().trial_id)


def test_a_transient_error_goes_to_tune(monkeypatch):
    monkeypatch.setattr(trial.tune, "report", lambda *a, **k: pytest.fail("reported an error row"))
    monkeypatch.setattr(trial, "_run", lambda *a: (_ for _ in ()).throw(torch.OutOfMemoryError("CUDA out of memory")))
    with pytest.raises(torch.OutOfMemoryError):
        trial.trainable({"trial": _config().to_dict()}, _shared())


# -- what trials read of the statistics -------------------------------------------------------------


@pytest.mark.parametrize("method, allocation", [("whiten-fd", "layer"), ("whiten", "type"), ("id", "uniform")])
def test_trials_plan_and_compress_the_same_without_grams(method, allocation):
    model = tiny_model("llama")
    batches = tiny_batches(model)
    stats = collect_stats(model, batches, progress=False)
    light = shared.trial_stats(stats)
    assert not light.grams and not light.row_fisher and light.nbytes() < stats.nbytes() / 10
    decs = decompose_model(model, stats, method)
    full_plan = plan_ranks(model, stats, method, 0.4, allocation, decs)
    light_plan = plan_ranks(model, light, method, 0.4, allocation, decs)
    assert light_plan.ranks == full_plan.ranks
    a = compress(copy.deepcopy(model), stats, method, full_plan, decs)
    b = compress(copy.deepcopy(model), light, method, light_plan, decs)
    batch = {k: v for k, v in batches[0].items() if k != "labels"}
    with torch.no_grad():
        assert torch.equal(a(**batch).logits, b(**batch).logits)


def test_example_cluster_sweep_sets_limits():
    from sweeps.spec import load_spec

    s = load_spec(Path(__file__).resolve().parents[1] / "sweeps" / "examples" / "llama-cluster.yaml")
    assert s.limits.sweep_seconds and s.limits.trial_seconds and s.limits.retries >= 1


# -- a Tune run stopped by Ray's memory monitor -------------------------------------------------


class _StoppedByMemoryMonitor:
    """A Tuner whose run stops as Tune 2.60's does when Ray's memory monitor kills a trial's worker."""

    def fit(self):
        import ray.exceptions

        try:
            raise ray.exceptions.OutOfMemoryError("1 worker(s) were killed due to the node running low on memory.\n...")
        except ray.exceptions.OutOfMemoryError as e:
            raise RuntimeError(f"Caught unexpected exception: {e}") from e


def test_a_trial_killed_by_the_memory_monitor_past_its_retries_is_recorded_failed(tmp_path, monkeypatch, caplog):
    """Each stopped Tune run counts one failed attempt for the trials that were running; with
    retries = 1 the second kill records the trial as failed, and no Tuner is started for it again."""
    from types import SimpleNamespace

    from sweeps.table import ResultsTable
    from trainables.contract import TrialRow

    s = spec(retries=1)
    config = _config()
    victim = SimpleNamespace(trial_id="tune-1", config={"trial": config.to_dict()}, last_result=None)
    table = ResultsTable(str(tmp_path), [TrialRow(trial_id="dense", method="dense", status="ok")])
    started = []

    def fake_tuner(spec_, prepared, shared_, directory, table_, final, time_budget=None, journal=None,
                   callbacks=None):
        if any(r.trial_id == config.trial_id for r in final):
            return None  # what make_tuner does when every trial has a row
        callback = tuning.ResultsCallback(table_, 1)
        callback.running = {victim.trial_id: victim}
        started.append(1)
        return _StoppedByMemoryMonitor(), callback

    monkeypatch.setattr(runner, "make_tuner", fake_tuner)
    with caplog.at_level("INFO", logger="lrsweep"):
        faults = runner.run_trials(s, None, None, str(tmp_path), table, None)
    assert len(started) == 2 and faults.restarts == 2 and faults.retried == 1
    row = table.rows[config.trial_id]
    assert row.status == "error"
    assert row.error == "1 worker(s) were killed due to the node running low on memory. (2 attempts)"
    assert "Tune started again 2 time(s)" in faults.describe()
    assert sum("Tune stopped: 1 worker(s) were killed" in line for line in caplog.messages) == 2


def test_other_errors_of_a_tune_run_are_not_swallowed(tmp_path, monkeypatch):
    from sweeps.table import ResultsTable

    class Broken:
        def fit(self):
            raise RuntimeError("a bug in a callback")

    table = ResultsTable(str(tmp_path), [])
    monkeypatch.setattr(runner, "make_tuner", lambda *a, **k: (Broken(), tuning.ResultsCallback(table, 1)))
    with pytest.raises(RuntimeError, match="a bug in a callback"):
        runner.run_trials(spec(), None, None, str(tmp_path), table, None)
