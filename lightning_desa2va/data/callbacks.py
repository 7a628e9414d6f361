"""Reports what the data pipelines skipped to the run's logger (MLflow), as ``data/skipped/<reason>``."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch

SKIPPED_PREFIX = "data/skipped/"


class SkippedDataLogger(pl.Callback):
    """Logs the DataModule's skip counts (every reason, zeros included, summed over ranks and DataLoader
    workers) every ``log_every_n_steps`` training steps, after each validation and at the end of training.

    The counts are cumulative skip events: a bad validation sample counts again at every validation.
    """

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if trainer.global_step % trainer.log_every_n_steps == 0:
            self._log(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log(trainer)

    def _log(self, trainer: pl.Trainer) -> None:
        skipped = getattr(trainer.datamodule, "skipped", None)
        if skipped is None or trainer.logger is None:
            return
        counts = skipped()
        # on the module's device: a GPU run's collectives (NCCL) take no CPU tensors
        local = torch.tensor(list(counts.values()), dtype=torch.float64, device=trainer.strategy.root_device)
        summed = trainer.strategy.reduce(local, reduce_op="sum")
        metrics = {
            f"{SKIPPED_PREFIX}{reason}": float(n) for reason, n in zip(counts, summed.tolist(), strict=True)
        }
        trainer.logger.log_metrics(metrics, step=trainer.global_step)
