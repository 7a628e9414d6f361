"""The motion objective of the segmentation stages: the image embedding says which way each object moves.

SAM-2 decodes every frame on its own; the motion cue (:mod:`lightning_desa2va.models.motion_cue`) adds
the clip's normal flow to the image embedding through a projection that starts at zero, and the mask loss
alone gave it no consistent use (README, "Referring"). As the look objective of SAM-2 pre-training made
the embedding name colour and shape, a 1×1 probe trained to name the direction words of the object at
every pixel ("up" and "left" for up-left, "still") makes the cued embedding carry the motion where a
prompt that says "moving left" can find it. The probe belongs to the stage; it is not part of the model.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_desa2va.stages.look import look_hits, look_loss, pixel_looks


class MotionProbe(nn.Module):
    """A 1×1 convolution from the image embedding to logits over the vocabulary, scored per object pixel."""

    def __init__(self, embed_dim: int, vocab_size: int, grid: int) -> None:
        super().__init__()
        self.head = nn.Conv2d(embed_dim, vocab_size, kernel_size=1)
        self.grid = grid

    def forward(
        self, image_embeddings: Tensor, instance_masks: Tensor, object_motion_ids: Tensor
    ) -> tuple[Tensor | None, Tensor]:
        """Loss (``None`` without any moving-or-still object pixel) and per-pixel hits [P] of clips'
        embeddings [B·T, C, h, w] (clip by clip) against instance ids [B, T, H, W] and each clip's
        direction words [B, L, 2] (row = object id)."""
        batch, num_frames = instance_masks.shape[:2]
        clips = torch.arange(batch, device=instance_masks.device).repeat_interleave(num_frames)
        words = pixel_looks(instance_masks.flatten(0, 1), object_motion_ids, clips, self.grid)
        logits = self.head(image_embeddings)
        return look_loss(logits, words), look_hits(logits, words)
