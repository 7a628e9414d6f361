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


def dice_loss(logits: Tensor, target: Tensor, smooth: float) -> Tensor:
    """Soft Dice loss per mask, averaged: robust to the small foreground of one referred object."""
    probs = logits.sigmoid().flatten(1)
    target = target.flatten(1)
    overlap = (probs * target).sum(-1)
    return (1 - (2 * overlap + smooth) / (probs.sum(-1) + target.sum(-1) + smooth)).mean()


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
    """w_f·L(M_f) + w_t·L(M_t) + w_v·L(M_v) + w_orth·L_orth + w_lm·L_lm."""

    def __init__(
        self, mask: MaskLoss, w_f: float, w_t: float, w_v: float, w_orth: float, w_lm: float
    ) -> None:
        super().__init__()
        self.mask = mask
        self.weights = {"fused": w_f, "text": w_t, "visual": w_v, "orth": w_orth, "lm": w_lm}

    @property
    def uses_lm(self) -> bool:
        """Whether answer labels need to reach the VLM (skips the LM head's loss otherwise)."""
        return self.weights["lm"] != 0

    @property
    def uses_orth(self) -> bool:
        """Whether the decoupler's orthogonality penalty needs computing."""
        return self.weights["orth"] != 0

    def forward(self, output: DeSa2VAOutput, target: Tensor, orthogonality: Tensor | None) -> LossTerms:
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
        if not terms:
            raise ValueError("every loss weight is 0: nothing would train")
        total = torch.stack([self.weights[name] * value for name, value in terms.items()]).sum()
        return LossTerms(total=total, terms=terms)
