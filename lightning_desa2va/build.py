"""Turn a composed run config into objects, with ``hydra.utils.instantiate`` throughout.

Component configs carry hyperparameters only; widths that come from the built foundations (d of the VLM,
C of SAM-2, image sizes, image tokens) are wired here, so a YAML never repeats a number a checkpoint
already fixes.
"""

from __future__ import annotations

from dataclasses import dataclass

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from transformers import PreTrainedTokenizerBase

from lightning_desa2va.data.datamodule import RefVOSDataModule
from lightning_desa2va.models.desa2va import DeSa2VA
from lightning_desa2va.stages.base import SegmentationStage


@dataclass
class Components:
    """Everything one stage run needs."""

    tokenizer: PreTrainedTokenizerBase
    model: DeSa2VA
    datamodule: RefVOSDataModule
    stage: SegmentationStage


def build_model(cfg: DictConfig, tokenizer: PreTrainedTokenizerBase) -> DeSa2VA:
    """The DeSa2VA model of a config: foundations first, then the components sized to them."""
    return DeSa2VA(
        vlm=instantiate(cfg.model.vlm, tokenizer=tokenizer),
        sam=instantiate(cfg.model.sam2),
        decoupler=instantiate(cfg.decoupler),
        text_prompt=instantiate(cfg.text_prompt),
        visual_prompt=instantiate(cfg.visual_prompt),
        fusion=instantiate(cfg.fusion),
        motion_cue=instantiate(cfg.motion_cue),
        motion_prompt=instantiate(cfg.motion_prompt),
    )


def build_datamodule(cfg: DictConfig, tokenizer: PreTrainedTokenizerBase, model: DeSa2VA) -> RefVOSDataModule:
    """The DataModule, producing frames and tokens in the sizes the model's foundations expect."""
    return instantiate(
        cfg.data,
        tokenizer=tokenizer,
        image_tokens=model.vlm.image_tokens,
        sam_image_size=model.sam.image_size,
        vlm_image_size=model.vlm.image_size,
    )


def build_components(cfg: DictConfig) -> Components:
    """Seed (and pin the CPU threads when configured), then build tokenizer, model, data and the
    configured stage around the model."""
    pl.seed_everything(cfg.seed, workers=True)
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)  # the reduction order, so the bits, depend on the count
    tokenizer = instantiate(cfg.model.tokenizer)
    model = build_model(cfg, tokenizer)
    stage = instantiate(cfg.stage, model=model, loss=instantiate(cfg.loss))
    return Components(tokenizer, model, build_datamodule(cfg, tokenizer, model), stage)
