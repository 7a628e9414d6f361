"""One trial: sample the space, compose the overrides, train with :func:`run_pipeline`, report, score.

Training is counted in steps: :class:`~lightning_desa2va.tuning.callbacks.StepPruningCallback` reports the
validation metric at every validation at the trial's step (the steps of its earlier stages and seeds before
it), so a pruner compares trials at the same amount of training; it reports from the first validation of
``prune_stage`` on (default: the last stage). A trial's values are its last stage's final validation metrics
(mean over its seeds) or its trial measures. Only an ablation (a grid read on test) scores the test split per
trial, keeping each seed's per-expression scores for the table's intervals; any other study chooses on val
and confirms on test at its end (:mod:`lightning_desa2va.tuning.confirm`).
"""

from __future__ import annotations

import logging
import os
import socket
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from lightning.pytorch.callbacks import Callback
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from omegaconf import DictConfig
from optuna.storages import RetryFailedTrialCallback
from optuna.trial import TrialState

from lightning_desa2va.config import compose_config
from lightning_desa2va.data.datamodule import VAL
from lightning_desa2va.pipeline import StageRun, run_pipeline
from lightning_desa2va.tuning.callbacks import (
    ExpressionScoreRecorder,
    MissingMetricError,
    StepPruningCallback,
    TrialMeasures,
)
from lightning_desa2va.tuning.metric_names import TRIAL_MEASURES
from lightning_desa2va.tuning.mlflow_runs import (
    PARENT_RUN_ATTR,
    STUDY_TAG,
    TRIAL_ROLE,
    TRIAL_RUN_ATTR,
    TRIAL_TAG,
    StudyRuns,
)
from lightning_desa2va.tuning.spec import (
    SEED_PARAM,
    ParamType,
    SweepSpec,
    describe,
    merge_overrides,
    multi_objective,
    param_overrides,
    trial_seeds,
)

log = logging.getLogger(__name__)

TEST_ATTR = "test"  # per seed: the last stage's test metrics (ablations)
EXPRESSIONS_ATTR = "expressions"  # per seed: the test split's per-expression scores (ablations)
VAL_ATTR = "val"  # per seed: the last stage's final validation metrics
MEASURES_ATTR = "measures"  # step seconds and peak memory over the trial's training
STEPS_ATTR = "steps"  # training steps the trial spent (up to where it was pruned)
SECONDS_ATTR = "seconds"  # wall time of the trial
NAME_ATTR = "run_name"
WORKER_ATTR = "worker"  # host:pid of the process that ran the trial


@dataclass
class Training:
    """What one configuration's training left: a result per seed, the steps spent, the measures."""

    results: list[StageRun] = field(default_factory=list)
    expressions: list[dict[str, list[Any]]] = field(default_factory=list)
    planned: int = 0  # steps of the stages started so far
    reported: int = 0  # steps trained up to the last report
    measures: TrialMeasures = field(default_factory=TrialMeasures)


class TrialObjective:
    """The function Optuna calls for each trial (picklable: worker processes rebuild it from its fields)."""

    def __init__(
        self,
        spec: SweepSpec,
        overrides: list[str],
        experiments_dir: Path | None,
        tracking_uri: str,
        n_trials: int,
        trials_dir: Path,
    ) -> None:
        self.spec = spec
        self.overrides = overrides
        self.experiments_dir = experiments_dir
        self.runs = StudyRuns(tracking_uri, spec.name)
        self.n_trials = n_trials
        self.trials_dir = trials_dir
        """Each trial's pipeline records, by the number of the trial a retry retries, so that a trial
        re-queued after its worker died or was stopped continues from its checkpoints."""
        self.running: int | None = None  # the number of the trial this process is training, if any
        self.on_start: Callable[[], None] | None = None
        """Called as a trial begins (it exists in the storage by then): the study loop's start lock."""

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for name, param in self.spec.space.items():
            if param.type is ParamType.categorical:
                values[name] = trial.suggest_categorical(name, list(param.choices or []))
            elif param.type is ParamType.int:
                step = int(param.step or 1)
                values[name] = trial.suggest_int(name, int(param.low), int(param.high), step=step)
            else:
                log_scale = param.type is ParamType.log_float
                values[name] = trial.suggest_float(
                    name, param.low, param.high, step=param.step, log=log_scale
                )
        if self.spec.seeds > 1 and trial_seeds(self.spec) == [None]:
            values[SEED_PARAM] = trial.suggest_categorical(SEED_PARAM, list(range(self.spec.seeds)))
        return values

    def __call__(self, trial: optuna.Trial) -> float | list[float]:
        if self.on_start is not None:
            self.on_start()
        values = self.suggest(trial)
        name = describe(values)
        overrides = merge_overrides(self.overrides, param_overrides(self.spec, values))
        parent_id = trial.study.user_attrs[PARENT_RUN_ATTR]
        cfg = self.last_stage_config(overrides)
        run_id = self.runs.start_run(parent_id, TRIAL_ROLE, trial.number, name, values, cfg).run_id
        trial.set_user_attr(TRIAL_RUN_ATTR, run_id)
        trial.set_user_attr(NAME_ATTR, name)
        trial.set_user_attr(WORKER_ATTR, f"{socket.gethostname()}:{os.getpid()}")
        finished = sum(t.state.is_finished() for t in trial.study.get_trials(deepcopy=False))
        log.info(
            "trial %d of %d (Optuna #%d): %s (MLflow run %s)",
            finished + 1,
            self.n_trials,
            trial.number,
            name,
            run_id,
        )
        self.running = trial.number
        started = time.monotonic()
        training = Training()
        origin = original_number(trial)
        try:
            for seed in trial_seeds(self.spec):
                record_dir = self.trials_dir / f"{origin:05d}" / f"seed-{seed}"
                self.train_seed(
                    overrides, seed, name, run_id, training, self.spec.ablation, trial, record_dir
                )
        except optuna.TrialPruned:
            self._record(trial, training, started)
            self.runs.end_run(run_id, TrialState.PRUNED, {})
            self.running = None
            raise
        except BaseException as error:
            self._record(trial, training, started)
            self.runs.end_run(run_id, TrialState.FAIL, {})
            if isinstance(error, Exception):  # an interrupt keeps `running` for the loop to re-queue it
                self.running = None
            raise
        self.running = None
        self._record(trial, training, started)
        objectives = self.objective_values(training)
        trial.set_user_attr(VAL_ATTR, [run.metrics for run in training.results])
        final = {
            f"objective/{metric}": value for metric, value in zip(self.spec.metric, objectives, strict=True)
        }
        if self.spec.ablation:
            tests = [run.test_metrics for run in training.results]
            trial.set_user_attr(TEST_ATTR, tests)
            trial.set_user_attr(EXPRESSIONS_ATTR, training.expressions)
            self.runs.log_expressions(run_id, training.expressions)
            final |= {f"test/{key}": statistics.fmean(test[key] for test in tests) for key in tests[0]}
        best = max(training.results, key=lambda run: run.metrics.get(self.spec.metric[0], 0.0) * self.sign)
        self.runs.end_run(run_id, TrialState.COMPLETE, final, best.checkpoint)
        return objectives if multi_objective(self.spec) else objectives[0]

    def objective_values(self, training: Training) -> list[float]:
        """Each metric of the spec: the mean over seeds of the final validation value, or a trial measure."""
        measures = training.measures.values()
        values = []
        for metric in self.spec.metric:
            if metric in TRIAL_MEASURES:
                values.append(measures[metric])
            elif all(metric in run.metrics for run in training.results):
                values.append(statistics.fmean(run.metrics[metric] for run in training.results))
            else:
                logged = ", ".join(sorted(training.results[-1].metrics))
                raise MissingMetricError(f"the last stage logged no val/{metric} (it logged {logged})")
        return values

    @property
    def sign(self) -> int:
        return 1 if self.spec.direction[0].value == "maximize" else -1

    def last_stage_config(self, overrides: list[str]) -> DictConfig:
        """The config of the trial's last stage (what its run records as params)."""
        first = compose_config(overrides, self.experiments_dir)
        return compose_config([f"stage={first.pipeline.stages[-1]}", *overrides], self.experiments_dir)

    def train_seed(
        self,
        overrides: list[str],
        seed: int | None,
        name: str,
        run_id: str,
        training: Training,
        score_test: bool,
        trial: optuna.Trial | None = None,
        record_dir: Path | None = None,
    ) -> None:
        """One :func:`run_pipeline` call, its stage runs nested under ``run_id``; a ``trial`` gets its
        validations reported (pruning), a run that scores test keeps its per-expression scores; the pipeline
        continues the one recorded in ``record_dir`` when it holds one."""
        if seed is not None:
            overrides = [*overrides, f"{SEED_PARAM}={seed}"]
            name = f"{name} {SEED_PARAM}={seed}"
        monitor = f"{VAL}/{self.spec.metric[0]}"
        recorder = ExpressionScoreRecorder()
        first = compose_config(overrides, self.experiments_dir)
        prune_stage = self.spec.prune_stage or first.pipeline.stages[-1]
        reporting = trial is not None and not multi_objective(self.spec)
        watching = self.spec.metric[0] not in TRIAL_MEASURES

        def report(step: int, value: float) -> None:
            training.reported = step
            self.runs.log_intermediate(run_id, monitor, value, step)

        def stage_callbacks(cfg: DictConfig) -> Sequence[Callback]:
            offset = training.planned
            training.planned += int(cfg.trainer.max_steps)
            stage = cfg.run.choices.stage
            callbacks: list[Callback] = [training.measures]
            if trial is not None and watching:
                prunes = reporting and stage_index(first, stage) >= stage_index(first, prune_stage)
                callbacks.append(StepPruningCallback(trial, monitor, offset, report, prunes))
            if score_test and stage == first.pipeline.stages[-1]:
                callbacks.append(recorder)
            return callbacks

        tags = {MLFLOW_PARENT_RUN_ID: run_id, STUDY_TAG: self.spec.name}
        if trial is not None:
            tags[TRIAL_TAG] = str(trial.number)
        runs = run_pipeline(
            [*overrides, f"logger.experiment_name={self.spec.name}"],
            self.experiments_dir,
            stage_callbacks=stage_callbacks,
            score_test=score_test,
            run_name=lambda cfg: f"{name} {cfg.run.choices.stage}",
            tags=tags,
            record_dir=record_dir,
        )
        training.reported = training.planned
        training.results.append(runs[-1])
        if recorder.scores is not None:
            training.expressions.append(recorder.scores.as_dict())

    def _record(self, trial: optuna.Trial, training: Training, started: float) -> None:
        trial.set_user_attr(STEPS_ATTR, training.reported)
        trial.set_user_attr(SECONDS_ATTR, time.monotonic() - started)
        trial.set_user_attr(MEASURES_ATTR, training.measures.values())


def stage_index(cfg: DictConfig, stage: str) -> int:
    return list(cfg.pipeline.stages).index(stage)


def original_number(trial: optuna.Trial) -> int:
    """The number of the trial a re-queued trial retries (the first of its retries), else its own."""
    (frozen,) = [t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number]
    return (RetryFailedTrialCallback.retry_history(frozen) or [trial.number])[0]
