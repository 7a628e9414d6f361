"""Losses: the hybrid mask loss (BCE + Dice, as Sa2VA) and DeSa2VA's triple supervision.

Config group ``loss``. Every weight is a config value and a weight of 0 switches its term off (the term is
then not even computed), so ablations such as "no text-mask supervision" are one override away.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_desa2va.models.desa2va import DeSa2VAOutput
from lightning_desa2va.models.motion_prompt import StatedMotion


def dice_loss(logits: Tensor, target: Tensor, smooth: float) -> Tensor:
    """Soft Dice loss per mask, averaged: robust to the small foreground of one referred object."""
    probs = logits.sigmoid().flatten(1)
    target = target.flatten(1)
    overlap = (probs * target).sum(-1)
    return (1 - (2 * overlap + smooth) / (probs.sum(-1) + target.sum(-1) + smooth)).mean()


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


class MaskLoss(nn.Module):
    """w_bce · BCE + w_dice · Dice on mask logits against binary masks of the same shape."""

    def __init__(self, w_bce: float, w_dice: float, dice_smooth: float = 1.0) -> None:
        super().__init__()
        self.w_bce = w_bce
        self.w_dice = w_dice
        self.dice_smooth = dice_smooth

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        if logits.shape != target.shape:
            raise ValueError(f"mask logits {tuple(logits.shape)} and target {tuple(target.shape)} differ")
        target = target.to(logits.dtype)
        loss = logits.new_zeros(())
        if self.w_bce:
            loss = loss + self.w_bce * F.binary_cross_entropy_with_logits(logits, target)
        if self.w_dice:
            loss = loss + self.w_dice * dice_loss(
                logits.flatten(0, -3), target.flatten(0, -3), self.dice_smooth
            )
        return loss


@dataclass
class LossTerms:
    """The weighted total and each unweighted term that was computed, for logging."""

    total: Tensor
    terms: dict[str, Tensor] = field(default_factory=dict)


class TripleSupervisionLoss(nn.Module):
    """w_f·L(M_f) + w_t·L(M_t) + w_v·L(M_v) + w_orth·L_orth + w_lm·L_lm + w_point·L_point
    + w_stated_motion·L_stated_motion.

    L_point (:func:`point_loss`) supervises where a grounded text prompt puts its points,
    L_stated_motion (:func:`stated_motion_loss`) what a motion prompt reads from z_t.
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
    ) -> None:
        super().__init__()
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
        """Whether the decoupler's orthogonality penalty needs computing."""
        return self.weights["orth"] != 0

    def forward(
        self,
        output: DeSa2VAOutput,
        target: Tensor,
        orthogonality: Tensor | None,
        stated_motion: Tensor | None = None,
    ) -> LossTerms:
        """``target`` masks [B, T, H, W]; ``stated_motion`` [B, 3] the motion each expression states
        (the batch's ``stated_motion``), needed with ``w_stated_motion``."""
        masks = {"fused": output.fused_logits, "text": output.text_logits, "visual": output.visual_logits}
        terms = {name: self.mask(logits, target) for name, logits in masks.items() if self.weights[name]}
        if self.uses_orth:
            if orthogonality is None:
                raise ValueError("loss.w_orth is set but no orthogonality penalty was computed")
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
