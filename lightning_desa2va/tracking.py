"""MLflow tracking through Lightning's logger: the resolved config, params and image artifacts of a run."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterable
from pathlib import Path

from lightning.pytorch.loggers import Logger, MLFlowLogger
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

RESOLVED_CONFIG_ARTIFACT = "config"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"
"""What MLflow's UI reads to open an experiment as model training (runs, charts), not GenAI traces."""


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
    client.set_experiment_tag(logger.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
    for key, value in {"experiment": cfg.run.experiment, **cfg.run.choices}.items():
        client.set_tag(logger.run_id, key, str(value))
