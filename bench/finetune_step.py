"""Seconds per LoRA finetune step of a compressed SmolLM2-135M, and what each speed-up gives.

    python bench/finetune_step.py [--repeats N] [--steps N] [--no-write]

The model: identity-block hybrid / spectrum at 40 % removed (heal.yaml's 40 % configuration),
calibrated on 32 x 256-token windows of `packaged:wiki`; LoRA r 8 on every layer, batches of
4 x 256 tokens. Variants, each timed on its own copy of the model, runs interleaved, medians of
`--repeats` timings of `--steps` optimizer steps (torch.utils.benchmark):

- float32: no autocast, the plain loss over the whole logits;
- bf16, plain: CPU bf16 autocast, the whole logits, frozen weights cast at every call;
- bf16, chunked loss: the next-token loss a chunk of tokens at a time (`trainables.head_loss`);
- bf16, chunked loss + frozen weights in bf16 (`trainables.frozen_cast`): what finetune does.

Writes the "finetune step" section of BENCHMARKS.md unless --no-write.
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch
from torch.utils import benchmark

import trainables.finetune as finetune_module
from benchfile import machine_line, write_section
from compression.apply import compress, decompose_model, plan_ranks
from compression.calibration import collect_stats
from compression.methods import method_config
from compression.targets import find_targets
from trainables.adapters import Healing
from trainables.finetune import FinetuneConfig, finetune
from trainables.sources import draw_windows, load_model


class _NoCast:
    """Stands in for FrozenLinearCast: frozen weights stay float32, autocast casts them each call."""

    def __init__(self, *args):
        pass

    def cast(self) -> None:
        pass

    def restore(self) -> None:
        pass


VARIANTS = {  # name -> (cpu_precision, chunked loss, frozen weights cast)
    "float32": ("float32", False, False),
    "bf16, plain": ("bf16", False, False),
    "bf16, chunked loss": ("bf16", True, False),
    "bf16, chunked loss + frozen weights in bf16": ("bf16", True, True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per timing")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)

    loaded = load_model("packaged:smollm2-135m")
    model = loaded.model
    windows = draw_windows("packaged:wiki", loaded.tokenizer, 256, {"calibration": 32, "train": 64}, seed=0)
    batches = [{"input_ids": windows["calibration"][i:i + 4]} for i in range(0, 32, 4)]
    stats = collect_stats(model, batches, progress=False, weight_fisher=False)
    config = method_config("hybrid", form="identity")
    decs = decompose_model(model, stats, config)
    plan = plan_ranks(model, stats, config, 0.4, "spectrum", decs)
    small = compress(model, stats, config, plan, decs, inplace=False)

    originals = finetune_module.split_head, finetune_module.FrozenLinearCast
    timers, models = {}, {}
    for name, (precision, chunked, cast) in VARIANTS.items():
        ft = FinetuneConfig(steps=args.steps, lr=1e-3, batch_size=4, kind="lora", train="all", cpu_precision=precision)
        healed = copy.deepcopy(small)
        Healing.prepare(healed, find_targets(model), plan, ft)
        models[name] = healed

        def run(healed=healed, ft=ft, chunked=chunked, cast=cast):
            finetune_module.split_head = originals[0] if chunked else (lambda *a: None)
            finetune_module.FrozenLinearCast = originals[1] if cast else _NoCast
            try:
                finetune(healed, "causal-lm", windows["train"], ft)
            finally:
                finetune_module.split_head, finetune_module.FrozenLinearCast = originals

        run()  # warm-up
        timers[name] = benchmark.Timer(stmt="run()", globals={"run": run}, num_threads=torch.get_num_threads())
    runs = {name: [] for name in VARIANTS}
    for _ in range(args.repeats):
        for name, timer in timers.items():
            runs[name].append(timer.timeit(1).median / args.steps)
    medians = {name: statistics.median(r) for name, r in runs.items()}
    base = medians["bf16, plain"]
    lines = [
        "## Seconds per LoRA finetune step (`bench/finetune_step.py`)",
        "",
        machine_line(),
        "",
        f"SmolLM2-135M, identity-block hybrid / spectrum at 40 % removed, LoRA r 8 on every layer, "
        f"batches of 4 x 256 tokens; medians of {args.repeats} interleaved timings of {args.steps} steps each.",
        "",
        "| variant | s / step (median) | vs bf16, plain | runs (s / step) |",
        "|---|---:|---:|---|",
    ]
    for name, median in medians.items():
        lines.append(f"| {name} | {median:.2f} | {base / median:.2f}x | {', '.join(f'{r:.2f}' for r in runs[name])} |")
    text = "\n".join(lines)
    print(text)
    print(f"finetune step {medians['bf16, chunked loss + frozen weights in bf16']:.2f} s; "
          f"{base / medians['bf16, chunked loss + frozen weights in bf16']:.2f}x of bf16, plain")
    if not args.no_write:
        write_section("finetune step", text)


if __name__ == "__main__":
    main()
