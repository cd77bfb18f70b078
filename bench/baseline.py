"""Dense baselines: model load times, perplexity, evaluation throughput, MiniLM on tweets.

    python bench/baseline.py [--windows 32] [--repeats 3] [--skip-gemma]

Load times run in fresh subprocesses: "first" with an empty model cache
(LRSWEEP_CACHE in a temporary directory, so the GGUF is converted), "cached"
as the median of --repeats loads from that cache. Perplexity is measured on
held-out 256-token windows (the eval split of `draw_windows`, seed 0).
Prints markdown tables for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from trainables.evaluation import classification_metrics, perplexity
from trainables.finetune import task_finetune_classifier
from trainables.sources import draw_windows, load_labelled, load_model

MODELS = ("packaged:minilm", "packaged:smollm2-135m", "packaged:gemma3-270m")
CORPORA = ("packaged:lee", "packaged:wiki")


def _timed_load(source: str, cache: str) -> float:
    code = (
        "import time, sys; from trainables.sources import load_model; t = time.perf_counter(); "
        f"load_model({source!r}, task={'classification' if 'minilm' in source else 'causal-lm'!r}); "
        "print(time.perf_counter() - t)"
    )
    env = dict(os.environ, LRSWEEP_CACHE=cache)
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def load_times(models: tuple[str, ...], repeats: int) -> None:
    print("| model | first load (s) | cached load, median (s) |\n|---|---|---|")
    with tempfile.TemporaryDirectory() as cache:
        for source in models:
            first = _timed_load(source, cache)
            cached = statistics.median(_timed_load(source, cache) for _ in range(repeats))
            print(f"| `{source}` | {first:.1f} | {cached:.1f} |", flush=True)


def dense_perplexity(models: tuple[str, ...], windows: int, seq_len: int) -> None:
    print("\n| model | eval data | windows x tokens | perplexity | eval tokens/s |\n|---|---|---|---|---|")
    for source in models:
        loaded = load_model(source)
        for corpus in CORPORA:
            eval_windows = draw_windows(corpus, loaded.tokenizer, seq_len, {"eval": windows}, seed=0)["eval"]
            result = perplexity(loaded.model, eval_windows, batch_size=8)
            print(f"| `{source}` | `{corpus}` | {windows} x {seq_len} | {result.value:.2f} | "
                  f"{result.tokens_per_s:.0f} |", flush=True)
        del loaded


def minilm_tweets() -> None:
    data = load_labelled("packaged:tweets", seed=0)
    loaded = load_model("packaged:minilm", task="classification", num_labels=len(data.label_names), seed=0)
    before = classification_metrics(loaded.model, loaded.tokenizer, data.test, max_length=64)
    start = time.perf_counter()
    run = task_finetune_classifier(loaded.model, loaded.tokenizer, data.train)
    seconds = time.perf_counter() - start
    after = classification_metrics(loaded.model, loaded.tokenizer, data.test, max_length=64)
    print("\n| MiniLM on `packaged:tweets` | test accuracy | test macro-F1 | eval examples/s |\n|---|---|---|---|")
    print(f"| untrained head | {before.value:.4f} | {before.extra['macro_f1']:.4f} | "
          f"{len(data.test) / before.seconds:.0f} |")
    print(f"| after task finetune ({run.steps} steps, {seconds:.0f} s) | {after.value:.4f} | "
          f"{after.extra['macro_f1']:.4f} | {len(data.test) / after.seconds:.0f} |")
    print(f"\ntest set: {len(data.test)} tweets; train set: {len(data.train)} tweets")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-gemma", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    models = tuple(m for m in MODELS if not (args.skip_gemma and "gemma" in m))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}\n")
    load_times(models, args.repeats)
    dense_perplexity(tuple(m for m in models if "minilm" not in m), args.windows, args.seq_len)
    minilm_tweets()


if __name__ == "__main__":
    main()
