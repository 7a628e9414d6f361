"""A study in MLflow: one parent run per study, a nested run per trial, the stage runs nested under it.

MLflow nests a run under another by the ``mlflow.parentRunId`` tag, so the stage runs that
:func:`~lightning_desa2va.pipeline.run_pipeline` starts are nested by passing that tag among its ``tags``:
the pipeline needs no change. A trial's run is an ``MLFlowLogger`` run like the stages' (same params, the
resolved config, component tags); its status says how the trial ended (FINISHED, KILLED when pruned, FAILED)
and the ``sweep.state`` tag names Optuna's state.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import optuna
from lightning.pytorch.loggers import MLFlowLogger
from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from omegaconf import DictConfig, OmegaConf
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from lightning_desa2va.config import save_config
from lightning_desa2va.tracking import (
    EXPERIMENT_KIND_TAG,
    MODEL_TRAINING_KIND,
    ensure_tracking_store,
    log_run_config,
    set_experiment_tag,
    tag_run,
)
from lightning_desa2va.tuning.spec import describe
from lightning_desa2va.tuning.stats import ExpressionScores

log = logging.getLogger(__name__)

PARENT_WAIT_S = 120.0  # how long a joining machine waits for the study's creator to make the parent run
PARENT_POLL_S = 1.0
STUDY_TAG = "sweep.study"
ROLE_TAG = "sweep.role"
TRIAL_TAG = "sweep.trial"
STATE_TAG = "sweep.state"
VARIED_TAG = "sweep.varied"
CHECKPOINT_TAG = "best_checkpoint"
PARENT_RUN_ATTR = "mlflow_parent_run_id"
TRIAL_RUN_ATTR = "mlflow_run_id"
STUDY_ROLE, TRIAL_ROLE, CONFIRM_ROLE = "study", "trial", "confirm"
SWEEP_PARAM_PREFIX = "sweep/"
EXPRESSIONS_ARTIFACT_DIR = "expression_scores"
MLFLOW_RUN_NOTE = "mlflow.note.content"  # what the UI shows as a run's description
RUN_STATUS = {
    TrialState.COMPLETE: RunStatus.FINISHED,
    TrialState.PRUNED: RunStatus.KILLED,
    TrialState.FAIL: RunStatus.FAILED,
}
"""The MLflow run status a trial ends with, by its Optuna state."""


class StudyRuns:
    """The study's MLflow experiment (named after the study) and the runs in it."""

    def __init__(self, tracking_uri: str, study_name: str) -> None:
        self.tracking_uri = tracking_uri
        self.study_name = study_name
        ensure_tracking_store(tracking_uri)
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.experiment_id = self._experiment_id(study_name)

    def _experiment_id(self, name: str) -> str:
        """The study's experiment, created if missing (by whichever process of a team is first) with the
        tag that opens it on the runs table."""
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            try:
                return self.client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND})
            except MlflowException as error:
                if error.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                experiment = self.client.get_experiment_by_name(name)
        set_experiment_tag(self.client, experiment.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
        return experiment.experiment_id

    def open_parent(self, study: optuna.Study, params: dict[str, Any], created: bool) -> str:
        """The study's parent run: created by the process that ``created`` the study, continued when the
        study resumes or another machine joins it (which waits for the creator's run, then makes one if
        the creator died first)."""
        deadline = time.monotonic() + PARENT_WAIT_S
        while not created and PARENT_RUN_ATTR not in study.user_attrs and time.monotonic() < deadline:
            time.sleep(PARENT_POLL_S)
        run_id = study.user_attrs.get(PARENT_RUN_ATTR)
        if run_id is not None:
            self.client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
            return run_id
        tags = {STUDY_TAG: self.study_name, ROLE_TAG: STUDY_ROLE}
        run = self.client.create_run(self.experiment_id, run_name=f"study {self.study_name}", tags=tags)
        for key, value in params.items():
            self.client.log_param(run.info.run_id, key, value)
        study.set_user_attr(PARENT_RUN_ATTR, run.info.run_id)
        return run.info.run_id

    def start_run(
        self, parent_id: str, role: str, number: int, name: str, values: dict[str, Any], cfg: DictConfig
    ) -> MLFlowLogger:
        """A trial's (or a confirmation's) nested run: the flattened config and the sampled values
        (``sweep/<key>``, what Compare's parallel coordinates plot) as params, the resolved config, the
        components as tags (the real ones: a bundle such as the Sa2VA control tags ``decoupler=none``)."""
        tags = {
            MLFLOW_PARENT_RUN_ID: parent_id,
            STUDY_TAG: self.study_name,
            ROLE_TAG: role,
            TRIAL_TAG: str(number),
            STATE_TAG: TrialState.RUNNING.name,
            VARIED_TAG: ",".join(values),
        }
        logger = MLFlowLogger(
            experiment_name=self.study_name, tracking_uri=self.tracking_uri, run_name=name, tags=tags
        )
        with tempfile.TemporaryDirectory() as folder:
            log_run_config(logger, cfg, save_config(cfg, Path(folder) / "config.yaml"))
        tag_run(logger, cfg)
        for key, value in values.items():
            self.client.log_param(logger.run_id, f"{SWEEP_PARAM_PREFIX}{key}", value)
        return logger

    def log_expressions(self, run_id: str, expressions: list[dict[str, list[Any]]]) -> None:
        """Each seed's per-expression test scores as ``expression_scores/test-seed<i>.csv`` on the run."""
        with tempfile.TemporaryDirectory() as folder:
            for index, scores in enumerate(expressions):
                path = ExpressionScores(**scores).write_csv(Path(folder) / f"test-seed{index}.csv")
                self.client.log_artifact(run_id, str(path), EXPRESSIONS_ARTIFACT_DIR)

    def log_intermediate(self, run_id: str, metric: str, value: float, step: int) -> None:
        self.client.log_metric(run_id, metric, value, step=step)

    def end_run(
        self, run_id: str, state: TrialState, metrics: dict[str, float], checkpoint: Path | None = None
    ) -> None:
        """Final metrics and checkpoint path, then the run's status (and its stage runs') from the state."""
        for key, value in metrics.items():
            self.client.log_metric(run_id, key, value)
        if checkpoint is not None:
            self.client.set_tag(run_id, CHECKPOINT_TAG, str(checkpoint))
        self.mark(run_id, state)

    def mark(self, run_id: str, state: TrialState) -> None:
        """Set the trial run's state tag and status, and end its stage runs with the same status."""
        status = RunStatus.to_string(RUN_STATUS[state])
        self.client.set_tag(run_id, STATE_TAG, state.name)
        children = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.{MLFLOW_PARENT_RUN_ID} = '{run_id}'"
        )
        for child in children:
            if child.info.status != RunStatus.to_string(RunStatus.FINISHED):
                self.client.set_terminated(child.info.run_id, status)
        self.client.set_terminated(run_id, status)

    def log_summary(
        self, parent_id: str, study: optuna.Study, figures: list[Path], files: list[Path], description: str
    ) -> None:
        """Counts, the best trial (values as metrics, its number, run and configuration as tags: a study
        resumed with more trials may change them, which params would refuse), the study's plots and files,
        and the tables as the run's description."""
        trials = study.get_trials(deepcopy=False)
        for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL):
            count = sum(trial.state == state for trial in trials)
            self.client.log_metric(parent_id, f"trials_{state.name.lower()}", count)
        for rank, best in enumerate(best_trials(study)):
            prefix = "best" if rank == 0 else f"pareto{rank}"
            for metric, value in zip(study.metric_names or ["value"], best.values, strict=False):
                self.client.log_metric(parent_id, f"{prefix}/{metric}", float(value))
            self.client.set_tag(parent_id, f"{prefix}.trial", str(best.number))
            self.client.set_tag(parent_id, f"{prefix}.run_id", str(best.user_attrs.get(TRIAL_RUN_ATTR)))
            self.client.set_tag(parent_id, f"{prefix}.config", describe(best.params))
        for path in figures:
            self.client.log_artifact(parent_id, str(path), "plots")
        for path in files:
            self.client.log_artifact(parent_id, str(path))
        self.client.set_tag(parent_id, MLFLOW_RUN_NOTE, description)

    def finish_parent(self, parent_id: str, status: RunStatus = RunStatus.FINISHED) -> None:
        self.client.set_terminated(parent_id, RunStatus.to_string(status))


def best_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The best complete trial (one objective) or the Pareto front, first metric first (several)."""
    if not any(trial.state == TrialState.COMPLETE for trial in study.get_trials(deepcopy=False)):
        return []
    if len(study.directions) == 1:
        return [study.best_trial]
    sign = 1 if study.directions[0] == optuna.study.StudyDirection.MAXIMIZE else -1
    return sorted(study.best_trials, key=lambda trial: -sign * trial.values[0])


class RetryStaleTrial(RetryHeartbeatStaleTrialCallback):
    """Optuna's retry of a trial whose process died (no heartbeat), which also ends its MLflow run as FAILED
    so that MLflow, like Optuna, shows the dead trial failed and its retry as a trial of its own."""

    def __init__(self, tracking_uri: str, study_name: str, max_retry: int = 1) -> None:
        super().__init__(max_retry=max_retry)
        self.tracking_uri = tracking_uri
        self.study_name = study_name

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        run_id = trial.user_attrs.get(TRIAL_RUN_ATTR)
        if run_id is not None:
            StudyRuns(self.tracking_uri, self.study_name).mark(run_id, TrialState.FAIL)
            log.warning("trial %d stopped while running (MLflow run %s): marked failed", trial.number, run_id)
        super().__call__(study, trial)


def flat_spec(spec: Any) -> dict[str, Any]:
    """The spec as parent-run params (sampler, pruner, metric, ...), the space as one YAML param."""
    container = OmegaConf.to_container(OmegaConf.structured(spec), resolve=True, enum_to_str=True)
    container.pop("profiles", None)
    space = container.pop("space")
    params = {key: value for key, value in container.items() if not isinstance(value, dict | list)}
    params["space"] = OmegaConf.to_yaml(space)
    for key in ("overrides", "metric", "direction"):
        params[key] = " ".join(map(str, container[key]))
    for group in ("confirm", "stats"):
        params |= {f"{group}.{key}": value for key, value in container[group].items()}
    return params
