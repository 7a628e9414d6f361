"""Referring segmentation metrics: J (region similarity) and F (boundary F-measure), cIoU and gIoU.

J and F follow the DAVIS benchmark as implemented by davis2017-evaluation (``db_eval_iou``,
``db_eval_boundary``), which MeViS, Ref-YouTube-VOS and Ref-DAVIS17 all use, so numbers computed here are
comparable with published ones. They are written with batched torch ops (boundary maps by neighbour
comparison, disk dilation by a convolution on a crop around the boundaries) so that evaluating every
frame of every clip stays cheap on a CPU. cIoU and gIoU follow the RefCOCO family (image datasets), and
:class:`PerTypeMean` averages any per-sample score (e.g. QA exact match) per expression type.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
import torchmetrics
from torch import Tensor
from torchmetrics.utilities import dim_zero_cat

from lightning_desa2va.data.chat import IGNORE_INDEX
from lightning_desa2va.data.schema import EXPRESSION_TYPES

DEFAULT_BOUND_TH = 0.008
"""DAVIS default boundary tolerance: a fraction of the image diagonal (values >= 1 mean pixels)."""

_MIN_MASK_DIMS = 2
_CLIP_DIMS = 4  # B, T, H, W
_HALF = 0.5  # threshold that turns exact integer-valued convolution sums back into booleans


def _check_masks(pred: Tensor, gt: Tensor) -> None:
    """Reject inputs that would silently give wrong numbers (logits, mismatched shapes)."""
    if pred.dtype != torch.bool or gt.dtype != torch.bool:
        raise TypeError(f"masks must be bool tensors, got pred={pred.dtype}, gt={gt.dtype}")
    if pred.shape != gt.shape:
        raise ValueError(f"pred and gt shapes differ: {tuple(pred.shape)} vs {tuple(gt.shape)}")
    if pred.ndim < _MIN_MASK_DIMS:
        raise ValueError(f"masks need at least 2 dims (..., H, W), got shape {tuple(pred.shape)}")


def region_similarity(pred: Tensor, gt: Tensor) -> Tensor:
    """J: intersection over union per frame, shape ``pred.shape[:-2]``.

    An empty prediction of an empty ground truth is a perfect answer, so J = 1 there (as DAVIS).
    """
    _check_masks(pred, gt)
    inter = (pred & gt).sum(dim=(-2, -1))
    union = (pred | gt).sum(dim=(-2, -1))
    ratio = inter.float() / union.clamp(min=1).float()
    return torch.where(union == 0, torch.ones_like(ratio), ratio)


def boundary_map(mask: Tensor) -> Tensor:
    """One-pixel boundary of a bool mask ``[..., H, W]`` (DAVIS ``_seg2bmap`` at full resolution).

    A pixel is on the boundary when it differs from its right, lower or lower-right neighbour; in the
    last row only the right neighbour counts, in the last column only the lower one, and the
    bottom-right corner never does.
    """
    right = torch.zeros_like(mask)
    down = torch.zeros_like(mask)
    diag = torch.zeros_like(mask)
    right[..., :, :-1] = mask[..., :, 1:]
    down[..., :-1, :] = mask[..., 1:, :]
    diag[..., :-1, :-1] = mask[..., 1:, 1:]
    bmap = (mask ^ right) | (mask ^ down) | (mask ^ diag)
    bmap[..., -1, :] = mask[..., -1, :] ^ right[..., -1, :]
    bmap[..., :, -1] = mask[..., :, -1] ^ down[..., :, -1]
    bmap[..., -1, -1] = False
    return bmap


def boundary_tolerance_pixels(height: int, width: int, bound_th: float = DEFAULT_BOUND_TH) -> int:
    """Dilation radius: ``ceil(bound_th * diagonal)`` for a fraction, else ``bound_th`` pixels."""
    if bound_th <= 0:
        raise ValueError(f"bound_th must be positive, got {bound_th}")
    if bound_th >= 1:
        return math.ceil(bound_th)
    return math.ceil(bound_th * math.sqrt(height**2 + width**2))


def disk_kernel(radius: int, device: torch.device | None = None) -> Tensor:
    """Float disk ``x^2 + y^2 <= r^2`` of side ``2r + 1`` (skimage's ``disk``)."""
    offsets = torch.arange(-radius, radius + 1, device=device)
    return ((offsets[:, None] ** 2 + offsets[None, :] ** 2) <= radius**2).float()


def dilate_disk(mask: Tensor, radius: int) -> Tensor:
    """Binary dilation of ``[..., H, W]`` by a disk; pixels outside the image count as background."""
    if radius == 0:
        return mask.clone()
    lead, (height, width) = mask.shape[:-2], mask.shape[-2:]
    flat = mask.reshape(-1, 1, height, width).float()
    kernel = disk_kernel(radius, device=mask.device)[None, None]
    hits = F.conv2d(flat, kernel, padding=radius)
    return (hits > _HALF).reshape(*lead, height, width)


def _crop_to_content(maps: Tensor) -> Tensor:
    """Crop ``[..., H, W]`` to the box holding every True pixel of every map.

    Matches are only counted at boundary pixels, and every boundary pixel within reach of them is in
    that box too, so the dilation (the costly step) runs on the crop with exactly the same counts.
    """
    height, width = maps.shape[-2:]
    rows = maps.any(dim=-1).reshape(-1, height).any(dim=0).nonzero()
    cols = maps.any(dim=-2).reshape(-1, width).any(dim=0).nonzero()
    if rows.numel() == 0:
        return maps[..., :1, :1]  # all False: keeps shapes valid, counts stay 0
    return maps[..., rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]


def _matched_counts(pred_b: Tensor, gt_b: Tensor, radius: int) -> tuple[Tensor, Tensor]:
    """Per frame: pred boundary pixels near a GT boundary pixel, and GT ones near a pred one."""
    height, width = pred_b.shape[-2:]
    pred_flat, gt_flat = pred_b.reshape(-1, height, width), gt_b.reshape(-1, height, width)
    pred_match = torch.zeros(pred_flat.shape[0], device=pred_b.device)
    gt_match = torch.zeros_like(pred_match)
    for index in range(pred_flat.shape[0]):  # per frame, so each crop hugs its own objects
        crop = _crop_to_content(torch.stack([pred_flat[index], gt_flat[index]]))
        dilated = dilate_disk(crop, radius)
        pred_match[index] = (crop[0] & dilated[1]).sum()
        gt_match[index] = (crop[1] & dilated[0]).sum()
    return pred_match.reshape(pred_b.shape[:-2]), gt_match.reshape(pred_b.shape[:-2])


def boundary_f_measure(pred: Tensor, gt: Tensor, bound_th: float = DEFAULT_BOUND_TH) -> Tensor:
    """F: boundary precision/recall F-measure per frame, shape ``pred.shape[:-2]``.

    Boundary pixels of one mask count as matched when a boundary pixel of the other lies within the
    tolerance disk. Degenerate cases follow davis2017-evaluation's ``f_measure``: no boundary in
    either mask gives F = 1, a boundary in only one of them gives F = 0.
    """
    _check_masks(pred, gt)
    height, width = pred.shape[-2:]
    radius = boundary_tolerance_pixels(height, width, bound_th)
    pred_b, gt_b = boundary_map(pred), boundary_map(gt)
    n_pred = pred_b.sum(dim=(-2, -1)).float()
    n_gt = gt_b.sum(dim=(-2, -1)).float()
    pred_match, gt_match = _matched_counts(pred_b, gt_b, radius)
    # With nothing to match against, the matched counts are 0, which gives DAVIS's P=0 / R=0 branches.
    ones = torch.ones_like(n_pred)
    precision = torch.where(n_pred > 0, pred_match / n_pred.clamp(min=1), ones)
    recall = torch.where(n_gt > 0, gt_match / n_gt.clamp(min=1), ones)
    denom = precision + recall
    f_measure = 2 * precision * recall / denom.clamp(min=torch.finfo(denom.dtype).tiny)
    return torch.where(denom > 0, f_measure, torch.zeros_like(f_measure))


def type_index(expression_types: Sequence[str], device: torch.device) -> Tensor:
    """Index into ``EXPRESSION_TYPES`` of each expression type, refusing unknown ones."""
    unknown = sorted({t for t in expression_types if t not in EXPRESSION_TYPES})
    if unknown:
        raise ValueError(f"unknown expression type(s) {unknown}; expected one of {EXPRESSION_TYPES}")
    return torch.tensor([EXPRESSION_TYPES.index(t) for t in expression_types], device=device)


class JFMetric(torchmetrics.Metric):
    """J, F and J&F per referring expression, averaged overall and per expression type.

    Each expression scores the mean over the frames of its clip (as MeViS / Ref-YouTube-VOS), and
    the dataset score is the mean over expressions. Per-expression values are kept as ``cat`` list
    states so the result is exact after a multi-process sync; types with no expressions are left out
    of the result rather than reported as a misleading 0 or NaN. Every state holds the metric's dtype
    (type ids too): a rank that saw no sample syncs torchmetrics' empty tensor of that dtype, and the
    gather needs one dtype on every rank.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, bound_th: float = DEFAULT_BOUND_TH, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.bound_th = bound_th
        self.add_state("j_values", default=[], dist_reduce_fx="cat")
        self.add_state("f_values", default=[], dist_reduce_fx="cat")
        self.add_state("type_ids", default=[], dist_reduce_fx="cat")

    def update(self, pred_masks: Tensor, gt_masks: Tensor, expression_types: Sequence[str]) -> None:
        """Score a batch ``[B, T, H, W]`` of bool masks, one expression (and type) per clip."""
        if pred_masks.ndim != _CLIP_DIMS:
            raise ValueError(f"expected [B, T, H, W] masks, got shape {tuple(pred_masks.shape)}")
        if len(expression_types) != pred_masks.shape[0]:
            raise ValueError(
                f"{len(expression_types)} expression types for a batch of {pred_masks.shape[0]} clips"
            )
        type_ids = type_index(expression_types, self.device)
        j_per_frame = region_similarity(pred_masks, gt_masks)
        f_per_frame = boundary_f_measure(pred_masks, gt_masks, self.bound_th)
        self.j_values.append(j_per_frame.mean(dim=1).to(self.dtype))
        self.f_values.append(f_per_frame.mean(dim=1).to(self.dtype))
        self.type_ids.append(type_ids.to(self.dtype))

    def compute(self) -> dict[str, float]:
        """``J``, ``F``, ``JF`` overall and ``J/<type>``, ``F/<type>``, ``JF/<type>`` per present type."""
        j_values = cat_state(self.j_values).double()
        f_values = cat_state(self.f_values).double()
        type_ids = cat_state(self.type_ids).long()
        if j_values.numel() == 0:
            return {}
        results = _summarise(j_values, f_values, suffix="")
        for index, name in enumerate(EXPRESSION_TYPES):
            selected = type_ids == index
            if selected.any():
                results.update(_summarise(j_values[selected], f_values[selected], suffix=f"/{name}"))
        return results


def cat_state(state: Tensor | list[Tensor]) -> Tensor:
    """A ``cat`` state as one tensor: a list of batches before a sync (empty when nothing was updated),
    already one tensor after a multi-process sync."""
    if isinstance(state, list) and not state:
        return torch.zeros(0)
    return dim_zero_cat(state)


def synced(metric: torchmetrics.Metric) -> Any:
    """What ``metric.compute()`` gives over every rank's states; on a rank that updated nothing, without
    torchmetrics' warning that compute came before update (the other ranks' samples are what it computes)."""
    with warnings.catch_warnings():
        if not metric.update_called:
            warnings.filterwarnings("ignore", message=".*was called before the ``update`` method")
        return metric.compute()


def _summarise(j_values: Tensor, f_values: Tensor, suffix: str) -> dict[str, float]:
    """Means over expressions; J&F is the mean of the two means, as the benchmarks report it."""
    j_mean = j_values.mean().item()
    f_mean = f_values.mean().item()
    return {f"J{suffix}": j_mean, f"F{suffix}": f_mean, f"JF{suffix}": (j_mean + f_mean) / 2}


MASK_SHARE_PARTS = ("target", "lookalike", "other", "background")
"""Where a predicted mask's pixels fall, for :class:`MaskShareMetric`."""


class MaskShareMetric(torchmetrics.Metric):
    """Share of the predicted mask area on the target, on *lookalikes* (objects that are not targets but
    look like one, i.e. share a target's colour and shape words), on other objects and on background.

    J&F says how good a mask is, not why it is wrong; on the benchmark's motion and mixed expressions a
    model that reads the look but not the motion splits its mask between the target and its twin, which
    this shows directly (README, "Referring"). Clips whose objects have no look words count their
    lookalike share as 0. Reported overall and per expression type.
    """

    is_differentiable = False
    full_state_update = False

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        shape = (len(EXPRESSION_TYPES), len(MASK_SHARE_PARTS))
        self.add_state("area", default=torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum")

    def update(
        self,
        pred_masks: Tensor,
        gt_masks: Tensor,
        instance_ids: Tensor,
        object_look_ids: Tensor,
        expression_types: Sequence[str],
    ) -> None:
        """``pred_masks``, ``gt_masks``, ``instance_ids`` [B, T, H, W]; ``object_look_ids`` [B, L, W] word
        ids per object id (``IGNORE_INDEX`` rows for ids without a look), one expression type per clip."""
        if not pred_masks.shape == gt_masks.shape == instance_ids.shape:
            raise ValueError(
                f"predicted {tuple(pred_masks.shape)}, target {tuple(gt_masks.shape)} and instance ids "
                f"{tuple(instance_ids.shape)} must have one shape"
            )
        for pred, target, ids, looks, kind in zip(
            pred_masks, gt_masks, instance_ids, object_look_ids, expression_types, strict=True
        ):
            lookalike = torch.isin(ids, lookalike_ids(ids, target, looks))
            parts = (target, lookalike, (ids > 0) & ~target & ~lookalike, (ids == 0) & ~target)
            area = torch.stack([(pred & part).sum() for part in parts]).to(self.area.dtype)
            self.area[EXPRESSION_TYPES.index(kind)] += area

    def compute(self) -> dict[str, float]:
        """``<part>`` overall and ``<part>/<type>`` per type with any predicted area."""
        results = {}
        per_type = [(f"/{kind}", area) for kind, area in zip(EXPRESSION_TYPES, self.area, strict=True)]
        for suffix, area in [("", self.area.sum(dim=0)), *per_type]:
            if area.sum() > 0:
                shares = (area / area.sum()).tolist()
                results.update({f"{part}{suffix}": shares[i] for i, part in enumerate(MASK_SHARE_PARTS)})
        return results


def lookalike_ids(instance_ids: Tensor, target: Tensor, object_look_ids: Tensor) -> Tensor:
    """Ids of the objects that are not in ``target`` but have the look words of an object that is."""
    valid = (object_look_ids != IGNORE_INDEX).all(dim=1)
    target_ids = instance_ids[target].unique()
    target_ids = target_ids[(target_ids > 0) & (target_ids < len(object_look_ids))]
    target_looks = object_look_ids[target_ids][valid[target_ids]]
    same = (object_look_ids[:, None, :] == target_looks[None]).all(dim=-1).any(dim=1) & valid
    same[target_ids] = False
    return same.nonzero().flatten()


class ReferringIoUMetric(torchmetrics.Metric):
    """cIoU and gIoU with the RefCOCO definitions, overall and per expression type.

    A *sample* is one expression with its masks (one frame for an image dataset, the clip's frames for a
    video: its intersection and union are summed over them). cIoU = Σ intersection / Σ union over every
    sample (large objects weigh more); gIoU = mean over samples of intersection / union. A sample whose
    ground truth and prediction are both empty is a perfect answer: it scores IoU 1 in gIoU and adds 0/0
    (nothing) to cIoU, as generalised referring (gRefCOCO) counts it; an empty ground truth with a
    non-empty prediction scores 0 and adds the predicted area to cIoU's union. A type whose samples have
    no union at all has no cIoU and is left out (gIoU is then 1).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        for name in ("intersection", "union", "iou_sum", "samples"):
            self.add_state(
                name, default=torch.zeros(len(EXPRESSION_TYPES), dtype=torch.float64), dist_reduce_fx="sum"
            )

    def update(self, pred_masks: Tensor, gt_masks: Tensor, expression_types: Sequence[str]) -> None:
        """Bool masks [B, (T,) H, W], one expression (and type) per sample."""
        _check_masks(pred_masks, gt_masks)
        if len(expression_types) != pred_masks.shape[0]:
            raise ValueError(f"{len(expression_types)} expression types for {pred_masks.shape[0]} samples")
        types = type_index(expression_types, self.intersection.device)
        intersection = (pred_masks & gt_masks).flatten(1).sum(1).to(self.intersection.dtype)
        union = (pred_masks | gt_masks).flatten(1).sum(1).to(self.union.dtype)
        iou = torch.where(union > 0, intersection / union.clamp(min=1), torch.ones_like(union))
        self.intersection.index_add_(0, types, intersection)
        self.union.index_add_(0, types, union)
        self.iou_sum.index_add_(0, types, iou)
        self.samples.index_add_(0, types, torch.ones_like(iou))

    def compute(self) -> dict[str, float]:
        """``cIoU``, ``gIoU`` and ``cIoU/<type>``, ``gIoU/<type>`` for every type with samples."""
        results: dict[str, float] = {}
        per_type = [(f"/{kind}", index) for index, kind in enumerate(EXPRESSION_TYPES)]
        for suffix, index in [("", slice(None)), *per_type]:
            samples = self.samples[index].sum()
            if samples == 0:
                continue
            union = self.union[index].sum()
            if union > 0:
                results[f"cIoU{suffix}"] = (self.intersection[index].sum() / union).item()
            results[f"gIoU{suffix}"] = (self.iou_sum[index].sum() / samples).item()
        return results


class PerTypeMean(torchmetrics.Metric):
    """Mean of per-sample values (e.g. QA exact-match hits) overall and per expression type, as sums that
    sync across processes. Logged as ``<name>`` and ``<name>/<type>``; types without samples are left out."""

    full_state_update = False

    def __init__(self, name: str, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.name = name
        for state in ("total", "count"):
            self.add_state(
                state, default=torch.zeros(len(EXPRESSION_TYPES), dtype=torch.float64), dist_reduce_fx="sum"
            )

    def update(self, values: Tensor, expression_types: Sequence[str]) -> None:
        """One value per sample [N] and the sample's expression type."""
        if values.shape != (len(expression_types),):
            raise ValueError(f"{tuple(values.shape)} values for {len(expression_types)} expression types")
        types = type_index(expression_types, self.total.device)
        self.total.index_add_(0, types, values.detach().to(self.total))  # the state's device and dtype
        self.count.index_add_(0, types, torch.ones_like(self.count[types]))

    def compute(self) -> dict[str, float]:
        results = {}
        if self.count.sum() > 0:
            results[self.name] = (self.total.sum() / self.count.sum()).item()
        for index, kind in enumerate(EXPRESSION_TYPES):
            if self.count[index] > 0:
                results[f"{self.name}/{kind}"] = (self.total[index] / self.count[index]).item()
        return results
