"""The trainer's callbacks for training counted in steps over streamed (WebDataset) data, whose epochs have no
length: a progress bar over ``max_steps`` and a ``last.ckpt`` that is written on the way and at the end.

Lightning's bar counts per epoch and titles it ``Epoch 6/-2`` when ``max_epochs`` is -1; its checkpoint
callback with ``every_n_train_steps`` skips the final step unless it falls on the interval.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from rich.console import Console

log = logging.getLogger(__name__)

TRAIN_DESCRIPTION = "train steps"
LOGGER_VERSION_KEY = "v_num"


class StepProgressBar(RichProgressBar):
    """Steps done of ``max_steps`` (one bar for the whole run, across epochs) and the logged losses.

    Where output is not a terminal (a log file, CI) a live bar cannot be drawn, so the bar stays off and the
    same figures are logged as ``lines_when_piped`` evenly spaced lines instead.
    """

    def __init__(self, lines_when_piped: int = 10, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.lines_when_piped = lines_when_piped
        self.piped = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self.piped = not Console(**self._console_kwargs).is_terminal
        if self.piped:
            self.disable()

    @property
    def total_train_batches(self) -> int | float:
        max_steps = self.trainer.max_steps
        return max_steps if max_steps and max_steps > 0 else super().total_train_batches

    def _get_train_description(self, current_epoch: int) -> str:
        return f"{TRAIN_DESCRIPTION:{len(self.validation_description)}}"

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A new epoch of the stream is not a new bar: keep counting where the last one stopped."""
        if self.train_progress_bar_id is None or self.trainer.max_steps <= 0:
            super().on_train_epoch_start(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, trainer.global_step - 1)
        if self.piped and trainer.is_global_zero and self._due(trainer):
            metrics = ", ".join(
                f"{name} {value:.4g}" if isinstance(value, float) else f"{name} {value}"
                for name, value in self.get_metrics(trainer, pl_module).items()
            )
            log.info("%s %d/%d: %s", TRAIN_DESCRIPTION, trainer.global_step, trainer.max_steps, metrics)

    def _due(self, trainer: pl.Trainer) -> bool:
        every = max(1, trainer.max_steps // max(1, self.lines_when_piped)) if trainer.max_steps > 0 else 1
        return trainer.global_step % every == 0 or trainer.global_step == trainer.max_steps

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        """The logged progress-bar metrics, without the logger's version (an MLflow run id, noise here)."""
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop(LOGGER_VERSION_KEY, None)
        return metrics


class ResumableCheckpoint(ModelCheckpoint):
    """``last.ckpt`` every ``every_n_train_steps`` (a killed run resumes from it) and always at the last step
    (which the next stage starts from)."""

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        super().on_train_end(trainer, pl_module)
