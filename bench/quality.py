"""Quality of every method x allocation on SmolLM2-135M, no finetuning.

    python bench/quality.py [--calibration 32] [--eval-windows 32] [--ratios 0.2 0.4] [--no-write]

Calibrates once on `--calibration` x 256-token windows of `packaged:wiki`, decomposes every
target once per method, then for every allocation and ratio truncates, compresses a copy and
measures perplexity on held-out `packaged:lee` windows. Times: calibration, each method's
decomposition, and the median plan + truncation + layer swap of one trial. Writes the
"quality" section of BENCHMARKS.md (unless --no-write) and prints it.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchfile import machine_line, write_section
from compression.allocation import ALLOCATIONS
from compression.apply import compress, decompose_model, plan_ranks
from compression.calibration import collect_stats
from compression.methods import METHODS, method_config
from trainables.evaluation import perplexity
from trainables.sources import draw_windows, load_model

MODEL, CALIBRATION, EVAL = "packaged:smollm2-135m", "packaged:wiki", "packaged:lee"
GRID_ALLOCATIONS = tuple(a for a in ALLOCATIONS if a != "explicit")  # explicit needs caller ratios


def batches_of(windows: torch.Tensor, size: int) -> list[dict[str, torch.Tensor]]:
    return [{"input_ids": w, "attention_mask": torch.ones_like(w)} for w in windows.split(size)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibration", type=int, default=32)
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.4])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--alphas", type=float, nargs="+", default=[1.0],
                        help="exponents of the importance weighting, for the methods with an `alpha` option")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    loaded = load_model(MODEL)
    model, tok = loaded.model, loaded.tokenizer
    calib = draw_windows(CALIBRATION, tok, args.seq_len, {"calibration": args.calibration}, seed=0)["calibration"]
    held_out = draw_windows(EVAL, tok, args.seq_len, {"eval": args.eval_windows}, seed=0)["eval"]
    dense = perplexity(model, held_out, batch_size=8)

    start = time.perf_counter()
    stats = collect_stats(model, batches_of(calib, 4), progress=False)
    calib_seconds = time.perf_counter() - start

    rows, timing = [], []
    variants = [method_config(m, **({"alpha": a} if "alpha" in method_config(m).option_names() else {}))
                for m in args.methods for a in args.alphas]
    for method in dict.fromkeys(variants):
        start = time.perf_counter()
        decs = decompose_model(model, stats, method)
        decompose_seconds = time.perf_counter() - start
        trial_seconds = []
        for allocation in method.allocations or GRID_ALLOCATIONS:  # hybrid: spectrum only
            cells = []
            for ratio in args.ratios:
                start = time.perf_counter()
                plan = plan_ranks(model, stats, method, ratio, allocation, decs)
                small = compress(model, stats, method, plan, decs, inplace=False)
                trial_seconds.append(time.perf_counter() - start)
                ppl = perplexity(small, held_out, batch_size=8).value
                cells.append(f"{ppl:.2f} ({plan.achieved_ratio:.3f})")
                del small
            label = method.name + "".join(f" ({k} {v:g})" for k, v in method.options().items())
            rows.append(f"| {label} | {allocation} | " + " | ".join(cells) + " |")
            print(rows[-1], flush=True)
        timing.append(f"| {label} | {decompose_seconds:.1f} | {statistics.median(trial_seconds):.2f} |")
        del decs

    ratio_cols = " | ".join(f"ppl @ ratio {r:g} (achieved)" for r in args.ratios)
    body = "\n".join([
        "## Compression quality: SmolLM2-135M, no finetuning (`bench/quality.py`)",
        "",
        machine_line(),
        f"Calibration: {args.calibration} x {args.seq_len}-token windows of `{CALIBRATION}`. "
        f"Perplexity on {args.eval_windows} held-out {args.seq_len}-token windows of `{EVAL}` "
        f"({held_out.numel():,} tokens). Dense perplexity: **{dense.value:.2f}**. "
        "`ratio` = fraction of the targeted linear weights removed (all q/k/v/o/gate/up/down; "
        "for `id` and `id-fd` the MLP weights; `hybrid` only takes `spectrum`, which chooses per MLP "
        "between pruning and factorising).",
        "",
        f"| method | allocation | {ratio_cols} |",
        "|---|---|" + "---|" * len(args.ratios),
        *rows,
        "",
        f"Calibration (one forward + backward pass): {calib_seconds:.1f} s.",
        "",
        "| method | decomposition of all targets (s, once) | plan + truncation + swap, median per trial (s) |",
        "|---|---|---|",
        *timing,
    ])
    print(body)
    if not args.no_write:
        write_section("quality", body)


if __name__ == "__main__":
    main()
