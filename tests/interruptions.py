"""Helpers for tests that interrupt runs: a tiny stage config, and processes that train and die at a given
step (SIGKILL: nothing saved at the kill) or that run the ``desa2va`` command itself."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient

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

DIE_AT_STEP = """
import os, signal, sys
from pathlib import Path

import lightning.pytorch as pl

from lightning_desa2va.config import compose_config
from lightning_desa2va.pipeline import run_pipeline
from lightning_desa2va.training import train_stage

job, stage, step, overrides = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]


class DieAt(pl.Callback):
    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == step:
            os.kill(os.getpid(), signal.SIGKILL)


class TermInValidation(pl.Callback):
    def on_validation_batch_start(self, trainer, *args):
        if trainer.global_step == step and trainer.state.fn == "fit":
            os.kill(os.getpid(), signal.SIGTERM)


def callbacks(cfg):
    if cfg.run.choices.stage != stage:
        return []
    return [TermInValidation() if os.environ.get("SIGNAL") == "SIGTERM" else DieAt()]


if job == "train":
    cfg = compose_config(overrides)
    train_stage(cfg, callbacks=callbacks(cfg))
else:
    run_pipeline(overrides, Path(os.environ["EXPERIMENTS_DIR"]), stage_callbacks=callbacks)
"""


def environment() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    return {**env, "EXPERIMENTS_DIR": str(EXPERIMENTS_DIR)}


def die_at_step(root: Path, job: str, stage: str, step: int, overrides: list[str]) -> int:
    """Run ``job`` (train: one stage; demo: the pipeline) in a process that SIGKILLs itself at the end of
    ``step`` of ``stage``; its return code."""
    command = [sys.executable, "-c", DIE_AT_STEP, job, stage, str(step), *overrides]
    return subprocess.run(command, cwd=root, env=environment(), capture_output=True, text=True).returncode


def term_in_validation(root: Path, step: int, overrides: list[str]) -> subprocess.CompletedProcess:
    """Train one stage in a process that sends itself SIGTERM as the validation after ``step`` starts."""
    command = [sys.executable, "-c", DIE_AT_STEP, "train", "text_pretrain", str(step), *overrides]
    env = {**environment(), "SIGNAL": "SIGTERM"}
    return subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)


def desa2va(root: Path, *args: str) -> subprocess.CompletedProcess:
    """The ``desa2va`` command run in ``root``."""
    command = [
        sys.executable,
        "-m",
        "lightning_desa2va.cli",
        "--experiments-dir",
        str(EXPERIMENTS_DIR),
        *args,
    ]
    return subprocess.run(command, cwd=root, env=environment(), capture_output=True, text=True)


def start_desa2va(root: Path, *args: str) -> subprocess.Popen:
    """The ``desa2va`` command started in ``root`` (its log on stderr, line by line)."""
    command = [
        sys.executable,
        "-m",
        "lightning_desa2va.cli",
        "--experiments-dir",
        str(EXPERIMENTS_DIR),
        *args,
    ]
    return subprocess.Popen(command, cwd=root, env=environment(), stderr=subprocess.PIPE, text=True)


def metric_steps(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) of every point of a metric, in step order."""
    return sorted((point.step, point.value) for point in client.get_metric_history(run_id, key))
