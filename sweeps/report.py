"""`report.md` and its figures, from the trials table alone (no Ray): what `lrsweep run` writes at the
end of a sweep and `lrsweep report` writes again from `trials.parquet`; and the text tables of the
CLI (`format_table`, `format_compare`).

Units everywhere: ratios and accuracies in %, sizes in MB (10^6 bytes of parameters, whole model),
parameter counts in millions (M), times in seconds (s), latencies in milliseconds (ms), speed-ups
as a factor (x, dense latency / compressed latency). Perplexity has no unit.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable

import pandas as pd

from sweeps import final_eval, plots
from sweeps.analysis import (
    best_of_each_method,
    best_per_method,
    best_per_ratio,
    factorised,
    finished,
    healing,
    metric_name,
    pareto,
    slower_than_dense,
    recipe_label,
)
from compression.errors import UserInputError
from sweeps.storage import REPORT_FILE, SWEEP_FILE, check_location, read_file, write_file
from sweeps.study import JOURNAL_FILE, read_study
from sweeps.table import load_results, typed

log = logging.getLogger("lrsweep")

METRIC_VS_RATIO = "metric_vs_ratio.png"
PARETO = "pareto.png"
OPTUNA_HISTORY = "optuna_history.png"
OPTUNA_PARETO = "optuna_pareto.png"
OPTUNA_IMPORTANCES = "optuna_importances.png"
FINETUNE_CURVES = "finetune_curves.png"


def ranks_file(method: str) -> str:
    return f"ranks_{method}.png"


# -- cells ----------------------------------------------------------------------------------------


def _num(x, digits: int = 2) -> str:
    return "-" if pd.isna(x) else f"{x:,.{digits}f}"


def _pct(x) -> str:
    return "-" if pd.isna(x) else f"{100 * x:.1f} %"


def _metric(name: str, x) -> str:
    if pd.isna(x):
        return "-"
    return f"{100 * x:.2f} %" if name == "accuracy" else f"{x:,.3f}"


def _ms(x) -> str:
    return "-" if pd.isna(x) else f"{x:,.2f} ms"


def _speedup(x) -> str:
    return "-" if pd.isna(x) else f"{x:.2f}x"


def _as_dict(value) -> dict:
    if isinstance(value, dict):
        return value
    return json.loads(value) if isinstance(value, str) and value else {}


def _options(row) -> str:
    parts = [f"{k}={v}" for k, v in _as_dict(row["options"]).items()]
    group_ratios = _as_dict(row["group_ratios"])
    if group_ratios:
        parts.append(f"{len(group_ratios)} group ratios")
    return ", ".join(parts) or "-"


def _what(row) -> str:
    """"whiten-fd / spectrum, 40 % removed" (with options)."""
    options = _options(row)
    return (f"{row['method']} / {row['allocation']}" + (f" ({options})" if options != "-" else "")
            + f", {100 * row['target_ratio']:.0f} % removed")


# -- tables -----------------------------------------------------------------------------------------


def display(df: pd.DataFrame) -> pd.DataFrame:
    """The table people read: one row per trial, every number with its unit in the header or cell.

    Sorted baseline first, then by target ratio, method, allocation."""
    if df.empty:
        return pd.DataFrame()
    df = typed(df)
    name = metric_name(df)
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
        "params (M)": [_num(x / 1e6) if pd.notna(x) else "-" for x in order["params_compressed"]],
        "size (MB)": [_num(x, 1) for x in order["size_mb"]],
        f"{name} compressed": [_metric(name, x) for x in order["metric_compressed"]],
        f"{name} finetuned": [_metric(name, x) for x in order["metric_finetuned"]],
        f"{name} final": [_metric(name, x) for x in order["metric"]],
        "speed-up vs dense": [_speedup(x) for x in order["speedup"]],
        "trial time (s)": [_num(a + b + c, 1) for a, b, c in
                           zip(order["seconds_compress"], order["seconds_eval"], order["seconds_finetune"])],
    })
    return out.reset_index(drop=True)


def format_table(df: pd.DataFrame) -> str:
    """Plain-text table for the terminal."""
    table = display(df)
    return "(no trials finished)" if table.empty else table.to_string(index=False)


def markdown(table: pd.DataFrame) -> str:
    header = "| " + " | ".join(map(str, table.columns)) + " |"
    rule = "|" + "|".join("---" for _ in table.columns) + "|"
    body = ["| " + " | ".join(str(v).replace("|", "\\|") for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def method_table(df: pd.DataFrame) -> pd.DataFrame:
    """Methods x target ratios: the best final metric of each (and the allocation that got it)."""
    best = best_per_method(df)
    if best.empty:
        return pd.DataFrame()
    name = metric_name(df)
    ratios = sorted(best["target_ratio"].unique())
    rows = []
    for method, part in best.groupby("method", observed=True, sort=True):
        cells = {"method": str(method)}
        for r in ratios:
            hit = part[part["target_ratio"] == r]
            cells[f"{100 * r:.0f} % removed: {name}"] = "-" if hit.empty else \
                f"{_metric(name, hit['metric'].iloc[0])} ({hit['allocation'].iloc[0]})"
        rows.append(cells)
    return pd.DataFrame(rows)


def _ms_spread(median, iqr) -> str:
    return "-" if pd.isna(median) else f"{median:,.1f} ms (IQR {iqr:,.1f})"


def speed_table(df: pd.DataFrame) -> pd.DataFrame:
    ok = finished(df, "speedup").sort_values(["target_ratio", "method", "allocation"], kind="stable")
    return pd.DataFrame({
        "trial": ok["trial_id"], "method": ok["method"], "allocation": ok["allocation"],
        "target removed": [_pct(x) for x in ok["target_ratio"]],
        "dense latency": [_ms_spread(m, q) for m, q in zip(ok["latency_ms_dense"], ok["latency_iqr_ms_dense"])],
        "compressed latency": [_ms_spread(m, q) for m, q in
                               zip(ok["latency_ms_compressed"], ok["latency_iqr_ms_compressed"])],
        "speed-up vs dense": [_speedup(x) for x in ok["speedup"]],
        "FLOP-bound speed-up": [_speedup(x) for x in ok["speedup_flops"]],
        "measured / FLOP-bound": ["-" if pd.isna(a) or pd.isna(b) else f"{a / b:.2f}"
                                  for a, b in zip(ok["speedup"], ok["speedup_flops"])],
        "slower than dense": ["yes" if slower_than_dense(r) else "" for _, r in ok.iterrows()],
    })


def _speed_section(df: pd.DataFrame, spec: dict | None) -> list[str]:
    ok = finished(df, "speedup")
    if ok.empty:
        return []
    first = ok.iloc[0]
    latency = (spec or {}).get("latency") or {}
    devices = ", ".join(sorted(set(ok["latency_device"].astype(str))))
    shapes = ok["shape"].nunique() if "shape" in ok else len(ok)
    lines = ["## Speed", "",
             f"Forward latency of one batch of {first['latency_batch']} x {first['latency_seq_len']} tokens "
             f"(random token ids), measured after the trials, when nothing else ran, once for each of the "
             f"{shapes} distinct compressed shape(s) (trials with the same layer shapes share one measurement), "
             f"on {devices}: the dense and the compressed model's runs interleaved, "
             f"{latency.get('warmup', 1)} warm-up round(s) then {latency.get('repeats', 'several')} timed runs "
             f"each (torch.utils.benchmark); the median and the interquartile range (IQR). Speed-up = dense "
             f"latency / compressed latency. FLOP-bound speed-up = dense / compressed matrix-product FLOPs per "
             f"token (linear layers with the LM head, plus attention at this length): what the speed-up "
             f"approaches when matrix products dominate. A trial is slower than dense only when its median "
             f"exceeds the dense one by more than the larger IQR.", ""]
    slower = ok[[slower_than_dense(r) for _, r in ok.iterrows()]].sort_values("speedup")
    if slower.empty:
        lines.append(f"No compressed model was slower than the dense one beyond the spread of the runs (speed-up "
                     f"{ok['speedup'].min():.2f}x to {ok['speedup'].max():.2f}x).")
    else:
        listed = "; ".join(f"{_what(r)}: {_speedup(r['speedup'])} ({_ms(r['latency_ms_compressed'])} vs "
                           f"{_ms(r['latency_ms_dense'])} dense)" for _, r in slower.iterrows())
        lines.append(f"**Slower than dense in {len(slower)} of {len(ok)} trials**: {listed}.")
        if any(factorised(r) for _, r in slower.iterrows()):
            lines.append("Low rank replaces one matrix product by two thinner ones; with small ranks on small "
                         "matrices the extra kernel launches and memory passes cost more than the saved "
                         "arithmetic.")
    if ok["latency_ms_dense"].median() < 5:
        lines.append(f"These forward passes take only {ok['latency_ms_dense'].median():.1f} ms (dense, median): "
                     f"timer noise can dominate; raise latency.batch_size, latency.seq_len or latency.repeats "
                     f"for firmer figures.")
    return lines + ["", markdown(speed_table(df)), ""]


def _healing_section(df: pd.DataFrame, figure: Callable[[str, Callable, str], list[str]]) -> list[str]:
    """How much each healing recipe recovered, and per finetune minute."""
    healed = healing(df)
    if healed.empty:
        return []
    name = metric_name(df)
    accuracy = name == "accuracy"
    unit = "percentage points of accuracy" if accuracy else "perplexity"
    lines = ["## Healing", "",
             f"What finetuning after compression recovered, per recipe. Recovery per finetune minute = how much "
             f"finetuning improved the {name} ({'finetuned - compressed' if accuracy else 'compressed - finetuned'}, "
             f"in {unit}) / the minutes of finetuning (training only: evaluations excluded); gap closed = the share "
             f"of the gap between the compressed and the dense {name} that finetuning closed. The finetuned {name} "
             f"is that of the best evaluation, whose weights a trial keeps.", ""]
    lines += figure(FINETUNE_CURVES, lambda: plots.finetune_curves(df), f"{name} against finetune step per recipe")
    table = pd.DataFrame({
        "trial": healed["trial_id"], "method": healed["method"], "allocation": healed["allocation"],
        "target removed": [_pct(x) for x in healed["target_ratio"]], "recipe": healed["recipe"],
        "params trained (M)": [_num(x / 1e6, 3) if pd.notna(x) else "-" for x in healed["params_trained"]],
        "steps": [str(x) if pd.notna(x) else "-" for x in healed["finetune_steps"]],
        "finetune (s)": [_num(x, 1) for x in healed["seconds_finetune"]],
        f"{name} compressed": [_metric(name, x) for x in healed["metric_compressed"]],
        f"{name} finetuned": [_metric(name, x) for x in healed["metric_finetuned"]],
        "gap closed": [_pct(x) for x in healed["gap_closed"]],
        f"recovery / finetune min ({'points' if accuracy else 'ppl'})":
            [_num(100 * x if accuracy else x, 2) for x in healed["recovery_per_minute"]],
    })
    stopped = healed["status"] == "stopped"
    table.loc[stopped, "trial"] = [f"{t} (stopped)" for t in table.loc[stopped, "trial"]]
    return lines + [markdown(table), ""]


# -- the header ---------------------------------------------------------------------------------------


def read_record(directory: str) -> dict | None:
    """The sweep record (`sweep.json`) of a sweep folder, None when there is none (or it is damaged)."""
    data = read_file(directory, SWEEP_FILE)
    if data is None:
        return None
    try:
        record = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) else None


def about(record: dict | None, df: pd.DataFrame) -> dict[str, str]:
    """The report header from the stored sweep record and the table (for `lrsweep report`)."""
    spec = (record or {}).get("spec") or {}
    out: dict[str, str] = {}
    if spec.get("model"):
        out["model"] = spec["model"]
    task = spec.get("task") or {}
    if task.get("type") == "causal-lm":
        out["task"] = (f"causal-lm: held-out perplexity on {task.get('eval')} ({task.get('eval_windows')} windows "
                       f"of {task.get('seq_len')} tokens)")
    elif task.get("type") == "classification":
        out["task"] = (f"classification: accuracy on the {task.get('eval_split', 'validation')} split of "
                       f"{task.get('eval') or task.get('train')}")
    cal = spec.get("calibration") or {}
    dense = df[df["method"] == "dense"]
    keys = sorted(set(df["calibration_key"].astype(str)) - {""})
    if cal or keys:
        seconds = dense["seconds_calibration"].iloc[0] if not dense.empty else math.nan
        source = cal.get("source") or ("task data" if cal else "?")
        out["calibration"] = (f"{cal.get('samples', '?')} samples of {source}"
                              + (f", {_num(seconds, 1)} s" if pd.notna(seconds) else "")
                              + (f" (key {', '.join(keys)})" if keys else ""))
    ft = spec.get("finetune") or {}
    if ft:
        out["finetune"] = (f"{ft.get('steps')} steps, lr {ft.get('lr'):g}, batch {ft.get('batch_size')} x "
                           f"{ft.get('grad_accum', 1)}, {recipe_label(ft)}") if ft.get("steps") else "none"
    if record and record.get("spec_hash"):
        out["sweep hash"] = str(record["spec_hash"])[:16]
    return out


# -- the report ----------------------------------------------------------------------------------------


def _image(name: str, alt: str) -> str:
    return f"![{alt}]({name})"


def render(df: pd.DataFrame, title: str, about_lines: dict[str, str], spec: dict | None = None, study=None
           ) -> tuple[str, dict[str, bytes]]:
    """The text of report.md and its figures {file name: PNG bytes}; `study`: the sweep's Optuna
    study (`sweeps.study.read_study`), whose plots Optuna draws."""
    df = typed(df)
    name = metric_name(df)
    figures: dict[str, bytes] = {}

    def figure(file: str, make: Callable[[], bytes | None], alt: str) -> list[str]:
        png = make()
        if png is None:
            return []
        figures[file] = png
        return [_image(file, alt), ""]

    lines = [f"# {title}", ""]
    lines += [f"- {k}: {v}" for k, v in about_lines.items()]
    dense = df[df["method"] == "dense"]
    if not dense.empty:
        d = dense.iloc[0]
        lines.append(f"- dense baseline: {name} {_metric(name, d['metric'])}, "
                     f"{_num(d['params_compressed'] / 1e6)} M parameters, {_num(d['size_mb'], 1)} MB")
    trials = df[df["method"] != "dense"]
    counts = trials["status"].astype(str).value_counts().to_dict()
    lines.append("- trials: " + (", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "none"))
    lines += ["", "Ratios are fractions of the targeted (compressible) parameters removed; parameter counts "
              "and sizes are for the whole model (embeddings included; MB = 10^6 bytes). Times are wall "
              "seconds; calibration and decomposition are shared costs and not in the trial time. "
              f"{'Higher' if name == 'accuracy' else 'Lower'} {name} is better.", ""]

    grid = finished(df, "metric_compressed")
    if not grid.empty:
        lines += ["## Metric against ratio", ""]
        lines += figure(METRIC_VS_RATIO, lambda: plots.metric_vs_ratio(df),
                        f"{name} vs targeted parameters removed, per method")
    best = best_per_ratio(df)
    if not best.empty:
        lines += ["## Best trial per ratio", "", markdown(display(best)), ""]
        lines += ["## Best per method", "", f"The best final {name} of each method at each ratio, and the "
                  f"allocation that reached it.", "", markdown(method_table(df)), ""]
    if not grid.empty:
        lines += ["## Pareto front (size vs metric)", "",
                  "Trials no other trial beats on both model size and metric, before and after finetuning "
                  "(dominated trials faded).", ""]
        lines += figure(PARETO, lambda: plots.pareto_plot(df), f"Pareto front of size vs {name}")
        points = pd.concat([finished(df), df[(df["method"] == "dense") & df["metric"].notna()]])
        front = pareto(points, "size_mb", "metric")
        if len(front):
            lines += ["Final metric:", "", markdown(display(front)), ""]
    lines += _healing_section(df, figure)
    lines += _speed_section(df, spec)
    chosen = best_of_each_method(df)
    if not chosen.empty:
        lines += ["## Where the budget went", "",
                  "For each method, its best trial at the largest ratio it reached: the rank kept by every "
                  "layer of every block (kept neurons per MLP for `id`); the colour is the fraction of the "
                  "layer's parameters kept.", ""]
        for _, row in chosen.iterrows():
            lines += figure(ranks_file(str(row["method"])), lambda row=row: plots.rank_heatmap(row),
                            f"ranks of {row['trial_id']}")
    optuna_rows = finished(df[df["allocation"] == "optuna"])
    if not optuna_rows.empty:
        optuna_spec = (spec or {}).get("optuna") or {}
        multi = optuna_spec.get("objective", "metric") != "metric" if optuna_spec else \
            optuna_rows["target_ratio"].nunique() > 1
        lines += ["## Optuna", "", f"{len(optuna_rows)} finished Optuna trials"
                  + (" (objectives: metric and model size)." if multi else " (objective: the metric)."), ""]
        if study is not None:
            lines += [f"The study is kept in `{JOURNAL_FILE}` (Optuna's journal storage; "
                      f"`optuna-dashboard {JOURNAL_FILE}` opens it). Optuna's own plots of it:", ""]
            lines += figure(OPTUNA_HISTORY, lambda: plots.optuna_history(study, name), "Optuna optimisation history")
            lines += figure(OPTUNA_IMPORTANCES, lambda: plots.optuna_importances(study, name),
                            "Optuna parameter importances")
            lines += figure(OPTUNA_PARETO, lambda: plots.optuna_pareto(study, name), "Optuna Pareto front")
    lines += final_eval.report_section(df, spec)
    lines += ["## All trials", "", markdown(display(df)) if not df.empty else "(none)", ""]
    failed = df[df["status"] == "error"]
    if not failed.empty:
        lines += ["## Errors", ""]
        lines += [f"- `{r.trial_id}` ({r.method}, {r.allocation}, ratio {_pct(r.target_ratio)}): {r.error}"
                  for r in failed.itertuples()]
        lines.append("")
    return "\n".join(lines), figures


def write_report(directory: str, df: pd.DataFrame, title: str, about_lines: dict[str, str],
                 spec: dict | None = None) -> str:
    """Write report.md and its PNG figures into `directory` (a folder or URI); return report.md's path.
    `spec`: the stored sweep (for the Optuna objective and latency settings); default: the
    `sweep.json` in `directory`, if any."""
    if spec is None:
        spec = (read_record(directory) or {}).get("spec")
    text, figures = render(df, title, about_lines, spec, _study(directory))
    for file, png in figures.items():
        write_file(directory, file, png)
    return write_file(directory, REPORT_FILE, text.encode())


def _study(directory: str):
    """The sweep's Optuna study, None when it has none or its journal cannot be read (a warning)."""
    try:
        return read_study(directory)
    except UserInputError as e:
        log.warning(f"the Optuna plots are left out: {e}")
        return None


def regenerate(experiment: str, out: str | None = None) -> tuple[str, list[str]]:
    """`lrsweep report`: report.md and figures of a sweep folder again, from its trials.parquet (and
    sweep.json for the header), into `out` (default: the sweep folder). Returns (report path, figures)."""
    df = load_results(experiment)
    target = out or experiment
    check_location(target, "--out" if out else f"sweep folder {experiment}")
    record = read_record(experiment)
    title = f"Sweep {record['name']}" if record and record.get("name") else f"Sweep {experiment}"
    spec = (record or {}).get("spec")
    text, figures = render(df, title, about(record, df), spec, _study(experiment))
    for file, png in figures.items():
        write_file(target, file, png)
    return write_file(target, REPORT_FILE, text.encode()), sorted(figures)


# -- comparison -----------------------------------------------------------------------------------------


def format_compare(table: pd.DataFrame, label_a: str = "A", label_b: str = "B") -> str:
    """The comparison of two experiments (sweeps.analysis.compare) as a text table."""
    if table.empty:
        return "(no trials in either experiment)"
    name = table.attrs.get("metric_name", "metric")
    unit = " (%)" if name == "accuracy" else ""
    scale = 100 if name == "accuracy" else 1

    def num(x, digits=3):
        return "-" if pd.isna(x) else f"{scale * x:,.{digits}f}"

    out = pd.DataFrame({
        "trial A": table["trial_a"], "trial B": table["trial_b"], "matched by": table["matched"],
        "method": table["method"], "allocation": table["allocation"],
        "target removed": [_pct(x) if x else "-" for x in table["target_ratio"]],
        "options": [", ".join(f"{k}={v}" for k, v in json.loads(o).items()) or "-" for o in table["options"]],
        f"{name}{unit} A": [num(x) for x in table["metric_a"]],
        f"{name}{unit} B": [num(x) for x in table["metric_b"]],
        f"B - A{unit}": ["-" if pd.isna(x) else f"{scale * x:+,.3f}" for x in table["diff"]],
        "B - A (% of A)": ["-" if pd.isna(x) else f"{x:+.2f} %" for x in table["diff_pct"]],
        "better": [b or "-" for b in table["better"]],
        "size A (MB)": [_num(x, 1) for x in table["size_mb_a"]],
        "size B (MB)": [_num(x, 1) for x in table["size_mb_b"]],
        "speed-up A": [_speedup(x) for x in table["speedup_a"]],
        "speed-up B": [_speedup(x) for x in table["speedup_b"]],
    })
    status = [f"{a or '-'} / {b or '-'}" for a, b in zip(table["status_a"], table["status_b"])]
    if any(s != "ok / ok" for s in status):
        out.insert(3, "status A / B", status)
    lines = [f"A = {label_a}", f"B = {label_b}", "", out.to_string(index=False)]
    matched = table[table["matched"].isin(["trial id", "settings"])]
    both = matched[matched["diff"].notna()]
    if len(both):
        wins = both["better"].value_counts().to_dict()
        lines += ["", f"{len(matched)} matched trial(s); {name} better in A: {wins.get('A', 0)}, in B: "
                      f"{wins.get('B', 0)}, the same: {wins.get('same', 0)}; "
                      f"{(table['matched'] == 'only in A').sum()} only in A, {(table['matched'] == 'only in B').sum()} "
                      f"only in B"]
    return "\n".join(lines)
