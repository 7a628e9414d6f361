"""Train one stage in a run of its own, and leave nothing half done.

:func:`train_stage` builds a run config's parts, trains them with a Lightning ``Trainer`` in the run's
folder (:mod:`lightning_desa2va.runs`) and MLflow run, then scores the final model on val (and optionally
test) beside the union-of-objects baseline, all logged to the run. How an attempt ends decides what it leaves:

- finished: ``run.json`` says so and holds the scores (a pipeline reuses a finished stage as it is);
- stopped by SIGTERM / SIGINT: ``last.ckpt`` at the signal's step, the run interrupted (MLflow: KILLED);
- failed before training a step (a bad shard, a NaN loss at the first step): a new run leaves no folder and
  no MLflow run behind, a resumed one is left as it was before the attempt (a finished run stays FINISHED);
- failed or stopped (a pruned sweep trial) later: the run failed (MLflow: FAILED), its last checkpoint there
  to resume from.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import Logger, MLFlowLogger
from mlflow.entities import RunStatus
from omegaconf import DictConfig, OmegaConf

from lightning_desa2va.baselines import score_union_baseline
from lightning_desa2va.build import build_components
from lightning_desa2va.callbacks import lightning_stop_as_ours
from lightning_desa2va.config import save_config
from lightning_desa2va.data.datamodule import TEST, TRAIN, VAL
from lightning_desa2va.errors import RunInterrupted
from lightning_desa2va.resume import Resume
from lightning_desa2va.runs import (
    CHECKPOINTS_DIR,
    FAILED,
    FINISHED,
    INTERRUPTED,
    RUNNING,
    RunRecord,
    holding_lock,
    last_checkpoint,
    new_run_dir,
    now,
    read_record,
    write_record,
)
from lightning_desa2va.signals import STOP
from lightning_desa2va.stages.base import SegmentationStage
from lightning_desa2va.strategies import check_accelerator, check_strategy
from lightning_desa2va.tracking import ensure_tracking_store, log_run_config, tag_run

log = logging.getLogger(__name__)

CALLBACKS_KEY = "callbacks"
WHOLE_SPLIT = 1.0
"""``trainer.limit_val_batches`` scoring every val batch: the final validation's, whatever training used."""


@dataclass
class StageRun:
    """What a finished stage leaves behind: its val (and test, when scored) metrics beside the baseline's."""

    label: str  # e.g. "stage 2 (fused mask)"
    run_id: str | None
    output_dir: Path
    checkpoint: Path
    metrics: dict[str, float] = field(default_factory=dict)
    baseline: dict[str, float] = field(default_factory=dict)
    test_metrics: dict[str, float] = field(default_factory=dict)
    test_baseline: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    """Samples the data pipelines skipped, by reason (every split, every attempt of the run)."""
    checkpoint_weights: dict[str, int] = field(default_factory=dict)
    """What the final checkpoint keeps and leaves to the base folders (see ``RunRecord``)."""


def build_trainer(cfg: DictConfig, logger: Logger | bool, callbacks: Sequence[Callback] = ()) -> pl.Trainer:
    """The configured Trainer with its named callbacks (``trainer.callbacks.<name>``; null drops one) and
    ``callbacks`` after them."""
    named = cfg.trainer.get(CALLBACKS_KEY) or {}
    configured = [instantiate(node) for node in named.values() if node is not None]
    resolved = OmegaConf.to_container(cfg.trainer, resolve=True)
    settings = {key: value for key, value in resolved.items() if key != CALLBACKS_KEY}
    check_accelerator(str(settings.get("accelerator", "auto")))
    check_strategy(
        settings.get("strategy", "auto"), settings.get("devices", "auto"), settings.get("num_nodes", 1)
    )
    return instantiate(settings, logger=logger, callbacks=[*configured, *callbacks])


def build_logger(
    cfg: DictConfig, run_id: str | None, run_name: str | None, tags: dict[str, str]
) -> Logger | None:
    """The configured logger; a resumed run continues its MLflow run (``run_id``)."""
    if cfg.logger is None:
        return None
    ensure_tracking_store(cfg.logger.tracking_uri)
    extra: dict[str, Any] = {"run_id": run_id} if run_id else {}
    if run_name is not None:
        extra["run_name"] = run_name
    return instantiate(cfg.logger, **extra, tags={**(cfg.logger.get("tags") or {}), **tags})


def point_checkpoints_at(trainer: pl.Trainer, folder: Path) -> None:
    """Checkpoint callbacks without a folder of their own save into the run's folder."""
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath is None:
            callback.dirpath = str(folder)


def train_stage(
    cfg: DictConfig,
    callbacks: Sequence[Callback] = (),
    score_test: bool = False,
    run_name: str | None = None,
    tags: dict[str, str] | None = None,
    resume: Resume | None = None,
    on_open: Callable[[Path], None] | None = None,
) -> StageRun:
    """Train the configured stage (continuing ``resume``'s run when given), then score its final model and
    the union baseline on val (and test). ``on_open`` learns the run's folder as soon as it exists."""
    parts = build_components(cfg)
    parts.datamodule.require_splits(TRAIN, VAL, *([TEST] if score_test else []))
    logger = build_logger(cfg, resume.record.mlflow_run_id if resume else None, run_name, tags or {})
    trainer = build_trainer(cfg, logger or False, callbacks)
    if trainer.is_global_zero:
        attempt = stage_attempt(cfg, logger, resume, tags or {}, lambda: trainer.global_step)
    else:
        attempt = other_rank(cfg, resume)
    with attempt as output_dir:
        if trainer.is_global_zero:  # other ranks checkpoint into rank 0's folder: Lightning broadcasts it
            point_checkpoints_at(trainer, output_dir / CHECKPOINTS_DIR)
            if on_open is not None:
                on_open(output_dir)
            log.info("run folder: %s", output_dir)
        checkpoint = resume.checkpoint if resume else None
        with STOP.listening(), lightning_stop_as_ours(trainer):
            trainer.fit(parts.stage, datamodule=parts.datamodule, ckpt_path=checkpoint, weights_only=True)
        limit = trainer.limit_val_batches
        validated_whole = isinstance(limit, float) and limit == WHOLE_SPLIT
        if not validated_whole or parts.stage.last_validated_step != trainer.global_step:
            trainer.limit_val_batches = WHOLE_SPLIT  # training validated on a subset (an int counts batches)
            trainer.validate(parts.stage, parts.datamodule, verbose=False)
        run = StageRun(
            label=parts.stage.label,
            run_id=logger.run_id if isinstance(logger, MLFlowLogger) else None,
            output_dir=output_dir,
            checkpoint=Path(trainer.checkpoint_callback.last_model_path).resolve(),
            metrics=split_metrics(trainer.callback_metrics, VAL),
        )
        # The union baseline measures referring; stages that output no masks (VLM pre-training) skip it.
        referring = isinstance(parts.stage, SegmentationStage)
        if referring:
            run.baseline = score_union_baseline(
                parts.datamodule, trainer.logger, VAL, trainer.strategy.root_device
            )
        if score_test:
            scores = trainer.test(parts.stage, parts.datamodule, verbose=False)[0]
            run.test_metrics = split_metrics(scores, TEST)
            if referring:
                device = trainer.strategy.root_device
                run.test_baseline = score_union_baseline(parts.datamodule, trainer.logger, TEST, device)
        run.skipped = parts.datamodule.skipped()
        run.checkpoint_weights = parts.stage.saved_weights
        if trainer.is_global_zero:
            finish_record(run)
    return run


@contextmanager
def other_rank(cfg: DictConfig, resume: Resume | None) -> Iterator[Path]:
    """What a rank other than 0 of a distributed run keeps: nothing. Rank 0 makes the run's folder, records
    and MLflow run (the logger logs from rank 0 only); this rank trains beside it."""
    yield resume.run_dir if resume else Path(cfg.paths.output_dir)


@contextmanager
def stage_attempt(
    cfg: DictConfig,
    logger: Logger | None,
    resume: Resume | None,
    tags: dict[str, str],
    step: Callable[[], int],
) -> Iterator[Path]:
    """The run's folder for one attempt, locked while it lasts; how the attempt ends is recorded (module
    docstring), and an attempt that failed before ``step()`` (the trainer's) moved on changes nothing that
    was there."""
    mlflow = logger if isinstance(logger, MLFlowLogger) else None
    run_id = mlflow.run_id if mlflow else None  # creates (or opens) the MLflow run
    output_dir = resume.run_dir if resume else new_run_dir(cfg, run_id)
    previous_status = mlflow.experiment.get_run(run_id).info.status if (mlflow and resume) else None
    first_step = resume.step if resume else 0
    outcome: str | None = None  # how the attempt ended, when it ended otherwise than finished
    try:
        with holding_lock(output_dir):
            open_attempt(cfg, logger, output_dir, resume, tags)
            try:
                yield output_dir
            except RunInterrupted:
                outcome = INTERRUPTED
                raise
            except BaseException:
                outcome = FAILED if step() > first_step else None
                raise
    except BaseException:
        if outcome is None:
            undo_attempt(output_dir, mlflow, resume, previous_status)
        else:
            end_attempt(output_dir, mlflow, outcome)
        raise


def open_attempt(
    cfg: DictConfig, logger: Logger | None, output_dir: Path, resume: Resume | None, tags: dict[str, str]
) -> None:
    """A new run's record, config, params and tags; or a resumed run marked running again, with this
    attempt's tags (a re-queued sweep trial's stage run moves under the retry's run)."""
    if resume is not None:
        resumed_at = [*resume.record.resumed_at, resume.step]
        write_record(output_dir, replace(resume.record, status=RUNNING, resumed_at=resumed_at))
        if isinstance(logger, MLFlowLogger):
            logger.experiment.update_run(logger.run_id, RunStatus.to_string(RunStatus.RUNNING))
            for key, value in tags.items():
                logger.experiment.set_tag(logger.run_id, key, value)
        return
    tracking_uri = cfg.logger.tracking_uri if cfg.logger is not None else None
    run_id = logger.run_id if isinstance(logger, MLFlowLogger) else None
    record = RunRecord(cfg.run.experiment, cfg.run.choices.stage, run_id, tracking_uri, now())
    saved = save_config(cfg, output_dir / "config.yaml")  # before the record, which makes the run visible
    write_record(output_dir, record)
    log_run_config(logger, cfg, saved)
    tag_run(logger, cfg)


def end_attempt(run_dir: Path, mlflow: MLFlowLogger | None, outcome: str) -> None:
    """Record an interrupted or failed attempt in ``run.json`` and MLflow (KILLED / FAILED)."""
    write_record(run_dir, replace(read_record(run_dir), status=outcome, ended=now()))
    if mlflow is not None:
        status = RunStatus.KILLED if outcome == INTERRUPTED else RunStatus.FAILED
        mlflow.experiment.set_terminated(mlflow.run_id, RunStatus.to_string(status))
    log.info("run %s %s; it resumes from %s", run_dir, outcome, last_checkpoint(run_dir) or "step 0")


def undo_attempt(
    run_dir: Path, mlflow: MLFlowLogger | None, resume: Resume | None, previous_status: str | None
) -> None:
    """An attempt that failed before training a step: a new run is removed (folder and MLflow run), a
    resumed one gets back its record and MLflow status."""
    if resume is None:
        shutil.rmtree(run_dir, ignore_errors=True)
        if mlflow is not None:
            mlflow.experiment.delete_run(mlflow.run_id)
        return
    write_record(run_dir, resume.record)
    if mlflow is not None and previous_status is not None:
        mlflow.experiment.update_run(mlflow.run_id, previous_status)


def finish_record(run: StageRun) -> None:
    """``run.json`` of a finished stage: how it ended, its final checkpoint and its scores."""
    results = {
        VAL: run.metrics,
        f"{VAL}_baseline": run.baseline,
        TEST: run.test_metrics,
        f"{TEST}_baseline": run.test_baseline,
    }
    record = replace(
        read_record(run.output_dir),
        status=FINISHED,
        ended=now(),
        label=run.label,
        checkpoint=str(run.checkpoint),
        results=results,
        skipped=run.skipped,
        checkpoint_weights=run.checkpoint_weights,
    )
    write_record(run.output_dir, record)


def stage_run_of(run_dir: Path, record: RunRecord) -> StageRun:
    """The :class:`StageRun` of a finished run, from its record (a pipeline reusing a finished stage)."""
    results = record.results
    return StageRun(
        label=record.label or record.stage,
        run_id=record.mlflow_run_id,
        output_dir=run_dir,
        checkpoint=Path(record.checkpoint or ""),
        metrics=results.get(VAL, {}),
        baseline=results.get(f"{VAL}_baseline", {}),
        test_metrics=results.get(TEST, {}),
        test_baseline=results.get(f"{TEST}_baseline", {}),
        skipped=record.skipped,
        checkpoint_weights=record.checkpoint_weights,
    )


def split_metrics(metrics: dict[str, Any], split: str) -> dict[str, float]:
    """The metrics logged under ``<split>/``, without that prefix."""
    prefix = f"{split}/"
    return {
        name.removeprefix(prefix): float(value) for name, value in metrics.items() if name.startswith(prefix)
    }
