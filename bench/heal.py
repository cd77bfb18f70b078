"""Healing after compression on SmolLM2-135M: perplexity before and after each recipe.

    python bench/heal.py [--steps N] [--eval-every N] [--storage DIR] [--resume] [--no-write]

Runs `sweeps/examples/heal.yaml` through the sweep API (`run_sweep`: one trial at a time on 2
CPUs): whiten-fd / spectrum at 20 % and 40 % removed, healed by full finetuning or LoRA, on the LM
loss or by distillation from the dense model, and the best one-shot configuration (identity-block
hybrid at 20 % and 40 %, healed by LoRA on either loss), every recipe with the same finetune
steps. Then it writes the "heal" section of BENCHMARKS.md (unless --no-write) from the sweep's
trials.parquet: held-out `packaged:lee` perplexity before healing and after each recipe, against
the dense model, finetune seconds (training only), seconds per step, parameters trained, and
recovery per finetune minute. A row meets its goal when it reaches the goal's perplexity within
the goal's 5 minutes of finetuning. `--steps` / `--eval-every` override the sweep file's for a
quick check (the sweep is then stored under another name).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import yaml

from benchfile import machine_line, write_section
from sweeps import load_results, load_sweep, run_sweep
from sweeps.analysis import healing

SWEEP = Path(__file__).resolve().parent.parent / "sweeps" / "examples" / "heal.yaml"
GOALS = {0.2: 1.25, 0.4: 2.0}  # removed fraction -> the perplexity a recipe should reach, x dense
GOAL_SECONDS = 300  # ... within this many seconds of finetuning (5 CPU-minutes on 2 cores)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, help="finetune steps of every recipe (default: the sweep file's)")
    parser.add_argument("--eval-every", type=int, help="steps between evaluations (default: the sweep file's)")
    parser.add_argument("--storage", default="results", help="where the sweep's folder goes (default: results)")
    parser.add_argument("--resume", action="store_true", help="keep the stored sweep's finished trials")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    data = yaml.safe_load(SWEEP.read_text())
    for key, value in (("steps", args.steps), ("eval_every", args.eval_every)):
        if value is not None:
            data["finetune"][key] = value
            data["name"] += f"-{key.replace('_', '-')}{value}"
    spec = load_sweep(data, storage=args.storage)
    result = run_sweep(spec, resume=args.resume)
    if result.faults.unfinished:  # an interrupted sweep: no table from part of it
        raise SystemExit(f"heal: {result.faults.unfinished} trial(s) did not finish; run again with --resume")
    df = load_results(result.directory)
    dense = float(df.loc[df["method"] == "dense", "metric"].iloc[0])
    healed = healing(df)

    rows = []
    for (ratio, method, options), part in healed.groupby(["target_ratio", "method", "options"], sort=True):
        before = part["metric_compressed"].iloc[0]
        goal = GOALS.get(round(ratio, 2))
        config = f"{method}{', ' + options if options else ''}"
        rows.append(f"| {100 * ratio:.0f} % | {config} | none (compressed) | - | {before:.2f} | {before / dense:.2f}x "
                    "| - | - | - |")
        for row in part.itertuples():
            per_step = row.seconds_finetune / row.finetune_steps
            reached = goal and row.metric_finetuned <= goal * dense
            mark = "" if not reached else " **(goal met)**" if row.seconds_finetune <= GOAL_SECONDS \
                else " (goal's perplexity, over 5 minutes)"
            rows.append(f"| {100 * ratio:.0f} % | {config} | {row.recipe} | {row.params_trained / 1e6:.2f} | "
                        f"{row.metric_finetuned:.2f} | {row.metric_finetuned / dense:.2f}x{mark} | "
                        f"{row.seconds_finetune:.0f} ({per_step:.2f} / step) | {100 * row.gap_closed:.0f} % | "
                        f"{row.recovery_per_minute:.2f} |")
    ft, task, cal = spec.finetune, spec.task, spec.calibration_settings()
    body = "\n".join([
        "## Healing after compression: SmolLM2-135M (`bench/heal.py`)",
        "",
        machine_line(),
        "",
        f"`sweeps/examples/heal.yaml`: {cal['samples']} calibration windows of `{cal['source']}` "
        f"(Fisher: {cal['fisher']}), the `spectrum` allocation, healed on `{task.train}` windows of "
        f"{task.seq_len} tokens, {ft.steps} finetune steps of batch {ft.batch_size} for every recipe, "
        f"one trial at a time on {spec.resources.cpu:g} CPUs. Perplexity on {task.eval_windows} held-out "
        f"{task.seq_len}-token windows of `{task.eval}`: dense **{dense:.2f}**; goals: 20 % removed within "
        f"{GOALS[0.2]}x of dense ({GOALS[0.2] * dense:.1f}), 40 % within {GOALS[0.4]:g}x ({GOALS[0.4] * dense:.1f}), "
        f"each after at most {GOAL_SECONDS // 60} minutes of finetuning. "
        "The finetuned perplexity is the trial's best evaluation (its kept weights). Finetune seconds count "
        "training only; recovery per finetune minute = (perplexity compressed - finetuned) / finetune "
        "minutes; gap closed = the share of the compressed-to-dense gap that healing closed.",
        "",
        "| removed | compressed by | recipe | params trained (M) | perplexity | x dense | finetune s | gap closed "
        "| recovery / finetune min |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
    ])
    print(body)
    if not args.no_write:
        write_section("heal", body)


if __name__ == "__main__":
    main()
