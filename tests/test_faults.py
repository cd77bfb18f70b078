"""Fault tolerance of a real sweep, through Ray Tune's own mechanisms: a driver killed (SIGKILL,
Ctrl-C) and resumed, trials that crash (a raise, a SIGKILLed worker, a worker killed by Ray's
memory monitor) retried up to `limits.retries` and then recorded as failed, and a worker node of
a simulated 3-node cluster removed while its trial runs.

Faults are injected into Ray's worker processes by tests/faults/sitecustomize.py (see there),
which also logs every trial attempt with its process and node: that log is how these tests see
which trial ran how often, and where. Each test runs Ray with its own RAY_TMPDIR, and checks that
no process of it is left when it ends.
"""

import collections
import io
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
import pytest
import ray
import yaml

from sweeps.spec import load_spec
from sweeps.trials import expand

sys.path.insert(0, str(Path(__file__).parent / "faults"))
from fault_sweep import attempts, fault_env, write_sweep  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

FAULTS = Path(__file__).parent / "faults"
LRSWEEP = Path(sys.executable).parent / "lrsweep"
GRID = {"method": ["svd", "whiten-fd"], "ratio": [0.2, 0.4]}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One statistics cache for the module: the first sweep calibrates, the others reuse it."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def work(tmp_path, cache, monkeypatch):
    """A folder with the corpus and the sweep file, and an environment that injects `faults`."""
    write_sweep(tmp_path, GRID, retries=1)
    ray_tmp = tempfile.mkdtemp(prefix="lrs-")  # short: Ray's socket paths must fit in 107 characters
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LRSWEEP_CACHE", str(cache))
    monkeypatch.setenv("RAY_TMPDIR", ray_tmp)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(FAULTS), os.environ.get("PYTHONPATH", "")]))

    def faults(**spec):
        os.environ["LRSWEEP_TEST_FAULTS"] = fault_env(tmp_path, **spec)

    monkeypatch.setenv("LRSWEEP_TEST_FAULTS", "")
    trials = [c.trial_id for c in expand(load_spec("sweep.yaml"))]
    yield tmp_path, faults, trials
    left = _ray_processes(ray_tmp)
    for p in left:
        p.kill()
    assert not left, f"stray Ray processes: {[p.info['name'] for p in left]}"


def _ray_processes(ray_tmp: str) -> list[psutil.Process]:
    """The processes started with RAY_TMPDIR=ray_tmp (Ray's own set their title, not their command line)."""
    found = []
    for p in psutil.process_iter(["name"]):
        try:
            if p.pid != os.getpid() and p.environ().get("RAY_TMPDIR") == ray_tmp:
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return found


def _table(folder: Path, name: str = "faults") -> pd.DataFrame:
    return pd.read_parquet(folder / "results" / name / "trials.parquet")


def _lrsweep(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(LRSWEEP), *args], capture_output=True, text=True, timeout=400, **kw)


def _check_one_ok_row_per_trial(df: pd.DataFrame, trials: list[str]) -> None:
    rows = df[df["method"] != "dense"]
    assert rows["trial_id"].is_unique
    assert sorted(rows["trial_id"]) == sorted(trials)
    assert (rows["status"] == "ok").all(), rows[["trial_id", "status", "error"]]


def _start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([str(LRSWEEP), "run", "sweep.yaml", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _wait_for_rows(driver: subprocess.Popen, table: Path, at_least: int) -> list[str]:
    """The finished trials once `table` (written atomically: never half a file) has `at_least`."""
    deadline = time.monotonic() + 300
    finished: list[str] = []
    while len(finished) < at_least and time.monotonic() < deadline and driver.poll() is None:
        time.sleep(0.2)
        if table.exists():  # one read of the bytes: a path read opens the file twice, racing the replace
            df = pd.read_parquet(io.BytesIO(table.read_bytes()))
            finished = list(df.loc[df["method"] != "dense", "trial_id"])
    assert len(finished) >= at_least and driver.poll() is None, f"the sweep did not get {at_least} trials done"
    return finished


def _check_interrupted(driver: subprocess.Popen) -> None:
    """Ctrl-C: Tune stops the trials; the CLI says what is left and how to go on (status 3)."""
    out, err = driver.communicate(timeout=300)
    assert driver.returncode == 3, err
    assert ("did not finish" in err or "interrupted" in err) and "--resume" in err and "Traceback" not in err
    assert "Tuner.restore" not in out + err  # Tune's advice, which this project does not follow


def test_a_stopped_driver_resumes_without_losing_or_repeating_trials(work):
    """One sweep stopped three ways and resumed each time: Ctrl-C half a second after "ray:
    starting", while Ray starts: it stops before any trial; then
    SIGKILL of the driver after two trials; then Ctrl-C after another. The last --resume finishes
    it: one ok row per trial, and no trial that had finished before a stop ran again."""
    folder, faults, TRIALS = work
    sweep = yaml.safe_load((folder / "sweep.yaml").read_text())
    sweep["resources"]["max_concurrent"] = 1  # one trial at a time: each stop leaves some to do
    (folder / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    faults()
    table = folder / "results" / "faults" / "trials.parquet"

    driver = _start()
    for line in driver.stdout:
        if line.startswith("ray: starting"):
            time.sleep(0.5)
            os.kill(driver.pid, signal.SIGINT)
            break
    _check_interrupted(driver)
    assert set(_table(folder)["trial_id"]) == {"dense"} and attempts(folder) == []  # no trial started

    driver = _start("--resume")
    finished = _wait_for_rows(driver, table, 2)
    os.kill(driver.pid, signal.SIGKILL)
    driver.communicate(timeout=120)
    assert driver.returncode == -signal.SIGKILL
    # Ray's own processes die with the driver, except its node agents: kill what is left of the
    # driver's session, as closing the terminal would
    os.killpg(driver.pid, signal.SIGKILL)
    psutil.wait_procs(_ray_processes(os.environ["RAY_TMPDIR"]), timeout=30)
    killed = set(_table(folder)["trial_id"]) - {"dense"}
    assert set(finished) <= killed
    before_kill = collections.Counter(a["trial"] for a in attempts(folder))

    driver = _start("--resume")
    finished = _wait_for_rows(driver, table, len(killed) + 1)
    os.kill(driver.pid, signal.SIGINT)
    _check_interrupted(driver)
    interrupted = set(_table(folder)["trial_id"]) - {"dense"}
    assert killed < interrupted and set(finished) <= interrupted
    before_interrupt = collections.Counter(a["trial"] for a in attempts(folder))

    resumed = _lrsweep("run", "sweep.yaml", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resume: keeping {len(interrupted)} finished trial(s)" in resumed.stdout
    _check_one_ok_row_per_trial(_table(folder), TRIALS)
    runs = collections.Counter(a["trial"] for a in attempts(folder))
    # finished before a stop: never run again after it
    assert all(runs[t] == before_kill[t] for t in killed), (runs, before_kill)
    assert all(runs[t] == before_interrupt[t] for t in interrupted), (runs, before_interrupt)
    assert set(runs) == set(TRIALS)


def test_crashed_trials_are_retried_then_recorded_as_failed(work):
    """One run, three faults (limits.retries = 1): trial 0 raises OSError on every attempt, trial 1
    SIGKILLs its own worker once, trial 2 is killed by Ray's memory monitor once."""
    folder, faults, TRIALS = work
    memory = psutil.virtual_memory()
    if memory.available < 14e9:
        pytest.skip("needs 14 GB of free memory to make Ray's memory monitor kill a trial on purpose")
    faults(**{"raise": {TRIALS[0]: "OSError"}, "kill_once": [TRIALS[1]], "hog_once": [TRIALS[2]], "hog_gb": 10})
    # 4.5 GB above what is in use now: room for Ray and the sweep (about 3 GB), not for the hog
    threshold = (memory.total - memory.available + 4.5e9) / memory.total
    env = os.environ | {"RAY_memory_usage_threshold": f"{threshold:.3f}", "RAY_memory_monitor_refresh_ms": "100"}
    run = _lrsweep("run", "sweep.yaml", env=env)
    assert run.returncode == 0, run.stderr[-3000:]

    df = _table(folder).set_index("trial_id")
    assert df.index.is_unique and set(df.index) == {"dense", *TRIALS}
    assert df.loc[TRIALS[0], "status"] == "error" and "injected fault" in df.loc[TRIALS[0], "error"]
    assert (df.loc[TRIALS[1:], "status"] == "ok").all()
    runs = collections.Counter(a["trial"] for a in attempts(folder))
    assert runs[TRIALS[0]] == 2  # the first attempt and one retry
    assert runs[TRIALS[1]] == 2
    assert runs[TRIALS[2]] >= 2  # the memory monitor may take a trial running beside it too
    assert "Tune stopped: " in run.stdout and "killed due to the node running low on memory" in run.stdout
    assert "faults: " in run.stdout and "Tune started again 1 time(s)" in run.stdout
    assert "failed trial attempt(s) run again" in (folder / "results" / "faults" / "report.md").read_text()


def test_a_worker_node_lost_mid_sweep(work, caplog):
    """A head and two worker nodes of one CPU each; the first worker node is removed while a trial
    runs on it: Tune runs that trial again on a remaining node, and the sweep completes."""
    from ray.cluster_utils import Cluster

    from sweeps.runner import run_sweep
    from sweeps.spec import load_spec

    folder, faults, TRIALS = work
    faults(sleep=3)
    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        victim = cluster.add_node(num_cpus=1)
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        removed: dict = {}

        def remove_when_busy():
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                busy = [a for a in attempts(folder) if a["node"] == victim.node_id]
                if busy:
                    time.sleep(1)  # mid-trial: the injected sleep is 3 s
                    cluster.remove_node(victim)
                    removed["trial"] = busy[0]["trial"]
                    return
                time.sleep(0.2)

        watcher = threading.Thread(target=remove_when_busy, daemon=True)
        watcher.start()
        spec = load_spec("sweep.yaml")
        spec = spec.model_copy(update={"resources": spec.resources.model_copy(update={"max_concurrent": 3})})
        with caplog.at_level("INFO", logger="lrsweep"):
            out = run_sweep(spec, address=cluster.address)
        watcher.join(timeout=10)
    finally:
        ray.shutdown()
        cluster.shutdown()

    assert "trial" in removed, "no trial ran on the node to remove"
    _check_one_ok_row_per_trial(out.table, TRIALS)
    again = [a for a in attempts(folder) if a["trial"] == removed["trial"]]
    assert len(again) == 2 and again[1]["node"] != victim.node_id  # run again, elsewhere
    assert out.faults.retried >= 1 and out.faults.unfinished == 0
    assert any("Tune retries it" in line for line in caplog.messages)
