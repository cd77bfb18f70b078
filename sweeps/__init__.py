"""sweeps: sweep files, the Ray Tune launcher, results, reports and the `lrsweep` CLI.

For notebooks::

    from sweeps import load_results, pareto
    df = load_results("results/quickstart")         # the trials table, typed
    front = pareto(df[df.status == "ok"], "size_mb", "metric")

The names below are imported on first use, so `import sweeps` (the CLI's first import) stays light.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {"load_results": "analysis", "pareto": "analysis", "compare": "analysis", "best_trial": "analysis",
            "best_per_ratio": "analysis", "higher_is_better": "analysis"}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'sweeps' has no attribute {name!r}")
    value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
