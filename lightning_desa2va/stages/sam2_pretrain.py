"""Stage 0, promptable SAM-2 pre-training (``stage=sam2_pretrain``): the tiny SAM-2's own foundation.

Random-init tiny SAM-2 hedges over the union of objects whatever prompts it (DESIGN §7), so before any
language enters it learns what SAM-2 is trained for: segment the object a point, box or mask prompt picks
on frame 0, and track it through the clip with its memory. Each training clip prompts one random object
visible in frame 0 (prompt kind sampled per batch, as sam2's own training does); the loss is the mask loss
of the best candidate per frame (SAM's minimum over its multimask outputs), SAM-2's IoU head regressed onto
the true IoU of every candidate, and its object score against the object's presence. Validation prompts
every object of every clip with one deterministic point and reports frame-0 IoU and tracking J&F. With
``w_look`` > 0 the image features also learn to name the colour and shape at every object pixel
(:mod:`lightning_desa2va.stages.look`), reported as ``look_accuracy``.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torchmetrics
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_desa2va.losses import MaskLoss, TripleSupervisionLoss
from lightning_desa2va.metrics import boundary_f_measure, cat_state, region_similarity
from lightning_desa2va.models.desa2va import DeSa2VA
from lightning_desa2va.models.sam2 import ClipFeatures, TrackOutput
from lightning_desa2va.stages.base import Optimizer, SegmentationStage
from lightning_desa2va.stages.look import frame_clips, look_hits, look_loss, pixel_looks
from lightning_desa2va.visualize import OverlayItem

log = logging.getLogger(__name__)

BACKGROUND_ID = 0  # instance id of background pixels in the shard schema
POSITIVE, NEGATIVE, BOX_TOP_LEFT, BOX_BOTTOM_RIGHT = 1, 0, 2, 3  # SAM-2 point labels


def objects_in_frame(instance_ids: Tensor) -> list[Tensor]:
    """Ids of the objects visible in each frame [B, H, W], background excluded."""
    return [ids[ids != BACKGROUND_ID] for ids in (frame.unique() for frame in instance_ids)]


def visible_objects(instance_ids: Tensor, clips: list[int]) -> tuple[Tensor, Tensor]:
    """(clip index, object id) of every object visible in frame 0 of the given clips ([B, T, H, W] ids)."""
    firsts = objects_in_frame(instance_ids[clips, 0])
    clip_index = [clip for clip, ids in zip(clips, firsts, strict=True) for _ in range(len(ids))]
    device = instance_ids.device
    object_ids = torch.cat(firsts) if firsts else torch.zeros(0, dtype=instance_ids.dtype, device=device)
    return torch.tensor(clip_index, dtype=torch.long, device=device), object_ids


def _pixel_centres(mask: Tensor) -> Tensor:
    """(x, y) pixel-centre coordinates [P, 2] of the True pixels of one mask [H, W]."""
    rows, cols = mask.nonzero(as_tuple=True)
    return torch.stack([cols, rows], dim=-1).float() + 0.5


def _random_pixels(mask: Tensor, count: int, generator: torch.Generator | None) -> Tensor:
    """``count`` pixels drawn uniformly (with replacement) from the True pixels of one mask [H, W]."""
    pixels = _pixel_centres(mask)
    if len(pixels) == 0:
        raise ValueError("cannot sample a prompt point from an empty mask")
    return pixels[torch.randint(len(pixels), (count,), generator=generator)]


def centroid_points(masks: Tensor) -> dict[str, Tensor]:
    """One positive point per mask [B, H, W]: the mask pixel nearest its centroid (deterministic)."""
    coords = []
    for mask in masks:
        pixels = _pixel_centres(mask)
        if len(pixels) == 0:
            raise ValueError("cannot place a prompt point on an empty mask")
        coords.append(pixels[(pixels - pixels.mean(0)).square().sum(-1).argmin()])
    return {
        "point_coords": torch.stack(coords)[:, None].to(masks.device),
        "point_labels": torch.full((len(masks), 1), POSITIVE, dtype=torch.int32, device=masks.device),
    }


class PromptSampler:
    """Random frame-0 prompts for promptable training: positive/negative clicks, a jittered box or the mask.

    One prompt kind and one number of clicks per batch, so every clip's prompt has the same shape (sam2's
    training samples them per batch too).
    """

    def __init__(
        self,
        prob_box: float,
        prob_mask: float,
        max_positive_points: int,
        max_negative_points: int,
        box_jitter: float,
    ) -> None:
        if min(prob_box, prob_mask) < 0 or prob_box + prob_mask > 1:
            raise ValueError(f"need prob_box, prob_mask >= 0 with sum <= 1, got {prob_box}, {prob_mask}")
        if max_positive_points < 1 or max_negative_points < 0:
            raise ValueError("need max_positive_points >= 1 and max_negative_points >= 0")
        self.prob_box = prob_box
        self.prob_mask = prob_mask
        self.max_positive_points = max_positive_points
        self.max_negative_points = max_negative_points
        self.box_jitter = box_jitter

    def __call__(
        self, masks: Tensor, generator: torch.Generator | None = None, allow_mask: bool = True
    ) -> tuple[dict[str, Tensor] | None, Tensor | None]:
        """``(point_inputs, mask_inputs)`` for the objects' frame-0 masks [B, H, W]; exactly one is set.

        ``allow_mask=False`` (single-frame clips, where a mask prompt leaves no frame to learn from) turns the
        mask share into clicks.
        """
        draw = torch.rand((), generator=generator).item()
        if draw < self.prob_mask:
            if allow_mask:
                return None, masks[:, None].float()
        elif draw < self.prob_mask + self.prob_box:
            return self.boxes(masks, generator), None
        positives = int(torch.randint(1, self.max_positive_points + 1, (), generator=generator))
        negatives = int(torch.randint(0, self.max_negative_points + 1, (), generator=generator))
        return self.points(masks, positives, negatives, generator), None

    def points(
        self, masks: Tensor, positives: int, negatives: int, generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        """``positives`` clicks inside each mask [B, H, W] and ``negatives`` outside it."""
        coords = [
            torch.cat(
                [_random_pixels(mask, positives, generator), _random_pixels(~mask, negatives, generator)]
            )
            for mask in masks.cpu()
        ]
        labels = torch.tensor([POSITIVE] * positives + [NEGATIVE] * negatives, dtype=torch.int32)
        return {
            "point_coords": torch.stack(coords).to(masks.device),
            "point_labels": labels.expand(len(masks), -1).to(masks.device),
        }

    def boxes(self, masks: Tensor, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Each mask's bounding box as SAM-2's two corner points, jittered by a fraction of its size."""
        size = masks.shape[-1]
        corners = []
        for mask in masks.cpu():
            pixels = _pixel_centres(mask)
            if len(pixels) == 0:
                raise ValueError("cannot draw a box around an empty mask")
            low, high = pixels.min(0).values - 0.5, pixels.max(0).values + 0.5
            noise = torch.randn(2, 2, generator=generator) * self.box_jitter * (high - low)
            corners.append((torch.stack([low, high]) + noise).clamp(0, size))
        labels = torch.tensor([BOX_TOP_LEFT, BOX_BOTTOM_RIGHT], dtype=torch.int32)
        return {
            "point_coords": torch.stack(corners).to(masks.device),
            "point_labels": labels.expand(len(masks), -1).to(masks.device),
        }


class PromptedTrackingMetric(torchmetrics.Metric):
    """Frame-0 IoU of prompted objects and J, F of their tracks (mean over frames, then over objects)."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.add_state("point_iou", default=[], dist_reduce_fx="cat")
        self.add_state("track_j", default=[], dist_reduce_fx="cat")
        self.add_state("track_f", default=[], dist_reduce_fx="cat")

    def update(self, pred: Tensor, gt: Tensor) -> None:
        """Score tracks [N, T, H, W] (bool) of N objects, prompted on frame 0."""
        j_per_frame = region_similarity(pred, gt)
        self.point_iou.append(j_per_frame[:, 0])
        self.track_j.append(j_per_frame.mean(dim=1))
        self.track_f.append(boundary_f_measure(pred, gt).mean(dim=1))

    def compute(self) -> dict[str, float]:
        point_iou = cat_state(self.point_iou)
        if point_iou.numel() == 0:
            return {}
        j_mean = cat_state(self.track_j).double().mean().item()
        f_mean = cat_state(self.track_f).double().mean().item()
        return {
            "point_iou": point_iou.double().mean().item(),
            "track_J": j_mean,
            "track_F": f_mean,
            "track_JF": (j_mean + f_mean) / 2,
        }


class SAM2PretrainStage(SegmentationStage):
    """Promptable (points, boxes, masks) training of SAM-2 with memory tracking on the clips."""

    label = "stage 0 (SAM-2, point-prompted tracking)"

    def __init__(
        self,
        model: DeSa2VA,
        loss: TripleSupervisionLoss,
        optimizer: Optimizer,
        train_modules: list[str],
        num_overlays: int,
        prompts: PromptSampler,
        w_iou: float,
        w_object: float,
        all_objects: bool = True,
        w_look: float = 0.0,
        look_grid: int = 32,
    ) -> None:
        super().__init__(model, optimizer, train_modules, num_overlays)
        self.mask_loss: MaskLoss = loss.mask  # the configured BCE + Dice; the triple weights do not apply
        self.prompts = prompts
        self.w_iou = w_iou
        self.w_object = w_object
        self.all_objects = all_objects
        self.w_look = w_look
        self.look_grid = look_grid
        self.look_head = (
            nn.Conv2d(model.sam.prompt_dim, model.vlm.vocab_size, kernel_size=1) if w_look > 0 else None
        )
        self.val_tracking = PromptedTrackingMetric()
        self.test_tracking = PromptedTrackingMetric()
        self._seen_videos: set[str] = set()
        self.select_trainable()

    def choose_objects(self, instance_masks: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """One random object id per clip among those visible in its frame 0 (instance ids [B, T, H, W])."""
        chosen = []
        for index, ids in enumerate(objects_in_frame(instance_masks[:, 0])):
            if len(ids) == 0:
                raise ValueError(f"clip {index} of the batch shows no object in its first frame")
            chosen.append(ids[torch.randint(len(ids), (), generator=generator)])
        return torch.stack(chosen)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        instance_masks = batch["instance_masks"]
        features = self.model.sam.encode_clips(batch["frames"])
        look = look_loss(*self.look_logits(features, batch)) if self.look_head is not None else None
        if self.all_objects:  # every object of every clip: several prompts per encoded clip, as SAM trains
            clip_index, object_ids = visible_objects(instance_masks, list(range(len(instance_masks))))
            features = features.select(clip_index)
        else:
            clip_index, object_ids = torch.arange(len(instance_masks)), self.choose_objects(instance_masks)
        targets = instance_masks[clip_index] == object_ids[:, None, None, None]
        point_inputs, mask_inputs = self.prompts(targets[:, 0], allow_mask=targets.shape[1] > 1)
        output = self.model.sam.track(features, point_inputs, mask_inputs)
        # A mask prompt is SAM-2's output on its frame as is: only the tracked frames can be supervised.
        terms = self.tracking_losses(output, targets, first_frame=0 if mask_inputs is None else 1)
        loss = terms["mask"] + self.w_iou * terms["iou"] + self.w_object * terms["object"]
        if look is not None:
            terms["look"] = look
            loss = loss + self.w_look * look
        loss = self.check_finite(loss, batch)
        batch_size = len(targets)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        self.log_dict({f"train/loss_{name}": value for name, value in terms.items()}, batch_size=batch_size)
        with torch.no_grad():
            iou = region_similarity(output.logits > 0, targets).mean()
        self.log("train/track_iou", iou, prog_bar=True, batch_size=batch_size)
        return loss

    def look_logits(self, features: ClipFeatures, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """The look head's logits [T·B, V, h, w] on the clips' image embeddings and each pixel's look words
        [T·B, s, s, 2] (frame-major, as the features)."""
        instance_ids = batch["instance_masks"].transpose(0, 1).flatten(0, 1)
        clips = frame_clips(features.num_clips, features.num_frames, instance_ids.device)
        looks = pixel_looks(instance_ids, batch["object_look_ids"], clips, self.look_grid)
        return self.look_head(features.image_embeddings()), looks

    def tracking_losses(self, output: TrackOutput, targets: Tensor, first_frame: int) -> dict[str, Tensor]:
        """Mask loss of the best candidate, IoU-head and object-score losses over frames ``first_frame``..T-1.

        As SAM trains its multimask output: only the candidate with the lowest mask loss is supervised as a
        mask, while the IoU head learns the true IoU of every candidate. The mask loss counts frames where
        the object is present; the object score learns presence on every frame.
        """
        per_sample_loss = torch.vmap(self.mask_loss)
        mask_terms, iou_terms = [], []
        for index in range(first_frame, targets.shape[1]):
            candidates = output.candidate_logits[index]  # [B, M, H, W]
            target = targets[:, index, None].expand_as(candidates)
            losses = per_sample_loss(candidates.flatten(0, 1)[:, None], target.flatten(0, 1)[:, None])
            mask_terms.append(losses.view(candidates.shape[:2]).min(dim=1).values)
            true_iou = region_similarity(candidates.detach() > 0, target)
            iou_terms.append(F.mse_loss(output.candidate_ious[index], true_iou))
        present = targets[:, first_frame:].flatten(2).any(dim=-1)
        mask_loss = (torch.stack(mask_terms, dim=1) * present).sum() / present.sum().clamp(min=1)
        object_loss = F.binary_cross_entropy_with_logits(
            output.object_score_logits[:, first_frame:], present.float()
        )
        return {"mask": mask_loss, "iou": torch.stack(iou_terms).mean(), "object": object_loss}

    def predict_logits(self, batch: dict[str, Any]) -> Tensor:
        """The referred targets tracked from their ground-truth frame-0 mask (SAM-2 as mask propagator)."""
        mask_inputs = batch["target_masks"][:, 0, None].float()
        return self.model.sam.track_from_prompt(batch["frames"], mask_inputs=mask_inputs)

    def on_validation_epoch_start(self) -> None:
        self._seen_videos.clear()

    def on_test_epoch_start(self) -> None:
        self._seen_videos.clear()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate_tracking(batch, self.val_tracking, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate_tracking(batch, self.test_tracking, "test")

    def on_validation_epoch_end(self) -> None:
        self._log_results("val", {"tracking": self.val_tracking})
        self.last_validated_step = self.global_step

    def on_test_epoch_end(self) -> None:
        self._log_results("test", {"tracking": self.test_tracking})

    def _evaluate_tracking(self, batch: dict[str, Any], metric: PromptedTrackingMetric, split: str) -> None:
        """Track every object of every clip not seen yet (batches repeat a clip once per expression)."""
        fresh = []
        for index, video in enumerate(batch["video_id"]):
            if video not in self._seen_videos:
                self._seen_videos.add(video)
                fresh.append(index)
        clip_index_t, all_ids = visible_objects(batch["instance_masks"], fresh)
        if len(clip_index_t) == 0:
            return
        clip_index = clip_index_t.tolist()
        targets = batch["instance_masks"][clip_index_t] == all_ids[:, None, None, None]
        all_features = self.model.sam.encode_clips(batch["frames"])
        if self.look_head is not None:
            self._log_look_accuracy(all_features, batch, fresh, split)
        features = all_features.select(clip_index_t)
        predicted = self.model.sam.track(features, centroid_points(targets[:, 0])).logits > 0
        metric.update(predicted, targets)
        for row, clip in enumerate(clip_index):
            if len(self._overlays) >= self.num_overlays:
                break
            object_id = int(all_ids[row])
            self._overlays.append(
                OverlayItem(
                    frames=self._unnormalise(batch["frames"][clip].cpu()),
                    pred=predicted[row].cpu(),
                    gt=targets[row].cpu(),
                    title=f"object {object_id}, point-prompted on frame 0",
                    name=f"{batch['video_id'][clip]}_object{object_id}",
                )
            )

    def _log_look_accuracy(
        self, features: ClipFeatures, batch: dict[str, Any], clips: list[int], split: str
    ) -> None:
        """Share of the object pixels of ``clips`` whose top two words are their colour and shape."""
        index = torch.tensor(clips, dtype=torch.long, device=batch["frames"].device)
        fresh_batch = {key: batch[key][index] for key in ("instance_masks", "object_look_ids")}
        hits = look_hits(*self.look_logits(features.select(index), fresh_batch))
        if len(hits):
            self.log(f"{split}/look_accuracy", hits.float().mean(), batch_size=len(hits))
