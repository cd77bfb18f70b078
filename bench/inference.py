"""Forward latency of dense vs compressed SmolLM2-135M, measured against the FLOP bound.

    python bench/inference.py [--ratios 0.2 0.4] [--variants whiten-fd/spectrum ...] [--batch 8] [--seq-len 256]
                              [--repeats 7] [--no-write]

For each method / allocation of --variants (default: whiten-fd / spectrum, whiten-fd / uniform and
id / uniform) at each ratio: the compressed model
and the dense one timed in pairs, their runs interleaved (`trainables.latency.measure`, the
sweep's latency stage: torch.utils.benchmark, 1 warm-up round, --repeats timed runs, median and
interquartile range), on CPU unless CUDA is available, with torch's threads. The FLOP-bound
speed-up is dense / compressed matrix-product FLOPs per token at --seq-len
(`compression.cost.flops_per_token`: linear layers with the LM head, plus attention). Writes the
"inference" section of BENCHMARKS.md unless --no-write.
"""

from __future__ import annotations

import argparse

import torch

from benchfile import machine_line, write_section
from compression.apply import compress, decompose_model, plan_ranks
from compression.calibration import collect_stats
from compression.cost import flops_per_token
from trainables.latency import measure, random_inputs
from trainables.sources import draw_windows, load_model

MODEL = "packaged:smollm2-135m"
VARIANTS = ("whiten-fd/spectrum", "whiten-fd/uniform", "id/uniform")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.4])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    loaded = load_model(MODEL)
    model = loaded.model
    windows = draw_windows("packaged:wiki", loaded.tokenizer, 256, {"calibration": 32}, seed=0)["calibration"]
    stats = collect_stats(model, [{"input_ids": w, "attention_mask": torch.ones_like(w)} for w in windows.split(8)],
                          progress=False)
    dense = model.to(device)
    ids = random_inputs(dense, args.batch, args.seq_len)
    dense_flops = flops_per_token(dense, args.seq_len)
    variants = [tuple(v.split("/")) for v in args.variants]
    rows = []
    for method in dict.fromkeys(m for m, _ in variants):
        decs = decompose_model(model.cpu(), stats, method)
        for allocation in (a for m, a in variants if m == method):
            for ratio in args.ratios:
                plan = plan_ranks(model, stats, method, ratio, allocation, decs)
                small = compress(model, stats, method, plan, decs, inplace=False).to(device)
                dense.to(device)
                base, timed = measure([dense, small], ids, repeats=args.repeats, warmup=1)
                bound = dense_flops / flops_per_token(small, args.seq_len)
                measured = base.median_ms / timed.median_ms
                rows.append(f"| {method} / {allocation} | {ratio:.0%} | {plan.achieved_ratio:.3f} | "
                            f"{sum(p.numel() for p in small.parameters()) / 1e6:.1f} | "
                            f"{base.median_ms:,.0f} ({base.iqr_ms:,.0f}) | {timed.median_ms:,.0f} ({timed.iqr_ms:,.0f}) | "
                            f"{measured:.2f}x | {bound:.2f}x | {measured / bound:.2f} |")
                print(rows[-1], flush=True)
                del small
        del decs

    body = "\n".join([
        "## Inference latency against the FLOP bound: SmolLM2-135M (`bench/inference.py`)",
        "",
        machine_line() + f" Device: {device.type}.",
        f"Forward pass of a batch of {args.batch} x {args.seq_len} random tokens; each compressed model timed "
        f"in a pair with the dense one, runs interleaved, 1 warm-up round then {args.repeats} timed runs each "
        f"(torch.utils.benchmark): median (interquartile range) in ms. FLOP-bound speed-up = dense / compressed "
        f"matrix-product FLOPs per token (linear layers with the 28M-parameter LM head, which no method touches, "
        f"plus attention at {args.seq_len} tokens).",
        "",
        "| model | ratio | achieved | params (M) | dense ms (IQR) | compressed ms (IQR) | measured speed-up | "
        "FLOP-bound | measured / bound |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
    ])
    print(body)
    if not args.no_write:
        write_section("inference", body)


if __name__ == "__main__":
    main()
