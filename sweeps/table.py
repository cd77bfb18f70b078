"""The results of a sweep: `trials.parquet` (one row per finished trial plus the dense baseline),
rewritten atomically after every trial, and the trials' checkpoints of finetuned weights.

Units: ratios are fractions of the targeted parameters removed (the report shows %), parameter
counts are whole-model counts (embeddings included, tied weights once), sizes are MB = 10^6 bytes
of parameters, times are seconds of wall time, latencies milliseconds. `seconds_calibration` (once
per sweep) and `seconds_decompose` (once per method) are shared costs, repeated on every row that
used them.

Reading and analysing the table is `sweeps.analysis`; the report is `sweeps.report`.
"""

from __future__ import annotations

import io
import os
import posixpath
import shutil
import tempfile
from pathlib import Path

import pandas as pd
import pyarrow.fs

TRIALS_FILE = "trials.parquet"
REPORT_FILE = "report.md"
SWEEP_FILE = "sweep.json"  # the validated sweep, its hash and its calibration key (written by sweeps.runner)

# column -> dtype; the order is the order in the file
COLUMNS: dict[str, str] = {
    "trial_id": "string",
    "status": "string",             # ok | error | stopped (early-stopped by ASHA)
    "error": "string",
    "method": "string",             # "dense" on the baseline row
    "ratio": "float64",
    "allocation": "string",
    "options": "string",            # JSON, e.g. {"alpha": 1.0}
    "group_ratios": "string",       # JSON, the per-group ratios Optuna chose ({} otherwise)
    "target_ratio": "float64",      # fraction of the targeted parameters to remove
    "achieved_ratio": "float64",    # fraction actually removed
    "params_dense": "Int64",        # whole model, embeddings included (empty when a trial failed)
    "params_compressed": "Int64",
    "size_mb": "float64",
    "metric_name": "string",        # perplexity | accuracy
    "metric": "float64",            # the trial's final metric (after finetuning when there was any)
    "metric_compressed": "float64",
    "metric_finetuned": "float64",  # NaN when finetune.steps is 0
    "metric_dense": "float64",
    "finetune_steps": "Int64",
    "finetune_loss": "float64",     # training loss of the last step
    "seconds_calibration": "float64",
    "seconds_decompose": "float64",
    "seconds_compress": "float64",
    "seconds_eval": "float64",
    "seconds_finetune": "float64",
    "rank_plan": "string",          # JSON of compression.allocation.RankPlan.to_dict()
    "calibration_key": "string",    # which cached statistics the trial used (the same for all rows)
    # forward latency, median of `latency.repeats` runs on random tokens (trainables.evaluation.forward_latency)
    "latency_device": "string",     # where it was measured: "cpu (1 thread)", "cuda (NVIDIA H100 ...)"
    "latency_batch": "Int64",       # sequences per forward pass
    "latency_seq_len": "Int64",     # tokens per sequence
    "latency_ms_dense": "float64",  # the dense model, measured in the same trial (interleaved runs)
    "latency_ms_compressed": "float64",
    "speedup": "float64",           # latency_ms_dense / latency_ms_compressed (< 1: slower than dense)
    "checkpoint": "string",         # folder of the finetuned weights, relative to the sweep folder ("" = none kept)
}
# Columns a table written before they existed may lack (filled with missing values on reading).
LATER_COLUMNS = ("latency_device", "latency_batch", "latency_seq_len", "latency_ms_dense", "latency_ms_compressed",
                 "speedup", "checkpoint")


def row_from_result(result: dict, status: str | None = None, error: str | None = None) -> dict:
    """A table row from a trial's last Tune result (see `trainables.trial`)."""
    row = {k: result.get(k) for k in COLUMNS}
    row["trial_id"] = result.get("config_id")
    if status is not None:
        row["status"] = status
    if error is not None:
        row["error"] = error
    return row


def frame(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=list(COLUMNS))
    for col, dtype in COLUMNS.items():
        if dtype == "Int64":
            df[col] = pd.to_numeric(df[col]).astype("Int64")
        elif dtype == "float64":
            df[col] = pd.to_numeric(df[col]).astype("float64")
        else:
            df[col] = df[col].fillna("").astype(str).astype("string")
    return df


# -- where results live: a local folder, or a URI pyarrow understands (s3://, gs://, ...) ------


def is_uri(location: str) -> bool:
    return "://" in location


def write_file(directory: str, name: str, data: bytes) -> str:
    """Write `directory/name` atomically: a temporary file renamed over the target (local), or a
    single object upload (object stores publish an object whole, on close)."""
    if is_uri(directory):
        fs, base = pyarrow.fs.FileSystem.from_uri(directory)
        fs.create_dir(base, recursive=True)
        with fs.open_output_stream(f"{base}/{name}") as f:
            f.write(data)
        return f"{directory.rstrip('/')}/{name}"
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, folder / name)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return str(folder / name)


def delete_dir(directory: str, name: str) -> None:
    """Remove the folder `directory/name` (missing is fine)."""
    if is_uri(directory):
        fs, base = pyarrow.fs.FileSystem.from_uri(directory)
        if fs.get_file_info(f"{base}/{name}").type != pyarrow.fs.FileType.NotFound:
            fs.delete_dir(f"{base}/{name}")
        return
    shutil.rmtree(Path(directory) / name, ignore_errors=True)


def read_file(directory: str, name: str) -> bytes | None:
    """The bytes of `directory/name`, None when it does not exist."""
    if is_uri(directory):
        fs, base = pyarrow.fs.FileSystem.from_uri(directory)
        if fs.get_file_info(f"{base}/{name}").type == pyarrow.fs.FileType.NotFound:
            return None
        with fs.open_input_stream(f"{base}/{name}") as f:
            return f.read()
    path = Path(directory) / name
    return path.read_bytes() if path.is_file() else None


def checkpoint_path(trial) -> str:
    """The folder of a finished Tune trial's last checkpoint, relative to the sweep folder ("" when
    it saved none). `trial` is a `ray.tune.experiment.Trial` (read, not imported)."""
    checkpoint = getattr(trial, "checkpoint", None)
    if checkpoint is None:
        return ""
    return posixpath.relpath(checkpoint.path, trial.storage.experiment_fs_path)


class ResultsTable:
    """The rows of one sweep, keyed by trial id; `add` rewrites trials.parquet atomically.

    `keep_checkpoints`: after every added row, only the best that many trials of each target ratio
    keep their checkpoint folder (see `sweeps.analysis.checkpoints_to_drop`); the others are
    deleted and their `checkpoint` cell emptied. None keeps them all."""

    def __init__(self, directory: str, rows: list[dict] = (), keep_checkpoints: int | None = None) -> None:
        self.directory = directory
        self.rows: dict[str, dict] = {r["trial_id"]: r for r in rows}
        self.keep_checkpoints = keep_checkpoints

    def add(self, row: dict) -> None:
        self.rows[row["trial_id"]] = row
        dropped = self._drop_checkpoints(self.keep_checkpoints) if self.keep_checkpoints is not None else []
        self.write()  # first: the table never names a folder that is gone
        for folder in dropped:
            delete_dir(self.directory, folder)

    def _drop_checkpoints(self, keep: int) -> list[str]:
        from sweeps.analysis import checkpoints_to_drop  # analysis reads tables; it imports this module

        dropped = []
        for trial_id in checkpoints_to_drop(self.frame(), keep):
            dropped.append(self.rows[trial_id]["checkpoint"])
            self.rows[trial_id]["checkpoint"] = ""
        return dropped

    def frame(self) -> pd.DataFrame:
        return frame(list(self.rows.values()))

    def write(self) -> str:
        buffer = io.BytesIO()
        self.frame().to_parquet(buffer, index=False)
        return write_file(self.directory, TRIALS_FILE, buffer.getvalue())


def read_trials(directory: str) -> pd.DataFrame | None:
    data = read_file(directory, TRIALS_FILE)
    return None if data is None else pd.read_parquet(io.BytesIO(data))
