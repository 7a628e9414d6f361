"""The jobs behind the CLI: train one stage, evaluate a checkpoint, and the demo (stage 1 → stage 2).

Each training job composes its config, builds its parts, trains with a Lightning ``Trainer``, then
validates the final model on the val split beside the union-of-objects baseline, all logged to the run.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf
from torch import nn

from lightning_desa2va.baselines import union_of_objects
from lightning_desa2va.build import build_components, build_model
from lightning_desa2va.config import RECIPES_DIR, compose_config, save_config
from lightning_desa2va.data.datamodule import TRAIN, VAL, RefVOSDataModule
from lightning_desa2va.data.shards import split_urls, write_synthetic_benchmark
from lightning_desa2va.data.synthetic import SyntheticConfig
from lightning_desa2va.foundations import (
    SAM2_WEIGHTS,
    VLM_WEIGHTS,
    Phase,
    Recipe,
    export_weights,
    write_manifest,
)
from lightning_desa2va.metrics import JFMetric
from lightning_desa2va.models.desa2va import DeSa2VA
from lightning_desa2va.stages.base import SegmentationStage
from lightning_desa2va.stages.checkpoints import load_model_weights
from lightning_desa2va.tracking import log_run_config

log = logging.getLogger(__name__)

UNION_BASELINE = "union_baseline"


@dataclass
class StageRun:
    """What a finished stage leaves behind."""

    label: str  # e.g. "stage 2 (fused mask)"
    run_id: str | None
    output_dir: Path
    checkpoint: Path
    metrics: dict[str, float] = field(default_factory=dict)
    baseline: dict[str, float] = field(default_factory=dict)


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


def train_stage(cfg: DictConfig) -> StageRun:
    """Train the configured stage, then score its final model and the union baseline on val."""
    parts = build_components(cfg)
    parts.datamodule.require_splits(TRAIN, VAL)
    logger: Logger | bool = instantiate(cfg.logger) if cfg.logger is not None else False
    trainer: pl.Trainer = instantiate(cfg.trainer, logger=logger)
    output_dir = run_output_dir(trainer)
    log_run_config(trainer.logger, cfg, save_config(cfg, output_dir / "config.yaml"))
    trainer.fit(parts.stage, datamodule=parts.datamodule, ckpt_path=cfg.resume_from)
    if parts.stage.last_validated_step != trainer.global_step:
        trainer.validate(parts.stage, parts.datamodule)
    metrics = _without_prefix(
        {name: value for name, value in trainer.callback_metrics.items() if name.startswith(f"{VAL}/")},
        f"{VAL}/",
    )
    # The union baseline measures referring; stages that output no masks (VLM pre-training) skip it.
    referring = isinstance(parts.stage, SegmentationStage)
    baseline = score_union_baseline(parts.datamodule, trainer.logger) if referring else {}
    checkpoint = Path(trainer.checkpoint_callback.last_model_path).resolve()
    return StageRun(
        label=parts.stage.label,
        run_id=getattr(trainer.logger, "run_id", None),
        output_dir=output_dir,
        checkpoint=checkpoint,
        metrics=metrics,
        baseline=baseline,
    )


def evaluate_checkpoint(
    cfg: DictConfig, checkpoint: Path, split: str
) -> tuple[dict[str, float], dict[str, float]]:
    """Score a stage checkpoint on ``split`` (the configured stage decides which masks are scored)."""
    parts = build_components(cfg)
    load_model_weights(parts.model, checkpoint)
    trainer: pl.Trainer = instantiate(cfg.trainer, logger=False)
    run = trainer.validate if split == VAL else trainer.test
    scores = _without_prefix(run(parts.stage, parts.datamodule)[0], f"{split}/")
    loader = parts.datamodule.val_dataloader() if split == VAL else parts.datamodule.test_dataloader()
    return scores, union_baseline_scores(loader)


def _without_prefix(metrics: dict[str, float], prefix: str) -> dict[str, float]:
    return {name.removeprefix(prefix): float(value) for name, value in metrics.items()}


def run_output_dir(trainer: pl.Trainer) -> Path:
    """The run's own folder (``<root>/<experiment>/<run>``), where its checkpoints also go."""
    logger = trainer.logger
    if logger is None:
        return Path(trainer.default_root_dir)
    root = Path(logger.save_dir or trainer.default_root_dir)
    path = root / str(logger.name) / str(logger.version)
    path.mkdir(parents=True, exist_ok=True)
    return path.resolve()


def union_baseline_scores(loader: Iterable[dict[str, Any]]) -> dict[str, float]:
    """J&F of the union-of-objects prediction over every batch of ``loader``."""
    metric = JFMetric()
    for batch in loader:
        metric.update(
            union_of_objects(batch["instance_masks"]), batch["target_masks"], batch["expression_type"]
        )
    return metric.compute()


def score_union_baseline(datamodule: RefVOSDataModule, logger: Logger | None) -> dict[str, float]:
    """J&F on val of predicting every object of the clip: what segmenting without referring gets."""
    scores = union_baseline_scores(datamodule.val_dataloader())
    if logger is not None:
        logger.log_metrics({f"{VAL}/{UNION_BASELINE}/{name}": value for name, value in scores.items()})
    return scores


def run_demo(overrides: list[str], experiments_dir: Path | None = None) -> tuple[StageRun, StageRun]:
    """The main job: shards if missing, stage 1, stage 2 from stage 1's checkpoint, both scored on val."""
    text_cfg = compose_config(["stage=text_pretrain", *overrides], experiments_dir)
    ensure_synthetic_shards(text_cfg)
    text_run = train_stage(text_cfg)
    finetune_cfg = compose_config(
        ["stage=decoupled_finetune", f"stage.init_from={text_run.checkpoint}", *overrides], experiments_dir
    )
    return text_run, train_stage(finetune_cfg)


FOUNDATION_FILES = {"sam2": SAM2_WEIGHTS, "vlm": VLM_WEIGHTS}
PRETRAIN_RECIPE = RECIPES_DIR / "pretrain_tiny.yaml"


def foundation_of(model: DeSa2VA, name: str) -> nn.Module:
    """The part of the model a foundation's weights file holds."""
    return model.sam if name == "sam2" else model.vlm.model


def pretrain_foundations(
    overrides: list[str],
    out_dir: Path,
    experiments_dir: Path | None = None,
    recipe_path: Path = PRETRAIN_RECIPE,
) -> dict[str, Recipe]:
    """Train the tiny SAM-2 and VLM from scratch, phase by phase as their recipe says, and export the
    result with a manifest. Each later phase starts from the weights the phase before it exported."""
    recipe = OmegaConf.load(recipe_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    recipes: dict[str, Recipe] = {}
    weights: dict[str, Path] = {}
    for name, file_name in FOUNDATION_FILES.items():
        phases: list[Phase] = []
        start: list[str] = []
        for index, phase_overrides in enumerate(recipe[name].phases, start=1):
            phase_overrides = [*recipe.get("common", []), *phase_overrides, *start, *overrides]
            cfg = compose_config(phase_overrides, experiments_dir)
            log.info(
                "%s phase %d of %d: %s", name, index, len(recipe[name].phases), " ".join(phase_overrides)
            )
            ensure_synthetic_shards(cfg)
            run = train_stage(cfg)
            model = build_model(cfg, instantiate(cfg.model.tokenizer))
            load_model_weights(model, run.checkpoint)
            weights[name] = export_weights(foundation_of(model, name), run.output_dir / file_name)
            start = [f"{recipe[name].start_key}={weights[name].resolve()}"]
            phases.append(
                Phase(
                    stage=str(cfg.stage._target_),
                    overrides=phase_overrides,
                    config=OmegaConf.to_container(cfg, resolve=True),
                    seed=cfg.seed,
                    metrics=run.metrics,
                )
            )
        weights[name] = shutil.copyfile(weights[name], out_dir / file_name)
        recipes[name] = Recipe(phases=phases)
    write_manifest(out_dir, recipes, weights)
    return recipes
