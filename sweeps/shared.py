"""Into the Ray object store, once per sweep: the statistics, the data, the dense weights, and each
method's ratio-independent decompositions (one Ray task per method, on a GPU worker when the sweep
reserves GPUs). Everything reaches the workers through the object store, never through a path on
the head; all of it is owned by the driver and stored on its node, so a worker node can die
mid-sweep without taking shared state with it.
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


def _decompose_task(model_source: str, task: str, num_labels: int | None, seed: int, dense_state, stats,
                    method: MethodConfig, device: str) -> tuple[dict, float]:
    """Runs in a Ray worker: the ratio-independent decompositions of one method, and their seconds."""
    from compression.apply import decompose_model

    loaded = load_model(model_source, task=task, num_labels=num_labels, seed=seed)
    if dense_state is not None:
        loaded.model.load_state_dict(dense_state)
    start = time.perf_counter()
    out = decompose_model(loaded.model, stats, method, device=device if device != "cpu" else None)
    seconds = time.perf_counter() - start
    # back on the CPU before they are shared: trials on CPU-only nodes read the same objects
    return {name: d.to("cpu") for name, d in out.items()}, seconds


def put_shared(spec: SweepSpec, prepared: Prepared) -> Shared:
    """Put the statistics, data and dense weights in the object store once; run one decomposition
    task per method config and wait for them all (trials must not wait holding their CPUs)."""
    stats_ref = ray.put(prepared.stats)
    data = {k: prepared.data[k] for k in ("eval", "train") if k in prepared.data}
    data["num_labels"] = prepared.data.get("num_labels")
    if refits(spec):  # the refit stage runs the calibration batches through each trial's model
        data["calibration"] = calibration_batches(spec, prepared.data, prepared.loaded.tokenizer)
    data_ref = ray.put(data)
    dense_ref = ray.put(prepared.dense_state) if prepared.dense_state is not None else None
    res = spec.resources
    device = "cuda" if res.gpu > 0 else "cpu"
    # a crashed worker is retried (limits.retries); a Python exception is not (retry_exceptions=False)
    task = ray.remote(num_cpus=res.cpu, num_gpus=res.gpu, num_returns=2,
                      max_retries=spec.limits.retries)(_decompose_task)
    methods = {m.key: m for m in method_configs(spec)}
    refs = {key: task.remote(spec.model, spec.task.type, data["num_labels"], spec.seed, dense_ref, stats_ref,
                             method, device)
            for key, method in methods.items()}
    seconds, decompositions = {}, {}
    for key, (decomposition_ref, seconds_ref) in refs.items():
        try:
            seconds[key] = ray.get(seconds_ref)
            # Owned by the driver from here: the copy the task left lives on the node that ran it,
            # and if that node dies mid-sweep Ray would have to run the task again for the trials
            # that read it, while those trials hold every CPU it could run on (a deadlock we hit).
            decompositions[key] = ray.put(ray.get(decomposition_ref))
            log.info(f"decomposition {key}: {seconds[key]:.1f} s")
        except Exception as e:  # noqa: BLE001 - its trials fail with this error and the sweep goes on
            seconds[key], decompositions[key] = math.nan, decomposition_ref
            log.warning(f"decomposition {key} failed: {str(e).strip().splitlines()[-1]}")
    refs.clear()  # the tasks' own copies can go
    dense = prepared.dense_row
    return Shared(stats=ray.put(trial_stats(prepared.stats)), methods=methods, decompositions=decompositions,
                  data=data_ref, dense_state=dense_ref, metric_dense=dense.metric, params_dense=dense.params_dense,
                  seconds_calibration=prepared.seconds_calibration, seconds_decompose=seconds,
                  calibration_key=prepared.calibration_key)
