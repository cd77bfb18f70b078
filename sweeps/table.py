"""The results table of a sweep: `trials.parquet`, one row per finished trial plus the dense
baseline, rewritten atomically after every trial; its schema is `trainables.contract.TrialRow`.

Units: ratios are fractions of the targeted parameters removed (the report shows %), parameter
counts are whole-model counts (embeddings included, tied weights once), sizes are MB = 10^6 bytes
of parameters, times are seconds of wall time, latencies milliseconds. `seconds_calibration` (once
per sweep) and `seconds_decompose` (once per method) are shared costs, repeated on every row that
used them.

`load_results` reads a table for analysis (typed columns); what "best" means, Pareto fronts and
comparisons are `sweeps.analysis`; the report is `sweeps.report`.
"""

from __future__ import annotations

import io
import json
import math
import posixpath
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from compression.errors import UserInputError
from sweeps.storage import TRIALS_FILE, delete_dir, is_uri, read_file, write_file
from trainables.contract import TrialRow

COLUMNS: dict[str, str] = TrialRow.columns()  # column -> dtype, in file order
# Columns a table written before they existed may lack (filled with missing values on reading).
LATER_COLUMNS = ("shape", "latency_device", "latency_batch", "latency_seq_len", "latency_ms_dense",
                 "latency_ms_compressed", "latency_iqr_ms_dense", "latency_iqr_ms_compressed", "speedup",
                 "speedup_flops", "checkpoint", "final_eval", "refit", "seconds_refit", "finetune",
                 "params_trained", "finetune_curve")
REQUIRED = tuple(c for c in COLUMNS if c not in LATER_COLUMNS)
CATEGORIES = ("status", "method", "allocation", "metric_name")
JSON_COLUMNS = ("options", "group_ratios", "rank_plan", "final_eval", "refit", "finetune", "finetune_curve")


def frame(rows: list[TrialRow | dict]) -> pd.DataFrame:
    """The table of `rows` with the column dtypes of `COLUMNS` (the file's own types)."""
    records = [r.to_dict() if isinstance(r, TrialRow) else r for r in rows]
    df = pd.DataFrame(records, columns=list(COLUMNS))
    for col, dtype in COLUMNS.items():
        if dtype == "Int64":
            df[col] = pd.to_numeric(df[col]).astype("Int64")
        elif dtype == "float64":
            df[col] = pd.to_numeric(df[col]).astype("float64")
        else:
            df[col] = df[col].fillna("").astype(str).astype("string")
    return df


def checkpoint_path(trial) -> str:
    """The folder of a finished Tune trial's last checkpoint, relative to the sweep folder ("" when
    it saved none). `trial` is a `ray.tune.experiment.Trial` (read, not imported)."""
    checkpoint = getattr(trial, "checkpoint", None)
    if checkpoint is None:
        return ""
    return posixpath.relpath(checkpoint.path, trial.storage.experiment_fs_path)


class ResultsTable:
    """The rows of one sweep, keyed by trial id; `add` rewrites trials.parquet atomically.

    `drop_checkpoints(table) -> trial ids`: after every added row, the trials it names lose their
    checkpoint folder (deleted, `checkpoint` cell emptied); None keeps them all."""

    def __init__(self, directory: str, rows: list[TrialRow] = (),
                 drop_checkpoints: Callable[[pd.DataFrame], list[str]] | None = None) -> None:
        self.directory = directory
        self.rows: dict[str, TrialRow] = {r.trial_id: r for r in rows}
        self.drop_checkpoints = drop_checkpoints

    def add(self, row: TrialRow) -> None:
        self.rows[row.trial_id] = row
        dropped = []
        if self.drop_checkpoints is not None:
            for trial_id in self.drop_checkpoints(self.frame()):
                dropped.append(self.rows[trial_id].checkpoint)
                self.rows[trial_id].checkpoint = ""
        self.write()  # first: the table never names a folder that is gone
        for folder in dropped:
            delete_dir(self.directory, folder)

    def update(self, rows: list[TrialRow]) -> None:
        """Replace rows that are in the table (by trial id) and write it once."""
        for row in rows:
            self.rows[row.trial_id] = row
        self.write()

    def frame(self) -> pd.DataFrame:
        return frame(list(self.rows.values()))

    def write(self) -> str:
        buffer = io.BytesIO()
        self.frame().to_parquet(buffer, index=False)
        return write_file(self.directory, TRIALS_FILE, buffer.getvalue())


def read_trials(directory: str) -> pd.DataFrame | None:
    """The stored table as written (no typing), None when there is none; UserInputError when it
    cannot be read, or is corrupt or only partly written."""
    try:
        data = read_file(directory, TRIALS_FILE)
    except OSError as e:
        raise UserInputError(f"cannot read {directory}/{TRIALS_FILE}: {e}") from None
    if data is None:
        return None
    try:
        return pd.read_parquet(io.BytesIO(data))
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a damaged file
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserInputError(f"{directory}/{TRIALS_FILE} cannot be read: the file is corrupt or only partly "
                             f"written ({reason})") from None


def rows_of(df: pd.DataFrame) -> list[TrialRow]:
    """The rows of a table (as stored, or typed) as `TrialRow`s."""
    return [row_of(series) for _, series in df.iterrows()]


def row_of(series: pd.Series) -> TrialRow:
    """One table row as a `TrialRow`: Python scalars, JSON cells as their text, missing cells as
    the row's defaults."""
    values = {}
    for col, dtype in COLUMNS.items():
        value = series.get(col)
        if _missing(value):
            continue
        if isinstance(value, dict):
            value = json.dumps(value, sort_keys=True)
        elif hasattr(value, "item"):  # numpy scalars
            value = value.item()
        values[col] = str(value) if dtype == "string" else value
    return TrialRow(**values)


def _missing(value) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


# -- reading, typed -------------------------------------------------------------------------------


def load_results(directory: str | Path) -> pd.DataFrame:
    """The trials table of the sweep folder `directory` (`<storage>/<name>`, or a URI) with proper
    dtypes (see `typed`). UserInputError when there is no table, or it is corrupt, partial
    (columns missing) or empty."""
    directory = str(directory)
    if not is_uri(directory) and not Path(directory).is_dir():
        state = "is a file, not a folder" if Path(directory).exists() else "does not exist"
        raise UserInputError(f"results folder {directory!r} {state}; give the folder of one sweep "
                             f"(<storage>/<name>, the one holding {TRIALS_FILE})")
    raw = read_trials(directory)
    if raw is None:
        raise UserInputError(f"{directory} holds no results: there is no {TRIALS_FILE} (it is written when a "
                             f"sweep has evaluated its dense baseline; give the folder of one sweep, "
                             f"<storage>/<name>)")
    if raw.empty:
        raise UserInputError(f"{directory}/{TRIALS_FILE} holds no rows: no trial has finished yet")
    return typed(raw, where=f"{directory}/{TRIALS_FILE}")


def typed(df: pd.DataFrame, where: str = "the results table") -> pd.DataFrame:
    """The table for analysis (idempotent; a copy): categories for status, method, allocation and
    metric name; dicts for `options`, `group_ratios`, `refit`, `rank_plan` (the JSON of
    `compression.allocation.RankPlan.to_dict()`), `finetune`, `finetune_curve` (step -> metric, the
    steps as strings) and `final_eval`; nullable integers for counts. Every number of
    `final_eval` also gets a column of its own, after the fixed ones, named by its key
    ("lrsweep_lee_cloze/acc", "lrsweep_lee_cloze/acc_stderr", "context_ppl/perplexity",
    "seconds/lm_eval", ...; NaN for rows without it)."""
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise UserInputError(f"{where} is partial or not a lowrank-sweep trials table: it lacks the "
                             f"column(s) {', '.join(missing)}")
    out = df.copy()
    for col in LATER_COLUMNS:
        if col not in out.columns:
            out[col] = pd.NA
    out = out[list(COLUMNS) + [c for c in out.columns if c not in COLUMNS]]
    for col, dtype in COLUMNS.items():
        if col in CATEGORIES:
            out[col] = out[col].astype("string").fillna("").astype("category")
        elif col in JSON_COLUMNS:
            out[col] = [_json_cell(v, col, t, where) for v, t in zip(out[col], out["trial_id"])]
        elif dtype == "Int64":
            out[col] = pd.to_numeric(out[col]).astype("Int64")
        elif dtype == "float64":
            out[col] = pd.to_numeric(out[col]).astype("float64")
        else:
            out[col] = out[col].astype("string").fillna("")
    return _expand_final_eval(out).reset_index(drop=True)


def _expand_final_eval(df: pd.DataFrame) -> pd.DataFrame:
    """One float column per number found in the `final_eval` dicts (columns typed already exist)."""
    keys = dict.fromkeys(k for cell in df["final_eval"] for k, v in cell.items()
                         if isinstance(v, (int, float)) and not isinstance(v, bool))
    columns = {k: [float(cell[k]) if isinstance(cell.get(k), (int, float)) else math.nan for cell in df["final_eval"]]
               for k in keys}
    return df.drop(columns=[k for k in keys if k in df.columns]).assign(**columns) if columns else df


def _json_cell(value, column: str, trial_id, where: str) -> dict:
    if isinstance(value, dict):
        return value
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA or value == "":
        return {}
    try:
        parsed = json.loads(value)
    except (TypeError, json.JSONDecodeError):
        raise UserInputError(f"{where}: column {column} of trial {trial_id} is not valid JSON") from None
    if not isinstance(parsed, dict):
        raise UserInputError(f"{where}: column {column} of trial {trial_id} is not a JSON object")
    return parsed
