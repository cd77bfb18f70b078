"""The `lrsweep` command line: each bad input exits 2 with one message, no traceback, nothing
started and nothing written."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sweeps import __version__
from sweeps.cli import main
from sweeps.storage import SWEEP_FILE

GOOD = {
    "name": "t",
    "model": "tiny:llama",
    "task": {"type": "causal-lm", "eval": "packaged:lee", "seq_len": 64, "eval_windows": 4},
    "grid": {"method": ["svd", "whiten"], "ratio": [0.2, 0.4]},
    "resources": {"cpu": 1, "max_concurrent": 1},
}


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """An empty current directory; results would land in ./results."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write(path: Path, data) -> str:
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return str(path)


def with_(**changes):
    return {**GOOD, **changes}


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_version_and_sources(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"lrsweep {__version__}"
    code, out, _ = run_cli(capsys, "sources")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["source", "kind", "installed"]
    for name in ("packaged:smollm2-135m", "packaged:wiki", "packaged:lee", "packaged:tweets", "tiny:llama"):
        assert any(line.startswith(name + " ") for line in lines), name


def test_validate_prints_the_plan_and_writes_nothing(capsys, workdir):
    sweep = write(workdir / "s.yaml", GOOD)
    code, out, err = run_cli(capsys, "validate", sweep)
    assert code == 0, err
    assert "sweep t: 4 trial(s) on tiny:llama (causal-lm)" in out
    rows = [line.split() for line in out.splitlines() if line.split()[1:2] in (["svd"], ["whiten"])]
    assert sorted((r[1], r[3]) for r in rows) == [("svd", "0.20"), ("svd", "0.40"), ("whiten", "0.20"),
                                                  ("whiten", "0.40")]
    assert files_under(workdir) == {"s.yaml"}


def test_quickstart_is_the_packaged_example(capsys, workdir):
    from sweeps.cli import quickstart_file

    code, out, _ = run_cli(capsys, "validate", quickstart_file())
    assert code == 0 and "sweep quickstart: 20 trial(s) on packaged:smollm2-135m" in out
    assert files_under(workdir) == set()


def test_validate_optuna_sweep(capsys, workdir):
    sweep = write(workdir / "s.yaml", with_(grid={"method": ["whiten-fd"], "ratio": [0.3], "allocation": ["optuna"]},
                                            optuna={"trials": 5, "granularity": "role"}))
    code, out, _ = run_cli(capsys, "validate", sweep)
    assert code == 0
    assert "5 trial(s)" in out and "one ratio per role" in out


BAD_FILES = {
    "invalid yaml": ("name: t\ngrid: [svd\n", "not valid YAML"),
    "unknown key": (with_(colour="red"), "unknown key 'colour'"),
    "unknown method": (with_(grid={"method": ["tucker"], "ratio": [0.2]}), "unknown method 'tucker'"),
    "unknown allocation": (with_(grid={"method": ["svd"], "ratio": [0.2], "allocation": ["best"]}),
                           "unknown allocation 'best'"),
    "unknown source": (with_(model="packaged:gpt5"), "'packaged:gpt5' is unknown"),
    "ratio outside (0, 1)": (with_(grid={"method": ["svd"], "ratio": [1.5]}), "outside (0, 1)"),
    "empty grid": (with_(grid=[]), "grid: the grid is empty"),
    "negative steps": (with_(finetune={"steps": -3}), "finetune.steps"),
    "too many concurrent trials": (with_(resources={"cpu": 1, "max_concurrent": 4096}), "resources.max_concurrent"),
    "optuna with other allocations": (
        with_(grid={"method": ["svd"], "ratio": [0.2], "allocation": ["uniform", "optuna"]}, optuna={"trials": 3}),
        "Optuna drives the allocation"),
}


@pytest.mark.parametrize("command", ["validate", "run"])
@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_input_exits_2_with_one_message(capsys, workdir, command, case):
    import ray

    data, expected = BAD_FILES[case]
    sweep = write(workdir / "s.yaml", data)
    code, out, err = run_cli(capsys, command, sweep)
    assert code == 2
    assert err.startswith("lrsweep: error: ") and expected in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert files_under(workdir) == {"s.yaml"}
    assert not ray.is_initialized()


@pytest.mark.parametrize("command", ["validate", "run", "calibrate"])
def test_missing_and_unreadable_files(capsys, workdir, monkeypatch, command):
    code, _, err = run_cli(capsys, command, str(workdir / "nope.yaml"))
    assert code == 2 and "does not exist" in err and "Traceback" not in err
    sweep = write(workdir / "s.yaml", GOOD)

    def denied(self, *args, **kw):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_text", denied)
    code, _, err = run_cli(capsys, command, sweep)
    assert code == 2 and "cannot be read" in err and "Permission denied" in err and "Traceback" not in err
    assert files_under(workdir) == {"s.yaml"}


def test_calibrate_computes_once_then_reuses(capsys, workdir, monkeypatch):
    monkeypatch.setenv("LRSWEEP_CACHE", str(workdir / "cache"))
    corpus = workdir / "corpus.txt"
    corpus.write_text("\n\n".join(f"document {i}: " + "some words of text " * 20 for i in range(20)))
    sweep = write(workdir / "s.yaml", with_(task={"type": "causal-lm", "eval": f"path:{corpus}", "seq_len": 32,
                                                  "eval_windows": 2}, calibration={"samples": 4, "batch_size": 2}))
    code, out, err = run_cli(capsys, "calibrate", sweep)
    assert code == 0, err
    path = Path(out.strip().splitlines()[-1].removeprefix("statistics: "))
    assert path.is_file() and path.parent == workdir / "cache" / "calibration"
    assert "saved to" in out
    code, out, _ = run_cli(capsys, "calibrate", sweep)
    assert code == 0 and "calibration: reused" in out
    assert not (workdir / "results").exists()  # calibrating writes only the cache


def test_a_different_sweep_under_the_same_name_needs_resume(capsys, workdir):
    stored = workdir / "results" / "t"
    stored.mkdir(parents=True)
    (stored / SWEEP_FILE).write_text(json.dumps({"name": "t", "spec_hash": "0" * 64}))
    before = files_under(workdir)
    sweep = write(workdir / "s.yaml", GOOD)
    for command in ("validate", "run"):
        code, _, err = run_cli(capsys, command, sweep)
        assert code == 2 and "already holds a different sweep named 't'" in err and "--resume" in err
    assert files_under(workdir) == before | {"s.yaml"}
    code, out, _ = run_cli(capsys, "validate", sweep, "--resume")
    assert code == 0 and "holds this sweep already" in out
    # another name or storage is another sweep
    assert run_cli(capsys, "validate", sweep, "--name", "t2")[0] == 0
    assert run_cli(capsys, "validate", sweep, "--storage", str(workdir / "elsewhere"))[0] == 0
    code, _, err = run_cli(capsys, "validate", sweep, "--name", "../up")
    assert code == 2 and "--name '../up'" in err


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["run"])
    assert info.value.code == 2
    assert "lrsweep run: error: the following arguments are required: FILE" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code == 2


def test_console_script_prints_no_traceback(workdir):
    """The installed entry point, end to end in a fresh process."""
    sweep = write(workdir / "s.yaml", with_(grid={"method": ["svd"], "ratio": [2]}))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-m", "sweeps.cli", "validate", sweep], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.startswith("lrsweep: error: ") and "grid[0].ratio" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert files_under(workdir) == {"s.yaml"}
