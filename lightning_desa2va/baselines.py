"""Reference predictions that need no model, to tell what a J&F number is worth.

On the synthetic benchmark (and MeViS) several objects share a clip, and a model that has learned
to segment objects but not to follow the expression can score well above zero. The union of all
objects is exactly what such a model would output, so a trained model has only shown that it reads
the expression when it beats this baseline, per expression type.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
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


def union_and_truth(batch: Mapping[str, Any]) -> Iterator[tuple[Tensor, Tensor, list[str]]]:
    """(union of objects, ground truth, expression types) to score: each clip at its video's own size where
    the batch has the originals (evaluation batches: ``original_union_masks``), else the batch as it is."""
    types = batch["expression_type"]
    if "original_union_masks" not in batch:
        yield union_of_objects(batch["instance_masks"]), batch["target_masks"], types
        return
    originals = zip(batch["original_union_masks"], batch["original_target_masks"], types, strict=True)
    for union, target, kind in originals:
        yield union[None], target[None], [kind]


def union_baseline_scores(
    loader: Iterable[dict[str, Any]], device: torch.device | None = None
) -> dict[str, float]:
    """J&F of the union-of-objects prediction over every batch of ``loader``, each clip at its video's own
    size (on ``device``; in distributed training every rank scores its share and the metric gathers them)."""
    metric = JFMetric().to(device or torch.device("cpu"))
    for batch in loader:
        for union, target, types in union_and_truth(batch):
            metric.update(union.to(metric.device), target.to(metric.device), types)
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
