"""The report's figures, drawn with matplotlib's Agg canvas (no display, no pyplot state: importing
this module does not change the backend of a notebook). Every function takes the typed table of
`sweeps.analysis.load_results` (or one row of it) and returns PNG bytes, or None when there is
nothing to draw.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogFormatter

from sweeps.analysis import finished, healing, metric_name, pareto

DPI = 100
DENSE_STYLE = {"color": "0.35", "linestyle": "--", "linewidth": 1.2}


def _figure(width: float, height: float, panels: int = 1) -> tuple[Figure, list]:
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, panels, i + 1) for i in range(panels)]
    return fig, axes


def _png(fig: Figure, legend_inches: float = 0.0) -> bytes:
    """PNG of `fig`, laid out tight, leaving `legend_inches` on the right for a figure legend."""
    fig.tight_layout(rect=(0, 0, 1 - legend_inches / fig.get_figwidth(), 1))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def _metric_axis(axis, name: str) -> None:
    """Perplexity on a log axis (it grows exponentially as a model degrades); accuracy in %."""
    if name == "perplexity":
        axis.set_yscale("log")
        plain = FuncFormatter(lambda v, _: f"{v:g}")
        axis.yaxis.set_major_formatter(plain)
        # label minor ticks only over a short range: over many decades they overlap
        axis.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(1.5, 0.5)))
        axis.tick_params(axis="y", which="minor", labelsize=7)
        axis.set_ylabel("perplexity (log scale, lower is better)")
    elif name == "accuracy":
        axis.set_ylabel("accuracy (%, higher is better)")
    else:
        axis.set_ylabel(name)
    axis.grid(alpha=0.3, which="both")


def _shown(name: str, values) -> np.ndarray:
    values = np.asarray(values, dtype=float)
    return 100 * values if name == "accuracy" else values


def _dense(df: pd.DataFrame) -> pd.Series | None:
    dense = df[(df["method"] == "dense") & df["metric"].notna()]
    return None if dense.empty else dense.iloc[0]


def _stages(df: pd.DataFrame) -> list[tuple[str, str]]:
    """(column, title) of the metric before and, when trials were finetuned, after finetuning."""
    stages = [("metric_compressed", "after compression")]
    if finished(df, "metric_finetuned").shape[0]:
        stages.append(("metric_finetuned", "after finetuning"))
    return stages


def _label(row, allocations: int) -> str:
    parts = [str(row["method"])]
    if allocations > 1 or row["allocation"] == "optuna":
        parts.append(str(row["allocation"]))
    options = ", ".join(f"{k}={v}" for k, v in row["options"].items())
    return " / ".join(parts) + (f" ({options})" if options else "")


def _colours(labels: list[str]) -> dict[str, tuple]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(labels) <= 10 else "tab20"]
    return {label: cmap(i % cmap.N) for i, label in enumerate(labels)}


def metric_vs_ratio(df: pd.DataFrame) -> bytes | None:
    """Metric against the target ratio: one line per method / allocation / options (Optuna trials as
    points), the dense baseline as a horizontal line; before and after finetuning side by side."""
    ok = finished(df, "metric_compressed")
    if ok.empty:
        return None
    name = metric_name(df)
    stages = _stages(df)
    allocations = ok.loc[ok["allocation"] != "optuna", "allocation"].nunique()
    labels = {i: _label(r, allocations) for i, r in ok.iterrows()}
    colours = _colours(sorted(set(labels.values())))
    fig, axes = _figure(5.2 * len(stages) + 1.6, 4.2, len(stages))
    dense = _dense(df)
    for axis, (column, title) in zip(axes, stages):
        rows = ok[ok[column].notna()]
        for label in sorted(set(labels[i] for i in rows.index)):
            part = rows[[labels[i] == label for i in rows.index]].sort_values("target_ratio")
            if (part["allocation"] == "optuna").all():
                axis.scatter(100 * part["target_ratio"], _shown(name, part[column]), s=16, marker="x",
                             color=colours[label], label=label)
            else:
                axis.plot(100 * part["target_ratio"], _shown(name, part[column]), marker="o", markersize=4,
                          color=colours[label], label=label)
        if dense is not None:
            axis.axhline(_shown(name, [dense["metric"]])[0], label="dense baseline", **DENSE_STYLE)
        axis.set_xlabel("targeted parameters removed (%)")
        axis.set_title(f"{name} {title}")
        _metric_axis(axis, name)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="center right", fontsize=8, frameon=False)
    return _png(fig, legend_inches=1.6)


def _pareto_panel(axis, df: pd.DataFrame, column: str, title: str) -> None:
    name = metric_name(df)
    is_dense = (df["method"] == "dense") & df["metric"].notna()
    points = df[((df["status"] == "ok") & (df["method"] != "dense") & df[column].notna()) | is_dense].copy()
    points.loc[points["method"] == "dense", column] = points.loc[points["method"] == "dense", "metric"]
    points["_front"] = points.index.isin(pareto(points, "size_mb", column).index)
    methods = sorted(str(m) for m in points["method"].unique() if str(m) != "dense")
    colours = _colours(methods)
    for method in methods:
        part = points[points["method"] == method]
        faded, on = part[~part["_front"]], part[part["_front"]]
        axis.scatter(faded["size_mb"], _shown(name, faded[column]), s=18, color=colours[method], alpha=0.22)
        axis.scatter(on["size_mb"], _shown(name, on[column]), s=30, color=colours[method], edgecolor="black",
                     linewidth=0.6, label=method)
    dense = points[points["method"] == "dense"]
    if not dense.empty:
        axis.scatter(dense["size_mb"], _shown(name, dense[column]), s=70, marker="*", color="0.2",
                     label="dense", zorder=3)
    front = points[points["_front"]].sort_values("size_mb")
    axis.step(front["size_mb"], _shown(name, front[column]), where="post", color="black", linewidth=1,
              alpha=0.8, label="Pareto front")
    axis.set_xlabel("model size (MB, whole model)")
    axis.set_title(title)
    _metric_axis(axis, name)


def pareto_plot(df: pd.DataFrame) -> bytes | None:
    """Model size against the metric, before and after finetuning: the Pareto front in full colour
    and joined by a line, dominated trials faded, the dense model as a star."""
    if finished(df, "metric_compressed").empty:
        return None
    name = metric_name(df)
    stages = _stages(df)
    fig, axes = _figure(5.2 * len(stages) + 1.4, 4.2, len(stages))
    for axis, (column, title) in zip(axes, stages):
        _pareto_panel(axis, df, column, f"{name} {title} vs size")
    handles, names = axes[-1].get_legend_handles_labels()
    fig.legend(handles, names, loc="center right", fontsize=8, frameon=False)
    return _png(fig, legend_inches=1.4)


def plan_grid(plan: dict) -> tuple[list[int], list[str], np.ndarray, np.ndarray]:
    """(blocks, roles, kept fraction of each unit's parameters [blocks x roles], rank or kept
    neurons [blocks x roles], -1 = left dense) of a rank plan dict. Units are placed by the block
    and role the plan records for them (roles in the order they first appear: the order of the
    layers in a block; role "mlp" is a whole MLP, whose rank is its number of kept neurons)."""
    cells: dict[tuple[int, str], tuple[float, int]] = {}
    for unit in plan.get("units") or []:
        name, rank = unit["name"], plan["ranks"][unit["name"]]
        dense = plan["dense_params"][name]
        kept = plan["params"][name] / dense if dense else 1.0
        cells[(int(unit["block"]), str(unit["role"]))] = (kept, -1 if rank is None else int(rank))
    blocks = sorted({b for b, _ in cells})
    roles = list(dict.fromkeys(role for _, role in cells))
    fraction = np.full((len(blocks), len(roles)), np.nan)
    ranks = np.full((len(blocks), len(roles)), -2)  # -2: no such unit
    for (block, role), (kept, rank) in cells.items():
        fraction[blocks.index(block), roles.index(role)] = kept
        ranks[blocks.index(block), roles.index(role)] = rank
    return blocks, roles, fraction, ranks


def rank_heatmap(row: pd.Series) -> bytes | None:
    """Heat map of one trial's rank plan over blocks x roles: colour = fraction of the layer's
    parameters kept, number = its rank (kept neurons for `id`; "dense" where it was left dense)."""
    plan = row["rank_plan"] if isinstance(row["rank_plan"], dict) else json.loads(row["rank_plan"] or "{}")
    if not plan.get("ranks"):
        return None
    blocks, names, fraction, ranks = plan_grid(plan)
    width = min(16.0, max(4.2, 2.2 + 0.95 * len(names)))
    height = min(14.0, max(2.8, 1.5 + 0.32 * len(blocks)))
    fig, (axis,) = _figure(width, height)
    image = axis.imshow(np.ma.masked_invalid(fraction), aspect="auto", cmap="viridis", norm=Normalize(0, 1),
                        interpolation="nearest")
    fontsize = 7 if len(blocks) <= 24 else 5.5
    for (b, c), rank in np.ndenumerate(ranks):
        if rank == -2:
            continue
        text = "dense" if rank == -1 else str(rank)
        axis.text(c, b, text, ha="center", va="center", fontsize=fontsize,
                  color="black" if fraction[b, c] > 0.5 else "white")
    axis.set_xticks(range(len(names)), names, rotation=30 if max(map(len, names)) > 6 else 0, ha="right"
                    if max(map(len, names)) > 6 else "center", fontsize=8)
    step = max(1, len(blocks) // 16)
    axis.set_yticks(range(0, len(blocks), step), [str(b) for b in blocks[::step]], fontsize=8)
    axis.set_ylabel("block")
    what = "kept neurons per MLP" if names == ["mlp"] else "rank per layer"
    axis.set_title(f"{row['method']} / {row['allocation']}, {100 * row['target_ratio']:.0f} % removed: {what}",
                   fontsize=9)
    colourbar = fig.colorbar(image, ax=axis, fraction=0.05, pad=0.02)
    colourbar.set_label("parameters kept (fraction)", fontsize=8)
    return _png(fig)


# -- an Optuna study: Optuna's own plots, from the study's journal (sweeps.study) ---------------------

MIN_IMPORTANCE_TRIALS = 4  # fewer finished trials say nothing about which ratios matter


def _optuna_png(draw) -> bytes:
    """PNG of one of `optuna.visualization.matplotlib`'s plots (`draw()` returns its Axes). Those
    draw through pyplot: the figure is closed at once, so a notebook shows nothing of it."""
    import warnings

    from matplotlib import pyplot as plt

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
        axes = draw()
    fig = np.ravel(axes)[0].figure
    try:
        return _png(fig)
    finally:
        plt.close(fig)


def _finished_trials(study) -> list:
    from optuna.trial import TrialState

    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def optuna_history(study, metric: str) -> bytes | None:
    """Optuna's optimisation history of the study: each trial's metric and the best so far."""
    from optuna.visualization.matplotlib import plot_optimization_history

    if not _finished_trials(study):
        return None
    target = (lambda t: t.values[0]) if len(study.directions) > 1 else None
    return _optuna_png(lambda: plot_optimization_history(study, target=target, target_name=metric))


def optuna_importances(study, metric: str) -> bytes | None:
    """Optuna's parameter importances (which group ratios and choices mattered for the metric), once
    the study has `MIN_IMPORTANCE_TRIALS` finished trials."""
    from optuna.visualization.matplotlib import plot_param_importances

    if len(_finished_trials(study)) < MIN_IMPORTANCE_TRIALS:
        return None
    target = (lambda t: t.values[0]) if len(study.directions) > 1 else None
    return _optuna_png(lambda: plot_param_importances(study, target=target, target_name=metric))


def optuna_pareto(study, metric: str) -> bytes | None:
    """Optuna's Pareto front of a multi-objective study (metric and model size)."""
    from optuna.visualization.matplotlib import plot_pareto_front

    if len(study.directions) < 2 or not _finished_trials(study):
        return None
    return _optuna_png(lambda: plot_pareto_front(study, target_names=[metric, "size (MB)"]))


def finetune_curves(df: pd.DataFrame) -> bytes | None:
    """The metric against the finetune step (the evaluations every `eval_every` steps, step 0 =
    before finetuning), one line per trial labelled by its healing recipe, one panel per target
    ratio, the dense baseline dashed; trials stopped early end where they stopped."""
    healed = healing(df)
    healed = healed[[len(c) > 1 for c in healed["curve"]]] if not healed.empty else healed
    if healed.empty:
        return None
    name = metric_name(df)
    ratios = sorted(healed["target_ratio"].unique())
    several = healed[["method", "allocation"]].drop_duplicates().shape[0] > 1
    label = {i: (f"{r['method']} / {r['allocation']}: " if several else "") + str(r["recipe"])
             for i, r in healed.iterrows()}
    colours = _colours(sorted(set(label.values())))
    fig, axes = _figure(5.0 * len(ratios) + 2.4, 4.2, len(ratios))
    dense = _dense(df)
    for axis, ratio in zip(axes, ratios):
        for i, row in healed[healed["target_ratio"] == ratio].iterrows():
            steps = sorted(row["curve"], key=int)
            axis.plot([int(s) for s in steps], _shown(name, [row["curve"][s] for s in steps]), marker="o",
                      markersize=3, color=colours[label[i]], linestyle="-" if row["status"] == "ok" else ":",
                      label=label[i] + ("" if row["status"] == "ok" else " (stopped)"))
        if dense is not None:
            axis.axhline(_shown(name, [dense["metric"]])[0], label="dense baseline", **DENSE_STYLE)
        axis.set_xlabel("finetune step")
        axis.set_title(f"{name} while healing, {100 * ratio:.0f} % removed")
        _metric_axis(axis, name)
    handles, names = axes[0].get_legend_handles_labels()
    for axis in axes[1:]:  # every recipe once, whichever panel it appears in
        for handle, text in zip(*axis.get_legend_handles_labels()):
            if text not in names:
                handles.append(handle)
                names.append(text)
    fig.legend(handles, names, loc="center right", fontsize=7, frameon=False)
    return _png(fig, legend_inches=2.4)
