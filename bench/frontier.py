"""The one-shot quality frontier: today's best, each new ingredient alone, and all together.

    python bench/frontier.py [--model smollm2|gemma3|tiny] [--ratios 0.2 0.4] [--configs ...] [--no-write]

No finetuning. Calibration: `--calibration` x 256-token windows of `packaged:wiki` (the statistics
are cached in `--stats-dir`, so a second run decomposes and evaluates only); perplexity on
`--eval-windows` held-out 256-token windows of `packaged:lee`, as `bench/quality.py`. Configs:

    baseline  whiten-fd / spectrum (the best before: BENCHMARKS "quality")
    identity  + factors without rank wastage (form: identity)
    refit           + propagated refitting (dense layers too, no damping)
    refit-ridge     + propagated refitting of the compressed layers, damp 0.01
    hybrid          + id-fd neuron pruning competing with factors (method hybrid)
    identity-refit  identity-block factors + refit-ridge
    identity-hybrid identity-block factors + hybrid
    all             all three (refit-ridge)
    sampled                  + Fisher statistics from labels the model samples (`fisher: sampled`)
    identity-sampled         identity-block factors + sampled Fisher
    identity-hybrid-sampled  identity-block hybrid + sampled Fisher

The sampled Fisher (Monte Carlo: one label per token drawn from the model's own prediction, seeded)
changes the statistics, not the method: those configs calibrate once more (cached separately) and
decompose from those statistics.

Every config is also scored on 16 windows of `packaged:wiki` disjoint from the calibration
windows (the validation column): the configuration to recommend is chosen there, never on the
held-out text.

Times: each config's decomposition (once per sweep: whiten-fd's, plus id-fd's for hybrid; as a
sweep's decomposition stage, `sweeps.shared.decompose_all`, the bench decomposes the two once and
derives every config's from them), and per trial the plan + truncation
+ layer swap and the refit stage; "extra per trial" is what a trial spends beyond the baseline's.
Writes the "frontier-<model>" section of BENCHMARKS.md (unless --no-write) and prints it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from benchfile import machine_line, write_section
from compression.apply import compress, plan_ranks
from compression.calibration import CalibrationStats, collect_stats
from compression.methods.hybrid import Hybrid
from compression.methods.id_fd import IdFd
from compression.methods.whiten_fd import WhitenFd
from compression.refit import refit, row_scales
from sweeps.shared import decompose_all
from trainables.evaluation import perplexity
from trainables.sources import draw_windows, load_model

MODELS = {"smollm2": "packaged:smollm2-135m", "gemma3": "packaged:gemma3-270m",
          "tiny": "tiny:llama"}  # tiny: a smoke run of the script (random weights, seconds)
CALIBRATION, EVAL, SEQ_LEN = "packaged:wiki", "packaged:lee", 256
REFIT = {"dense_layers": True, "damp": 0.0}
RIDGE = {"dense_layers": False, "damp": 0.01}  # the compressed layers only, with GPTQ's 1 % damping
CONFIGS = {
    "baseline": ("whiten-fd / spectrum (the best before)", WhitenFd(), None),
    "identity": ("+ identity-block factors (`form: identity`)", WhitenFd(form="identity"), None),
    "refit": ("+ propagated refit (`refit: {dense: true}`)", WhitenFd(), REFIT),
    "refit-ridge": ("+ propagated refit, compressed layers, damp 0.01", WhitenFd(), RIDGE),
    "hybrid": ("+ id-fd pruning vs factors (`hybrid`)", Hybrid(), None),
    "identity-refit": ("identity-block + refit (compressed layers, damp 0.01)", WhitenFd(form="identity"), RIDGE),
    "identity-hybrid": ("identity-block + hybrid", Hybrid(form="identity"), None),
    "all": ("all three (`hybrid`, `form: identity`, refit compressed layers, damp 0.01)",
            Hybrid(form="identity"), RIDGE),
    "sampled": ("+ sampled Fisher (`calibration: {fisher: sampled}`)", WhitenFd(), None),
    "identity-sampled": ("identity-block + sampled Fisher", WhitenFd(form="identity"), None),
    "identity-hybrid-sampled": ("identity-block hybrid + sampled Fisher", Hybrid(form="identity"), None),
}
SAMPLED = {"sampled", "identity-sampled", "identity-hybrid-sampled"}  # the configs on sampled-Fisher statistics


def fisher_of(name: str) -> str:
    return "sampled" if name in SAMPLED else "empirical"


def batches_of(windows: torch.Tensor, size: int) -> list[dict[str, torch.Tensor]]:
    return [{"input_ids": w, "attention_mask": torch.ones_like(w)} for w in windows.split(size)]


def statistics_for(model, calibration: torch.Tensor, path: Path, fisher: str) -> tuple[CalibrationStats, float]:
    """The calibration statistics (`fisher` labels) from `path`, or collected (and saved there); their seconds."""
    if path.is_file():
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata()
        return CalibrationStats.from_tensors(load_file(str(path)), metadata), float("nan")
    start = time.perf_counter()
    stats = collect_stats(model, batches_of(calibration, 4), progress=False, fisher=fisher)
    seconds = time.perf_counter() - start
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors, metadata = stats.to_tensors()
    save_file(tensors, str(path), metadata=metadata)
    return stats, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=list(MODELS), default="smollm2")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.4])
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--calibration", type=int, default=32)
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--stats-dir", type=Path, default=Path(tempfile.gettempdir()) / "lowrank-sweep-bench")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    source = MODELS[args.model]
    loaded = load_model(source)
    model, tok = loaded.model, loaded.tokenizer
    calibration = draw_windows(CALIBRATION, tok, SEQ_LEN, {"calibration": args.calibration}, seed=0)["calibration"]
    held_out = draw_windows(EVAL, tok, SEQ_LEN, {"eval": args.eval_windows}, seed=0)["eval"]
    validation = draw_windows(CALIBRATION, tok, SEQ_LEN, {"calibration": args.calibration, "train": 16},
                              seed=0)["train"]  # the same calibration windows, then 16 others
    dense = perplexity(model, held_out, batch_size=8).value
    dense_validation = perplexity(model, validation, batch_size=8).value
    refit_batches = batches_of(calibration, 4)

    # per kind of Fisher statistics, as a sweep's decomposition stage: whiten-fd and id-fd decomposed
    # once, every config made from them
    stats, calibration_seconds, by_key, seconds = {}, {}, {}, {}
    for fisher in sorted({fisher_of(name) for name in args.configs}):
        stem = f"{args.model}-{CALIBRATION.split(':')[1]}-{args.calibration}x{SEQ_LEN}"
        path = args.stats_dir / (f"{stem}.safetensors" if fisher == "empirical" else f"{stem}-{fisher}.safetensors")
        stats[fisher], calibration_seconds[fisher] = statistics_for(model, calibration, path, fisher)
        names = [name for name in args.configs if fisher_of(name) == fisher]
        bases = [WhitenFd(), IdFd()] if any(isinstance(CONFIGS[name][1], Hybrid) for name in names) else [WhitenFd()]
        methods = {m.key: m for m in [*bases, *(CONFIGS[name][1] for name in names)]}
        made = decompose_all(model, stats[fisher], list(methods.values()), "cpu", torch.get_num_threads())
        failed = [key for key, decs in zip(methods, made[0::2]) if decs is None]
        if failed:
            raise SystemExit(f"frontier: the decompositions of {', '.join(failed)} ({fisher} Fisher) failed")
        by_key |= {(fisher, key): decs for key, decs in zip(methods, made[0::2])}
        seconds |= {(fisher, m.name): s for m, s in zip(bases, made[1::2])}
    rows, per_trial = {}, {}
    for name in args.configs:
        label, method, refit_settings = CONFIGS[name]
        fisher = fisher_of(name)
        decs = by_key[fisher, method.key]
        cells, checks, compress_s, refit_s = [], [], [], []
        for ratio in args.ratios:
            start = time.perf_counter()
            plan = plan_ranks(model, stats[fisher], method, ratio, "spectrum", decs)
            small = compress(model, stats[fisher], method, plan, decs, inplace=False)
            compress_s.append(time.perf_counter() - start)
            if refit_settings is not None:
                refit_s.append(refit(small, model, refit_batches, stats[fisher].targets, row_scales(decs),
                                     **refit_settings).seconds)
            ppl = perplexity(small, held_out, batch_size=8).value
            check = perplexity(small, validation, batch_size=8).value
            pruned = sum(1 for u in plan.units.values() if u["role"] == "mlp")
            cells.append(f"{ppl:.2f} ({ppl / dense:.2f}x)" + (f", {pruned} MLPs pruned" if pruned else ""))
            checks.append(f"{check:.2f}")
            print(f"{name} {ratio}: {ppl:.2f}, validation {check:.2f} (achieved {plan.achieved_ratio:.4f})",
                  flush=True)
            del small
        per_trial[name] = [statistics.median(compress_s), statistics.median(refit_s) if refit_s else 0.0]
        decompose = seconds[fisher, "whiten-fd"] + (seconds[fisher, "id-fd"] if isinstance(method, Hybrid) else 0.0)
        rows[name] = (label, decompose, cells, checks)

    base = sum(per_trial.get("baseline", [0.0, 0.0]))
    table = []
    for name in args.configs:
        label, decompose, cells, checks = rows[name]
        compress_s, refit_s = per_trial[name]
        extra = compress_s + refit_s - base
        table.append(f"| {label} | " + " | ".join(cells) + f" | {' / '.join(checks)} | {decompose:.0f} | {compress_s:.1f} | "
                     f"{refit_s:.1f} | {extra:+.1f} |")
    ratio_cols = " | ".join(f"ppl @ {r:g} removed (x dense)" for r in args.ratios)
    calibrated = "; ".join(
        f"{fisher} Fisher " + ("from the cache" if s != s else f"{s:.0f} s, one forward + backward pass")
        for fisher, s in calibration_seconds.items())
    body = "\n".join([
        f"## The one-shot frontier: {source.split(':')[1]}, no finetuning (`bench/frontier.py --model {args.model}`)",
        "",
        machine_line(),
        f"Calibration: {args.calibration} x {SEQ_LEN}-token windows of `{CALIBRATION}` ({calibrated}). "
        f"Perplexity on {args.eval_windows} held-out {SEQ_LEN}-token windows of `{EVAL}` "
        f"({held_out.numel():,} tokens), never calibrated or tuned on. Dense perplexity: **{dense:.2f}**. "
        f"Validation ppl: on 16 `{CALIBRATION}` windows disjoint from the calibration windows (dense "
        f"{dense_validation:.2f}), one value per ratio; the recommended configuration is chosen there. "
        "Allocation `spectrum` everywhere; `ratio` = fraction of the targeted linear weights removed "
        "(all q/k/v/o/gate/up/down, pruned MLPs included).",
        "",
        f"| configuration | {ratio_cols} | validation ppl | decomposition (s, once) | plan + compress per trial (s) | "
        "refit per trial (s) | extra per trial vs baseline (s) |",
        "|---|" + "---|" * len(args.ratios) + "---|---|---|---|---|",
        *table,
    ])
    print(body)
    if not args.no_write:
        write_section(f"frontier-{args.model}", body)


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    main()
