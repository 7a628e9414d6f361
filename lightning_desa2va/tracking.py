"""MLflow tracking through Lightning's logger: the resolved config, params and image artifacts of a run; a
logger that continues a run without logging a step twice; a local store created once under a file lock."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from filelock import FileLock
from lightning.pytorch.loggers import Logger, MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

RESOLVED_CONFIG_ARTIFACT = "config"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"
"""What MLflow's UI reads to open an experiment as model training (runs, charts), not GenAI traces."""
SQLITE_PREFIX = "sqlite:///"
STORE_LOCK_SUFFIX = ".lock"


def ensure_tracking_store(tracking_uri: str) -> None:
    """Create a local SQLite store (its schema) under a file lock: two first runs on a fresh ``mlflow.db``
    otherwise race through MLflow's schema migrations and one fails."""
    if not tracking_uri.startswith(SQLITE_PREFIX):
        return
    database = Path(tracking_uri.removeprefix(SQLITE_PREFIX))
    database.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{database}{STORE_LOCK_SUFFIX}"):
        MlflowClient(tracking_uri=tracking_uri).search_experiments(max_results=1)


def set_experiment_tag(client: MlflowClient, experiment_id: str, key: str, value: str) -> None:
    """Set an experiment tag unless it already has ``value``; a team's processes tagging the same experiment
    at once race to insert it, and the loser finds the winner's value."""
    if client.get_experiment(experiment_id).tags.get(key) == value:
        return
    try:
        client.set_experiment_tag(experiment_id, key, value)
    except MlflowException:
        if client.get_experiment(experiment_id).tags.get(key) != value:
            raise


class RunLogger(MLFlowLogger):
    """Lightning's MLflow logger that, continuing a run (``run_id``), does not log again a step of a metric
    the run already holds: a run killed after its last checkpoint logged steps that its resumed run, reading
    on from the checkpoint, computes again (the same values, when resumed exactly)."""

    def __init__(
        self,
        experiment_name: str,
        tracking_uri: str,
        run_name: str | None = None,
        tags: dict[str, Any] | None = None,
        log_model: bool = False,
        run_id: str | None = None,
    ) -> None:
        super().__init__(
            experiment_name=experiment_name,
            tracking_uri=tracking_uri,
            run_name=run_name,
            tags=tags,
            log_model=log_model,
            run_id=run_id,
        )
        self._continued = run_id is not None
        self._last_logged: dict[str, int] | None = None

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if self._continued and step is not None:
            last = self.last_logged_steps()
            metrics = {key: value for key, value in metrics.items() if step > last.get(key, -1)}
            if not metrics:
                return
        super().log_metrics(metrics, step)

    def last_logged_steps(self) -> dict[str, int]:
        """The last step of every metric the continued run held when this logger opened it."""
        if self._last_logged is None:
            client, run_id = self.experiment, self.run_id
            self._last_logged = {
                key: max(point.step for point in client.get_metric_history(run_id, key))
                for key in client.get_run(run_id).data.metrics
            }
        return self._last_logged


def log_run_config(logger: Logger | None, cfg: DictConfig, resolved_path: Path) -> None:
    """Log every resolved config value as a param and the resolved YAML as an artifact."""
    if logger is None:
        return
    logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    log_artifacts(logger, [resolved_path], RESOLVED_CONFIG_ARTIFACT, fallback_dir=None)


def log_artifacts(
    logger: Logger | None, paths: Iterable[Path], artifact_dir: str, fallback_dir: Path | None
) -> None:
    """Attach files to the MLflow run; with another (or no) logger keep them under ``fallback_dir``."""
    paths = list(paths)
    if isinstance(logger, MLFlowLogger):
        for path in paths:
            logger.experiment.log_artifact(logger.run_id, str(path), artifact_dir)
        return
    if fallback_dir is None:
        return
    target = fallback_dir / artifact_dir
    target.mkdir(parents=True, exist_ok=True)
    for path in paths:
        shutil.copy2(path, target / path.name)
    log.info("no MLflow logger: kept %d artifacts in %s", len(paths), target)


def tag_run(logger: Logger | None, cfg: DictConfig) -> None:
    """Tag the run with its experiment and the variant of every config group (filterable columns in the
    MLflow UI), and mark its MLflow experiment as model training."""
    if not isinstance(logger, MLFlowLogger):
        return
    client = logger.experiment
    set_experiment_tag(client, logger.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
    for key, value in {"experiment": cfg.run.experiment, **cfg.run.choices}.items():
        client.set_tag(logger.run_id, key, str(value))
