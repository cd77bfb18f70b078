"""The latency stage of a sweep: after the trials, when nothing else runs, time the dense model and
each distinct compressed shape once, and fill in the latency columns of every finished trial.

Trials with the same layer shapes (`TrialRow.shape`: e.g. every SVD-family method at one ratio
with the `uniform` allocation) run at the same speed whatever their weights, so one of them is
rebuilt (its method's decompositions and its rank plan, as the trial built it) and timed against
the dense model, their runs interleaved (`trainables.latency.measure`), in one Ray task with a
trial's resources: its CPU threads, or its GPU. Shapes are timed in groups, as many as memory holds
(up to `MAX_GROUP`), each group interleaved with one set of dense runs. Beside the measured speed-up stands the FLOP-bound
one (`compression.cost.flops_per_token`: linear layers with the LM head, plus attention at the
measured length). A trial is slower than dense only when the difference of the medians exceeds
the larger of the two interquartile ranges (`slower_than_dense`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import time

import ray

from compression.methods import method_key
from sweeps.analysis import slower_than_dense
from sweeps.spec import SweepSpec
from sweeps.table import ResultsTable
from trainables.trial import Shared

log = logging.getLogger("lrsweep")
MAX_GROUP = 16  # compressed models timed in one interleaved round with the dense model

LATENCY_COLUMNS = ("latency_device", "latency_batch", "latency_seq_len", "latency_ms_dense", "latency_ms_compressed",
                   "latency_iqr_ms_dense", "latency_iqr_ms_compressed", "speedup", "speedup_flops")


def _group_size(dense, device) -> int:
    """How many compressed models one round of timed runs holds beside the dense one: as many as
    half the free memory of `device` takes at the dense model's size (a compressed model is no
    larger), at least 1, at most `MAX_GROUP`."""
    import torch

    from sweeps.prepare import available_memory

    size = sum(t.numel() * t.element_size() for t in [*dense.parameters(), *dense.buffers()])
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else available_memory()
    return max(1, min(MAX_GROUP, int(free // 2 // max(size, 1))))


def _measure_shapes(model_source: str, task: str, num_labels: int | None, seed: int, dense_state, stats,
                    methods: dict, decompositions: dict, shapes: list[tuple[str, str, dict]], settings: dict,
                    threads: int, use_gpu: bool) -> dict:
    """{shape: measured columns} for each (shape, method key, rank plan): in a Ray worker with a
    trial's resources, or in the driver of a sweep on one machine (nothing else runs then). The
    shapes are timed in groups (`_group_size`), each group's runs interleaved with one set of the
    dense model's: the dense runs are not repeated per shape. Models are built with every thread
    of the process; only the timed runs use the trial's `threads`."""
    import torch

    from compression.allocation import RankPlan
    from compression.apply import compress
    from compression.cost import flops_per_token
    from trainables.latency import device_label, measure, random_inputs
    from trainables.sources import load_model

    device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
    loaded = load_model(model_source, task=task, num_labels=num_labels, seed=seed)
    if dense_state is not None:
        loaded.model.load_state_dict(dense_state)
    cpu_model = loaded.model
    dense = copy.deepcopy(cpu_model).to(device)
    ids = random_inputs(dense, settings["batch_size"], settings["seq_len"])
    dense_flops = flops_per_token(dense, settings["seq_len"])
    ordered = sorted(shapes, key=lambda s: s[1])  # the decompositions of one method at a time
    size = _group_size(dense, device)
    out, held = {}, (None, None)
    for first in range(0, len(ordered), size):
        group = {}
        for shape, key, plan in ordered[first:first + size]:
            if held[0] != key:
                held = (key, ray.get(decompositions[key]))
            group[shape] = compress(copy.deepcopy(cpu_model), stats, methods[key], RankPlan.from_dict(plan),
                                    held[1]).to(device)
        dense_latency, *latencies = measure([dense, *group.values()], ids, repeats=settings["repeats"],
                                            warmup=settings["warmup"], threads=threads)
        for (shape, model), latency in zip(group.items(), latencies):
            out[shape] = {"latency_device": device_label(device, threads), "latency_batch": settings["batch_size"],
                          "latency_seq_len": settings["seq_len"], "latency_ms_dense": dense_latency.median_ms,
                          "latency_ms_compressed": latency.median_ms, "latency_iqr_ms_dense": dense_latency.iqr_ms,
                          "latency_iqr_ms_compressed": latency.iqr_ms,
                          "speedup": dense_latency.median_ms / latency.median_ms,
                          "speedup_flops": dense_flops / flops_per_token(model, settings["seq_len"])}
        del group
    return out


def measure_latency(spec: SweepSpec, shared: Shared, table: ResultsTable, in_driver: bool = False) -> int:
    """Time every distinct shape of the finished trials (see the module docstring) and write the
    latency columns of their rows: in this process when `in_driver` (a sweep on one machine), else
    in a Ray task. Rows that have them (kept by a resumed sweep) keep them, and a
    shape one of them measured is not timed again. Returns how many shapes were timed. A failure
    is logged, not raised: the results stand without latency."""
    settings = spec.latency
    rows = [r for r in table.rows.values() if r.status == "ok" and r.method != "dense" and r.shape]
    known = {r.shape: {c: getattr(r, c) for c in LATENCY_COLUMNS} for r in rows if math.isfinite(r.speedup)}
    rows = [r for r in rows if not math.isfinite(r.speedup)]  # a resumed sweep's kept rows keep theirs
    if settings.repeats == 0 or not rows:
        return 0
    shapes: dict[str, tuple[str, dict]] = {}
    for row in (r for r in rows if r.shape not in known):
        key = method_key(row.method, json.loads(row.options))
        if row.shape not in shapes and key in shared.decompositions and key not in shared.decomposition_errors:
            shapes[row.shape] = (key, json.loads(row.rank_plan))
    if not shapes:  # every shape was measured with a row of an earlier run
        table.update([dataclasses.replace(r, **known[r.shape]) for r in rows if r.shape in known])
        return 0
    res = spec.resources
    log.info(f"latency: {len(shapes)} distinct shape(s) of {len(rows)} finished trial(s), "
             f"{settings.batch_size} x {settings.seq_len} tokens, {settings.repeats} runs each")
    args = (spec.model, spec.task.type, ray.get(shared.data).get("num_labels"), spec.seed, shared.dense_state,
            shared.stats, {key: shared.methods[key] for key, _ in shapes.values()},
            {key: shared.decompositions[key] for key, _ in shapes.values()},
            [(shape, key, plan) for shape, (key, plan) in shapes.items()],
            settings.model_dump(), max(1, int(res.cpu)), res.gpu > 0)
    start = time.perf_counter()
    try:
        if in_driver:
            dense_state = None if shared.dense_state is None else ray.get(shared.dense_state)
            measured = _measure_shapes(*args[:4], dense_state, ray.get(shared.stats), *args[6:])
        else:
            task = ray.remote(num_cpus=res.cpu, num_gpus=res.gpu, max_retries=spec.limits.retries)(_measure_shapes)
            measured = ray.get(task.remote(*args))
    except Exception as e:  # noqa: BLE001 - the results stand without latency; say why
        log.warning(f"latency: not measured ({type(e).__name__}: {str(e).strip().splitlines()[-1]})")
        return 0
    measured |= known
    table.update([dataclasses.replace(r, **measured[r.shape]) for r in rows if r.shape in measured])
    slow = sum(slower_than_dense(m) for m in measured.values())
    speedups = [m["speedup"] for m in measured.values()]
    log.info(f"latency: speed-ups {min(speedups):.2f}x to {max(speedups):.2f}x; {slow} shape(s) slower than dense "
             f"beyond the spread of the runs ({time.perf_counter() - start:.0f} s)")
    return len(measured)

