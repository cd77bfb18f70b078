"""Nothing the tool reads runs code, and mistakes are found early and said clearly: a test for each
hardening the tool got. Bad inputs of every kind (sweep files, sources, storage, state files,
exports, flags) are in test_bad_inputs.py; a planted .pkl file on resume in test_sweep_e2e.py;
Ctrl-C while Ray starts in test_faults.py."""

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import load, load_file
from tiny_models import tiny_config
from transformers import AutoModelForCausalLM

import sweeps.cli as cli
from compression.errors import UserInputError
from compression.io import load_compressed, save_compressed
from compression.layers import LowRankLinear
from compression.targets import dense_weight, find_targets
from sweeps import tuning
from sweeps.table import ResultsTable
from trainables.contract import TrialRow
from trainables.sources import load_model
from trainables.sources.tiny import byte_tokenizer

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def one_low_rank_layer(model) -> None:
    target = find_targets(model)[0]
    old = model.get_submodule(target.name)
    U, S, Vh = torch.linalg.svd(dense_weight(old).detach(), full_matrices=False)
    model.set_submodule(target.name, LowRankLinear.from_factors(U[:, :8] * S[:8], Vh[:8], old.bias))


def exported(arch: str, folder: Path) -> Path:
    """A tiny causal LM of `arch` with one low-rank layer, saved with a byte-level tokenizer."""
    tokenizer = byte_tokenizer("llama" if arch == "gemma3" else arch)
    config = tiny_config(arch)
    config.update({"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
                   "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    one_low_rank_layer(model)
    return save_compressed(model, folder, tokenizer=tokenizer)


def add_code(folder: Path, file: str, auto_map: dict, marker: Path) -> None:
    """Give a model folder Python code of its own, named by `auto_map` in `file`; importing it
    writes `marker`."""
    data = json.loads((folder / file).read_text()) if (folder / file).exists() else {}
    (folder / file).write_text(json.dumps({**data, "auto_map": auto_map}))
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                    "class Evil:\n    pass\n")


# -- foreign code ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("file", ["config.json", "tokenizer_config.json"])
def test_a_model_folder_with_code_of_its_own_is_refused_by_name(tmp_path, file):
    loaded = load_model("tiny:llama")
    folder = tmp_path / "model"
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    marker = tmp_path / "ran"
    auto_map = {"AutoTokenizer": ["evil.Evil", None]} if file == "tokenizer_config.json" else \
        {"AutoConfig": "evil.Evil", "AutoModelForCausalLM": "evil.Evil"}
    add_code(folder, file, auto_map, marker)
    with pytest.raises(UserInputError) as e:
        load_model(f"path:{folder}")
    assert str(folder) in str(e.value) and f"{file} has auto_map" in str(e.value) and "evil.Evil" in str(e.value)
    assert not marker.exists()


def test_an_export_with_code_is_refused_without_a_prompt(tmp_path):
    """A fresh process with stdin open and never written to: a prompt on stdin would wait until the
    timeout; the refusal is immediate."""
    path = exported("llama", tmp_path / "m")
    marker = tmp_path / "ran"
    add_code(path, "tokenizer_config.json", {"AutoTokenizer": ["evil.Evil", None]}, marker)
    proc = subprocess.run([sys.executable, "-m", "sweeps.cli", "generate", str(path), "hello"], stdin=subprocess.PIPE,
                          capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("lrsweep: error: ") and "auto_map" in proc.stderr and "Traceback" not in proc.stderr
    assert not marker.exists()
    with pytest.raises(UserInputError, match="needs its own Python code"):
        load_compressed(path)
    assert not marker.exists()


def test_the_code_unpickles_nothing_and_trusts_no_remote_code():
    forbidden = re.compile(r"pickle|torch\.load|joblib|trust_remote_code=True|\binput\(")
    hits = [f"{path.relative_to(ROOT)}:{n}" for package in ("compression", "trainables", "sweeps")
            for path in sorted((ROOT / package).rglob("*.py"))
            for n, line in enumerate(path.read_text().splitlines(), 1) if forbidden.search(line)]
    assert hits == []


# -- storage before any work ------------------------------------------------------------------------------


@pytest.mark.parametrize("storage, says", [("results", "is a file, not a folder"),
                                           ("/proc/lrsweep", "cannot be written"),
                                           ("results/" + "x" * 300, "300 bytes long")])
def test_run_checks_the_storage_before_loading_anything(tmp_path, monkeypatch, capsys, storage, says):
    monkeypatch.chdir(tmp_path)
    if storage == "results":
        (tmp_path / "results").write_text("a file")
    sweep = {"name": "t", "model": "tiny:llama", "task": {"type": "causal-lm", "eval": "packaged:lee"},
             "grid": {"method": ["svd"], "ratio": [0.2]}, "resources": {"cpu": 1}, "storage": storage}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(sweep))
    monkeypatch.setattr("sweeps.runner.prepare", lambda *a, **k: pytest.fail("the model was loaded"))
    for command in ("validate", "run"):
        assert cli.main([command, "s.yaml"]) == 2
        assert says in capsys.readouterr().err


# -- state files ----------------------------------------------------------------------------------------


@pytest.fixture
def calibrating(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LRSWEEP_CACHE", str(tmp_path / "cache"))
    (tmp_path / "corpus.txt").write_text("\n\n".join(f"document {i}: " + "some words of text " * 20 for i in range(20)))
    sweep = {"name": "t", "model": "tiny:llama", "resources": {"cpu": 1},
             "task": {"type": "causal-lm", "eval": "path:corpus.txt", "seq_len": 32, "eval_windows": 2},
             "calibration": {"samples": 4, "batch_size": 2}, "grid": {"method": ["svd"], "ratio": [0.2]}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(sweep))
    return tmp_path / "cache" / "calibration"


def test_a_corrupt_calibration_cache_is_computed_again(calibrating, capsys):
    assert cli.main(["calibrate", "s.yaml"]) == 0
    path = Path(capsys.readouterr().out.strip().splitlines()[-1].removeprefix("statistics: "))
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])
    assert cli.main(["calibrate", "s.yaml"]) == 0
    out = capsys.readouterr().out
    assert f"the cached calibration statistics {path} cannot be used" in out and "computed again" in out
    assert "saved to" in out
    again, before = load_file(path), load(good)  # the same statistics, whole again
    assert again.keys() == before.keys() and all(torch.equal(again[k], before[k]) for k in before)
    assert sorted(p.name for p in calibrating.iterdir()) == sorted([path.name, path.with_suffix(".json").name])


def test_cache_files_are_written_whole_or_not_at_all(calibrating, monkeypatch, capsys):
    def interrupted(*args, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr("os.replace", interrupted)
    assert cli.main(["calibrate", "s.yaml"]) == 130
    assert not calibrating.exists() or list(calibrating.iterdir()) == []


# -- exported models ------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt", "gemma3"])
def test_generate_runs_every_causal_architecture(arch, tmp_path, capsys):
    path = exported(arch, tmp_path / arch)
    assert cli.main(["generate", str(path), "hello", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.startswith("hello")
    assert cli.main(["classify", str(path), "hello"]) == 2
    assert "not a sequence classifier" in capsys.readouterr().err


# -- the command line -----------------------------------------------------------------------------------


def test_the_help_lists_every_exit_status(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    for code in (cli.EXIT_USER_ERROR, cli.UNFINISHED, cli.ALL_FAILED, cli.INTERRUPTED, cli.BROKEN_PIPE):
        assert re.search(rf"^  {code} +\S", out, re.MULTILINE), code


def test_a_sweep_whose_every_trial_failed_has_its_own_exit_status(tmp_path, monkeypatch, capsys):
    rows = [TrialRow(trial_id="dense", status="ok", method="dense", metric_name="perplexity", metric=10.0),
            TrialRow(trial_id="a", status="error", method="svd", error="boom"),
            TrialRow(trial_id="b", status="error", method="svd", error="boom")]
    table = ResultsTable(str(tmp_path), rows).frame()
    result = SimpleNamespace(table=table, directory=str(tmp_path), report=str(tmp_path / "report.md"),
                             timing=SimpleNamespace(describe=lambda: "0 s"),
                             faults=SimpleNamespace(retried=0, restarts=0, unfinished=0))
    monkeypatch.setattr("sweeps.runner.run_sweep", lambda *a, **k: result)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"name": "t", "model": "tiny:llama", "resources": {"cpu": 1},
                                                     "task": {"type": "causal-lm", "eval": "packaged:lee"},
                                                     "grid": {"method": ["svd"], "ratio": [0.2]}}))
    assert cli.main(["run", "s.yaml"]) == cli.ALL_FAILED
    assert "every trial of the sweep failed (2)" in capsys.readouterr().err
    result.table.loc[1, "status"] = "ok"
    assert cli.main(["run", "s.yaml"]) == 0


def test_a_reader_that_goes_away_ends_the_command_quietly(tmp_path):
    rows = [TrialRow(trial_id=f"t{i:03d}", status="ok", method="svd", allocation="uniform", ratio=0.2,
                     target_ratio=0.2, metric_name="perplexity", metric=float(i)) for i in range(400)]
    ResultsTable(str(tmp_path / "a"), rows).write()
    proc = subprocess.Popen([sys.executable, "-m", "sweeps.cli", "compare", str(tmp_path / "a"), str(tmp_path / "a")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    proc.stdout.close()  # `| head` that has read enough
    err = proc.stderr.read()
    assert proc.wait(timeout=300) == cli.BROKEN_PIPE
    assert "Traceback" not in err and "Exception ignored" not in err and err == ""


# -- Tune's side ------------------------------------------------------------------------------------------


def test_a_trial_cut_by_an_interrupt_is_labelled_so(tmp_path, caplog):
    from sweeps.spec import parse_spec
    from sweeps.trials import expand

    config = expand(parse_spec({"name": "t", "model": "tiny:llama", "task": {"type": "causal-lm", "eval": "packaged:lee"},
                                "grid": {"method": ["svd"], "ratio": [0.2]}}))[0]
    table = ResultsTable(str(tmp_path), [])
    callback = tuning.ResultsCallback(table, 1)
    result = TrialRow.for_trial(config, status="running", metric=10.0, metric_compressed=10.0,
                                achieved_ratio=0.2).to_dict()
    cut = SimpleNamespace(trial_id="tune-1", last_result=result | {"stage": "finetune"}, config=config.to_dict())
    callback.trials = [cut]
    with caplog.at_level("INFO", logger="lrsweep"):
        assert callback.record_unfinished("interrupted") == 1
    assert "(stopped early: interrupted; --resume runs it again)" in caplog.messages[-1]
    assert "ASHA" not in caplog.messages[-1]


def test_tune_does_not_advise_tuner_restore():
    tuning._quiet_restore_advice()
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    tune_log = logging.getLogger("ray.tune.tune")
    tune_log.addHandler(handler)
    try:
        tune_log.warning("Experiment has been interrupted, but the most recent state was saved.\n"
                         "Resume experiment with: Tuner.restore(path=..., trainable=...)")
        tune_log.warning("another warning")
    finally:
        tune_log.removeHandler(handler)
    assert seen == ["another warning"]


def test_a_uri_storage_keeps_its_optuna_journal_in_the_bucket(tmp_path, monkeypatch):
    """file:// stands for a bucket: the journal lives in the local cache and is copied whole to the
    storage, where a resume (on any machine: an empty cache here) finds it."""
    import optuna

    from sweeps.study import JOURNAL_FILE, Journal, read_study

    bucket = f"file://{tmp_path / 'bucket'}/sweep"
    monkeypatch.setenv("LRSWEEP_CACHE", str(tmp_path / "cache"))
    journal = Journal(bucket, "s").open(fresh=True)
    study = optuna.create_study(study_name="s", storage=journal.storage)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)
    journal.publish()
    assert (tmp_path / "bucket" / "sweep" / JOURNAL_FILE).is_file()
    assert journal.path.is_relative_to(tmp_path / "cache")
    monkeypatch.setenv("LRSWEEP_CACHE", str(tmp_path / "another-machine"))
    again = Journal(bucket, "s").open(fresh=False)
    assert again.trials() == 3 and len(read_study(bucket).trials) == 3
    Journal(bucket, "s").open(fresh=True).publish()
    assert read_study(bucket) is None


# -- Ctrl-C ---------------------------------------------------------------------------------------------


@pytest.fixture
def python_sigint():
    """Python's own SIGINT handler for the test (a shell that starts pytest in the background
    ignores SIGINT), and the original one back afterwards."""
    original = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, original)


def test_a_ctrl_c_while_ray_starts_is_raised_when_it_is_up(python_sigint):
    from sweeps import interrupts

    steps = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts.deferred():
            os.kill(os.getpid(), signal.SIGINT)  # arrives while "Ray starts"
            steps.append("the startup went on to its end")
    assert steps == ["the startup went on to its end"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with interrupts.deferred():
        pass  # no Ctrl-C: nothing raised


def test_the_sigint_handler_tune_leaves_behind_is_removed(python_sigint):
    from sweeps import interrupts

    with interrupts.handler_kept():
        signal.signal(signal.SIGINT, lambda *a: None)  # what a Tune run installs and leaves
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)  # the handler runs at the next bytecode
        time.sleep(1)
