"""Wall time of one sweep on a simulated 3-node Ray cluster against the same sweep on one node.

    python bench/cluster.py [--repeats 2]

`ray.cluster_utils.Cluster` starts real Ray nodes (each its own raylet and object store) as
processes of this machine; every node offers 1 CPU and runs 1 trial at a time. The sweep is
SmolLM2-135M (packaged), whiten-fd and svd at three ratios (6 trials), compress + evaluate on
8 x 128-token windows + a 4-step finetune, so trials are compute-bound. The calibration
statistics come from the cache (computed once, before the first timed run); each run starts its
cluster from scratch and is timed from `run_sweep` to its return (load, baseline, decompositions,
trials). Runs alternate 1 node, 3 nodes, ...; medians are quoted. On a machine with fewer cores
than nodes, the nodes share cores: the speed-up is bounded by the cores, not the node count.

Writes the `cluster` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchfile import machine_line, write_section  # noqa: E402

from sweeps.prepare import prepare  # noqa: E402
from sweeps.runner import run_sweep  # noqa: E402
from sweeps.spec import parse_spec  # noqa: E402

SWEEP = {
    "name": "bench-cluster",
    "model": "packaged:smollm2-135m",
    "task": {"type": "causal-lm", "eval": "packaged:lee", "seq_len": 128, "eval_windows": 8, "eval_batch_size": 8,
             "train": "packaged:wiki", "train_windows": 16},
    "calibration": {"source": "packaged:wiki", "samples": 32, "batch_size": 4},
    "grid": {"method": ["svd", "whiten-fd"], "ratio": [0.2, 0.3, 0.4]},
    "finetune": {"steps": 4, "batch_size": 2, "lr": 1e-4, "train": "compressed"},
    "resources": {"cpu": 1, "max_concurrent": 3},
}


def timed_run(nodes: int, storage: str, index: int) -> dict:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        for _ in range(nodes - 1):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        spec = parse_spec(SWEEP | {"name": f"run{index}-{nodes}nodes", "storage": storage})
        start = time.perf_counter()
        out = run_sweep(spec, address=cluster.address)
        wall = time.perf_counter() - start
    finally:
        ray.shutdown()
        cluster.shutdown()
    df = out.table
    trials = df[df["method"] != "dense"]
    assert (trials["status"] == "ok").all(), trials[["trial_id", "status", "error"]]
    return {"nodes": nodes, "wall": wall, "trial_compute": out.timing.trials, "shared": out.timing.shared,
            "trials": len(trials)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    prepare(parse_spec(SWEEP | {"storage": tempfile.gettempdir()}))  # fill the cache
    runs = []
    with tempfile.TemporaryDirectory() as storage:
        for i in range(args.repeats):
            for nodes in (1, 3):
                runs.append(timed_run(nodes, storage, i))
                print(f"{nodes} node(s): {runs[-1]['wall']:.1f} s wall", flush=True)
    med = {n: statistics.median(r["wall"] for r in runs if r["nodes"] == n) for n in (1, 3)}
    compute = {n: statistics.median(r["trial_compute"] for r in runs if r["nodes"] == n) for n in (1, 3)}
    walls = {n: ", ".join(f"{r['wall']:.1f}" for r in runs if r["nodes"] == n) for n in (1, 3)}
    rows = "\n".join(f"| {n} | {n} | {med[n]:.1f} | {compute[n]:.1f} | {walls[n]} |" for n in (1, 3))
    body = f"""## Sweep on a simulated 3-node cluster (bench/cluster.py)

{machine_line()} {os.cpu_count()} cores shared by all nodes.

SmolLM2-135M, 6 trials (svd and whiten-fd at 20/30/40 %, 4 finetune steps), 1 CPU and 1 trial per
node; each run starts its `ray.cluster_utils.Cluster` from scratch; statistics from the cache.

| nodes | trials at once | wall, median (s) | trial compute summed, median (s) | runs (s) |
|---:|---:|---:|---:|---|
{rows}

3 nodes against 1: **{med[1] / med[3]:.2f}x** faster in wall time ({args.repeats} runs each, alternated).
The summed trial compute grows with 3 nodes ({compute[3] / compute[1]:.2f}x): 3 trials share {os.cpu_count()} cores.
"""
    write_section("cluster", body)
    print(body)


if __name__ == "__main__":
    main()
