"""Analysis of a sweep's results table, for the report, the CLI and notebooks (pandas only: no Ray,
no torch).

    from sweeps import load_results, pareto
    df = load_results("results/quickstart")           # one row per trial, proper dtypes
    front = pareto(df[df.status == "ok"], "size_mb", "metric")

"Best" always means the lowest perplexity or the highest accuracy (`higher_is_better`), among
finished trials. Tables come from `sweeps.table.load_results` (typed columns).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd

from compression.errors import UserInputError
from sweeps.table import typed
from trainables.finetune import FinetuneConfig, recipe


# -- what "best" means ----------------------------------------------------------------------------


def factorised(row: pd.Series) -> bool:
    """Whether a trial's plan replaced some matrix by low-rank factors (rather than only pruning
    whole MLPs, role "mlp", or leaving everything dense)."""
    plan = row["rank_plan"] if isinstance(row["rank_plan"], dict) else {}
    ranks = plan.get("ranks", {})
    return any(ranks.get(u["name"]) is not None and u["role"] != "mlp" for u in plan.get("units") or [])


def slower_than_dense(row: pd.Series) -> bool:
    """Whether a trial's compressed model ran slower than the dense one by more than the spread of
    the runs: the difference of the medians exceeds the larger interquartile range."""
    values = [row.get(c) for c in ("latency_ms_dense", "latency_ms_compressed", "latency_iqr_ms_dense",
                                   "latency_iqr_ms_compressed")]
    if any(v is None or pd.isna(v) for v in values):
        return False
    dense, compressed, iqr_dense, iqr_compressed = (float(v) for v in values)
    return compressed - dense > max(iqr_dense, iqr_compressed)


def higher_is_better(metric_name: str) -> bool:
    """Accuracy: higher is better; perplexity: lower is."""
    return str(metric_name) == "accuracy"


def metric_name(df: pd.DataFrame) -> str:
    names = [str(n) for n in df["metric_name"].dropna().unique() if str(n)]
    return names[0] if names else "metric"


def finished(df: pd.DataFrame, column: str = "metric") -> pd.DataFrame:
    """Compressed trials that ran to the end (status ok) with a value in `column`."""
    return df[(df["status"] == "ok") & (df["method"] != "dense") & df[column].notna()]


def ranked(df: pd.DataFrame, column: str = "metric") -> pd.DataFrame:
    """Rows best first by `column` (ties: smaller model, then trial id)."""
    if df.empty:
        return df
    sign = -1.0 if higher_is_better(metric_name(df)) else 1.0
    return (df.assign(_key=sign * df[column].astype(float))
            .sort_values(["_key", "size_mb", "trial_id"], kind="stable").drop(columns="_key"))


def best_per_ratio(df: pd.DataFrame, n: int = 1, column: str = "metric") -> pd.DataFrame:
    """The best `n` finished trials at each target ratio, by ratio."""
    ok = ranked(finished(df, column), column)
    if ok.empty:
        return ok
    return ok.groupby("target_ratio", sort=True).head(n).sort_values(["target_ratio"], kind="stable")


def best_per_method(df: pd.DataFrame, column: str = "metric") -> pd.DataFrame:
    """The best finished trial of every (method, target ratio), by method then ratio."""
    ok = ranked(finished(df, column), column)
    if ok.empty:
        return ok
    best = ok.groupby(["method", "target_ratio"], sort=True, observed=True).head(1)
    return best.sort_values(["method", "target_ratio"], kind="stable")


def best_trial(df: pd.DataFrame, max_ratio: float | None = None, min_ratio: float | None = None) -> pd.Series:
    """The best finished trial whose target ratio is at most `max_ratio` / at least `min_ratio`."""
    ok = finished(df)
    if ok.empty:
        raise UserInputError("no trial of this sweep finished (status ok): there is nothing to choose from")
    chosen = ok
    if max_ratio is not None:
        chosen = chosen[chosen["target_ratio"] <= max_ratio + 1e-9]
    if min_ratio is not None:
        chosen = chosen[chosen["target_ratio"] >= min_ratio - 1e-9]
    if chosen.empty:
        bound = (f"at most {max_ratio:g}" if max_ratio is not None else "") + \
                (" and " if max_ratio is not None and min_ratio is not None else "") + \
                (f"at least {min_ratio:g}" if min_ratio is not None else "")
        have = ", ".join(f"{r:g}" for r in sorted(ok["target_ratio"].unique()))
        raise UserInputError(f"no finished trial removes {bound} of the targeted parameters; the finished "
                             f"trials have target ratios {have}")
    return ranked(chosen).iloc[0]


def find_trial(df: pd.DataFrame, trial_id: str) -> pd.Series:
    """The row of `trial_id` (or of the one trial whose id starts with it, 4 characters or more).
    UserInputError for an unknown id, or a trial that failed."""
    ids = df["trial_id"].astype(str)
    hits = df[ids == trial_id]
    if hits.empty and len(trial_id) >= 4:
        hits = df[ids.str.startswith(trial_id)]
    if len(hits) > 1:
        raise UserInputError(f"trial id {trial_id!r} is ambiguous: it starts {', '.join(hits['trial_id'])}")
    if hits.empty and len(trial_id) < 4 and ids.str.startswith(trial_id).any():
        raise UserInputError(f"trial id prefix {trial_id!r} is too short: give at least 4 characters of a trial "
                             f"id (or the whole id)")
    if hits.empty:
        listed = ", ".join(ids.head(12)) + (" ..." if len(ids) > 12 else "")
        raise UserInputError(f"no trial {trial_id!r} in this sweep; its trials are: {listed}")
    row = hits.iloc[0]
    if row["status"] == "error":
        raise UserInputError(f"trial {row['trial_id']} ({row['method']}, {row['allocation']}, ratio "
                             f"{row['target_ratio']:g}) failed, so there is no model to use: {row['error']}")
    return row


def checkpoints_to_drop(df: pd.DataFrame, keep: int, also_keep: set[str] | None = None) -> list[str]:
    """Trial ids whose finetuned-weights checkpoint should go: all but the best `keep` finished trials
    of each target ratio (so `lrsweep export --best` with any ratio bound finds its weights when
    keep >= 1), the best `keep` of each ratio among the trials stopped early (which keep their best
    evaluated weights), and those in `also_keep`."""
    has = df[df["checkpoint"].fillna("").astype(str) != ""]
    if has.empty:
        return []
    kept = set(also_keep or set())
    if keep > 0:
        stopped = df[df["status"] == "stopped"].assign(status="ok")  # ranked among themselves
        kept |= set(best_per_ratio(df, keep)["trial_id"]) | set(best_per_ratio(stopped, keep)["trial_id"])
    return [t for t in has["trial_id"] if t not in kept]


# -- Pareto fronts --------------------------------------------------------------------------------


def pareto(df: pd.DataFrame, x: str = "size_mb", y: str = "metric", x_mode: str = "min",
           y_mode: str | None = None) -> pd.DataFrame:
    """The rows of `df` that no other row dominates on (x, y), sorted by x (ascending).

    A row dominates another when it is at least as good in both columns and better in one; `x_mode`
    and `y_mode` say "min" or "max" is good (y_mode default: "max" for an accuracy table's metric
    columns, else "min"). Rows with a missing x or y take no part; equal points are all kept."""
    for col in (x, y):
        if col not in df.columns:
            raise UserInputError(f"pareto: no column {col!r}; columns: {', '.join(map(str, df.columns))}")
    if y_mode is None:
        y_mode = "max" if (y.startswith("metric") and "metric_name" in df.columns
                           and higher_is_better(metric_name(df))) else "min"
    for name, mode in (("x_mode", x_mode), ("y_mode", y_mode)):
        if mode not in ("min", "max"):
            raise UserInputError(f"pareto: {name} {mode!r}; allowed: min, max")
    xs = pd.to_numeric(df[x], errors="coerce").astype(float).to_numpy()
    ys = pd.to_numeric(df[y], errors="coerce").astype(float).to_numpy()
    xs = xs if x_mode == "min" else -xs
    ys = ys if y_mode == "min" else -ys
    valid = np.flatnonzero(np.isfinite(xs) & np.isfinite(ys))
    order = valid[np.lexsort((ys[valid], xs[valid]))]  # by x, then y
    keep, best_before = [], math.inf  # best y among points with a strictly smaller x
    i = 0
    while i < len(order):
        j = i
        while j < len(order) and xs[order[j]] == xs[order[i]]:
            j += 1
        group_best = ys[order[i]]  # the group is sorted by y
        if group_best < best_before:
            keep += [k for k in order[i:j] if ys[k] == group_best]
            best_before = group_best
        i = j
    return df.iloc[keep].sort_values(x, kind="stable")


def dominated(df: pd.DataFrame, x: str = "size_mb", y: str = "metric", **kw) -> pd.Series:
    """Boolean mask: True for rows off the Pareto front (rows with a missing x or y included)."""
    front = pareto(df, x, y, **kw)
    return ~df.index.isin(front.index)


# -- comparing two experiments ----------------------------------------------------------------------


def _settings_key(row) -> tuple:
    return (str(row["method"]), str(row["allocation"]), round(float(row["target_ratio"]), 6),
            json.dumps(row["options"], sort_keys=True), json.dumps(row["group_ratios"], sort_keys=True),
            json.dumps(recipe(row["finetune"]), sort_keys=True))


def compare(a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
    """The trials of two experiments side by side: matched by trial id, then (for the rest) by method,
    allocation, target ratio, options, group ratios and healing recipe; unmatched trials of either
    side last.

    Columns: trial_a, trial_b, matched ("trial id", "settings", "only in A", "only in B"), method,
    allocation, target_ratio, options, status_a/_b, metric_a/_b, diff (b - a), diff_pct (of a),
    better ("A", "B", "same" or ""), achieved_ratio_a/_b, size_mb_a/_b, speedup_a/_b."""
    a, b = typed(a, "table A"), typed(b, "table B")
    name_a, name_b = metric_name(a), metric_name(b)
    if name_a != name_b:
        raise UserInputError(f"the experiments measure different things (A: {name_a}, B: {name_b}); "
                             f"compare sweeps of the same task")
    pairs: list[tuple[int | None, int | None, str]] = []
    ids_b = {t: i for i, t in zip(b.index, b["trial_id"])}
    left_a, left_b = [], set(b.index)
    for i, t in zip(a.index, a["trial_id"]):
        if t in ids_b:
            pairs.append((i, ids_b[t], "trial id"))
            left_b.discard(ids_b[t])
        else:
            left_a.append(i)
    keys_b: dict[tuple, list[int]] = {}
    for j in sorted(left_b):
        keys_b.setdefault(_settings_key(b.loc[j]), []).append(j)
    for i in left_a:
        candidates = keys_b.get(_settings_key(a.loc[i]), [])
        if len(candidates) == 1:
            j = candidates.pop()
            pairs.append((i, j, "settings"))
            left_b.discard(j)
        else:
            pairs.append((i, None, "only in A"))
    pairs += [(None, j, "only in B") for j in sorted(left_b)]

    higher = higher_is_better(name_a)
    rows = []
    for i, j, how in pairs:
        ra = a.loc[i] if i is not None else None
        rb = b.loc[j] if j is not None else None
        ref = ra if ra is not None else rb

        def get(row, col):
            return row[col] if row is not None else np.nan

        ma, mb = float(get(ra, "metric")), float(get(rb, "metric"))
        diff = mb - ma
        better = ""
        if math.isfinite(diff):
            better = "same" if diff == 0 else ("B" if (diff > 0) == higher else "A")
        rows.append({
            "trial_a": ra["trial_id"] if ra is not None else "", "trial_b": rb["trial_id"] if rb is not None else "",
            "matched": how, "method": str(ref["method"]), "allocation": str(ref["allocation"]),
            "target_ratio": float(ref["target_ratio"]), "options": json.dumps(ref["options"], sort_keys=True),
            "status_a": str(get(ra, "status")) if ra is not None else "",
            "status_b": str(get(rb, "status")) if rb is not None else "",
            "metric_a": ma, "metric_b": mb, "diff": diff,
            "diff_pct": 100 * diff / ma if math.isfinite(diff) and ma != 0 else np.nan, "better": better,
            "achieved_ratio_a": float(get(ra, "achieved_ratio")), "achieved_ratio_b": float(get(rb, "achieved_ratio")),
            "size_mb_a": float(get(ra, "size_mb")), "size_mb_b": float(get(rb, "size_mb")),
            "speedup_a": float(get(ra, "speedup")), "speedup_b": float(get(rb, "speedup")),
        })
    out = pd.DataFrame(rows)
    out.attrs["metric_name"] = name_a
    return out


def best_of_each_method(df: pd.DataFrame) -> pd.DataFrame:
    """For every method, its best finished trial at the largest target ratio it reached (the
    tightest budget, where the allocation matters most)."""
    ok = finished(df)
    if ok.empty:
        return ok
    tightest = ok.groupby("method", observed=True)["target_ratio"].transform("max")
    best = ranked(ok[ok["target_ratio"] == tightest]).groupby("method", observed=True).head(1)
    return best.sort_values("method", kind="stable")


# -- healing ------------------------------------------------------------------------------------------

# Finetune settings that name a recipe when they differ between trials (kind and loss always do).
_RECIPE_SETTINGS = ("steps", "lr", "batch_size", "grad_accum", "schedule", "warmup_steps", "warmup_ratio",
                    "weight_decay", "max_grad_norm", "lora_alpha", "lora_dropout", "lm_weight", "precision", "cpu_precision")


def recipe_label(settings: dict, extra: tuple[str, ...] = ()) -> str:
    """A trial's healing recipe in short: "full / lm", "lora r8 / distill T2", and what it trains
    when not everything, plus the `extra` settings (e.g. those that differ between trials)."""
    s = FinetuneConfig().to_dict() | dict(settings)
    kind = f"lora r{s['lora_rank']}" if s["kind"] == "lora" else "full"
    loss = f"distill T{s['temperature']:g}" + (f" + {s['lm_weight']:g} lm" if s["lm_weight"] else "") \
        if s["loss"] == "distill" else "lm"
    train = "" if s["train"] == "all" else f", {s['train'] if isinstance(s['train'], str) else '+'.join(s['train'])}"
    return f"{kind} / {loss}{train}" + "".join(f", {k} {s[k]:g}" if isinstance(s[k], float) else f", {k} {s[k]}"
                                               for k in extra)


def healing(df: pd.DataFrame) -> pd.DataFrame:
    """The trials that finetuned (finished or stopped early, with a finetuned metric), one row each:
    trial_id, status, method, allocation, target_ratio, options ("form=identity", "" when none),
    recipe (`recipe_label`, with the settings that differ between them), params_trained,
    finetune_steps, seconds_finetune, the metric compressed / finetuned / dense, curve
    ({step: metric}), gap_closed (the share of the gap between compressed and dense that
    finetuning closed) and recovery_per_minute: the metric's improvement per minute of finetuning, (compressed - finetuned) / minutes for perplexity, (finetuned -
    compressed) / minutes for accuracy (a fraction: x 100 for percentage points)."""
    rows = df[df["status"].isin(["ok", "stopped"]) & (df["method"] != "dense") & df["metric_finetuned"].notna()]
    if rows.empty:
        return pd.DataFrame()
    settings = [FinetuneConfig().to_dict() | dict(r) for r in rows["finetune"]]
    varying = tuple(k for k in _RECIPE_SETTINGS if len({json.dumps(s[k]) for s in settings}) > 1)
    sign = 1.0 if higher_is_better(metric_name(df)) else -1.0
    improvement = sign * (rows["metric_finetuned"] - rows["metric_compressed"])
    out = rows[["trial_id", "status", "method", "allocation", "target_ratio", "params_trained", "finetune_steps",
                "seconds_finetune", "metric_compressed", "metric_finetuned", "metric_dense", "finetune_curve"]].copy()
    out.insert(5, "options", [", ".join(f"{k}={v}" for k, v in sorted(dict(o).items())) for o in rows["options"]])
    out["recipe"] = [recipe_label(s, varying) for s in settings]
    out["gap_closed"] = (rows["metric_compressed"] - rows["metric_finetuned"]) / \
        (rows["metric_compressed"] - rows["metric_dense"])
    out["recovery_per_minute"] = improvement / (rows["seconds_finetune"] / 60)
    return out.rename(columns={"finetune_curve": "curve"}).sort_values(
        ["target_ratio", "method", "allocation", "options", "recipe"], kind="stable").reset_index(drop=True)
