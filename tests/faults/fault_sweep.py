"""The sweep that tests/test_faults.py and bench/faults.py run through injected faults.

`write_sweep` puts a small corpus and the sweep file in a folder; `fault_env` is the value of
LRSWEEP_TEST_FAULTS that sitecustomize.py (next to this file) reads in Ray's workers; `attempts`
reads back its log of trial attempts.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import yaml

SPEC = {
    "name": "faults",
    "model": "tiny:llama",
    "task": {"type": "causal-lm", "eval": "path:corpus.txt", "seq_len": 32, "eval_windows": 4, "train_windows": 16},
    "calibration": {"samples": 8, "batch_size": 4},
    "finetune": {"steps": 2, "batch_size": 2, "lr": 1e-3, "eval_every": 1},
    "resources": {"cpu": 1, "max_concurrent": 2},
    "storage": "results",
}


def write_sweep(folder: Path, grid: dict, retries: int) -> None:
    """`folder`/corpus.txt (about 25k characters of word salad) and `folder`/sweep.yaml."""
    rng = random.Random(0)
    words = "the model layer rank low compress matrix weight sweep trial data token window small".split()
    (folder / "corpus.txt").write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(120)) + "."
                                                  for _ in range(40)))
    (folder / "sweep.yaml").write_text(yaml.safe_dump(SPEC | {"grid": grid, "limits": {"retries": retries}}))


def fault_env(folder: Path, sleep: float = 2, **faults) -> str:
    """LRSWEEP_TEST_FAULTS: log attempts in `folder`, sleep `sleep` s per attempt, and `faults`."""
    return json.dumps({"attempts": str(folder / "attempts.jsonl"), "markers": str(folder), "sleep": sleep} | faults)


def attempts(folder: Path) -> list[dict]:
    path = folder / "attempts.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
