"""The Lightning callbacks a sweep adds to each stage it trains (never a training loop of its own):
reporting validation to the pruner, keeping the test split's per-expression scores, measuring speed and
memory for a second objective."""

from __future__ import annotations

import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import optuna
import psutil
import torch
from lightning.pytorch.callbacks import Callback
from optuna_integration import PyTorchLightningPruningCallback

from lightning_desa2va.data.datamodule import all_ranks
from lightning_desa2va.data.schema import EXPRESSION_TYPES
from lightning_desa2va.metrics import cat_state
from lightning_desa2va.tracking import log_artifacts
from lightning_desa2va.tuning.metric_names import PEAK_MEMORY, STEP_SECONDS
from lightning_desa2va.tuning.mlflow_runs import EXPRESSIONS_ARTIFACT_DIR
from lightning_desa2va.tuning.stats import ExpressionScores

Report = Callable[[int, float], None]
BYTES_PER_GB = 1024**3


class MissingMetricError(RuntimeError):
    """The metric a study optimises is not among what the stage logged at a validation."""


class StepPruningCallback(PyTorchLightningPruningCallback):
    """optuna-integration's Lightning pruning callback, reporting at every validation with the step.

    The integration reports ``current_epoch``; a run here is counted in steps over a stream with no epochs,
    so each validation reports ``step_offset + global_step`` (a repeated validation of the same step, as
    after ``fit``, reports nothing new). Stages before the one the search acts on are logged through
    ``on_report`` but not reported to the trial (``report_to_trial`` false): a pruner must not stop a trial
    on a signal the searched keys do not affect. A monitor the stage does not log fails the trial at once.
    """

    def __init__(
        self, trial: optuna.Trial, monitor: str, step_offset: int, on_report: Report, report_to_trial: bool
    ) -> None:
        super().__init__(trial, monitor)
        self.step_offset = step_offset
        self.on_report = on_report
        self.report_to_trial = report_to_trial
        self.last_step: int | None = None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.is_ddp_backend:
            super().on_validation_end(trainer, pl_module)
            return
        step = self.step_offset + trainer.global_step
        if step == self.last_step:
            return
        score = trainer.callback_metrics.get(self.monitor)
        if score is None:
            logged = sorted(name for name in trainer.callback_metrics if name.startswith("val/"))
            raise MissingMetricError(f"the stage logged no {self.monitor} (it logged {', '.join(logged)})")
        self.last_step = step
        self.on_report(step, float(score))
        if not self.report_to_trial:
            return
        self._trial.report(float(score), step=step)
        if self._trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {step}: {self.monitor} {float(score):.4f}")


class ExpressionScoreRecorder(Callback):
    """The test split's J and F per expression, in the order the stage's J&F metric saw them, kept for the
    study (``self.scores``) and logged as ``expression_scores/test.csv`` on the stage's run, so that any
    table of intervals and paired tests can be recomputed without retraining.

    Reads the stage's :class:`~lightning_desa2va.metrics.JFMetric` states (``metric_state``, torchmetrics'
    public view) before the stage computes and resets them: callbacks' ``on_test_epoch_end`` runs first. An
    expression is named ``<video id>/<text>`` (``#2`` after a repeat), the same in every run of a test set.
    """

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.scores: ExpressionScores | None = None

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.ids = []

    def on_test_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self.ids += [
            f"{video}/{text}" for video, text in zip(batch["video_id"], batch["expression"], strict=True)
        ]

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Gather every rank's expressions (each rank scores its share of the split) into one table, which
        rank 0 logs as one file."""
        state = pl_module.scores["test"]["jf"].metric_state
        j, f = (cat_state(state[key]).double().cpu().tolist() for key in ("j_values", "f_values"))
        types = [EXPRESSION_TYPES[index] for index in cat_state(state["type_ids"]).long().tolist()]
        if len(j) != len(self.ids):
            raise RuntimeError(f"{len(j)} scored expressions but {len(self.ids)} test samples seen")
        columns = zip(*all_ranks((self.ids, types, j, f)), strict=True)  # each column: every rank's part
        ids, types, j, f = ([value for part in column for value in part] for column in columns)
        self.scores = ExpressionScores(unique_ids(ids), types, j, f)
        if not trainer.is_global_zero:
            return
        with tempfile.TemporaryDirectory() as folder:
            path = self.scores.write_csv(Path(folder) / "test.csv")
            log_artifacts(trainer.logger, [path], EXPRESSIONS_ARTIFACT_DIR, Path(trainer.default_root_dir))


def unique_ids(ids: list[str]) -> list[str]:
    seen: Counter[str] = Counter()
    unique = []
    for name in ids:
        seen[name] += 1
        unique.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return unique


class TrialMeasures(Callback):
    """Wall seconds of every training step (validation excluded) and peak memory, over all the stages and
    seeds of a trial: a second objective for speed or memory (``step_s``, ``peak_memory_gb``)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.steps = 0
        self.peak_bytes = 0
        self._started = 0.0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._started = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.seconds += time.perf_counter() - self._started
        self.steps += 1
        used = (
            torch.cuda.max_memory_allocated()
            if torch.cuda.is_available()
            else psutil.Process().memory_info().rss
        )
        self.peak_bytes = max(self.peak_bytes, used)

    def values(self) -> dict[str, float]:
        return {STEP_SECONDS: self.seconds / max(1, self.steps), PEAK_MEMORY: self.peak_bytes / BYTES_PER_GB}
