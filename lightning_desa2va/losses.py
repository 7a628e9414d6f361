"""Losses: the hybrid mask loss (BCE + Dice, as Sa2VA) and DeSa2VA's triple supervision.

Config group ``loss``. Every weight is a config value and a weight of 0 switches its term off: the term is
then not computed, nor what only it needs (:meth:`TripleSupervisionLoss.required_masks` tells the model
which masks to decode, w_lm = 0 keeps the answer labels from the VLM, w_orth = 0 skips the decoupler's
penalty), so ablations such as "no text-mask supervision" are one override away and cost nothing extra.
The mask terms can be scored on uncertainty-sampled points, as Sa2VA and Mask2Former train
(``mask.num_points`` > 0).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from transformers.models.mask2former.modeling_mask2former import sample_point

from lightning_desa2va.models.desa2va import (
    AUX_MASKS,
    DECODER_RESOLUTION,
    IMAGE_RESOLUTION,
    DeSa2VAOutput,
    MaskRequest,
)
from lightning_desa2va.models.motion_prompt import StatedMotion


def dice_loss(logits: Tensor, target: Tensor, smooth: float) -> Tensor:
    """Soft Dice loss per mask, averaged: robust to the small foreground of one referred object."""
    probs = logits.sigmoid().flatten(1)
    target = target.flatten(1)
    overlap = (probs * target).sum(-1)
    return (1 - (2 * overlap + smooth) / (probs.sum(-1) + target.sum(-1) + smooth)).mean()


def covered_share(target: Tensor, size: torch.Size) -> Tensor:
    """Binary masks [B, T, H, W] as the share of each cell of a coarser ``size`` grid they cover."""
    return F.adaptive_avg_pool2d(target.flatten(0, 1).float(), size).view(*target.shape[:2], *size)


def point_loss(heatmap_logits: Tensor, target: Tensor) -> Tensor:
    """−log of the probability mass a point heatmap [B, T, K, h, w] puts on the target [B, T, H, W].

    Cells count by the share of their area inside the target, so the loss pulls every point onto the
    referred object(s), towards their interior. Frames where the target is absent do not count.
    """
    cells = heatmap_logits.shape[-2:]
    inside = F.adaptive_avg_pool2d(target.flatten(0, 1).unsqueeze(1).to(heatmap_logits.dtype), cells)
    inside = inside.view(*target.shape[:2], 1, -1)
    log_mass = torch.logsumexp(heatmap_logits.flatten(-2).log_softmax(-1) + inside.log(), dim=-1)
    present = (inside.sum(-1) > 0).expand_as(log_mass)
    if not present.any():
        return heatmap_logits.new_zeros(())
    return -log_mass[present].mean()


def stated_motion_loss(stated: StatedMotion, target: Tensor) -> Tensor:
    """BCE on whether a motion is stated + MSE on its direction, against targets [B, 3] (x, y, stated);
    rows with a NaN flag (no structured referent, e.g. real datasets) do not count, nor do the directions
    of expressions that state none."""
    known = ~target[:, 2].isnan()
    if not known.any():
        return stated.stated_logits.new_zeros(())
    flags = target[known, 2].to(stated.stated_logits.dtype)
    loss = F.binary_cross_entropy_with_logits(stated.stated_logits[known], flags)
    moving = known & (target[:, 2] > 0)
    if moving.any():
        loss = loss + F.mse_loss(stated.direction[moving], target[moving, :2].to(stated.direction.dtype))
    return loss


def uncertain_points(
    logits: Tensor, num_points: int, oversample_ratio: float, importance_sample_ratio: float
) -> Tensor:
    """Point coordinates [N, P, 2] in [0, 1] for mask logits [N, 1, H, W], as PointRend / Mask2Former pick
    them: of ``oversample_ratio``·P random points, the ``importance_sample_ratio``·P least certain (logit
    nearest 0) are kept, and the rest of the P points are drawn uniformly."""
    candidates = torch.rand(logits.shape[0], int(num_points * oversample_ratio), 2, device=logits.device)
    uncertainty = -sample_point(logits.detach(), candidates, align_corners=False)[:, 0].abs()
    num_uncertain = int(importance_sample_ratio * num_points)
    chosen = uncertainty.topk(num_uncertain, dim=1).indices
    points = candidates.gather(1, chosen[:, :, None].expand(-1, -1, 2))
    uniform = torch.rand(logits.shape[0], num_points - num_uncertain, 2, device=logits.device)
    return torch.cat([points, uniform], dim=1)


class MaskLoss(nn.Module):
    """w_bce · BCE + w_dice · Dice on mask logits against binary masks of the same shape [..., H, W].

    With ``num_points`` > 0 both are computed on that many points per mask, chosen by
    :func:`uncertain_points` and read by bilinear interpolation (``F.grid_sample``) from the logits and the
    target alike, as Sa2VA trains (12544 points, oversampling 3, importance ratio 0.75); 0 scores every
    pixel.
    """

    def __init__(
        self,
        w_bce: float,
        w_dice: float,
        dice_smooth: float = 1.0,
        num_points: int = 0,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
    ) -> None:
        super().__init__()
        if num_points < 0 or oversample_ratio < 1 or not 0 <= importance_sample_ratio <= 1:
            raise ValueError(
                f"loss.mask point sampling needs num_points >= 0, oversample_ratio >= 1 and "
                f"importance_sample_ratio in [0, 1], got {num_points}, {oversample_ratio}, "
                f"{importance_sample_ratio}"
            )
        self.w_bce = w_bce
        self.w_dice = w_dice
        self.dice_smooth = dice_smooth
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        if logits.shape != target.shape:
            raise ValueError(f"mask logits {tuple(logits.shape)} and target {tuple(target.shape)} differ")
        target = target.to(logits.dtype)
        if self.num_points:
            logits, target = self.sample_points(logits, target)
        loss = logits.new_zeros(())
        if self.w_bce:
            loss = loss + self.w_bce * F.binary_cross_entropy_with_logits(logits, target)
        if self.w_dice:
            loss = loss + self.w_dice * dice_loss(
                logits.flatten(0, -3), target.flatten(0, -3), self.dice_smooth
            )
        return loss

    def sample_points(self, logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """Logits and targets [..., H, W] read at the sampled points of each mask, as [N, 1, P] rows (Dice
        and BCE then treat the P points as the mask's pixels)."""
        masks = logits.reshape(-1, 1, *logits.shape[-2:])
        points = uncertain_points(masks, self.num_points, self.oversample_ratio, self.importance_sample_ratio)
        targets = target.reshape(masks.shape)
        return (
            sample_point(masks, points, align_corners=False),
            sample_point(targets, points, align_corners=False),
        )


@dataclass
class LossTerms:
    """The weighted total and each unweighted term that was computed, for logging."""

    total: Tensor
    terms: dict[str, Tensor] = field(default_factory=dict)


class TripleSupervisionLoss(nn.Module):
    """w_f·L(M_f) + w_t·L(M_t) + w_v·L(M_v) + w_orth·L_orth + w_lm·L_lm + w_point·L_point
    + w_stated_motion·L_stated_motion.

    L_orth is the decoupler's own penalty (only ``decoupler=linear_ortho`` defines one; with the others
    w_orth has nothing to weigh), L_point (:func:`point_loss`) supervises where a grounded text prompt
    puts its points, L_stated_motion (:func:`stated_motion_loss`) what a motion prompt reads from z_t.

    ``aux_resolution``: where L(M_t) and L(M_v) are scored. ``image``: on the masks upsampled to the image,
    as L(M_f). ``decoder``: on SAM-2's own low-resolution logits (a quarter of the image a side) against the
    share of each cell the target covers (its area average), so the aux masks need no upsampling, nor its
    backward pass; the fused mask, the answer, is always scored at the image's resolution.
    """

    def __init__(
        self,
        mask: MaskLoss,
        w_f: float,
        w_t: float,
        w_v: float,
        w_orth: float,
        w_lm: float,
        w_point: float = 0.0,
        w_stated_motion: float = 0.0,
        aux_resolution: str = IMAGE_RESOLUTION,
    ) -> None:
        super().__init__()
        if aux_resolution not in (IMAGE_RESOLUTION, DECODER_RESOLUTION):
            raise ValueError(
                f"loss.aux_resolution is {aux_resolution!r}: it must be "
                f"{IMAGE_RESOLUTION!r} or {DECODER_RESOLUTION!r}"
            )
        self.aux_resolution = aux_resolution
        self.mask = mask
        self.weights = {
            "fused": w_f,
            "text": w_t,
            "visual": w_v,
            "orth": w_orth,
            "lm": w_lm,
            "point": w_point,
            "stated_motion": w_stated_motion,
        }

    @property
    def uses_lm(self) -> bool:
        """Whether answer labels need to reach the VLM (skips the LM head's loss otherwise)."""
        return self.weights["lm"] != 0

    @property
    def uses_orth(self) -> bool:
        """Whether the decoupler's orthogonality penalty (if it has one) needs computing."""
        return self.weights["orth"] != 0

    def required_masks(self) -> MaskRequest:
        """The masks training needs: those with a weight (the text path also for the point loss, which
        reads the text prompt's heatmap)."""
        return MaskRequest(
            fused=self.weights["fused"] != 0,
            text=self.weights["text"] != 0 or self.weights["point"] != 0,
            visual=self.weights["visual"] != 0,
            aux_resolution=self.aux_resolution,
        )

    def forward(
        self,
        output: DeSa2VAOutput,
        target: Tensor,
        orthogonality: Tensor | None,
        stated_motion: Tensor | None = None,
    ) -> LossTerms:
        """``target`` masks [B, T, H, W]; ``orthogonality`` the decoupler's penalty (``None``: it has none);
        ``stated_motion`` [B, 3] the motion each expression states (the batch's ``stated_motion``), needed
        with ``w_stated_motion``."""
        masks = {"fused": output.fused_logits, "text": output.text_logits, "visual": output.visual_logits}
        low_res_target: Tensor | None = None
        terms = {}
        for name, logits in masks.items():
            if self.weights[name]:
                if logits is None:
                    raise ValueError(f"loss weighs the {name} mask but the model did not decode it")
                mask_target = target
                if name in AUX_MASKS and self.aux_resolution == DECODER_RESOLUTION:
                    if low_res_target is None:
                        low_res_target = covered_share(target, logits.shape[-2:])
                    mask_target = low_res_target
                terms[name] = self.mask(logits, mask_target)
        if self.uses_orth and orthogonality is not None:
            terms["orth"] = orthogonality
        if self.uses_lm:
            if output.lm_loss is None:
                raise ValueError("loss.w_lm is set but the VLM returned no LM loss (no answer labels)")
            terms["lm"] = output.lm_loss
        terms.update(self.point_terms(output.text_heatmap, target))
        if self.weights["stated_motion"]:
            if output.stated_motion is None:
                raise ValueError(
                    "loss.w_stated_motion is set but the model has no motion prompt "
                    "(use motion_prompt=flow_match)"
                )
            if stated_motion is None:
                raise ValueError("loss.w_stated_motion is set but the batch states no motions")
            terms["stated_motion"] = stated_motion_loss(output.stated_motion, stated_motion)
        return self.weighted(terms)

    def text_only(self, text_logits: Tensor, text_heatmap: Tensor | None, target: Tensor) -> LossTerms:
        """Stage 1: the text mask is the only mask, so its loss counts fully; plus w_point · L_point."""
        terms = {"text": self.mask(text_logits, target), **self.point_terms(text_heatmap, target)}
        total = terms["text"] + sum(self.weights[name] * terms[name] for name in terms if name != "text")
        return LossTerms(total=total, terms=terms)

    def point_terms(self, text_heatmap: Tensor | None, target: Tensor) -> dict[str, Tensor]:
        if not self.weights["point"]:
            return {}
        if text_heatmap is None:
            raise ValueError(
                "loss.w_point is set but the text prompt makes no heatmap (text_prompt=grounded_points does)"
            )
        return {"point": point_loss(text_heatmap, target)}

    def weighted(self, terms: dict[str, Tensor]) -> LossTerms:
        if not terms:
            raise ValueError("every loss weight is 0: nothing would train")
        total = torch.stack([self.weights[name] * value for name, value in terms.items()]).sum()
        return LossTerms(total=total, terms=terms)
