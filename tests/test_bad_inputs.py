"""Bad inputs, as a hostile or a careless user gives them: sweep files, sources, data files, storage,
state files, exported models and command-line flags, through the CLI in this process.

For every case: the exit status; one message `lrsweep: error: ...` that names the input and what is
allowed; no traceback; nothing read from stdin; and nothing written or half-written: every file of
the working folder (which holds the storage, the data and the statistics cache) is the same before
and after, byte for byte, and Ray was not started.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml

from compression.io import INFO_FILE, save_compressed
from compression.layers import LowRankLinear
from compression.targets import dense_weight, find_targets
from sweeps.api import load_sweep
from sweeps.cli import main
from sweeps.storage import SWEEP_FILE, TRIALS_FILE
from sweeps.study import JOURNAL_FILE
from sweeps.table import frame
from trainables.contract import TrialRow
from trainables.sources import load_model

GOOD = {
    "name": "t",
    "model": "tiny:llama",
    "task": {"type": "causal-lm", "eval": "path:corpus.txt", "seq_len": 32, "eval_windows": 2},
    "calibration": {"samples": 2, "batch_size": 2},
    "grid": {"method": ["svd"], "ratio": [0.2]},
    "resources": {"cpu": 1, "max_concurrent": 1},
}
OPTUNA = {**GOOD, "grid": {"method": ["svd"], "ratio": [0.3], "allocation": ["optuna"]}, "optuna": {"trials": 2}}
TRIAL = "1a3edb82fc6d"     # the finished trial of the stored sweep `done`
FAILED = "f00dfeed0bad"    # its failed trial


def with_(base: dict = GOOD, **changes) -> dict:
    """`base` with top-level sections replaced, or (key "task__seq_len") one key of a section changed."""
    out = json.loads(json.dumps(base))
    for key, value in changes.items():
        section, _, name = key.partition("__")
        if name:
            out[section] = {**out.get(section, {}), name: value}
        else:
            out[section] = value
    return out


@dataclass
class Case:
    argv: list[str]                           # "{x}" -> the folder of the fixture `x` (see `folders`)
    says: tuple[str, ...]                      # every one appears in the message
    sweep: dict | str | None = None            # written to s.yaml
    setup: tuple[Callable[[Path], None], ...] = ()
    code: int = 2
    usage: bool = False                        # argparse's own error (its usage line, then the message)
    env: dict = field(default_factory=dict)


def _store(spec: dict, trials: bytes | None = None, record: bytes | None = None) -> Callable[[Path], None]:
    """Setup: results/<name>/ with `record` as sweep.json (default: this sweep's own record) and
    `trials` as trials.parquet."""
    def setup(work: Path) -> None:
        folder = work / "results" / spec["name"]
        folder.mkdir(parents=True)
        (work / "s.yaml").write_text(yaml.safe_dump(spec))
        own = json.dumps({"name": spec["name"], "spec_hash": load_sweep(work / "s.yaml").spec_hash}).encode()
        (folder / SWEEP_FILE).write_bytes(own if record is None else record)
        if trials is not None:
            (folder / TRIALS_FILE).write_bytes(trials)
    return setup


def _folder(name: str) -> Callable[[Path], None]:
    return lambda work: (work / name).mkdir()


def _write(name: str, data: bytes | str) -> Callable[[Path], None]:
    def setup(work: Path) -> None:
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        (work / name).write_bytes(data.encode() if isinstance(data, str) else data)
    return setup


def _remote_code_model(work: Path) -> None:
    folder = work / "evil"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "evil", "architectures": ["EvilForCausalLM"],
                                                    "auto_map": {"AutoConfig": "evil.EvilConfig",
                                                                 "AutoModelForCausalLM": "evil.EvilModel"}}))
    (folder / "evil.py").write_text(f"open({str(work / 'ran')!r}, 'w').write('ran')\n")


def _export(edit: Callable[[dict], None] | None = None, config: Callable[[dict], None] | None = None):
    """Setup: a copy of the exported tiny GPT-2 in ./out, its lowrank.json (or config.json) edited."""
    def setup(work: Path) -> None:
        shutil.copytree(EXPORTED, work / "out")
        for name, change in ((INFO_FILE, edit), ("config.json", config)):
            if change is not None:
                data = json.loads((work / "out" / name).read_text())
                change(data)
                (work / "out" / name).write_text(json.dumps(data))
    return setup


def _rank(value):
    def edit(info: dict) -> None:
        info["low_rank"][next(iter(info["low_rank"]))]["rank"] = value
    return edit


def _table(columns: list[str] | None = None, rows: int | None = None) -> bytes:
    trials = [TrialRow(trial_id="dense", status="ok", method="dense", ratio=0.0, target_ratio=0.0, achieved_ratio=0.0,
                     metric_name="perplexity", metric=100.0, size_mb=1.0),
            TrialRow(trial_id=TRIAL, status="ok", method="svd", ratio=0.2, allocation="uniform", target_ratio=0.2,
                     achieved_ratio=0.2, metric_name="perplexity", metric=120.0, metric_compressed=130.0, size_mb=0.8),
            TrialRow(trial_id=FAILED, status="error", error="rank plan cannot be met", method="svd", ratio=0.9,
                     allocation="uniform", target_ratio=0.9, metric_name="perplexity")]
    df = frame(trials[:rows])
    buffer = io.BytesIO()
    (df if columns is None else df[columns]).to_parquet(buffer, index=False)
    return buffer.getvalue()


TABLE = _table()  # parquet bytes of a small finished sweep (no model behind it)
EXPORTED = None  # set by the `exported` fixture (a compressed tiny GPT-2 with its tokenizer)
LONG_NAME = "n" * 300


def _done(trials: bytes | None = None) -> Callable[[Path], None]:
    """Setup: the folder `done` of a finished sweep (its table; no model behind it)."""
    return _write(f"done/{TRIALS_FILE}", trials if trials is not None else TABLE)


CASES: dict[str, Case] = {
    # -- sweep files ----------------------------------------------------------------------------------
    "yaml list": Case(["validate", "s.yaml"], ("expected a mapping of sections",), sweep="- a\n- b\n"),
    "invalid yaml": Case(["validate", "s.yaml"], ("not valid YAML", "line 3"), sweep="name: t\ngrid: [svd\n"),
    "unknown key": Case(["validate", "s.yaml"], ("unknown key 'colour'", "allowed: name, model"),
                        sweep=with_(colour="red")),
    "unknown method": Case(["validate", "s.yaml"], ("unknown method 'tucker'", "allowed: svd"),
                           sweep=with_(grid={"method": ["tucker"], "ratio": [0.2]})),
    "unknown allocation": Case(["validate", "s.yaml"], ("unknown allocation 'best'", "allowed: uniform"),
                               sweep=with_(grid={"method": ["svd"], "ratio": [0.2], "allocation": ["best"]})),
    "ratio above 1": Case(["validate", "s.yaml"], ("grid[0].ratio", "outside (0, 1)"),
                          sweep=with_(grid={"method": ["svd"], "ratio": [1.5]})),
    "ratio 0": Case(["validate", "s.yaml"], ("grid[0].ratio", "outside (0, 1)"),
                    sweep=with_(grid={"method": ["svd"], "ratio": [0]})),
    "empty grid": Case(["validate", "s.yaml"], ("grid: the grid is empty", "give a block"), sweep=with_(grid=[])),
    "no grid": Case(["validate", "s.yaml"], ("grid: missing (required)",),
                    sweep={k: v for k, v in GOOD.items() if k != "grid"}),
    "negative steps": Case(["validate", "s.yaml"], ("finetune.steps", "greater than or equal to 0"),
                           sweep=with_(finetune={"steps": -3})),
    "seq_len true": Case(["validate", "s.yaml"], ("task: seq_len is true, a boolean", "allowed: a number"),
                         sweep=with_(task__seq_len=True)),
    "samples true": Case(["validate", "s.yaml"], ("calibration: samples is true, a boolean", "allowed: a number"),
                         sweep=with_(calibration__samples=True)),
    "ratio true": Case(["validate", "s.yaml"], ("grid[0]: ratio is [true], a boolean", "allowed: a number"),
                       sweep=with_(grid={"method": ["svd"], "ratio": [True]})),
    "seq_len too small": Case(["validate", "s.yaml"], ("task.seq_len", "greater than or equal to 8"),
                              sweep=with_(task__seq_len=4)),
    "unknown task": Case(["validate", "s.yaml"], ("type 'translation' is not a task", "allowed: causal-lm"),
                         sweep=with_(task={"type": "translation", "eval": "path:corpus.txt"})),
    "name with a slash": Case(["validate", "s.yaml"], ("'../x' is not a usable name", "use letters, digits"),
                              sweep=with_(name="../x")),
    "empty storage": Case(["validate", "s.yaml"], ("storage: '' is empty", "give a local folder"),
                          sweep=with_(storage="")),
    "option a method lacks": Case(["validate", "s.yaml"], ("method 'svd' has no option 'alpha'", "its options"),
                                  sweep=with_(grid={"method": ["svd"], "ratio": [0.2], "options": {"alpha": [0.5]}})),
    "optuna allocation alone": Case(["validate", "s.yaml"], ("allocation 'optuna' needs an `optuna` section",),
                                    sweep=with_(grid={"method": ["svd"], "ratio": [0.2], "allocation": ["optuna"]})),
    "optuna two blocks": Case(["validate", "s.yaml"], ("an Optuna sweep takes one grid block",),
                              sweep=with_(OPTUNA, grid=[OPTUNA["grid"], OPTUNA["grid"]])),
    "optuna two budgets": Case(["validate", "s.yaml"], ("needs one budget", "objective [metric, size]"),
                               sweep=with_(OPTUNA, grid={**OPTUNA["grid"], "ratio": [0.2, 0.4]})),
    "optuna bounds reversed": Case(["validate", "s.yaml"], ("optuna.bounds", "0 <= lo < hi < 1"),
                                   sweep=with_(OPTUNA, optuna__bounds=[0.5, 0.2])),
    "optuna objective": Case(["validate", "s.yaml"], ("optuna.objective", "allowed: metric"),
                             sweep=with_(OPTUNA, optuna__objective="speed")),
    "early stopping without evals": Case(["validate", "s.yaml"], ("finetune.early_stopping", "eval_every > 0"),
                                         sweep=with_(finetune={"steps": 4, "early_stopping": {}})),
    "too many concurrent trials": Case(["validate", "s.yaml"], ("resources.max_concurrent", "allowed max_concurrent"),
                                       sweep=with_(resources={"cpu": 1, "max_concurrent": 4096})),
    "too many cpus": Case(["run", "s.yaml"], ("resources.cpu", "lower it"),
                          sweep=with_(resources={"cpu": 4096})),
    "two warmups": Case(["validate", "s.yaml"], ("warmup_steps and warmup_ratio are exclusive",),
                        sweep=with_(finetune={"steps": 4, "warmup_steps": 1, "warmup_ratio": 0.1})),
    "unknown fisher": Case(["validate", "s.yaml"], ("calibration.fisher", "'empirical' or 'sampled'"),
                           sweep=with_(calibration__fisher="true")),
    "fisher samples without sampling": Case(["validate", "s.yaml"],
                                            ("fisher_samples 3 applies to fisher: sampled only",),
                                            sweep=with_(calibration__fisher_samples=3)),
    "calibration length differs": Case(["validate", "s.yaml"], ("calibration.seq_len", "differs from task.seq_len"),
                                       sweep=with_(calibration__seq_len=64)),
    "negative retries": Case(["validate", "s.yaml"], ("limits.retries", "greater than or equal to 0"),
                             sweep=with_(limits={"retries": -1})),
    "zero trial seconds": Case(["validate", "s.yaml"], ("limits.trial_seconds", "greater than 0"),
                               sweep=with_(limits={"trial_seconds": 0})),
    "zero learning rate": Case(["validate", "s.yaml"], ("finetune.lr", "greater than 0"),
                               sweep=with_(finetune={"lr": 0})),
    "negative latency repeats": Case(["validate", "s.yaml"], ("latency.repeats", "greater than or equal to 0"),
                                     sweep=with_(latency={"repeats": -1})),
    "sweep file missing": Case(["run", "nope.yaml", "--resume"], ("sweep file 'nope.yaml' does not exist",)),
    "sweep file is a folder": Case(["validate", "results"], ("is a directory, not a YAML file",),
                                   setup=(_folder("results"),)),
    # -- sources -------------------------------------------------------------------------------------
    "unknown packaged model": Case(["validate", "s.yaml"], ("'packaged:gpt5' is unknown", "packaged:smollm2-135m"),
                                   sweep=with_(model="packaged:gpt5")),
    "missing model folder": Case(["validate", "s.yaml"], ("no file or folder 'nope'",), sweep=with_(model="path:nope")),
    "unknown tiny architecture": Case(["validate", "s.yaml"], ("unknown tiny architecture 'mamba'", "tiny:llama"),
                                      sweep=with_(model="tiny:mamba")),
    "model without a scheme": Case(["validate", "s.yaml"], ("has no known scheme", "allowed: packaged:"),
                                   sweep=with_(model="llama")),
    "a model as text": Case(["validate", "s.yaml"], ("tiny: names a model, not text data",),
                            sweep=with_(task__eval="tiny:llama")),
    "an encoder as causal LM": Case(["run", "s.yaml"], ("is an encoder (bert)", "allowed task: classification"),
                                    sweep=with_(model="tiny:bert")),
    "model folder without config": Case(["run", "s.yaml"], ("is not a model", "a folder with config.json"),
                                        sweep=with_(model="path:empty"), setup=(_folder("empty"),)),
    "model folder with remote code": Case(["run", "s.yaml"], ("needs its own Python code", "auto_map",
                                                              "trust_remote_code=False"),
                                          sweep=with_(model="path:evil"), setup=(_remote_code_model,)),
    "data source is a folder": Case(["run", "s.yaml"], ("path:data", "is a folder; data sources are files"),
                                    sweep=with_(task__eval="path:data"), setup=(_folder("data"),)),
    "data file of an unknown type": Case(["run", "s.yaml"], ("unsupported file type '.docx'", ".txt"),
                                         sweep=with_(task__eval="path:notes.docx"), setup=(_write("notes.docx", "x"),)),
    "empty text file": Case(["run", "s.yaml"], ("path:empty.txt", "contains no text"),
                            sweep=with_(task__eval="path:empty.txt"), setup=(_write("empty.txt", "\n\n"),)),
    "too little text": Case(["run", "s.yaml"], ("has too little text", "asked for"),
                            sweep=with_(task__eval_windows=100000)),
    "no label column": Case(["run", "s.yaml"], ("path:texts.csv", "label"),
                            sweep=with_(task={"type": "classification", "train": "path:texts.csv"}, model="tiny:bert"),
                            setup=(_write("texts.csv", "text,other\n" + "".join(f"t {i},x\n" for i in range(30))),)),
    "window beyond GPT-2's positions": Case(["run", "s.yaml"], ("task.seq_len: 1024 tokens", "512 positions",
                                                                "allowed: at most 512"),
                                            sweep=with_(model="tiny:gpt2", task__seq_len=1024,
                                                        calibration__seq_len=1024)),
    "an Optuna window beyond the positions": Case(["run", "s.yaml"], ("task.seq_len: 1024 tokens", "512 positions"),
                                                  sweep=with_(OPTUNA, model="tiny:gpt2", task__seq_len=1024,
                                                              calibration__seq_len=1024)),
    "latency beyond Llama's positions": Case(["calibrate", "s.yaml"], ("latency.seq_len: 4096 tokens", "512 positions"),
                                             sweep=with_(latency={"seq_len": 4096})),
    # -- storage ------------------------------------------------------------------------------------
    "storage is a file": Case(["validate", "s.yaml"], ("storage 'results'", "is a file, not a folder"),
                              sweep=GOOD, setup=(_write("results", "not a folder"),)),
    "storage is a file (run)": Case(["run", "s.yaml"], ("storage 'results'", "is a file, not a folder"),
                                    sweep=GOOD, setup=(_write("results", "not a folder"),)),
    "storage cannot be written": Case(["validate", "s.yaml", "--storage", "/proc/lrsweep"],
                                      ("storage '/proc/lrsweep'", "cannot be written", "a location you can write to"),
                                      sweep=GOOD),
    "sweep name too long": Case(["run", "s.yaml", "--name", LONG_NAME], ("300 bytes long", "allows 255", "storage"), sweep=GOOD),
    "unknown URI scheme": Case(["validate", "s.yaml", "--storage", "nosuch://bucket/x"],
                               ("not a URI this machine can open", "s3://bucket/prefix"), sweep=GOOD),
    "unreachable bucket": Case(["validate", "s.yaml", "--storage",
                                "s3://no-bucket/x?endpoint_override=127.0.0.1:1&scheme=http"],
                               ("cannot be reached", "check the URI, the network and the credentials"), sweep=GOOD,
                               env={"AWS_EC2_METADATA_DISABLED": "true"}),
    "empty --storage": Case(["validate", "s.yaml", "--storage", ""], ("storage '' is empty",), sweep=GOOD),
    "cache is a file": Case(["calibrate", "s.yaml"], ("the calibration cache (LRSWEEP_CACHE)", "is a file"),
                            sweep=GOOD, setup=(_write("cache", "not a folder"),)),
    "bad --name": Case(["validate", "s.yaml", "--name", "../up"], ("--name '../up'", "use letters, digits"),
                       sweep=GOOD),
    # -- state files --------------------------------------------------------------------------------
    "sweep.json garbage": Case(["validate", "s.yaml"], ("sweep.json (the stored sweep) cannot be read", "move it away"),
                               setup=(_store(GOOD, record=b"\x00garbage"),)),
    "sweep.json a list": Case(["run", "s.yaml"], ("sweep.json (the stored sweep) is damaged: a JSON list",),
                              setup=(_store(GOOD, record=b"[1, 2]"),)),
    "a different sweep stored": Case(["run", "s.yaml"], ("already holds a different sweep named 't'", "--resume"),
                                     setup=(_store(GOOD, record=json.dumps({"spec_hash": "0" * 64}).encode()),)),
    "truncated table on resume": Case(["run", "s.yaml", "--resume"],
                                      ("--resume:", "trials.parquet cannot be read", "corrupt or only partly written",
                                       "move it away"),
                                      setup=(_store(GOOD, trials=TABLE[:len(TABLE) // 2]),)),
    "table lacks columns on resume": Case(["run", "s.yaml", "--resume"], ("lacks the column(s)", "metric"),
                                          setup=(_store(GOOD, trials=_table(["trial_id", "status"])),)),
    "damaged journal on resume": Case(["run", "s.yaml", "--resume"], ("optuna.log is not a readable Optuna journal",
                                                                      "move it away"),
                                      setup=(_store(OPTUNA), _write(f"results/t/{JOURNAL_FILE}", '{"op_code": 0}\nnot json\n{}\n'))),
    "report of a truncated table": Case(["report", "done"], ("trials.parquet cannot be read", "corrupt"),
                                        setup=(_done(TABLE[:100]),)),
    "report of a table without rows": Case(["report", "done"], ("holds no rows",),
                                           setup=(_done(_table(rows=0)),)),
    "report of a folder without a table": Case(["report", "results"], ("holds no results", "no trials.parquet"),
                                               setup=(_folder("results"),)),
    "report of a file": Case(["report", "s.yaml"], ("is a file, not a folder", "give the folder of one sweep"),
                             sweep=GOOD),
    "compare a file": Case(["compare", "s.yaml", "done"], ("'s.yaml' is a file, not a folder",), sweep=GOOD,
                           setup=(_done(),)),
    "compare a missing folder": Case(["compare", "done", "nope"], ("'nope' does not exist",),
                                     setup=(_done(),)),
    "report --out is a file": Case(["report", "done", "--out", "s.yaml"], ("--out", "is a file, not a folder"),
                                   sweep=GOOD, setup=(_done(),)),
    "report --out cannot be written": Case(["report", "done", "--out", "/proc/lrsweep-report"],
                                           ("--out", "cannot be written"), setup=(_done(),)),
    # -- exports ------------------------------------------------------------------------------------
    "export a too short prefix": Case(["export", "done", "--trial", TRIAL[:2], "--out", "o"],
                                      (f"trial id prefix '{TRIAL[:2]}' is too short", "at least 4 characters"),
                                      setup=(_done(),)),
    "export an unknown trial": Case(["export", "done", "--trial", "zzzzzz", "--out", "o"],
                                    ("no trial 'zzzzzz'", "its trials are: dense"), setup=(_done(),)),
    "export a failed trial": Case(["export", "done", "--trial", FAILED, "--out", "o"],
                                  (f"trial {FAILED}", "failed, so there is no model"), setup=(_done(),)),
    "export a bound outside [0, 1)": Case(["export", "done", "--best", "--max-ratio", "1.5", "--out", "o"],
                                          ("max ratio 1.5 is outside [0, 1)",), setup=(_done(),)),
    "export a bound with a trial": Case(["export", "done", "--trial", TRIAL, "--max-ratio", "0.3", "--out", "o"],
                                        ("--max-ratio and --min-ratio choose among trials with --best",),
                                        setup=(_done(),)),
    "export on cuda without cuda": Case(["export", "done", "--best", "--out", "o", "--device", "cuda"],
                                        ("--device 'cuda'", "use --device cpu"), setup=(_done(),)),
    "export to a file": Case(["export", "done", "--best", "--out", "s.yaml"], ("output folder s.yaml exists and is a file",
                                                                               "refusing to overwrite it"),
                             sweep=GOOD, setup=(_done(),)),
    "export to a folder of other files": Case(["export", "done", "--best", "--out", "data"],
                                              ("is a folder that is not a compressed model folder",),
                                              setup=(_done(), _write("data/keep.txt", "precious"))),
    "export without --out": Case(["export", "done", "--best"], ("the following arguments are required: --out",),
                                 usage=True),
    "generate from a missing folder": Case(["generate", "nope", "hi"], ("nope does not exist",)),
    "generate from a plain folder": Case(["generate", "plain", "hi"], ("is not a compressed model folder",
                                                                      "missing config.json"),
                                         setup=(_folder("plain"),)),
    "negative rank": Case(["generate", "out", "hi"], ("rank is -3", "allowed: an integer >= 0"),
                          setup=(_export(_rank(-3)),)),
    "huge rank": Case(["generate", "out", "hi"], ("do not match the model", "expected [1000000000000"),
                      setup=(_export(_rank(10**12)),)),
    "rank of the wrong type": Case(["generate", "out", "hi"], ("rank is '8'", "allowed: an integer"),
                                   setup=(_export(_rank("8")),)),
    "broken tied entry": Case(["generate", "out", "hi"], ("tied entry 'lm_head.weight' -> 'nope'", "same shape"),
                              setup=(_export(lambda info: info["tied"].update({"lm_head.weight": "nope"})),)),
    "tied not a mapping": Case(["generate", "out", "hi"], ("tied must map names to names",),
                               setup=(_export(lambda info: info.update(tied=["x"])),)),
    "unknown layer kind": Case(["generate", "out", "hi"], ("kind is 'conv3d'", "allowed: linear, conv1d"),
                               setup=(_export(lambda info: info["resized"].update(
                                   {"transformer.h.0.mlp.c_fc": {"kind": "conv3d", "in_features": 1,
                                                                 "out_features": 1, "bias": True}})),)),
    "lowrank.json garbage": Case(["generate", "out", "hi"], ("lowrank.json is not valid JSON",),
                                 setup=(_export(), _write(f"out/{INFO_FILE}", "{garbage"))),
    "weights garbage": Case(["generate", "out", "hi"], ("lowrank.safetensors is not a readable safetensors file",),
                            setup=(_export(), _write("out/lowrank.safetensors", b"\x00" * 64))),
    "export with remote code": Case(["generate", "out", "hi"], ("needs its own Python code", "auto_map"),
                                    setup=(_export(config=lambda c: c.update(auto_map={"AutoConfig": "evil.Evil"})),)),
    "generate on cuda without cuda": Case(["generate", "out", "hi", "--device", "cuda:0"],
                                          ("--device 'cuda:0'", "use --device cpu"), setup=(_export(),)),
    "a device that is not one": Case(["generate", "out", "hi", "--device", "banana"],
                                     ("--device 'banana' is not a device", "allowed: cpu, cuda"), setup=(_export(),)),
    "empty prompt": Case(["generate", "out", ""], ("the prompt is empty",), setup=(_export(),)),
    "no new tokens": Case(["generate", "out", "hi", "--max-new-tokens", "0"], ("--max-new-tokens must be at least 1",),
                          setup=(_export(),)),
    "classify a causal LM": Case(["classify", "out", "hi"], ("not a sequence classifier", "use `lrsweep generate`"),
                                 setup=(_export(),)),
    # -- flags ----------------------------------------------------------------------------------------
    "unknown command": Case(["frobnicate"], ("invalid choice: 'frobnicate'",), usage=True),
    "run without a file": Case(["run"], ("the following arguments are required: FILE",), usage=True),
    "max-new-tokens not a number": Case(["generate", "out", "hi", "--max-new-tokens", "many"],
                                        ("invalid int value: 'many'",), usage=True),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A compressed tiny GPT-2 (one low-rank layer, tied embeddings) exported with its tokenizer, and
    the table of a small finished sweep."""
    global EXPORTED
    loaded = load_model("tiny:gpt2")
    model = loaded.model
    target = find_targets(model)[0]
    old = model.get_submodule(target.name)
    U, S, Vh = torch.linalg.svd(dense_weight(old).detach(), full_matrices=False)
    model.set_submodule(target.name, LowRankLinear.from_factors(U[:, :8] * S[:8], Vh[:8], old.bias))
    EXPORTED = save_compressed(model, tmp_path_factory.mktemp("export") / "m", tokenizer=loaded.tokenizer)
    return EXPORTED


class _NoStdin(io.TextIOBase):
    def read(self, *args):
        raise AssertionError("something read stdin")

    readline = read


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"
            for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("name", list(CASES))
def test_a_bad_input_is_refused_and_changes_nothing(name, exported, tmp_path, monkeypatch, capsys):
    import ray

    case = CASES[name]
    work = tmp_path
    monkeypatch.chdir(work)
    monkeypatch.setenv("LRSWEEP_CACHE", str(work / "cache"))
    monkeypatch.setattr("sys.stdin", _NoStdin())
    for key, value in case.env.items():
        monkeypatch.setenv(key, value)
    rng_words = "the model layer rank low compress matrix weight sweep trial data token".split()
    (work / "corpus.txt").write_text("\n\n".join(" ".join(rng_words[(i * j) % len(rng_words)] for j in range(80))
                                                 for i in range(30)))
    if case.sweep is not None:
        (work / "s.yaml").write_text(case.sweep if isinstance(case.sweep, str) else yaml.safe_dump(case.sweep))
    for setup in case.setup:
        setup(work)
    before = snapshot(work)

    if case.usage:
        with pytest.raises(SystemExit) as stop:
            main(case.argv)
        code = stop.value.code
    else:
        code = main(case.argv)
    out, err = capsys.readouterr()

    assert code == case.code, err
    assert "Traceback" not in out + err
    message = err.strip().splitlines()[-1]
    assert message.startswith("lrsweep") and ": error: " in message, err
    if not case.usage:
        assert len(err.strip().splitlines()) == 1, err
    for text in case.says:
        assert text in message, message
    assert snapshot(work) == before
    assert not (work / "ran").exists()  # code of a model folder never runs
    assert not ray.is_initialized()
