"""The jobs behind the CLI: train one stage, evaluate a checkpoint, and the full pipeline.

:func:`train_stage` composes nothing itself: it builds a run config's parts, trains them with a Lightning
``Trainer`` in the run's own folder (:mod:`lightning_desa2va.runs`), then scores the final model on val (and
optionally test) beside the union-of-objects baseline, all logged to the run. :func:`run_pipeline` trains the
stages ``pipeline.stages`` lists, each from the checkpoint of the one before: ``desa2va demo`` runs it, and so
does every trial of a sweep or ablation (which add callbacks and tags, never their own training loop).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import Logger, MLFlowLogger
from omegaconf import DictConfig

from lightning_desa2va.baselines import union_of_objects
from lightning_desa2va.build import build_components
from lightning_desa2va.config import compose_config, save_config
from lightning_desa2va.data.datamodule import TEST, TRAIN, VAL, RefVOSDataModule
from lightning_desa2va.data.shards import split_urls, write_synthetic_benchmark
from lightning_desa2va.data.synthetic import SyntheticConfig
from lightning_desa2va.metrics import JFMetric
from lightning_desa2va.runs import (
    CHECKPOINTS_DIR,
    RunRecord,
    new_run_dir,
    read_record,
    run_dir_of_checkpoint,
    started_now,
    write_record,
)
from lightning_desa2va.stages.base import SegmentationStage
from lightning_desa2va.stages.checkpoints import load_model_weights
from lightning_desa2va.tracking import log_run_config, tag_run

log = logging.getLogger(__name__)

UNION_BASELINE = "union_baseline"
StageCallbacks = Callable[[DictConfig], Sequence[Callback]]
"""Extra callbacks for each stage a pipeline trains (e.g. a sweep's pruning callback), given its config."""


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


def ensure_synthetic_shards(cfg: DictConfig) -> Path:
    """Write the synthetic benchmark into ``paths.data_dir`` unless its shards are already there."""
    data_dir = Path(cfg.paths.data_dir)
    try:
        for split in cfg.synthetic.videos:
            split_urls(data_dir, split)
        log.info("using the synthetic shards in %s", data_dir)
    except FileNotFoundError:
        write_synthetic_benchmark(
            data_dir,
            SyntheticConfig(**cfg.synthetic.generator),
            dict(cfg.synthetic.videos),
            seed=cfg.synthetic.seed,
            max_videos_per_shard=cfg.synthetic.videos_per_shard,
        )
    return data_dir


def build_logger(
    cfg: DictConfig, run_id: str | None, run_name: str | None, tags: dict[str, str]
) -> Logger | None:
    """The configured logger; a resumed run continues its MLflow run (``run_id``)."""
    if cfg.logger is None:
        return None
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
) -> StageRun:
    """Train the configured stage, then score its final model and the union baseline on val (and test).

    ``resume_from`` set to a checkpoint of an earlier run continues that run: same folder, same MLflow run.
    """
    parts = build_components(cfg)
    parts.datamodule.require_splits(TRAIN, VAL, *([TEST] if score_test else []))
    resumed_dir = run_dir_of_checkpoint(Path(cfg.resume_from)) if cfg.resume_from else None
    resumed = read_record(resumed_dir) if resumed_dir else None
    logger = build_logger(cfg, resumed.mlflow_run_id if resumed else None, run_name, tags or {})
    configured_callbacks = instantiate(cfg.trainer.callbacks) or []
    trainer: pl.Trainer = instantiate(
        cfg.trainer, logger=logger or False, callbacks=[*configured_callbacks, *callbacks]
    )
    run_id = logger.run_id if isinstance(logger, MLFlowLogger) else None
    output_dir = resumed_dir or new_run_dir(cfg, run_id)
    point_checkpoints_at(trainer, output_dir / CHECKPOINTS_DIR)
    if resumed is None:
        tracking_uri = cfg.logger.tracking_uri if cfg.logger is not None else None
        write_record(
            output_dir,
            RunRecord(cfg.run.experiment, cfg.run.choices.stage, run_id, tracking_uri, started_now()),
        )
        log_run_config(logger, cfg, save_config(cfg, output_dir / "config.yaml"))
        tag_run(logger, cfg)
    log.info("run folder: %s", output_dir)
    trainer.fit(parts.stage, datamodule=parts.datamodule, ckpt_path=cfg.resume_from)
    if parts.stage.last_validated_step != trainer.global_step:
        trainer.validate(parts.stage, parts.datamodule, verbose=False)
    run = StageRun(
        label=parts.stage.label,
        run_id=run_id,
        output_dir=output_dir,
        checkpoint=Path(trainer.checkpoint_callback.last_model_path).resolve(),
        metrics=split_metrics(trainer.callback_metrics, VAL),
    )
    # The union baseline measures referring; stages that output no masks (VLM pre-training) skip it.
    referring = isinstance(parts.stage, SegmentationStage)
    if referring:
        run.baseline = score_union_baseline(parts.datamodule, trainer.logger, VAL)
    if score_test:
        run.test_metrics = split_metrics(trainer.test(parts.stage, parts.datamodule, verbose=False)[0], TEST)
        if referring:
            run.test_baseline = score_union_baseline(parts.datamodule, trainer.logger, TEST)
    return run


def run_pipeline(
    overrides: list[str],
    experiments_dir: Path | None = None,
    stage_callbacks: StageCallbacks | None = None,
    score_test: bool = True,
    run_name: Callable[[DictConfig], str] | None = None,
    tags: dict[str, str] | None = None,
) -> list[StageRun]:
    """Train the stages of ``pipeline.stages`` in order, each later one from the checkpoint of the one before
    (``stage.init_from``); the last one is also scored on test when ``score_test``. The synthetic shards are
    written first if missing."""
    first = compose_config(overrides, experiments_dir)
    ensure_synthetic_shards(first)
    stages = list(first.pipeline.stages)
    if not stages:
        raise ValueError("pipeline.stages is empty: nothing to train")
    runs: list[StageRun] = []
    for index, stage in enumerate(stages):
        start = [f"stage.init_from={runs[-1].checkpoint}"] if runs else []
        cfg = compose_config([f"stage={stage}", *start, *overrides], experiments_dir)
        runs.append(
            train_stage(
                cfg,
                callbacks=stage_callbacks(cfg) if stage_callbacks else (),
                score_test=score_test and index == len(stages) - 1,
                run_name=run_name(cfg) if run_name else None,
                tags=tags,
            )
        )
    return runs


def evaluate_checkpoint(
    cfg: DictConfig, checkpoint: Path, split: str
) -> tuple[dict[str, float], dict[str, float]]:
    """Score a stage checkpoint on ``split`` (the configured stage decides which masks are scored)."""
    parts = build_components(cfg)
    load_model_weights(parts.model, checkpoint)
    trainer: pl.Trainer = instantiate(cfg.trainer, logger=False)
    run = trainer.validate if split == VAL else trainer.test
    scores = split_metrics(run(parts.stage, parts.datamodule, verbose=False)[0], split)
    loader = parts.datamodule.val_dataloader() if split == VAL else parts.datamodule.test_dataloader()
    return scores, union_baseline_scores(loader)


def split_metrics(metrics: dict[str, Any], split: str) -> dict[str, float]:
    """The metrics logged under ``<split>/``, without that prefix."""
    prefix = f"{split}/"
    return {
        name.removeprefix(prefix): float(value) for name, value in metrics.items() if name.startswith(prefix)
    }


def union_baseline_scores(loader: Iterable[dict[str, Any]]) -> dict[str, float]:
    """J&F of the union-of-objects prediction over every batch of ``loader``."""
    metric = JFMetric()
    for batch in loader:
        metric.update(
            union_of_objects(batch["instance_masks"]), batch["target_masks"], batch["expression_type"]
        )
    return metric.compute()


def score_union_baseline(datamodule: RefVOSDataModule, logger: Logger | None, split: str) -> dict[str, float]:
    """J&F on ``split`` of predicting every object of the clip: what segmenting without referring gets."""
    loader = datamodule.val_dataloader() if split == VAL else datamodule.test_dataloader()
    scores = union_baseline_scores(loader)
    if logger is not None:
        logger.log_metrics({f"{split}/{UNION_BASELINE}/{name}": value for name, value in scores.items()})
    return scores
