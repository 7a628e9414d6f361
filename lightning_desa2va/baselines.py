"""Reference predictions that need no model, to tell what a J&F number is worth.

On the synthetic benchmark (and MeViS) several objects share a clip, and a model that has learned
to segment objects but not to follow the expression can score well above zero. The union of all
objects is exactly what such a model would output, so a trained model has only shown that it reads
the expression when it beats this baseline, per expression type.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from lightning.pytorch.loggers import Logger
from torch import Tensor

from lightning_desa2va.data.datamodule import VAL, RefVOSDataModule
from lightning_desa2va.metrics import JFMetric

UNION_BASELINE = "union_baseline"

BACKGROUND_ID = 0
"""Instance id of background pixels in per-frame instance masks."""


def union_of_objects(instance_masks: Tensor) -> Tensor:
    """Every object in the clip as the answer: ``instance_masks > 0``, same shape, bool.

    ``instance_masks`` is ``[B, T, H, W]`` (any leading shape works) of integer instance ids with
    ``BACKGROUND_ID`` for background.
    """
    if instance_masks.dtype == torch.bool or instance_masks.is_floating_point():
        raise TypeError(f"instance_masks must hold integer ids, got {instance_masks.dtype}")
    return instance_masks > BACKGROUND_ID


def union_baseline_scores(
    loader: Iterable[dict[str, Any]], device: torch.device | None = None
) -> dict[str, float]:
    """J&F of the union-of-objects prediction over every batch of ``loader`` (on ``device``; in distributed
    training every rank scores its share and the metric gathers them)."""
    metric = JFMetric().to(device or torch.device("cpu"))
    for batch in loader:
        union = union_of_objects(batch["instance_masks"]).to(metric.device)
        metric.update(union, batch["target_masks"].to(metric.device), batch["expression_type"])
    return metric.compute()


def score_union_baseline(
    datamodule: RefVOSDataModule, logger: Logger | None, split: str, device: torch.device | None = None
) -> dict[str, float]:
    """J&F on ``split`` of predicting every object of the clip: what segmenting without referring gets."""
    loader = datamodule.val_dataloader() if split == VAL else datamodule.test_dataloader()
    scores = union_baseline_scores(loader, device)
    if logger is not None:
        logger.log_metrics({f"{split}/{UNION_BASELINE}/{name}": value for name, value in scores.items()})
    return scores
