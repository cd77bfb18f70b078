"""Run a sweep: prepare once, share through the object store, run the trials with Tune until every
trial has a row (recovering from the one failure Tune does not retry by itself), measure the
latency of each distinct compressed shape, write the report.

`--resume` keeps what `trials.parquet` (written atomically after every trial) says is finished and
runs the rest with a fresh Tuner over the same experiment folder; an Optuna study goes on from its
journal (`sweeps.study`). `Tuner.restore` is not used (nor any .pkl file Tune wrote): Tune saves its
experiment state at most every ~10 s, so a driver killed right after a trial finished would run
it again; the table is the record that is always current.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field

import pandas as pd
import ray

from compression.errors import UserInputError
from sweeps import __version__
from sweeps import interrupts
from sweeps.analysis import checkpoints_to_drop
from sweeps.final_eval import check_final_eval, keeps_checkpoints, run_final_eval
from sweeps.latency import measure_latency
from sweeps.prepare import Prepared, prepare
from sweeps.report import about, write_report
from sweeps.shared import put_shared
from sweeps.spec import SweepSpec
from sweeps.storage import SWEEP_FILE, TRIALS_FILE, check_location, read_file, sweep_directory, write_file
from sweeps.study import Journal, read_study
from sweeps.table import ResultsTable, read_trials, rows_of, typed
from sweeps.tracking import tracking_callbacks
from sweeps.trials import check_resources, expand, local_resources, optuna_choices, trial_count
from sweeps.tuning import make_tuner, trial_id
from trainables.contract import TrialRow
from trainables.memory import keep_freed_memory
from trainables.trial import Shared

log = logging.getLogger("lrsweep")


@dataclass
class Timing:
    """Wall time of the sweep against the compute it did itself (seconds)."""

    wall: float
    trials: float   # compress + evaluate + finetune, summed over the trials this run ran
    shared: float   # once per sweep: load, dense baseline, calibration, decompositions
    ran: int        # trials this run ran

    @property
    def compute(self) -> float:
        return self.trials + self.shared

    def describe(self) -> str:
        return (f"{self.wall:.0f} s wall for the whole sweep, against {self.compute:.0f} s of its own compute: "
                f"{self.shared:.0f} s once per sweep (load, dense baseline, calibration, decompositions) + "
                f"{self.trials:.0f} s of compress, evaluate and finetune summed over {self.ran} trials")


@dataclass
class Faults:
    """What went wrong and was recovered: attempts Tune (or the restart loop) ran again, restarts of
    Tune after a failure it does not retry, and trials left unfinished (an interrupt, or
    limits.sweep_seconds), which `resume=True` runs."""

    retried: int = 0
    restarts: int = 0
    unfinished: int = 0
    retries: int = 0  # the sweep's limits.retries

    def describe(self) -> str:
        text = f"{self.retried} failed trial attempt(s) run again (limits.retries = {self.retries})"
        if self.restarts:
            text += (f"; Tune started again {self.restarts} time(s) after a failure it does not retry "
                     f"(a worker killed by Ray's memory monitor)")
        return text


@dataclass
class SweepResult:
    """What `run_sweep` returns: where the results are, the table, and the run's figures."""

    directory: str
    report: str
    table: pd.DataFrame
    calibration_key: str
    calibration_cached: bool
    timing: Timing
    faults: Faults = field(default_factory=Faults)


def check_storage(spec: SweepSpec, directory: str, resume: bool) -> dict | None:
    """The stored sweep record of `directory`, or None. UserInputError, before anything is computed,
    when the folder cannot be written (or reached), its record is damaged, or it holds a different
    sweep under the same name and not `resume` (which then keeps the finished trials it shares)."""
    check_location(directory, f"storage {spec.storage!r}")
    try:
        data = read_file(directory, SWEEP_FILE)
        stored = None if data is None else json.loads(data)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserInputError(f"{directory}/{SWEEP_FILE} (the stored sweep) cannot be read ({e}); move it away, "
                             f"or choose another name or storage") from None
    if stored is None:
        return None
    if not isinstance(stored, dict):
        raise UserInputError(f"{directory}/{SWEEP_FILE} (the stored sweep) is damaged: a JSON "
                             f"{type(stored).__name__}, not an object; move it away, or choose another name or storage")
    if stored.get("spec_hash") != spec.spec_hash and not resume:
        raise UserInputError(
            f"storage {directory} already holds a different sweep named {spec.name!r} (its settings differ "
            f"from this file's); resume it with this file (`lrsweep run --resume`: finished trials with the "
            f"same trial id are kept), or choose another name or storage")
    return stored


def _kept_rows(spec: SweepSpec, directory: str) -> list[TrialRow]:
    """On resume: the finished trials of the stored table that this sweep would run again."""
    try:
        df = read_trials(directory)
    except UserInputError as e:
        raise UserInputError(f"--resume: {e}; move it away to run the sweep from the start") from None
    if df is None:
        return []
    df = typed(df, where=f"{directory}/{TRIALS_FILE}")
    ok = df[(df["status"] == "ok") & (df["method"] != "dense")]
    if spec.optuna is None:
        ok = ok[ok["trial_id"].isin({c.trial_id for c in expand(spec)})]
    else:
        choices = optuna_choices(spec)
        ok = ok[(ok["allocation"] == "optuna") & ok["method"].isin(choices["method"])
                & ok["target_ratio"].isin(choices["ratio"])]
    return rows_of(ok)


def run_sweep(spec: SweepSpec, address: str | None = None, resume: bool = False,
              callbacks: list | None = None) -> SweepResult:
    """Run a validated sweep to the end (see the module docstring).

    address: a Ray cluster (default: a local Ray on this machine); resume: keep the stored sweep's
    finished trials and run the rest; callbacks: more Ray Tune callbacks, after those of the
    sweep's `tracking` section. After the trials, the `final_eval` stage (if any) evaluates the
    dense model and the chosen trials and writes its numbers into the table."""
    directory = sweep_directory(spec.storage, spec.name)
    stored = check_storage(spec, directory, resume)
    check_final_eval(spec)
    callbacks = [*tracking_callbacks(spec, directory), *(callbacks or [])]
    started_ray = not ray.is_initialized()
    local = started_ray and address is None and not os.environ.get("RAY_ADDRESS")
    if local:  # a cluster (and its autoscaler) decides for itself what fits
        check_resources(spec, *local_resources())
    elif not started_ray:
        res = ray.cluster_resources()
        check_resources(spec, res.get("CPU", 0), res.get("GPU", 0), where="the running Ray cluster")

    keep_freed_memory()  # calibration and the dense baseline run in this process
    wall = time.perf_counter()
    kept = _kept_rows(spec, directory) if (resume and stored) else []
    # a resumed Optuna study goes on from its journal (read now: a damaged one stops the sweep before
    # any work); a sweep run again without resuming starts its study over
    same_study = spec.optuna is not None and resume and bool(stored) and stored.get("spec_hash") == spec.spec_hash
    if same_study:
        read_study(directory)
    # a sweep that reserves GPUs calibrates on one: on a cluster whose driver has none, through Ray
    early_ray = started_ray and spec.resources.gpu > 0 and not _local_cuda()
    if early_ray:
        _init_ray(address, local)
    try:
        prepared = prepare(spec)
        journal = Journal(directory, spec.name).open(fresh=not same_study) if spec.optuna is not None else None
        record = {"name": spec.name, "spec_hash": spec.spec_hash, "version": __version__,
                  "calibration_key": prepared.calibration_key, "spec": spec.model_dump(mode="json")}
        write_file(directory, SWEEP_FILE, json.dumps(record, indent=2).encode())
        keep, front = spec.checkpoints.keep, keeps_checkpoints(spec)
        table = ResultsTable(directory, [prepared.dense_row, *kept],
                             drop_checkpoints=lambda df: checkpoints_to_drop(df, keep, front(df) if front else None))
        table.write()
        if kept:
            log.info(f"resume: keeping {len(kept)} finished trial(s) from {directory}")
        if started_ray and not early_ray:
            _init_ray(address, local)
        # one machine (the local Ray, or a notebook's): the decompositions and latency run here
        here = address is None and not os.environ.get("RAY_ADDRESS") and sum(n["Alive"] for n in ray.nodes()) == 1
        shared = put_shared(spec, prepared, in_driver=here)
        deadline = None
        if spec.limits.sweep_seconds is not None:  # what preparation left of the sweep's budget
            deadline = wall + spec.limits.sweep_seconds
            if deadline <= time.perf_counter():
                raise UserInputError(
                    f"limits.sweep_seconds: {spec.limits.sweep_seconds:g} s were spent before the first trial "
                    f"(loading, baseline, calibration, decompositions: {time.perf_counter() - wall:.0f} s); "
                    f"raise it and resume the sweep (the statistics are cached)")
        faults = run_trials(spec, prepared, shared, directory, table, deadline, journal=journal,
                            callbacks=callbacks)
        measure_latency(spec, shared, table, in_driver=here)
    finally:
        if started_ray and ray.is_initialized():
            ray.shutdown()
    if not faults.unfinished:
        run_final_eval(spec, directory, table)
    df = table.frame()
    timing = _timing(df, shared, prepared, {r.trial_id for r in kept}, time.perf_counter() - wall)
    header = about(record, df) | {"time": timing.describe()}
    if faults.retried or faults.restarts:
        header["faults"] = faults.describe()
    report = write_report(directory, df, f"Sweep {spec.name}", header, record["spec"])
    return SweepResult(directory=directory, report=report, table=df, calibration_key=prepared.calibration_key,
                       calibration_cached=prepared.calibration_cached, timing=timing, faults=faults)


def _local_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _init_ray(address: str | None, local: bool) -> None:
    init = {"address": address, "include_dashboard": False, "log_to_driver": False, "logging_level": logging.WARNING}
    if local:
        init["num_cpus"] = int(local_resources()[0])
    log.info(f"ray: starting on this machine ({init['num_cpus']} CPUs)" if local else f"ray: connecting to {address or 'RAY_ADDRESS'}")
    with interrupts.deferred():  # a Ctrl-C while Ray starts stops the sweep once it is up
        ray.init(**init)


def run_trials(spec: SweepSpec, prepared: Prepared, shared: Shared, directory: str, table: ResultsTable,
               deadline: float | None, journal: Journal | None = None, callbacks: list | None = None) -> Faults:
    """Run every trial without a row in `table` with Tune, and recover from the one failure Tune
    does not retry by itself. Returns the fault figures.

    Tune retries a trial whose worker crashed, was killed or lost its node (FailureConfig). But
    when Ray's memory monitor kills a trial's worker, the actor task fails with an OutOfMemoryError
    that Tune's actor manager (Ray 2.60) does not expect: it raises "Caught unexpected exception"
    and the whole Tune run stops. Then each trial that was running counts one failed attempt,
    and a new Tuner runs what has no row yet (an Optuna study goes on from its journal);
    a trial that has failed more than `limits.retries` times is recorded as failed."""
    attempts_lost: dict[str, int] = {}  # our trial id -> attempts lost to a stopped Tune run
    faults = Faults(retries=spec.limits.retries)
    tune_retried = 0
    most_restarts = (spec.limits.retries + 1) * max(1, trial_count(spec))
    while True:
        budget = None if deadline is None else deadline - time.perf_counter()
        if budget is not None and budget <= 0:
            log.warning("limits.sweep_seconds: no time left to run the remaining trials; resume the sweep to run them")
            faults.unfinished = trial_count(spec) - sum(r.method != "dense" for r in table.rows.values())
            break
        final = [r for r in table.rows.values() if r.method != "dense"]
        made = make_tuner(spec, prepared, shared, directory, table, final, time_budget=budget, journal=journal,
                          callbacks=callbacks)
        if made is None:
            break
        tuner, callback = made
        try:
            with interrupts.handler_kept():
                tuner.fit()
            tune_retried += callback.retried
            out_of_time = deadline is not None and time.perf_counter() >= deadline
            faults.unfinished = callback.record_unfinished("limits.sweep_seconds ran out" if out_of_time
                                                           else "interrupted")
            if faults.unfinished:
                log.warning(f"the sweep stopped (interrupted, or limits.sweep_seconds ran out) before "
                            f"{faults.unfinished} trial(s) finished; resume the sweep to run them")
            break
        except RuntimeError as e:
            tune_retried += callback.retried
            if not isinstance(e.__cause__, ray.exceptions.RayError) or faults.restarts >= most_restarts:
                raise
            faults.restarts += 1
            cause = str(e.__cause__).strip().splitlines()[0]
            log.warning(f"Tune stopped: {cause}; the {len(callback.running)} running trial(s) count one failed "
                        f"attempt each, and Tune starts again on the trials without a row")
            for trial in callback.running.values():
                cid = trial_id(trial)
                attempts_lost[cid] = attempts_lost.get(cid, 0) + 1
                if attempts_lost[cid] > spec.limits.retries:
                    callback.record_failed(trial, f"{cause} ({attempts_lost[cid]} attempts)")
            if journal is not None:
                journal.open(fresh=False)  # the trials the stopped run left running count as failed
    faults.retried = tune_retried + sum(min(n, spec.limits.retries) for n in attempts_lost.values())
    return faults


def _timing(df: pd.DataFrame, shared: Shared, prepared: Prepared, kept: set[str], wall: float) -> Timing:
    """Sweep overhead: the wall time against the compute the sweep did itself (calibration, dense
    baseline, decompositions once per method, and every trial's compress + evaluate + finetune)."""
    ran = df[(df["method"] != "dense") & ~df["trial_id"].isin(kept)]
    trials = float((ran["seconds_compress"].fillna(0) + ran["seconds_eval"].fillna(0)
                    + ran["seconds_finetune"].fillna(0)).sum())
    dense = prepared.dense_row
    shared_s = (prepared.seconds_calibration + dense.seconds_eval + dense.seconds_finetune
                + prepared.timings["load"] + sum(v for v in shared.seconds_decompose.values() if math.isfinite(v)))
    return Timing(wall=wall, trials=trials, shared=shared_s, ran=len(ran))

