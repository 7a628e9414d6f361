"""Helpers for tests that interrupt runs: a tiny stage config, and processes that train and die at a given
step (SIGKILL: nothing saved at the kill) or that run the ``desa2va`` command itself."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from cli_processes import CommandProcess, start
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from lightning_desa2va.cli import main
from lightning_desa2va.config import compose_config
from lightning_desa2va.pipeline import run_pipeline
from lightning_desa2va.training import train_stage

EXPERIMENTS_DIR = Path(__file__).resolve().parents[1] / "experiments"
TINY_STAGE = [
    "stage=text_pretrain",
    "synthetic.videos={train:4,val:1,test:1}",
    "synthetic.videos_per_shard=2",
    "data.batch_size=4",
    "data.eval_batch_size=4",
    "stage.num_overlays=0",
    "trainer.log_every_n_steps=1",
    "trainer.max_steps=10",
    "trainer.val_check_interval=5",
    "trainer.callbacks.checkpoint.every_n_train_steps=4",
    "num_threads=1",
    "logger.log_model=false",
]
"""A stage of 10 steps over about two epochs of 4 videos (one loader worker, one thread: bit-reproducible),
validated at steps 5 and 10, checkpointed at steps 4 and 8."""

TINY_DEMO = [
    "experiment=desa2va_tiny",
    *(override for override in TINY_STAGE if not override.startswith(("stage=", "trainer."))),
    "trainer.log_every_n_steps=1",
    "trainer.max_steps=6",
    "trainer.val_check_interval=3",
    "trainer.callbacks.checkpoint.every_n_train_steps=2",
]
"""The demo's two stages, 6 steps each, validated at steps 3 and 6, checkpointed every 2 steps."""


class StopAt(pl.Callback):
    """Stops this process with a signal at training step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step


class DieAt(StopAt):
    """SIGKILL at the end of the step: nothing is saved."""

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class TermInValidation(StopAt):
    """SIGTERM as the validation after the step starts."""

    def on_validation_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step and trainer.state.fn == "fit":
            os.kill(os.getpid(), signal.SIGTERM)


class TermAtEpochEnd(StopAt):
    """SIGTERM as the epoch that ends with the step ends: after the checkpoint callback's last look at the
    epoch's steps, before Lightning's own look at the signal."""

    def on_train_epoch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def train_until(job: str, stage: str, stopper: StopAt, overrides: list[str]) -> None:
    """``job`` (train: one stage; demo: the pipeline) with ``stopper`` in ``stage``'s callbacks."""

    def callbacks(cfg: DictConfig) -> list[pl.Callback]:
        return [stopper] if cfg.run.choices.stage == stage else []

    if job == "train":
        cfg = compose_config(overrides)
        train_stage(cfg, callbacks=callbacks(cfg))
    else:
        run_pipeline(overrides, EXPERIMENTS_DIR, stage_callbacks=callbacks)


def die_at_step(root: Path, job: str, stage: str, step: int, overrides: list[str]) -> int:
    """Run ``job`` (train: one stage; demo: the pipeline) in a process that SIGKILLs itself at the end of
    ``step`` of ``stage``; its return code."""
    return start(root, train_until, job, stage, DieAt(step), overrides).wait()


def stopped_by(root: Path, stopper: StopAt, overrides: list[str]) -> subprocess.CompletedProcess:
    """Train one stage (``text_pretrain``) in a process that ``stopper`` stops."""
    return start(root, train_until, "train", "text_pretrain", stopper, overrides).result()


def start_desa2va(root: Path, *args: str) -> CommandProcess:
    """The ``desa2va`` command started in ``root``."""
    return start(root, main, ["--experiments-dir", str(EXPERIMENTS_DIR), *args])


def desa2va(root: Path, *args: str) -> subprocess.CompletedProcess:
    """The ``desa2va`` command run in ``root`` to its end."""
    return start_desa2va(root, *args).result()


def metric_steps(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) of every point of a metric, in step order."""
    return sorted((point.step, point.value) for point in client.get_metric_history(run_id, key))
