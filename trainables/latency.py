"""Forward latency of models on one batch, timed with torch.utils.benchmark.

`measure` runs `warmup` untimed rounds, then `repeats` timed rounds, the models interleaved within
each round (model 1, model 2, ..., then again) so that every model sees the same background load.
In a round each model runs `Timer.blocked_autorange(min_run_time=0)`: one untimed pass (the
Timer's block-size estimate, a warm-up) then one timed forward pass, in inference mode with the
attention mask of ones, synchronised on CUDA, with the given CPU threads. It reports the median
and the interquartile range of the timed passes.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils import benchmark

from compression.errors import UserInputError


@dataclass
class Latency:
    """Milliseconds of one forward pass: median and interquartile range of `runs_ms`."""

    median_ms: float
    iqr_ms: float
    runs_ms: list[float]

    @classmethod
    def of(cls, seconds: list[float]) -> Latency:
        ms = [1000 * s for s in seconds]
        q1, _, q3 = statistics.quantiles(ms, n=4, method="inclusive") if len(ms) > 1 else (ms[0], 0, ms[0])
        return cls(median_ms=statistics.median(ms), iqr_ms=q3 - q1, runs_ms=ms)


def random_inputs(model: nn.Module, batch_size: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """Random token ids [batch_size, seq_len] within the model's vocabulary (seeded), for timing."""
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserInputError(f"latency {name} must be a positive integer, got {value!r}")
    config = getattr(model, "config", None)
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and seq_len > limit:
        raise UserInputError(f"latency seq_len {seq_len} exceeds the model's {limit} positions")
    vocab = getattr(config, "vocab_size", None) or 256
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch_size, seq_len), generator=generator)


def device_label(device: torch.device, threads: int) -> str:
    """"cpu (2 threads)" or "cuda (NVIDIA H100 80GB HBM3)"."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"{device.type} ({threads} thread{'s' if threads != 1 else ''})"


def measure(models: list[nn.Module], input_ids: torch.Tensor, repeats: int = 5, warmup: int = 1,
            threads: int | None = None) -> list[Latency]:
    """The latency of each model (each on its own device) on `input_ids` (see the module
    docstring); `threads`: the CPU threads of the timed runs (default: torch's current)."""
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise UserInputError(f"latency repeats must be a positive integer, got {repeats!r}")
    threads = threads or torch.get_num_threads()
    timers = []
    for model in models:
        device = next(model.parameters()).device
        ids = input_ids.to(device)
        timers.append(benchmark.Timer(
            stmt="with torch.inference_mode(): model(input_ids=ids, attention_mask=mask)",
            globals={"torch": torch, "model": model, "ids": ids, "mask": torch.ones_like(ids)},
            num_threads=threads))
    modes = [m.training for m in models]
    runs: list[list[float]] = [[] for _ in models]
    try:
        for m in models:
            m.eval()
        for round_ in range(warmup + repeats):
            for i, timer in enumerate(timers):
                seconds = timer.blocked_autorange(min_run_time=0).times
                if round_ >= warmup:
                    runs[i] += seconds
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)
    return [Latency.of(r) for r in runs]
