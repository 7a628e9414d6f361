"""Mask fusion: combine the text mask M_t and the visual mask M_v into the fused mask M_f.

Config group ``fusion``. Every fusion but ``max`` is a gate g ∈ [0, 1] on the text mask,
M_f = g·M_t + (1 − g)·M_v on mask logits, and they differ in where g comes from: fixed (``text`` g = 1,
``visual`` g = 0, ``mean`` g = ½), one learned number (``learned``), SAM-2's own IoU predictions
(``confidence``), or a prediction per sample and pixel (``dynamic``, DeSa2VA's dynamic fusion). ``max``
takes the larger logit per pixel, which is the gate g = [M_t ≥ M_v]. With ``decoupler=none``, ``visual``
is the Sa2VA baseline. Masks arrive as :class:`MaskPrediction` rows, one per frame (logits [N, 1, h, w] at
the mask decoder's resolution, a quarter of the image's; SAM-2's IoU estimate [N, 1]): fusing there and
upsampling the fused mask once costs a sixteenth of fusing at the image's resolution. A fusion says which
of the two masks it reads (``reads_text``, ``reads_visual``), so the model decodes only those.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from lightning_desa2va.models.decoupler import SegEmbeddings
from lightning_desa2va.models.sam2 import MaskPrediction


@dataclass
class FusedMask:
    """Fused mask logits [N, 1, h, w] and, when the fusion has one, the gate on the text mask (same shape)."""

    logits: Tensor
    gate: Tensor | None = None


class Fusion(nn.Module, ABC):
    """Base class of mask fusions: ``forward(text, visual, embeddings)`` gives a :class:`FusedMask`; a mask
    the fusion does not read (``reads_text`` / ``reads_visual`` False) arrives as ``None``."""

    reads_text: ClassVar[bool] = True
    reads_visual: ClassVar[bool] = True
    #: Whether the fused mask depends on SAM-2's IoU predictions (its IoU head trains only then).
    reads_iou: ClassVar[bool] = False
    #: Whether the fused mask depends on z_t and z_v themselves, beside the masks they prompted.
    reads_embeddings: ClassVar[bool] = False

    @abstractmethod
    def forward(
        self, text: MaskPrediction | None, visual: MaskPrediction | None, embeddings: SegEmbeddings
    ) -> FusedMask: ...

    @staticmethod
    def gated(text: MaskPrediction, visual: MaskPrediction, gate: Tensor) -> FusedMask:
        """M_f = g·M_t + (1 − g)·M_v for a gate that broadcasts to the masks."""
        gate = gate.expand_as(text.logits)
        return FusedMask(logits=gate * text.logits + (1 - gate) * visual.logits, gate=gate)


class TextFusion(Fusion):
    """M_f = M_t: keep the text mask (ablation of the visual path)."""

    reads_visual: ClassVar[bool] = False

    def __init__(self, embed_dim: int) -> None:
        """``embed_dim`` is accepted like every fusion's; keeping M_t needs no weights."""
        super().__init__()

    def forward(
        self, text: MaskPrediction | None, visual: MaskPrediction | None, embeddings: SegEmbeddings
    ) -> FusedMask:
        return FusedMask(logits=text.logits)


class VisualFusion(Fusion):
    """M_f = M_v: keep the visual mask (Sa2VA, or an ablation of the text path)."""

    reads_text: ClassVar[bool] = False

    def __init__(self, embed_dim: int) -> None:
        """``embed_dim`` is accepted like every fusion's; keeping M_v needs no weights."""
        super().__init__()

    def forward(
        self, text: MaskPrediction | None, visual: MaskPrediction | None, embeddings: SegEmbeddings
    ) -> FusedMask:
        return FusedMask(logits=visual.logits)


class MeanFusion(Fusion):
    """M_f = (M_t + M_v) / 2: both masks count alike, nothing learned."""

    def __init__(self, embed_dim: int) -> None:
        super().__init__()

    def forward(self, text: MaskPrediction, visual: MaskPrediction, embeddings: SegEmbeddings) -> FusedMask:
        return self.gated(text, visual, text.logits.new_full((), 0.5))


class MaxFusion(Fusion):
    """M_f = max(M_t, M_v) per pixel: an object either mask finds is kept (gate g = [M_t ≥ M_v])."""

    def __init__(self, embed_dim: int) -> None:
        super().__init__()

    def forward(self, text: MaskPrediction, visual: MaskPrediction, embeddings: SegEmbeddings) -> FusedMask:
        gate = (text.logits >= visual.logits).to(text.logits.dtype)
        return FusedMask(logits=torch.maximum(text.logits, visual.logits), gate=gate)


class LearnedFusion(Fusion):
    """One global gate g = σ(a), a learned scalar (``initial_gate`` at the start): M_f = g·M_t + (1-g)·M_v."""

    def __init__(self, embed_dim: int, initial_gate: float = 0.5) -> None:
        super().__init__()
        if not 0 < initial_gate < 1:
            raise ValueError(f"fusion.initial_gate must lie strictly between 0 and 1, got {initial_gate}")
        self.gate_logit = nn.Parameter(torch.logit(torch.tensor(initial_gate)))

    def forward(self, text: MaskPrediction, visual: MaskPrediction, embeddings: SegEmbeddings) -> FusedMask:
        return self.gated(text, visual, torch.sigmoid(self.gate_logit))


class ConfidenceFusion(Fusion):
    """Weights from SAM-2's own IoU predictions s_t, s_v of the two masks, per frame:
    g = softmax(s_t/τ, s_v/τ)_t = σ((s_t − s_v)/τ), M_f = g·M_t + (1 − g)·M_v.

    The mask the decoder itself rates better counts more. The IoU head is part of SAM-2's mask decoder, so
    when that trains the fused-mask loss also teaches it which of its two masks to trust.
    """

    reads_iou: ClassVar[bool] = True

    def __init__(self, embed_dim: int, temperature: float) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"fusion.temperature must be positive, got {temperature}")
        self.temperature = temperature

    def forward(self, text: MaskPrediction, visual: MaskPrediction, embeddings: SegEmbeddings) -> FusedMask:
        gate = torch.sigmoid((text.iou - visual.iou) / self.temperature)
        return self.gated(text, visual, gate[:, :, None, None])


class DynamicFusion(Fusion):
    """Per-sample, per-pixel gate g = σ(conv([M_t, M_v]) + MLP([z_t, z_v])); M_f = g·M_t + (1-g)·M_v."""

    reads_embeddings: ClassVar[bool] = True

    def __init__(self, embed_dim: int, hidden_channels: int, kernel_size: int) -> None:
        super().__init__()
        self.mask_gate = nn.Sequential(
            nn.Conv2d(2, hidden_channels, kernel_size, padding=kernel_size // 2),
            nn.GELU(),
            nn.Conv2d(hidden_channels, 1, kernel_size, padding=kernel_size // 2),
        )
        self.embedding_gate = nn.Linear(2 * embed_dim, 1)

    def forward(self, text: MaskPrediction, visual: MaskPrediction, embeddings: SegEmbeddings) -> FusedMask:
        text_logits, visual_logits = text.logits, visual.logits
        # channels-last: oneDNN runs these few-channel convolutions twice as fast forward and backward on the
        # CPU (benchmarks/step_time.py --profile), to the same values
        masks = torch.cat([text_logits, visual_logits], dim=1).contiguous(memory_format=torch.channels_last)
        per_sample = self.embedding_gate(torch.cat([embeddings.text, embeddings.visual], dim=-1))
        gate = torch.sigmoid(self.mask_gate(masks) + per_sample[:, :, None, None])
        return FusedMask(logits=gate * text_logits + (1 - gate) * visual_logits, gate=gate)
