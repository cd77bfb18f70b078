"""Forward latency of dense vs compressed SmolLM2-135M (ratio 0.4), batch 8 x 256 tokens.

    python bench/inference.py [--ratio 0.4] [--repeats 7] [--no-write]

The low-rank models of the SVD family all have the same shapes at a given allocation, so one
`whiten-fd` model stands for them (uniform and spectrum allocations); `id` gives a narrower
dense MLP. Latency is the median of --repeats timed forwards after 2 warm-up rounds, the models' runs
interleaved so all see the same load (`trainables.evaluation.forward_latency`), on CPU unless
CUDA is available. Writes the "inference" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse

import torch

from benchfile import machine_line, write_section
from compression.apply import compress, decompose_model, plan_ranks
from compression.calibration import collect_stats
from trainables.evaluation import forward_latency
from trainables.sources import draw_windows, load_model

MODEL = "packaged:smollm2-135m"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    loaded = load_model(MODEL)
    model, tok = loaded.model, loaded.tokenizer
    windows = draw_windows("packaged:wiki", tok, args.seq_len, {"eval": args.batch, "calibration": 8}, seed=0)
    stats = collect_stats(model, [{"input_ids": w, "attention_mask": torch.ones_like(w)}
                                  for w in windows["calibration"].split(4)], progress=False)
    variants = [("dense", None, None)]
    for method, allocation in (("whiten-fd", "uniform"), ("whiten-fd", "spectrum"), ("id", "uniform")):
        decs = decompose_model(model, stats, method)
        plan = plan_ranks(model, stats, method, args.ratio, allocation, decs)
        variants.append((f"{method} / {allocation}", compress(model, stats, method, plan, decs, inplace=False), plan))
        del decs
    inputs = windows["eval"]
    nets = [small if small is not None else model for _, small, _ in variants]
    latencies = forward_latency(nets, inputs, repeats=args.repeats, warmup=2, device=device)  # interleaved

    rows = []
    for (label, _, plan), net, latency in zip(variants, nets, latencies):
        params = sum(p.numel() for p in net.parameters())
        achieved = f"{plan.achieved_ratio:.3f}" if plan is not None else "-"
        rows.append(f"| {label} | {achieved} | {params / 1e6:.1f} | {latency * 1e3:.0f} | {latencies[0] / latency:.2f}x |")
        print(rows[-1], flush=True)

    body = "\n".join([
        "## Inference latency: SmolLM2-135M (`bench/inference.py`)",
        "",
        machine_line() + f" Device: {device.type}.",
        f"Forward pass of a batch of {args.batch} x {args.seq_len} tokens, median of {args.repeats} interleaved "
        f"runs after 2 warm-up rounds; ratio {args.ratio:g}. Whole-model parameters include the 28M embedding "
        "(tied with the LM head), which no method touches.",
        "",
        "| model | achieved ratio | params (M) | latency (ms) | speed-up vs dense |",
        "|---|---|---|---|---|",
        *rows,
    ])
    print(body)
    if not args.no_write:
        write_section("inference", body)


if __name__ == "__main__":
    main()
