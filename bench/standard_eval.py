"""Standard numbers of SmolLM2-135M, dense and compressed: full-context perplexity and the local lm-eval tasks.

    python bench/standard_eval.py [--ratios 0.2 0.4] [--limit N] [--max-windows W] [--seq-len L] [--no-write]

The compressed models are the quickstart's best kind of trial, built without a sweep and without
finetuning: `whiten-fd` with the `spectrum` allocation, calibrated once on 32 x 256-token windows of
`packaged:wiki`. Every model is scored by `sweeps.evaluation.measure` (what `lrsweep evaluate` and
`final_eval` run): perplexity of `packaged:lee` in non-overlapping windows of the model's full
context (8192 tokens; `--max-windows` takes a seeded subset) and the local lm-eval tasks
(`lrsweep_local`, `--limit` documents each), with the wall time of each. Writes the
"standard-eval" section of BENCHMARKS.md (unless --no-write) and prints it.
"""

from __future__ import annotations

import argparse
import time

import torch

from benchfile import machine_line, write_section
from compression.apply import compress, decompose_model, plan_ranks
from compression.calibration import collect_stats
from sweeps.evaluation import EvalSettings, measure
from trainables.sources import draw_windows, load_model

MODEL, CALIBRATION, TEXT = "packaged:smollm2-135m", "packaged:wiki", "packaged:lee"
METHOD, ALLOCATION = "whiten-fd", "spectrum"
SHOWN = [("context_ppl/perplexity", "ppl, full context"), ("lrsweep_lee_cloze/acc", "cloze acc"),
         ("lrsweep_lee_cloze/acc_norm", "cloze acc_norm"), ("lrsweep_lee_lastword/acc", "last word acc"),
         ("lrsweep_lee_lastword/perplexity", "last word ppl"), ("lrsweep_lee_documents/word_perplexity",
                                                                "documents word ppl")]


def cell(metrics: dict, key: str) -> str:
    value, stderr = metrics.get(key), metrics.get(f"{key}_stderr")
    if value is None:
        return "-"
    percent = key.endswith(("acc", "acc_norm"))
    text = f"{100 * value:.1f} %" if percent else f"{value:.2f}"
    if stderr is not None and stderr == stderr and not key.endswith("perplexity"):
        text += f" +- {100 * stderr:.1f}" if percent else f" +- {stderr:.2f}"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.4])
    parser.add_argument("--calibration", type=int, default=32)
    parser.add_argument("--limit", type=int, help="documents per lm-eval task (default: all)")
    parser.add_argument("--max-windows", type=int, help="perplexity windows (default: all of packaged:lee)")
    parser.add_argument("--seq-len", type=int, help="perplexity context (default: the model's, 8192)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: a shared machine)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    loaded = load_model(MODEL)
    model, tokenizer = loaded.model, loaded.tokenizer
    windows = draw_windows(CALIBRATION, tokenizer, 256, {"calibration": args.calibration}, seed=0)["calibration"]
    stats = collect_stats(model, [{"input_ids": w, "attention_mask": torch.ones_like(w)} for w in windows.split(4)],
                          progress=False)
    decs = decompose_model(model, stats, METHOD)
    settings = EvalSettings(tasks=("lrsweep_local",), limit=args.limit, perplexity=TEXT, seq_len=args.seq_len,
                            max_windows=args.max_windows, batch_size=8)

    rows, details = [], None
    models = [("dense", model, sum(p.numel() for p in model.parameters()))]
    for ratio in args.ratios:
        plan = plan_ranks(model, stats, METHOD, ratio, ALLOCATION, decs)
        small = compress(model, stats, METHOD, plan, decs, inplace=False)
        models.append((f"{METHOD} / {ALLOCATION}, {100 * ratio:.0f} % removed ({100 * plan.achieved_ratio:.1f} "
                       f"% achieved)", small, sum(p.numel() for p in small.parameters())))
    del decs
    for label, candidate, params in models:
        start = time.perf_counter()
        result = measure(candidate, tokenizer, settings, name=label)
        total = time.perf_counter() - start
        details = result.details
        seconds = result.seconds
        rows.append(f"| {label} | {params / 1e6:.1f} M | " + " | ".join(cell(result.metrics, k) for k, _ in SHOWN)
                    + f" | {seconds.get('context_ppl', 0):.0f} | {seconds.get('lm_eval', 0):.0f} | {total:.0f} |")
        print(rows[-1], flush=True)

    context = details["context_ppl"]
    documents = ", ".join(f"{t} {n}" for t, n in sorted(details["documents"].items()))
    body = "\n".join([
        "## Standard evaluation: SmolLM2-135M dense vs compressed (`bench/standard_eval.py`)",
        "",
        machine_line(),
        f"Compressed models: `{METHOD}` with the `{ALLOCATION}` allocation (the quickstart's best kind of trial), "
        f"calibrated on {args.calibration} x 256-token windows of `{CALIBRATION}`, no finetuning. Full-context "
        f"perplexity: `{TEXT}` in {context['windows']} non-overlapping windows of {context['seq_len']} tokens "
        f"({context['tokens']:,} tokens). Local lm-eval tasks (`lrsweep_local`, zero-shot, documents: {documents}); "
        "accuracies +- their standard error. Times are wall seconds of each evaluation "
        f"({args.threads} thread(s)).",
        "",
        "| model | parameters | " + " | ".join(name for _, name in SHOWN)
        + " | perplexity (s) | lm-eval (s) | total (s) |",
        "|---|---:|" + "---:|" * (len(SHOWN) + 3),
        *rows,
    ])
    print(body)
    if not args.no_write:
        write_section("standard-eval", body)


if __name__ == "__main__":
    main()
