"""The model card (`README.md`) of an exported trial: where the model comes from and under which
licence, how it was compressed (method, allocation, ratio, ranks per role), what the trial
measured, and how to load the folder's layout.
"""

from __future__ import annotations

import json
import math
import re
import statistics

import pandas as pd

LOADERS = {"ForCausalLM": "AutoModelForCausalLM", "ForSequenceClassification": "AutoModelForSequenceClassification",
           "ForMaskedLM": "AutoModelForMaskedLM"}


def _value(name: str, x) -> str:
    if x is None or pd.isna(x):
        return "-"
    return f"{100 * x:.2f} %" if name == "accuracy" else f"{x:,.4g}"


def _as_dict(value) -> dict:
    if isinstance(value, dict):
        return value
    return json.loads(value) if isinstance(value, str) and value else {}


def _license_id(line: str) -> str:
    """The hub's licence identifier at the start of `line` ("apache-2.0 (...)"), else "other"."""
    first = line.split(" ")[0].rstrip(":")
    return first if re.fullmatch(r"[a-z0-9][a-z0-9.-]*", first) and first not in ("unknown", "none") else "other"


def rank_summary(plan: dict) -> list[str]:
    """Markdown table: per role, how many layers were factorised (or MLPs pruned), their ranks
    (kept neurons for role "mlp") and the fraction of the role's parameters kept."""
    units = {u["name"]: u for u in plan.get("units") or []}
    ranks, dense, params = plan.get("ranks") or {}, plan.get("dense_params") or {}, plan.get("params") or {}
    roles: dict[str, list[str]] = {}
    for name in dense:
        roles.setdefault(str(units.get(name, {}).get("role", "?")), []).append(name)
    if not roles:
        return []
    lines = ["| role | layers | compressed | rank min / median / max | parameters kept |", "|---|---:|---:|---|---:|"]
    for role, names in roles.items():
        kept = [ranks[n] for n in names if ranks.get(n) is not None]
        spread = f"{min(kept)} / {statistics.median(kept):g} / {max(kept)}" if kept else "- (dense)"
        share = sum(params.get(n, dense[n]) for n in names) / max(1, sum(dense[n] for n in names))
        lines.append(f"| {role} | {len(names)} | {len(kept)} | {spread} | {100 * share:.1f} % |")
    return lines


def _loading(layout: str, architecture: str, path: str) -> list[str]:
    auto = next((cls for suffix, cls in LOADERS.items() if architecture.endswith(suffix)), "AutoModel")
    compact = ["```python", "from compression import load_compressed   # pip install lowrank-sweep",
               f'model, tokenizer, info = load_compressed("{path}")', "```"]
    if layout == "compact":
        return ["This folder is the **compact** layout: the low-rank factors and narrowed layers themselves, at "
                "the compressed size. Plain `transformers` cannot build these layers and refuses the folder "
                "(its `config.json` names no model type it knows, its weights are `lowrank*.safetensors`); load it "
                "with lowrank-sweep:", "", *compact, "",
                "For evaluation harnesses and serving stacks, export the **dense** layout (`lrsweep export ... "
                "--format dense`): the same function in the dense model's shapes, loadable by plain transformers."]
    return ["This folder is the **dense** layout: the factors multiplied back into full matrices and pruned MLPs "
            "zero-padded to their full width (the same function as the compact model). Plain transformers "
            "loads it, and so does any tool that does:", "", "```python",
            f"from transformers import {auto}, AutoTokenizer",
            f'model = {auto}.from_pretrained("{path}")', f'tokenizer = AutoTokenizer.from_pretrained("{path}")',
            "```", "", f"`lm_eval --model hf --model_args pretrained={path} --tasks arc_easy` evaluates it as it is.",
            "", "It has **no size gain**: it holds as many parameters as the dense model. The compact layout "
            "(`--format compact`, the default) keeps the saving, and lowrank-sweep loads it:", "", *compact]


def model_card(row: pd.Series, layout: str, source: str, license_line: str, path: str, architecture: str,
               parameters: int, compressed_parameters: int, finetuned: bool) -> str:
    """README.md of an export of trial `row` (a typed row of the trials table)."""
    name = str(row["metric_name"])
    method = str(row["method"])
    options = ", ".join(f"{k}={v}" for k, v in _as_dict(row["options"]).items())
    dense_model = method == "dense"
    meta = ["---", f"license: {_license_id(license_line)}",
            "library_name: transformers", "tags:", "- lowrank-sweep", f"- {method}",
            *(["- compressed"] if not dense_model else []), "---", ""]
    if dense_model:
        title = f"# {source}: the dense baseline of a lowrank-sweep sweep"
        how = ["The uncompressed model, as the sweep evaluated it (for comparison with its compressed trials)."]
    else:
        title = (f"# {source}, {100 * row['achieved_ratio']:.1f} % of its targeted parameters removed "
                 f"({method} / {row['allocation']})")
        stage = "finetuned after compression" if finetuned else "as compressed, before any finetuning"
        how = [f"- method: `{method}`" + (f" ({options})" if options else ""),
               f"- allocation: `{row['allocation']}`",
               f"- ratio: {100 * row['target_ratio']:.0f} % of the targeted parameters to remove, "
               f"{100 * row['achieved_ratio']:.2f} % removed (targets: the attention and MLP projections of "
               f"every block; embeddings and heads untouched)",
               f"- weights: {stage}"]
        summary = rank_summary(_as_dict(row["rank_plan"]))
        if summary:
            how += ["", "Ranks per role (kept neurons for `mlp`, an MLP pruned whole):", "", *summary]
    dense_params, final = row.get("params_dense"), row["metric"] if finetuned or dense_model else row["metric_compressed"]
    metrics = [f"| {name} of this model | {_value(name, final)} |",
               f"| {name} of the dense model | {_value(name, row['metric_dense'])} |"]
    if not dense_model:
        metrics += [f"| {name} after compression | {_value(name, row['metric_compressed'])} |",
                    f"| {name} after finetuning ({row['finetune_steps'] or 0} steps) | "
                    f"{_value(name, row['metric_finetuned'])} |"]
    metrics.append(f"| parameters (compressed model) | {compressed_parameters / 1e6:,.2f} M |")
    if dense_params is not None and not pd.isna(dense_params):
        metrics.append(f"| parameters (dense model) | {dense_params / 1e6:,.2f} M |")
    for key, value in sorted(_as_dict(row.get("final_eval", "")).items()):
        if isinstance(value, (int, float)) and math.isfinite(value):
            metrics.append(f"| {key} | {value:.4g} |")
    lines = [*meta, title, "",
             f"- source model: `{source}`", f"- licence of the source model: {license_line}",
             f"- trial: `{row['trial_id']}` of a lowrank-sweep sweep", "", "## Compression", "", *how, "",
             "## Metrics", "", "Measured by the sweep on its held-out evaluation data.", "",
             "| what | value |", "|---|---:|", *metrics, "",
             "## Loading", "", *_loading(layout, architecture, path),
             f"\nThis folder: {parameters / 1e6:,.2f} M parameters stored.", ""]
    return "\n".join(lines)
