"""Fault injection for the fault-tolerance tests (tests/test_faults.py), in Ray worker processes.

A test puts this folder on PYTHONPATH and describes the faults in LRSWEEP_TEST_FAULTS (JSON);
every Python process started with that environment (the subprocess driver, Ray's workers) imports
this file at start-up. In a Ray worker it wraps `trainables.trial._run`, which every trial attempt
calls, to:

- append one line per attempt to `attempts` (JSON lines: our trial id, pid, Ray node id, time);
- `sleep`: wait this many seconds first, so a test has time to kill something mid-trial;
- `raise`: {trial id: exception name}: raise it on every attempt (OSError and MemoryError are
  errors Tune retries);
- `kill_once`: [trial ids]: SIGKILL its own worker on the first attempt, as the kernel's OOM
  killer does;
- `hog_once`: [trial ids]: on the first attempt, allocate memory 256 MB at a time (up to
  `hog_gb`) until Ray's memory monitor kills the worker.

First attempts are told apart by marker files in `markers`. Nothing here runs without the
variable, and nothing of it is part of the package.
"""

import json
import os
import sys

_SPEC = os.environ.get("LRSWEEP_TEST_FAULTS")


def _first_time(markers: str, name: str) -> bool:
    try:
        os.close(os.open(os.path.join(markers, name), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def _install(spec: dict) -> None:
    import signal
    import time

    import ray
    import torch

    import trainables.trial as trial

    original = trial._run

    def run(config, shared, row):
        cid = row.trial_id
        with open(spec["attempts"], "a") as f:
            f.write(json.dumps({"trial": cid, "pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(),
                                "time": time.time()}) + "\n")
        time.sleep(spec.get("sleep", 0))
        if cid in spec.get("raise", {}):
            raise {"OSError": OSError, "MemoryError": MemoryError}[spec["raise"][cid]](f"injected fault in {cid}")
        if cid in spec.get("kill_once", []) and _first_time(spec["markers"], f"kill-{cid}"):
            os.kill(os.getpid(), signal.SIGKILL)
        if cid in spec.get("hog_once", []) and _first_time(spec["markers"], f"hog-{cid}"):
            blocks = []
            for _ in range(int(spec.get("hog_gb", 8) * 4)):
                blocks.append(torch.ones(2**26))  # 256 MB, written so it is resident
                time.sleep(0.05)
            time.sleep(5)  # not killed: the test fails on the missing restart
        return original(config, shared, row)

    trial._run = run


if _SPEC and "default_worker.py" in " ".join(sys.argv[:1]):
    _install(json.loads(_SPEC))
