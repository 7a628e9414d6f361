"""One trial: sample the space, compose the overrides, train with :func:`run_pipeline`, report, score.

Training is counted in steps: :class:`StepPruningCallback` reports the validation metric at every validation
at the trial's step (the steps of its earlier stages and seeds before it), so a pruner compares trials at
the same amount of training. The value a trial returns is its last stage's final validation metric (mean
over its seeds); the test scores are kept beside it for the ablation table, never chosen on.
"""

from __future__ import annotations

import logging
import os
import socket
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import optuna
from lightning.pytorch.callbacks import Callback
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from omegaconf import DictConfig
from optuna.trial import TrialState
from optuna_integration import PyTorchLightningPruningCallback

from lightning_desa2va.config import compose_config
from lightning_desa2va.data.datamodule import VAL
from lightning_desa2va.pipeline import StageRun, run_pipeline
from lightning_desa2va.tuning.mlflow_runs import STUDY_TAG, TRIAL_RUN_ATTR, TRIAL_TAG, StudyRuns
from lightning_desa2va.tuning.spec import (
    SEED_PARAM,
    ParamType,
    SweepSpec,
    describe,
    merge_overrides,
    param_overrides,
    trial_seeds,
)

log = logging.getLogger(__name__)

TEST_ATTR = "test"  # per seed: the last stage's test metrics
VAL_ATTR = "val"  # per seed: the last stage's final validation metrics
STEPS_ATTR = "steps"  # training steps the trial spent (up to where it was pruned)
SECONDS_ATTR = "seconds"  # wall time of the trial
NAME_ATTR = "run_name"
WORKER_ATTR = "worker"  # host:pid of the process that ran the trial
Report = Callable[[int, float], None]


class StepPruningCallback(PyTorchLightningPruningCallback):
    """optuna-integration's Lightning pruning callback, reporting at every validation with the step.

    The integration reports ``current_epoch``; a run here is counted in steps over a stream with no epochs,
    so each validation reports ``step_offset + global_step`` (and a repeated validation of the same step,
    as after ``fit``, reports nothing new).
    """

    def __init__(self, trial: optuna.Trial, monitor: str, step_offset: int, on_report: Report) -> None:
        super().__init__(trial, monitor)
        self.step_offset = step_offset
        self.on_report = on_report
        self.last_step: int | None = None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.is_ddp_backend:
            super().on_validation_end(trainer, pl_module)
            return
        score = trainer.callback_metrics.get(self.monitor)
        step = self.step_offset + trainer.global_step
        if score is None or step == self.last_step:
            return
        self.last_step = step
        self._trial.report(float(score), step=step)
        self.on_report(step, float(score))
        if self._trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {step}: {self.monitor} {float(score):.4f}")


class TrialObjective:
    """The function Optuna calls for each trial (picklable: worker processes rebuild it from its fields)."""

    def __init__(
        self,
        spec: SweepSpec,
        overrides: list[str],
        experiments_dir: Path | None,
        tracking_uri: str,
    ) -> None:
        self.spec = spec
        self.overrides = overrides
        self.experiments_dir = experiments_dir
        self.runs = StudyRuns(tracking_uri, spec.name)

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

    def __call__(self, trial: optuna.Trial) -> float:
        values = self.suggest(trial)
        name = describe(values)
        overrides = merge_overrides(self.overrides, param_overrides(self.spec, values))
        parent_id = trial.study.user_attrs["mlflow_parent_run_id"]
        logger = self.runs.start_trial(
            parent_id, trial.number, name, values, self.last_stage_config(overrides)
        )
        run_id = logger.run_id
        trial.set_user_attr(TRIAL_RUN_ATTR, run_id)
        trial.set_user_attr(NAME_ATTR, name)
        trial.set_user_attr(WORKER_ATTR, f"{socket.gethostname()}:{os.getpid()}")
        log.info("trial %d: %s (MLflow run %s)", trial.number, name, run_id)
        started = time.monotonic()
        progress = _Steps()
        try:
            results = [
                self.train_seed(trial, overrides, seed, name, run_id, progress)
                for seed in trial_seeds(self.spec)
            ]
        except optuna.TrialPruned:
            self._record(trial, progress, started)
            self.runs.end_trial(run_id, TrialState.PRUNED, {})
            raise
        except BaseException:
            self._record(trial, progress, started)
            self.runs.end_trial(run_id, TrialState.FAIL, {})
            raise
        self._record(trial, progress, started)
        value = statistics.fmean(run.metrics[self.spec.metric] for run in results)
        tests = [run.test_metrics for run in results]
        trial.set_user_attr(TEST_ATTR, tests)
        trial.set_user_attr(VAL_ATTR, [run.metrics for run in results])
        means = {f"test/{key}": statistics.fmean(test[key] for test in tests) for key in tests[0]}
        best = max(results, key=lambda run: run.metrics[self.spec.metric] * self.sign)
        self.runs.end_trial(run_id, TrialState.COMPLETE, {"objective": value, **means}, best.checkpoint)
        return value

    @property
    def sign(self) -> int:
        return 1 if self.spec.direction.value == "maximize" else -1

    def last_stage_config(self, overrides: list[str]) -> DictConfig:
        """The config of the trial's last stage (what its run records as params)."""
        first = compose_config(overrides, self.experiments_dir)
        return compose_config([f"stage={first.pipeline.stages[-1]}", *overrides], self.experiments_dir)

    def train_seed(
        self,
        trial: optuna.Trial,
        overrides: list[str],
        seed: int | None,
        name: str,
        run_id: str,
        steps: _Steps,
    ) -> StageRun:
        """One :func:`run_pipeline` call, its stage runs nested under the trial's run."""
        if seed is not None:
            overrides = [*overrides, f"{SEED_PARAM}={seed}"]
            name = f"{name} {SEED_PARAM}={seed}"
        monitor = f"{VAL}/{self.spec.metric}"

        def report(step: int, value: float) -> None:
            steps.reported = step
            self.runs.log_intermediate(run_id, monitor, value, step)

        def stage_callbacks(cfg: DictConfig) -> Sequence[Callback]:
            offset = steps.planned
            steps.planned += int(cfg.trainer.max_steps)
            return [StepPruningCallback(trial, monitor, offset, report)]

        tags = {MLFLOW_PARENT_RUN_ID: run_id, STUDY_TAG: self.spec.name, TRIAL_TAG: str(trial.number)}
        runs = run_pipeline(
            [*overrides, f"logger.experiment_name={self.spec.name}"],
            self.experiments_dir,
            stage_callbacks=stage_callbacks,
            score_test=True,
            run_name=lambda cfg: f"{name} {cfg.run.choices.stage}",
            tags=tags,
        )
        steps.reported = steps.planned
        return runs[-1]

    def _record(self, trial: optuna.Trial, steps: _Steps, started: float) -> None:
        trial.set_user_attr(STEPS_ATTR, steps.reported)
        trial.set_user_attr(SECONDS_ATTR, time.monotonic() - started)


class _Steps:
    """Steps of the trial's stages started so far (``planned``) and trained up to the last report."""

    def __init__(self) -> None:
        self.planned = 0
        self.reported = 0
