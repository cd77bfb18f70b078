"""Fault figures: sweeps run through injected faults, counted from what they leave behind.

    python bench/faults.py

Three scenarios on a 12-trial sweep of tiny:llama (svd, whiten, whiten-fd, id at 20/30/40 %,
2 finetune steps, 2 s of injected sleep per attempt so that faults land mid-trial):

1. a simulated 3-node cluster (`ray.cluster_utils.Cluster`, 1 CPU per node), two trials that
   SIGKILL their own worker once, and one worker node removed while a trial runs on it;
2. a subprocess driver SIGKILLed after 3 finished trials, resumed, interrupted with Ctrl-C
   (SIGINT) after 3 more, resumed again;
3. a trial that allocates memory until Ray's memory monitor kills its worker (threshold set
   4.5 GB above the memory in use at the start).

Faults are injected by tests/faults/sitecustomize.py (put on PYTHONPATH here), which logs every
trial attempt with its node. Rows lost: trials of the sweep without a row at the end; rows
duplicated: trial ids with more than one row. Writes the `faults` section of BENCHMARKS.md.
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pandas as pd
import psutil
import ray

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests" / "faults"))
from benchfile import machine_line, write_section  # noqa: E402
from fault_sweep import attempts, fault_env, write_sweep  # noqa: E402

from sweeps.spec import load_spec  # noqa: E402
from sweeps.trials import expand  # noqa: E402

LRSWEEP = Path(sys.executable).parent / "lrsweep"
GRID = {"method": ["svd", "whiten", "whiten-fd", "id"], "ratio": [0.2, 0.3, 0.4]}


def setup(folder: Path) -> list[str]:
    """The corpus and sweep file in `folder` (the working directory from here); the trial ids."""
    write_sweep(folder, GRID, retries=2)
    os.chdir(folder)
    return [c.trial_id for c in expand(load_spec("sweep.yaml"))]


def inject(folder: Path, **faults) -> None:
    os.environ["LRSWEEP_TEST_FAULTS"] = fault_env(folder, **faults)


def rows_done(folder: Path) -> int:
    path = folder / "results" / "faults" / "trials.parquet"
    if not path.exists():
        return 0
    return int((pd.read_parquet(path)["method"] != "dense").sum())


def figures(name: str, folder: Path, trials: list[str], wall: float, **extra) -> dict:
    df = pd.read_parquet(folder / "results" / "faults" / "trials.parquet")
    rows = df[df["method"] != "dense"]
    runs = collections.Counter(a["trial"] for a in attempts(folder))
    return {"scenario": name, "trials": len(trials), "attempts": sum(runs.values()),
            "retried": sum(runs.values()) - len(trials), "failed rows": int((rows["status"] == "error").sum()),
            "rows lost": len(set(trials) - set(rows["trial_id"])),
            "rows duplicated": int(rows["trial_id"].duplicated().sum()), "wall (s)": round(wall)} | extra


def node_lost(folder: Path) -> dict:
    from ray.cluster_utils import Cluster

    from sweeps.runner import run_sweep

    trials = setup(folder)
    inject(folder, kill_once=trials[1:3])
    start = time.perf_counter()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    removed = []
    try:
        victim = cluster.add_node(num_cpus=1)
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()

        def remove_when_busy():
            while not any(a["node"] == victim.node_id for a in attempts(folder)):
                time.sleep(0.2)
            time.sleep(1)
            cluster.remove_node(victim)
            removed.append(victim.node_id)

        threading.Thread(target=remove_when_busy, daemon=True).start()
        spec = load_spec("sweep.yaml")
        spec = spec.model_copy(update={"resources": spec.resources.model_copy(update={"max_concurrent": 3})})
        run_sweep(spec, address=cluster.address)
    finally:
        ray.shutdown()
        cluster.shutdown()
    return figures("3-node cluster: 2 workers SIGKILLed, 1 node removed", folder, trials,
                   time.perf_counter() - start, **{"nodes killed": len(removed), "drivers killed": 0})


def driver_killed(folder: Path) -> dict:
    trials = setup(folder)
    inject(folder)
    start = time.perf_counter()
    for target, sig in ((3, signal.SIGKILL), (6, signal.SIGINT)):
        args = [str(LRSWEEP), "run", "sweep.yaml"] + (["--resume"] if target > 3 else [])
        driver = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        while rows_done(folder) < target and driver.poll() is None:
            time.sleep(0.2)
        os.kill(driver.pid, sig)
        driver.wait(120)
        if sig == signal.SIGKILL:  # what is left of the driver's session (Ray's node agents)
            os.killpg(driver.pid, signal.SIGKILL)
    final = subprocess.run([str(LRSWEEP), "run", "sweep.yaml", "--resume"], capture_output=True, text=True)
    assert final.returncode == 0, final.stderr[-2000:]
    return figures("driver SIGKILLed, resumed, Ctrl-C, resumed", folder, trials, time.perf_counter() - start,
                   **{"nodes killed": 0, "drivers killed": 2})


def memory_monitor(folder: Path) -> dict:
    trials = setup(folder)
    inject(folder, hog_once=[trials[4]], hog_gb=10)
    memory = psutil.virtual_memory()
    threshold = (memory.total - memory.available + 4.5e9) / memory.total
    env = os.environ | {"RAY_memory_usage_threshold": f"{threshold:.3f}", "RAY_memory_monitor_refresh_ms": "100"}
    start = time.perf_counter()
    run = subprocess.run([str(LRSWEEP), "run", "sweep.yaml"], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    return figures("a worker killed by Ray's memory monitor", folder, trials, time.perf_counter() - start,
                   **{"nodes killed": 0, "drivers killed": 0})


def main() -> None:
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests" / "faults"), os.environ.get("PYTHONPATH", "")])
    os.environ.setdefault("LRSWEEP_CACHE", tempfile.mkdtemp(prefix="lrs-cache-"))
    results = []
    for scenario in (node_lost, driver_killed, memory_monitor):
        with tempfile.TemporaryDirectory(prefix="lrs-faults-") as folder:
            os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="lrs-")
            results.append(scenario(Path(folder)))
            print(results[-1], flush=True)
    columns = list(results[0])
    table = "\n".join(["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
                      + ["| " + " | ".join(str(r[c]) for c in columns) + " |" for r in results])
    body = f"""## Fault tolerance (bench/faults.py)

{machine_line()}

12 trials of tiny:llama per scenario (limits.retries = 2), faults injected into Ray's workers by
tests/faults/sitecustomize.py; "attempts" counts every start of a trial, "retried" the attempts
beyond one per trial (trials running when a driver, node or worker was killed run again).

{table}
"""
    write_section("faults", body)
    print(body)


if __name__ == "__main__":
    main()
