"""Experiment tracking: the sweep file's `tracking` section turned into Ray Tune's own logger
callbacks, which the driver runs beside the results callback (`sweeps.tuning.make_tuner`).

- `tracking.mlflow`: `ray.air.integrations.mlflow.MLflowLoggerCallback`, one MLflow run per trial
  (named after the trial, its config as params, every report as metrics: the metric after
  compression and after each finetuning evaluation, size, ratios, times). `mlflow-skinny` is
  enough (`pip install 'lowrank-sweep[tracking]'`) for a file store or an MLflow server; the
  default tracking URI is a file store in the sweep folder (MLflow 3 keeps that backend in
  maintenance mode: MLFLOW_ALLOW_FILE_STORE is set for it), which `mlflow ui --backend-store-uri
  <sweep folder>/mlruns` shows. A `sqlite:` URI needs the full `mlflow` package.
- `tracking.wandb`: `ray.air.integrations.wandb.WandbLoggerCallback` (`pip install wandb`), one
  W&B run per trial; mode "offline" (the default) needs no account and writes the runs under the
  sweep folder (`wandb sync <sweep folder>/wandb/offline-run-*` uploads them later).

More callbacks of your own go through the Python API: `run_sweep(spec, callbacks=[...])`.
"""

from __future__ import annotations

import os
from pathlib import Path

from compression.errors import UserInputError
from sweeps.spec import SweepSpec
from sweeps.storage import is_uri


def _local_folder(directory: str, what: str) -> Path:
    if is_uri(directory):
        raise UserInputError(f"tracking.{what}: the sweep's storage {directory} is not a local folder, so the "
                             f"tracking data has no default place; give tracking.{what}."
                             + ("tracking_uri (an MLflow server)" if what == "mlflow" else "dir"))
    return Path(directory).resolve()


def mlflow_callback(spec: SweepSpec, directory: str):
    settings = spec.tracking.mlflow
    try:
        import mlflow  # noqa: F401 - the callback imports it lazily; fail here, before any trial
        from ray.air.integrations.mlflow import MLflowLoggerCallback
    except ImportError:
        raise UserInputError("tracking.mlflow needs MLflow: pip install 'lowrank-sweep[tracking]' (mlflow-skinny)") \
            from None
    uri = settings.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or \
        (_local_folder(directory, "mlflow") / "mlruns").as_uri()
    if uri.startswith("file:"):  # MLflow 3 keeps its file store in maintenance mode, behind this switch
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return MLflowLoggerCallback(tracking_uri=uri, experiment_name=settings.experiment or spec.name,
                                tags=dict(settings.tags) or None, save_artifact=False)


def wandb_callback(spec: SweepSpec, directory: str):
    settings = spec.tracking.wandb
    try:
        import wandb  # noqa: F401
        from ray.air.integrations.wandb import WandbLoggerCallback
    except ImportError:
        raise UserInputError("tracking.wandb needs Weights & Biases: pip install wandb") from None
    folder = Path(settings.dir) if settings.dir else _local_folder(directory, "wandb")
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["WANDB_MODE"] = settings.mode  # Ray asks for an API key unless the mode says offline
    return WandbLoggerCallback(project=settings.project or spec.name, group=settings.group,
                               mode=settings.mode, dir=str(folder))


def tracking_callbacks(spec: SweepSpec, directory: str) -> list:
    """The Tune callbacks `spec.tracking` asks for (none without the section)."""
    tracking = spec.tracking
    if tracking is None:
        return []
    return ([mlflow_callback(spec, directory)] if tracking.mlflow is not None else []) + \
        ([wandb_callback(spec, directory)] if tracking.wandb is not None else [])
