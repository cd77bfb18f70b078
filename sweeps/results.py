"""The results of a sweep: `trials.parquet` (one row per finished trial plus the dense baseline),
rewritten atomically after every trial, `report.md`, and the table the CLI prints.

Units: ratios are fractions of the targeted parameters removed (the report shows %), parameter
counts are whole-model counts (embeddings included, tied weights once), sizes are MB = 10^6 bytes
of parameters, times are seconds of wall time. `seconds_calibration` (once per sweep) and
`seconds_decompose` (once per method) are shared costs, repeated on every row that used them.
"""

from __future__ import annotations

import io
import json
import math
import os
import tempfile
from pathlib import Path

import pandas as pd
import pyarrow.fs

TRIALS_FILE = "trials.parquet"
REPORT_FILE = "report.md"
PLOT_FILE = "report.png"

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
}


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


class ResultsTable:
    """The rows of one sweep, keyed by trial id; `add` rewrites trials.parquet atomically."""

    def __init__(self, directory: str, rows: list[dict] = ()) -> None:
        self.directory = directory
        self.rows: dict[str, dict] = {r["trial_id"]: r for r in rows}

    def add(self, row: dict) -> None:
        self.rows[row["trial_id"]] = row
        self.write()

    def frame(self) -> pd.DataFrame:
        return frame(list(self.rows.values()))

    def write(self) -> str:
        buffer = io.BytesIO()
        self.frame().to_parquet(buffer, index=False)
        return write_file(self.directory, TRIALS_FILE, buffer.getvalue())


def read_trials(directory: str) -> pd.DataFrame | None:
    data = read_file(directory, TRIALS_FILE)
    return None if data is None else pd.read_parquet(io.BytesIO(data))


# -- presentation -----------------------------------------------------------------------------


def _num(x, digits: int = 2) -> str:
    return "-" if pd.isna(x) else f"{x:,.{digits}f}"


def _pct(x) -> str:
    return "-" if pd.isna(x) else f"{100 * x:.1f} %"


def _metric(name: str, x) -> str:
    if pd.isna(x):
        return "-"
    return f"{100 * x:.2f} %" if name == "accuracy" else f"{x:,.3f}"


def _options(row) -> str:
    parts = [f"{k}={v}" for k, v in json.loads(row["options"] or "{}").items()]
    if row["group_ratios"] not in ("", "{}"):
        parts.append(f"{len(json.loads(row['group_ratios']))} group ratios")
    return ", ".join(parts) or "-"


def display(df: pd.DataFrame) -> pd.DataFrame:
    """The table people read: one row per trial, every number with its unit in the header or cell.

    Sorted baseline first, then by target ratio, method, allocation."""
    if df.empty:
        return pd.DataFrame()
    name = df["metric_name"].iloc[0]
    order = df.assign(_base=df["method"] != "dense").sort_values(
        ["_base", "target_ratio", "method", "allocation", "trial_id"], kind="stable")
    out = pd.DataFrame({
        "trial": order["trial_id"],
        "status": order["status"],
        "method": order["method"],
        "allocation": order["allocation"],
        "options": [_options(r) for _, r in order.iterrows()],
        "target removed": [_pct(x) for x in order["target_ratio"]],
        "achieved removed": [_pct(x) for x in order["achieved_ratio"]],
        "params (M)": [_num(x / 1e6) for x in order["params_compressed"]],
        "size (MB)": [_num(x, 1) for x in order["size_mb"]],
        f"{name} compressed": [_metric(name, x) for x in order["metric_compressed"]],
        f"{name} finetuned": [_metric(name, x) for x in order["metric_finetuned"]],
        f"{name} final": [_metric(name, x) for x in order["metric"]],
        "trial time (s)": [_num(a + b + c, 1) for a, b, c in
                           zip(order["seconds_compress"], order["seconds_eval"], order["seconds_finetune"])],
    })
    return out.reset_index(drop=True)


def best_per_ratio(df: pd.DataFrame) -> pd.DataFrame:
    """The best finished trial at each target ratio (lowest perplexity / highest accuracy)."""
    ok = df[(df["status"] == "ok") & (df["method"] != "dense") & df["metric"].notna()]
    if ok.empty:
        return ok
    higher_better = ok["metric_name"].iloc[0] == "accuracy"
    ranked = ok.sort_values(["target_ratio", "metric"], ascending=[True, not higher_better], kind="stable")
    return ranked.groupby("target_ratio", sort=True).head(1)


def format_table(df: pd.DataFrame) -> str:
    """Plain-text table for the terminal."""
    table = display(df)
    return "(no trials finished)" if table.empty else table.to_string(index=False)


def _markdown(table: pd.DataFrame) -> str:
    header = "| " + " | ".join(table.columns) + " |"
    rule = "|" + "|".join("---" for _ in table.columns) + "|"
    body = ["| " + " | ".join(str(v).replace("|", "\\|") for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def pareto_front(df: pd.DataFrame) -> pd.DataFrame:
    """Finished trials no other trial beats on both size and metric."""
    ok = df[(df["status"] != "error") & df["metric"].notna() & df["size_mb"].notna()]
    if ok.empty:
        return ok
    sign = -1.0 if ok["metric_name"].iloc[0] == "accuracy" else 1.0  # lower is better after the sign
    ranked = ok.assign(_m=sign * ok["metric"]).sort_values(["size_mb", "_m"], kind="stable")
    keep, best = [], math.inf
    for index, m in zip(ranked.index, ranked["_m"]):
        if m < best:
            keep.append(index)
            best = m
    return ok.loc[keep]


def plot(df: pd.DataFrame) -> bytes | None:
    """PNG: final metric vs target ratio per method (best allocation), and metric vs size with
    the Pareto front. None when no trial finished."""
    ok = df[(df["status"] != "error") & (df["method"] != "dense") & df["metric"].notna()]
    if ok.empty:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    name = ok["metric_name"].iloc[0]
    higher_better = name == "accuracy"
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for method, rows in ok.groupby("method", sort=True):
        best = rows.groupby("target_ratio")["metric"].agg("max" if higher_better else "min")
        left.plot(100 * best.index, best.values, marker="o", label=method)
        right.scatter(rows["size_mb"], rows["metric"], s=18, label=method)
    dense = df[df["method"] == "dense"]
    for axis in (left, right):
        if not dense.empty:
            axis.axhline(dense["metric"].iloc[0], color="grey", linestyle="--", linewidth=1, label="dense")
        axis.set_ylabel(name)
        axis.grid(alpha=0.3)
    front = pareto_front(pd.concat([ok, dense]))
    right.plot(front["size_mb"], front["metric"], color="black", linewidth=1, label="Pareto front")
    left.set_xlabel("targeted parameters removed (%)")
    left.set_title(f"{name} vs ratio (best allocation per method)")
    right.set_xlabel("model size (MB)")
    right.set_title(f"{name} vs size")
    if not higher_better and ok["metric"].max() > 10 * ok["metric"].min():
        left.set_yscale("log")
        right.set_yscale("log")
    left.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def write_report(directory: str, df: pd.DataFrame, title: str, about: dict[str, str]) -> str:
    """report.md: what was swept, the best trial per ratio, every trial, and the errors."""
    lines = [f"# {title}", ""]
    lines += [f"- {k}: {v}" for k, v in about.items()]
    dense = df[df["method"] == "dense"]
    if not dense.empty:
        d = dense.iloc[0]
        lines.append(f"- dense baseline: {d['metric_name']} {_metric(d['metric_name'], d['metric'])}, "
                     f"{_num(d['params_compressed'] / 1e6)} M parameters, {_num(d['size_mb'], 1)} MB")
    trials = df[df["method"] != "dense"]
    counts = trials["status"].value_counts().to_dict()
    lines.append("- trials: " + (", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "none"))
    lines += ["", "Ratios are fractions of the targeted (compressible) parameters removed; parameter counts "
              "and sizes are for the whole model (embeddings included; MB = 10^6 bytes). Times are wall "
              "seconds; calibration and decomposition are shared costs and not in the trial time.", ""]
    figure = plot(df)
    if figure is not None:
        write_file(directory, PLOT_FILE, figure)
        lines += [f"![{df['metric_name'].iloc[0]} vs ratio and size]({PLOT_FILE})", ""]
    best = best_per_ratio(df)
    if not best.empty:
        lines += ["## Best trial per ratio", "", _markdown(display(best)), ""]
    front = pareto_front(df)
    if len(front) > 1:
        lines += ["## Pareto front (size vs metric)", "", _markdown(display(front)), ""]
    lines += ["## All trials", "", _markdown(display(df)) if not df.empty else "(none)", ""]
    failed = df[df["status"] == "error"]
    if not failed.empty:
        lines += ["## Errors", ""]
        lines += [f"- `{r.trial_id}` ({r.method}, {r.allocation}, ratio {_pct(r.target_ratio)}): {r.error}"
                  for r in failed.itertuples()]
        lines.append("")
    return write_file(directory, REPORT_FILE, "\n".join(lines).encode())
