"""Turn a composed run config into objects, with ``hydra.utils.instantiate`` throughout.

Component configs carry hyperparameters only; widths that come from the built foundations (d of the VLM,
C of SAM-2, image sizes, image tokens) are wired here, so a YAML never repeats a number a checkpoint
already fixes. Once the stage has chosen what trains, the frozen weights are held in the run's precision
(``trainer.precision``: bf16 for ``bf16-mixed``), the trained ones stay fp32 (the optimizer's master copy):
a frozen 2B VLM with SAM-2-L is ~4.5 GB in bf16 instead of ~9 GB.
"""

from __future__ import annotations

from dataclasses import dataclass

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn
from transformers import PreTrainedTokenizerBase

from lightning_desa2va.data.datamodule import RefVOSDataModule
from lightning_desa2va.models.desa2va import DeSa2VA
from lightning_desa2va.stages.base import SegmentationStage

PRECISION_PREFIXES = (("bf16", torch.bfloat16), ("16", torch.float16))
"""Lightning precision names by the dtype they compute in (checked in this order)."""
CPU = "cpu"
MODEL_GROUPS = ("model", "decoupler", "text_prompt", "visual_prompt", "fusion", "motion_cue", "motion_prompt")
"""Config groups whose variant shapes the model's weights."""


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
    stage.run_overrides = run_overrides(cfg)
    hold_in_precision(stage, frozen_dtype(cfg.trainer))
    return Components(tokenizer, model, build_datamodule(cfg, tokenizer, model), stage)


def run_overrides(cfg: DictConfig) -> list[str]:
    """The run's overrides, led by the variants of the groups that shape the model which they do not name
    (checkpoints record them: they say which model a checkpoint fits)."""
    overrides = list(cfg.run.overrides)
    named = {override.lstrip("+~").partition("=")[0] for override in overrides}
    chosen = [f"{group}={cfg.run.choices[group]}" for group in MODEL_GROUPS if group not in named]
    return [*chosen, *overrides]


def frozen_dtype(trainer: DictConfig) -> torch.dtype:
    """The dtype frozen weights are held in: the one ``trainer.precision`` computes in on an accelerator
    (bf16 for ``bf16-mixed`` / ``bf16-true``, fp16 for ``16-mixed`` / ``16-true``), else fp32. On the CPU
    they stay fp32: CPU autocast does not run layer norms in fp32 as CUDA's does, so a bf16 norm weight
    would meet fp32 activations."""
    if trainer.get("accelerator") == CPU:
        return torch.float32
    name = str(trainer.get("precision"))
    for prefix, dtype in PRECISION_PREFIXES:
        if name.startswith(prefix):
            return dtype
    return torch.float32


def hold_in_precision(module: nn.Module, frozen: torch.dtype) -> None:
    """Hold the frozen floating-point parameters of ``module`` in ``frozen`` and the trainable ones in fp32
    (a base loaded in bf16, ``model.vlm.dtype``, gives LoRA bf16 layers: the optimizer needs fp32)."""
    for parameter in module.parameters():
        if parameter.is_floating_point():
            parameter.data = parameter.data.to(torch.float32 if parameter.requires_grad else frozen)
