"""The `final_eval` sweep stage: after the trials, in the driver, the standard numbers
(`sweeps.evaluation`: lm-eval tasks, full-context perplexity) of the dense model and of the chosen
trials, rebuilt as `lrsweep export` rebuilds them (`sweeps.export.rebuild`: exactly the model the
trial evaluated, finetuned weights included).

The numbers join the trials table in its `final_eval` column (JSON; `sweeps.table.typed` gives
each number a column, "lrsweep_lee_cloze/acc", ...) and the report gets a table of them
(`report_section`). A row that already holds numbers of the same settings is not evaluated again
(a resumed sweep); changed settings evaluate it again.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math

from typing import TYPE_CHECKING

import pandas as pd

from compression.errors import UserInputError
from sweeps.analysis import best_per_ratio, finished, pareto
from sweeps.table import ResultsTable, typed

if TYPE_CHECKING:
    from sweeps.spec import SweepSpec

log = logging.getLogger("lrsweep")


def settings_of(spec: SweepSpec):
    from sweeps.evaluation import EvalSettings

    fe = spec.final_eval
    return EvalSettings(tasks=tuple(fe.tasks), limit=fe.limit, num_fewshot=fe.num_fewshot, batch_size=fe.batch_size,
                        perplexity=fe.perplexity, seq_len=fe.seq_len, max_windows=fe.max_windows, seed=spec.seed)


def check_final_eval(spec: SweepSpec) -> None:
    """Before any trial runs: the tasks exist (UserInputError naming them otherwise)."""
    if spec.final_eval is None or not spec.final_eval.tasks:
        return
    from sweeps.evaluation import LOCAL_TASKS
    from trainables.harness import task_manager

    try:
        task_manager(spec.final_eval.tasks, [LOCAL_TASKS])
    except UserInputError as e:
        raise UserInputError(f"final_eval.tasks: {e}") from None


def chosen(df: pd.DataFrame, which: str) -> pd.DataFrame:
    """The rows final_eval evaluates: the dense baseline, then the best finished trial of each
    ratio (`which` "best_per_ratio") or the trials on the Pareto front of size and metric ("pareto")."""
    df = typed(df)
    dense = df[(df["method"] == "dense") & (df["status"] == "ok")]
    trials = best_per_ratio(df) if which == "best_per_ratio" else pareto(finished(df), "size_mb", "metric")
    return pd.concat([dense, trials])


def keeps_checkpoints(spec: SweepSpec):
    """For `analysis.checkpoints_to_drop`: the trial ids whose finetuned weights final_eval will
    read beyond the best of each ratio (the Pareto front), or None."""
    if spec.final_eval is None or spec.final_eval.trials != "pareto":
        return None
    return lambda df: set(pareto(finished(typed(df)), "size_mb", "metric")["trial_id"])


def run_final_eval(spec: SweepSpec, directory: str, table: ResultsTable) -> int:
    """Evaluate the chosen rows of `table` and write their numbers into it; returns how many were
    evaluated. A trial that cannot be rebuilt (its weights are gone) is skipped with a warning."""
    from sweeps.evaluation import measure
    from sweeps.export import rebuild

    if spec.final_eval is None:
        return 0
    settings = settings_of(spec)
    wanted = json.loads(json.dumps(settings.to_dict()))
    evaluated = 0
    for _, row in chosen(table.frame(), spec.final_eval.trials).iterrows():
        trial_id = str(row["trial_id"])
        if row["final_eval"].get("settings") == wanted:
            continue
        what = "the dense model" if row["method"] == "dense" else \
            f"trial {trial_id} ({row['method']} / {row['allocation']}, {100 * row['target_ratio']:.0f} %)"
        try:
            built = rebuild(directory, row, device=spec.final_eval.device)
        except UserInputError as e:
            log.warning(f"final_eval: {what} is skipped: {e}")
            continue
        result = measure(built.model.to(spec.final_eval.device), built.tokenizer, settings, name=what)
        table.rows[trial_id] = dataclasses.replace(table.rows[trial_id], final_eval=json.dumps(result.record()))
        table.write()
        log.info(f"final_eval: {what}: " + ", ".join(f"{k} {v:.4g}" for k, v in result.metrics.items()
                                                      if not k.endswith("_stderr")))
        evaluated += 1
        del built
    return evaluated


def _describe(settings: dict) -> str:
    parts = []
    if settings.get("tasks"):
        limit = f", at most {settings['limit']} documents each" if settings.get("limit") else ""
        parts.append(f"lm-eval tasks {', '.join(settings['tasks'])}{limit}")
    if settings.get("perplexity"):
        context = f"{settings['seq_len']} tokens" if settings.get("seq_len") else "the model's full context"
        parts.append(f"context_ppl: perplexity of {settings['perplexity']} in non-overlapping windows of {context}")
    return "; ".join(parts)


def _cell(values: dict, key: str) -> str:
    value, stderr = values.get(key), values.get(f"{key}_stderr")
    if not isinstance(value, (int, float)):
        return "-"
    return f"{value:.4g}" + (f" +- {stderr:.2g}" if isinstance(stderr, (int, float)) and math.isfinite(stderr) else "")


def report_section(df: pd.DataFrame, spec: dict | None) -> list[str]:
    """The report's table of the final_eval numbers (rows that have them): each value with its
    standard error where lm-eval gives one, and the seconds the model's evaluations took."""
    df = typed(df)
    rows = df[[bool(cell) for cell in df["final_eval"]]]
    if rows.empty:
        return []
    keys = [k for k in dict.fromkeys(k for cell in rows["final_eval"] for k in cell)
            if k != "settings" and not k.endswith("_stderr") and not k.startswith("seconds/")]
    header = ["trial", "method", "allocation", "target removed", *keys, "time (s)"]
    lines = ["## Standard evaluation (final_eval)", "", _describe((spec or {}).get("final_eval") or {}) + ".", "",
             "| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for _, row in rows.iterrows():
        values = row["final_eval"]
        seconds = sum(v for k, v in values.items() if k.startswith("seconds/"))
        removed = "-" if row["method"] == "dense" else f"{100 * row['target_ratio']:.0f} %"
        cells = [str(row["trial_id"]), str(row["method"]), str(row["allocation"]) or "-", removed,
                 *(_cell(values, k) for k in keys), f"{seconds:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]
