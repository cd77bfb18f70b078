"""Into the Ray object store, once per sweep: the statistics, the data, the dense weights, and each
method's ratio-independent decompositions. The decompositions of all methods run in one go that
takes every CPU of a node (nothing else runs while the trials wait for them) or the sweep's GPU,
so the whitening methods whiten each input once between them: in the driver for a sweep on this
machine (no worker process to start, the model already loaded), else in one Ray task. Everything reaches the workers
through the object store, never through a path on the head; all of it is owned by the driver and
stored on its node, so a worker node can die mid-sweep without taking shared state with it.
"""

from __future__ import annotations

import logging
import math
import time

import ray

from compression.calibration import CalibrationStats
from compression.methods import MethodConfig
from sweeps.prepare import Prepared, calibration_batches
from sweeps.spec import SweepSpec
from sweeps.trials import method_configs, refits
from trainables.sources import load_model
from trainables.trial import Shared

log = logging.getLogger("lrsweep")


def trial_stats(stats: CalibrationStats) -> CalibrationStats:
    """What a trial reads of the statistics: the targets, token counts and block importance (for
    planning ranks and checking the model), without the Gram matrices and Fisher vectors, which
    only the decomposition tasks need. A trial process then never holds the full statistics
    (gigabytes for a large model): only the decomposition tasks pull them to their nodes."""
    return CalibrationStats(list(stats.targets), {}, dict(stats.tokens), {}, {}, {}, stats.block_importance.clone(),
                            dict(stats.meta))


def decompose_all(model, stats, methods: list[MethodConfig], device: str, threads: int) -> list:
    """For each method, its decompositions (None when they failed) and its seconds (or the error
    message), flat: [decs_1, seconds_1, decs_2, seconds_2, ...]. A method derived from others
    (`MethodConfig.derived_from`: another storage form, hybrid's two parts) is made from theirs,
    each decomposed once; a method's seconds are those of what it computed first."""
    import torch

    from compression.apply import decompose_model

    whitenings: dict = {}  # shared by the whitening methods: each input is whitened once
    made: dict = {}  # method key -> its decompositions (on the CPU), or why they failed

    def decompositions(method: MethodConfig) -> dict | str:
        if method.key not in made:
            try:
                parts = [decompositions(part) for part in method.derived_from()]
                failed = next((part for part in parts if isinstance(part, str)), None)
                if failed is not None:
                    made[method.key] = failed
                elif parts:
                    made[method.key] = method.derive(parts)
                else:  # back on the CPU before they are shared: trials on CPU-only nodes read them
                    decs = decompose_model(model, stats, method, device=device if device != "cpu" else None,
                                           whitenings=whitenings)
                    made[method.key] = {name: d.to("cpu") for name, d in decs.items()}
            except Exception as e:  # noqa: BLE001 - its trials fail with this message and the sweep goes on
                made[method.key] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else e}"
        return made[method.key]

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    out = []
    try:
        for method in methods:
            start = time.perf_counter()
            decs = decompositions(method)
            out += [None, decs] if isinstance(decs, str) else [decs, time.perf_counter() - start]
    finally:
        torch.set_num_threads(before)
    return out


def _decompose_task(model_source: str, task: str, num_labels: int | None, seed: int, dense_state, stats,
                    methods: list[MethodConfig], device: str, threads: int) -> list:
    """Runs in a Ray worker (a cluster's node): `decompose_all` on the model loaded there."""
    loaded = load_model(model_source, task=task, num_labels=num_labels, seed=seed)
    if dense_state is not None:
        loaded.model.load_state_dict(dense_state)
    return decompose_all(loaded.model, stats, methods, device, threads)


def _outcome(ref) -> float | str:
    """A method's seconds, or why it failed (the error of a task that died past its retries)."""
    try:
        return ray.get(ref)
    except Exception as e:  # noqa: BLE001 - every method of the task fails with it
        return f"{type(e).__name__}: {str(e).strip().splitlines()[-1]}"


def _decomposition_cpus(spec: SweepSpec) -> int:
    """CPUs of the decomposition task: every CPU of the largest node (at least a trial's)."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    largest = max((int(n.get("Resources", {}).get("CPU", 0)) for n in nodes), default=1)
    return max(1, int(spec.resources.cpu), largest)


def put_shared(spec: SweepSpec, prepared: Prepared, in_driver: bool = False) -> Shared:
    """Put the statistics, data and dense weights in the object store once, and the decompositions
    of every method config, computed before any trial starts (trials must not wait holding their
    CPUs). `in_driver` (a sweep on this machine alone): computed here, on the model already loaded,
    with every CPU (or the GPU) of the machine; else in one Ray task on the cluster."""
    stats_ref = ray.put(prepared.stats)
    data = {k: prepared.data[k] for k in ("eval", "train") if k in prepared.data}
    data["num_labels"] = prepared.data.get("num_labels")
    if refits(spec):  # the refit stage runs the calibration batches through each trial's model
        data["calibration"] = calibration_batches(spec, prepared.data, prepared.loaded.tokenizer)
    data_ref = ray.put(data)
    dense_ref = ray.put(prepared.dense_state) if prepared.dense_state is not None else None
    res = spec.resources
    device = "cuda" if res.gpu > 0 else "cpu"
    cpus = _decomposition_cpus(spec) if res.gpu == 0 else max(1, int(res.cpu))
    methods = {m.key: m for m in method_configs(spec)}
    seconds, decompositions, errors = {}, {}, {}
    # per method: (how to get its decompositions, its seconds or why it failed)
    if in_driver:
        here = decompose_all(prepared.loaded.model, prepared.stats, list(methods.values()), device, cpus)
        outcomes = [(lambda d=d: d, outcome) for d, outcome in zip(here[0::2], here[1::2])]
        del here
    else:  # a crashed worker is retried (limits.retries); a Python exception is caught per method
        task = ray.remote(num_cpus=cpus, num_gpus=res.gpu, num_returns=2 * len(methods),
                          max_retries=spec.limits.retries)(_decompose_task)
        refs = task.remote(spec.model, spec.task.type, data["num_labels"], spec.seed, dense_ref, stats_ref,
                           list(methods.values()), device, cpus)
        outcomes = [(lambda r=r: ray.get(r), _outcome(o)) for r, o in zip(refs[0::2], refs[1::2])]
        del refs
    for key, (decs, outcome) in zip(methods, outcomes):
        if isinstance(outcome, str):
            seconds[key], errors[key] = math.nan, outcome
            log.warning(f"decomposition {key} failed: {outcome}")
            continue
        seconds[key] = outcome
        # Owned by the driver: a copy a task left lives on the node that ran it, and if that node
        # dies mid-sweep Ray would have to run the task again for the trials that read it, while
        # those trials hold every CPU it could run on (a deadlock we hit).
        decompositions[key] = ray.put(decs())
        log.info(f"decomposition {key}: {seconds[key]:.1f} s")
    del outcomes  # the task's own copies (or the driver's) can go
    dense = prepared.dense_row
    return Shared(stats=ray.put(trial_stats(prepared.stats)), methods=methods, decompositions=decompositions,
                  decomposition_errors=errors,
                  data=data_ref, dense_state=dense_ref, metric_dense=dense.metric, params_dense=dense.params_dense,
                  seconds_calibration=prepared.seconds_calibration, seconds_decompose=seconds,
                  calibration_key=prepared.calibration_key)
