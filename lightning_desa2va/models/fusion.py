"""Mask fusion: combine the text mask M_t and the visual mask M_v into the fused mask M_f.

Config group ``fusion``. ``visual`` keeps M_v (with ``decoupler=none`` this is the Sa2VA baseline);
``dynamic`` is DeSa2VA's dynamic fusion: a gate predicted per sample and per pixel from z_t, z_v and
both masks. All fusions work on mask logits of shape [N, 1, H, W], one row per frame.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_desa2va.models.decoupler import SegEmbeddings


@dataclass
class FusedMask:
    """Fused mask logits [N, 1, H, W] and, when the fusion has one, the gate on the text mask."""

    logits: Tensor
    gate: Tensor | None = None


class Fusion(nn.Module, ABC):
    """Base class of mask fusions."""

    @abstractmethod
    def forward(self, text_logits: Tensor, visual_logits: Tensor, embeddings: SegEmbeddings) -> FusedMask: ...


class VisualFusion(Fusion):
    """Keep the visual mask: no fusion (Sa2VA, or an ablation of the text path)."""

    def __init__(self, embed_dim: int) -> None:
        """``embed_dim`` is accepted like every fusion's; keeping M_v needs no weights."""
        super().__init__()

    def forward(self, text_logits: Tensor, visual_logits: Tensor, embeddings: SegEmbeddings) -> FusedMask:
        return FusedMask(logits=visual_logits)


class DynamicFusion(Fusion):
    """Per-sample, per-pixel gate g = σ(conv([M_t, M_v]) + MLP([z_t, z_v])); M_f = g·M_t + (1-g)·M_v."""

    def __init__(self, embed_dim: int, hidden_channels: int, kernel_size: int) -> None:
        super().__init__()
        self.mask_gate = nn.Sequential(
            nn.Conv2d(2, hidden_channels, kernel_size, padding=kernel_size // 2),
            nn.GELU(),
            nn.Conv2d(hidden_channels, 1, kernel_size, padding=kernel_size // 2),
        )
        self.embedding_gate = nn.Linear(2 * embed_dim, 1)

    def forward(self, text_logits: Tensor, visual_logits: Tensor, embeddings: SegEmbeddings) -> FusedMask:
        masks = torch.cat([text_logits, visual_logits], dim=1)
        per_sample = self.embedding_gate(torch.cat([embeddings.text, embeddings.visual], dim=-1))
        gate = torch.sigmoid(self.mask_gate(masks) + per_sample[:, :, None, None])
        return FusedMask(logits=gate * text_logits + (1 - gate) * visual_logits, gate=gate)
