"""The shared work of a sweep against a plain training pass: calibration and every decomposition.

    python bench/shared_cost.py [--repeats 3] [--calibration 32] [--seq-len 256] [--no-write]

SmolLM2-135M, `--calibration` x `--seq-len` windows of packaged:wiki in batches of 8 (the sweep
default), one process, torch's threads (2 on the reference machine). Timed with
torch.utils.benchmark, `--repeats` runs each, interleaved, medians quoted:

- forward + backward: the batches through the model, the summed next-token loss, backward to the
  targeted weights only (what calibration differentiates), no statistics: the floor of calibration;
- forward: the batches through the backbone, no head, no gradients: the floor of a pass without
  gradients;
- `collect_stats` with every statistic (what a sweep with fwsvd or whiten-fw calibrates), with
  the neuron Fisher as its only gradient statistic (no weight gradients: what a sweep of
  whiten-fd, id-fd or hybrid calibrates) and without gradients (svd, whiten, id);
- `decompose_model` of every method alone, and of the three whitening methods sharing their
  whitenings (as a sweep's decomposition task does).

Also the relative Frobenius error of the Grams (float32 per batch, float64 total) against Grams
accumulated in float64 throughout, on the same batches. The last line printed is
`calibration R.RRx of forward+backward; whiten-fd decomposition R.RRx of forward+backward`, for
a sweep of whiten-fd (its calibration: the neuron Fisher, no weight gradients); the line before
it gives the calibration with every statistic.
The process keeps large freed tensors for reuse (`trainables.memory.keep_freed_memory`), as a
sweep's driver and trials do: the floor and calibration alike.
Writes the "shared cost" section of BENCHMARKS.md unless --no-write.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F
from torch.utils import benchmark

from benchfile import machine_line, write_section
from compression.apply import decompose_model
from compression.calibration import collect_stats
from compression.methods import METHODS
from compression.targets import find_targets, get_module
from trainables.memory import keep_freed_memory
from trainables.sources import draw_windows, load_model

MODEL, CALIBRATION = "packaged:smollm2-135m", "packaged:wiki"
WHITENING = ("whiten", "whiten-fw", "whiten-fd")


def forward_backward(model, batches, targets) -> None:
    """The calibration's autograd work without its statistics."""
    weights = [get_module(model, t.name).weight for t in targets]
    for p in model.parameters():
        p.requires_grad_(False)
    for w in weights:
        w.requires_grad_(True)
    for batch in batches:
        labels = F.pad(batch["input_ids"][:, 1:], (0, 1), value=-100)  # the last position predicts nothing
        logits = model(**batch).logits
        F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="sum").backward()
        for w in weights:
            w.grad = None
    for p in model.parameters():
        p.requires_grad_(False)


def forward(model, batches) -> None:
    with torch.no_grad():
        for batch in batches:
            model.base_model(**batch)


def float64_grams(model, batches, targets) -> dict[str, torch.Tensor]:
    """The Gram of every input group accumulated in float64 throughout (the reference)."""
    leaders = {t.input_group: t for t in targets}
    grams = {g: torch.zeros(t.in_features, t.in_features, dtype=torch.float64) for g, t in leaders.items()}

    def accumulate(group: str):
        def hook(module, args, output) -> None:
            rows = args[0].reshape(-1, args[0].shape[-1]).double()
            grams[group].addmm_(rows.T, rows)

        return hook

    hooks = [get_module(model, t.name).register_forward_hook(accumulate(g)) for g, t in leaders.items()]
    forward(model, batches)
    for h in hooks:
        h.remove()
    return grams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--calibration", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    keep_freed_memory()

    loaded = load_model(MODEL)
    model = loaded.model
    windows = draw_windows(CALIBRATION, loaded.tokenizer, args.seq_len, {"calibration": args.calibration},
                           seed=0)["calibration"]
    batches = [{"input_ids": w, "attention_mask": torch.ones_like(w)} for w in windows.split(args.batch_size)]
    targets = find_targets(model)
    stats = collect_stats(model, batches, progress=False)  # also the statistics the decompositions use
    reference = float64_grams(model, batches, targets)
    errors = [float((stats.grams[g] - r).norm() / r.norm()) for g, r in reference.items()]
    del reference

    def timer(fn, *a, **kw) -> benchmark.Timer:
        return benchmark.Timer(stmt="fn(*a, **kw)", globals={"fn": fn, "a": a, "kw": kw},
                               num_threads=torch.get_num_threads())

    def whitening_methods() -> None:
        whitenings: dict = {}
        for m in WHITENING:
            decompose_model(model, stats, m, whitenings=whitenings)

    cases = {
        "forward + backward": timer(forward_backward, model, batches, targets),
        "forward (backbone, no gradients)": timer(forward, model, batches),
        "collect_stats, with gradients": timer(collect_stats, model, batches, progress=False),
        "collect_stats, neuron Fisher only (no weight gradients)": timer(collect_stats, model, batches,
                                                                          progress=False, weight_fisher=False),
        "collect_stats, without gradients": timer(collect_stats, model, batches, progress=False, gradients=False),
        **{f"decompose {m}": timer(decompose_model, model, stats, m) for m in METHODS},
        "decompose whiten + whiten-fw + whiten-fd, sharing whitenings": timer(whitening_methods),
    }
    seconds: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.repeats):  # interleaved: every case sees the same background
        for name, t in cases.items():
            seconds[name].append(t.timeit(1).median)
            print(f"{name}: {seconds[name][-1]:.2f} s", flush=True)
    med = {name: statistics.median(v) for name, v in seconds.items()}
    base = med["forward + backward"]
    rows = "\n".join(f"| {name} | {med[name]:.2f} | {med[name] / base:.2f}x | "
                     f"{', '.join(f'{x:.2f}' for x in seconds[name])} |" for name in cases)
    every = (f"calibration with every statistic (a sweep with fwsvd or whiten-fw) "
             f"{med['collect_stats, with gradients'] / base:.2f}x of forward+backward")
    summary = (f"calibration {med['collect_stats, neuron Fisher only (no weight gradients)'] / base:.2f}x of "
               f"forward+backward; whiten-fd decomposition {med['decompose whiten-fd'] / base:.2f}x of forward+backward")
    body = f"""## Shared cost of a sweep (bench/shared_cost.py)

{machine_line()}

SmolLM2-135M, {args.calibration} x {args.seq_len}-token windows of `{CALIBRATION}` in batches of
{args.batch_size}, one process; medians of {args.repeats} interleaved runs (torch.utils.benchmark).
"forward + backward" is the floor of calibration: the same batches, loss and gradients (to the
targeted weights) with no statistics collected.

| work | median (s) | of forward + backward | runs (s) |
|---|---:|---:|---|
{rows}

Grams (each batch's product in float32, added into float64) against Grams accumulated in float64
throughout: relative Frobenius error at most {max(errors):.1e} (median {statistics.median(errors):.1e})
over the {len(errors)} input groups.

{every}; a sweep of whiten-fd:

{summary}
"""
    if not args.no_write:
        write_section("shared cost", body)
    print(body.rstrip().rsplit("\n", 1)[0])
    print(summary)


if __name__ == "__main__":
    main()
