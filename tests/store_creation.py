"""A process's first use of a fresh MLflow store, in a module a child process imports (no test module)."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from lightning_desa2va.tracking import ensure_tracking_store


def create_store(uri: str) -> None:
    """What a run does first with its tracking URI: create the store, then read it."""
    ensure_tracking_store(uri)
    MlflowClient(tracking_uri=uri).search_runs(["0"])
