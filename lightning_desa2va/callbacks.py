"""The trainer's callbacks for training counted in steps over streamed (WebDataset) data, whose epochs have no
length, and for runs that must survive interruption: a progress bar over ``max_steps``; a ``last.ckpt``
written on its own step interval, on SIGTERM / SIGINT and at the end; a seed per step; a divergence warning.

Lightning's bar counts per epoch and titles it ``Epoch 6/-2`` when ``max_epochs`` is -1; its checkpoint
callback with ``every_n_train_steps`` skips the final step unless it falls on the interval, saves again after
every validation, and a run resumed from a checkpoint saved just before a validation skips that validation.
"""

from __future__ import annotations

import logging
import math
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from rich.console import Console

from lightning_desa2va.data.stream import seed_libraries, stream_seed
from lightning_desa2va.errors import RunInterrupted
from lightning_desa2va.signals import STOP, signal_name

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
    """``last.ckpt`` every ``every_n_train_steps`` optimizer steps (a killed run resumes from it), at the
    last step (which the next stage starts from) and when SIGTERM or SIGINT arrives
    (:data:`~lightning_desa2va.signals.STOP`): the step in progress finishes, ``last.ckpt`` is saved and
    :class:`RunInterrupted` stops the run. Writes are independent of validation, except that a save due at a
    step that validates waits for the validation's end, and a stop during such a step stops in the
    validation: either way a resumed run neither skips nor repeats a validation.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._save_after_validation = False
        self._stop_in_validation = False

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loop = trainer.fit_loop.epoch_loop
        if loop._should_accumulate():  # gradients of a partial accumulation are in no checkpoint: wait
            return
        validating_next = loop._should_check_val_fx(trainer.fit_loop._data_fetcher)
        if trainer.strategy.reduce_boolean_decision(STOP.signum is not None, all=False):
            if validating_next:
                self._stop_in_validation = True
            else:
                self._save_and_stop(trainer)
            return
        every = self._every_n_train_steps
        if every < 1 or trainer.global_step % every or self._should_skip_saving_checkpoint(trainer):
            return
        if validating_next:
            self._save_after_validation = True
        else:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_validation_batch_start(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        """Stop before the batch, saved as Lightning saves from inside a validation step (the batch marked
        started): a run resumed from that checkpoint runs this validation again, from its first batch."""
        fitting = trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking
        if fitting and (self._stop_in_validation or STOP.signum is not None):
            trainer.fit_loop.epoch_loop.val_loop.batch_progress.increment_started()
            self._save_and_stop(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._save_after_validation:
            self._save_after_validation = False
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        super().on_train_end(trainer, pl_module)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        """Lightning's own SIGTERM stop (between the checks above and the next step) also saves."""
        if isinstance(exception, SIGTERMException) and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _save_and_stop(self, trainer: pl.Trainer) -> None:
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        raise saved_stop(trainer, STOP.signum or 0)


def saved_stop(trainer: pl.Trainer, signum: int) -> RunInterrupted:
    """The stop of a run whose ``last.ckpt`` holds its step: what the command prints and exits with."""
    step, saved = trainer.global_step, trainer.checkpoint_callback.last_model_path
    return RunInterrupted(signum, f"{signal_name(signum)}: stopped at step {step}, saved {saved}")


@contextmanager
def lightning_stop_as_ours(trainer: pl.Trainer) -> Iterator[None]:
    """Lightning's own SIGTERM stop (``SIGTERMException``, a ``SystemExit`` of status 0) comes where
    :class:`ResumableCheckpoint` does not look (a signal after its last check of an epoch, stopped at the
    epoch's end); its ``on_exception`` saved ``last.ckpt``, and the run stops as from those checks."""
    try:
        yield
    except SIGTERMException as stopped:
        raise saved_stop(trainer, signal.SIGTERM) from stopped


class StepSeed(pl.Callback):
    """Seeds torch, NumPy and Python from (``seed``, batch, rank) before every training batch, so what a
    step draws (dropout, sampled points) depends on the step alone and a resumed run draws what an
    uninterrupted one would (the data draws from generators of its own:
    :mod:`~lightning_desa2va.data.stream`).
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        seed_libraries(stream_seed(self.seed, trainer.fit_loop.total_batch_idx, trainer.global_rank))


class DivergenceWarning(pl.Callback):
    """Warns once when the training loss, smoothed over steps, grows ``factor`` times above its running
    minimum: a learning rate too high, usually, long before the loss is NaN."""

    def __init__(self, factor: float, smoothing: float) -> None:
        self.factor = factor
        self.smoothing = smoothing
        self.smoothed: float | None = None
        self.lowest = (math.inf, 0)
        self.warned = False

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is None or self.warned or not math.isfinite(value := float(loss)):
            return
        self.smoothed = (
            value if self.smoothed is None else self.smoothed + self.smoothing * (value - self.smoothed)
        )
        if self.smoothed < self.lowest[0]:
            self.lowest = (self.smoothed, trainer.global_step)
        elif self.smoothed > self.factor * self.lowest[0] > 0:
            self.warned = True
            log.warning(
                "the training loss is diverging: %.3g at step %d, %.0f times its lowest (%.3g at step %d); "
                "a lower stage.optimizer.lr may help",
                self.smoothed,
                trainer.global_step,
                self.smoothed / self.lowest[0],
                *self.lowest,
            )
