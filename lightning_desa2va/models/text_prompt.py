"""Text prompts: turn the text embedding z_t into sparse prompt tokens for SAM-2's mask decoder.

Config group ``text_prompt``. ``points`` is DeSa2VA's point-level prompt: z_t predicts K points whose
coordinates and labels SAM-2's own prompt encoder embeds, plus a content embedding per point so the
prompt also carries what the text said, not only where.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_desa2va.models.sam2 import LanguagePromptedSAM2


@dataclass
class TextPrompt:
    """Sparse prompt tokens [B, K, C] and, for point prompts, the points in pixels [B, K, 2]."""

    tokens: Tensor
    points: Tensor | None = None


class PointTextPrompt(nn.Module):
    """z_t → K positive point prompts (SAM-2 prompt encoder) + K content embeddings."""

    def __init__(self, in_dim: int, prompt_dim: int, num_points: int) -> None:
        super().__init__()
        self.num_points = num_points
        self.to_coords = nn.Linear(in_dim, num_points * 2)
        self.to_content = nn.Linear(in_dim, num_points * prompt_dim)

    def forward(self, z_text: Tensor, sam: LanguagePromptedSAM2) -> TextPrompt:
        batch = z_text.shape[0]
        coords = torch.sigmoid(self.to_coords(z_text)).view(batch, self.num_points, 2) * sam.image_size
        labels = torch.ones(batch, self.num_points, dtype=torch.int32, device=z_text.device)
        content = self.to_content(z_text).view(batch, self.num_points, -1)
        return TextPrompt(tokens=sam.embed_points(coords, labels) + content, points=coords)
