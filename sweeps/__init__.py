"""sweeps: sweep files, the Ray Tune launcher, results, reports and the `lrsweep` CLI.

The Python API (what the CLI does, returning objects; see `sweeps.api`)::

    from sweeps import load_sweep, plan_sweep, run_sweep, load_results, pareto, export_trial
    spec = load_sweep("sweeps/examples/quickstart.yaml")
    result = run_sweep(spec)                            # SweepResult
    df = load_results(result.directory)                 # the trials table, typed
    front = pareto(df[df.status == "ok"], "size_mb", "metric")

Modules, one idea each: `spec` (the sweep file; `section` the base of its sections, `spec_outputs`
its final_eval and tracking sections), `trials` (what it runs), `prepare` (model, data, baseline,
calibration cache), `shared` (the object store), `tuning` (Tune and Optuna), `study` (the Optuna
study's journal), `runner` (the run and its recovery), `interrupts` (Ctrl-C during a run),
`latency` (the stage after the trials), `storage` and `table` (files and the results table),
`analysis`, `report` and `plots`, `export` (and `model_card`), `evaluation` (lm-eval and
full-context perplexity), `final_eval` (its sweep stage), `tracking`, `api`, `cli`. The names
below are imported on first use, so `import sweeps` (the CLI's first import) stays light.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "load_sweep": "api", "plan_sweep": "api", "SweepPlan": "api",
    "run_sweep": "runner", "SweepResult": "runner",
    "load_results": "table",
    "pareto": "analysis", "compare": "analysis", "best_trial": "analysis", "best_per_ratio": "analysis",
    "higher_is_better": "analysis",
    "regenerate": "report",
    "export_trial": "export", "rebuild": "export", "generate": "export", "classify": "export",
    "evaluate": "evaluation", "Evaluation": "evaluation",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'sweeps' has no attribute {name!r}")
    value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
