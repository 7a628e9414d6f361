"""``desa2va pretrain-tiny``: train the tiny SAM-2 and VLM foundations from scratch with the framework's own
stages, phase by phase as ``configs/recipes/pretrain_tiny.yaml`` says, and export them with a manifest."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from lightning_desa2va.build import build_model
from lightning_desa2va.config import RECIPES_DIR, compose_config
from lightning_desa2va.foundations import (
    SAM2_WEIGHTS,
    VLM_WEIGHTS,
    Phase,
    Recipe,
    export_weights,
    write_manifest,
)
from lightning_desa2va.models.desa2va import DeSa2VA
from lightning_desa2va.pipeline import ensure_synthetic_shards
from lightning_desa2va.stages.checkpoints import load_model_weights
from lightning_desa2va.training import train_stage

log = logging.getLogger(__name__)

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
