"""Visual prompts: turn the visual embedding z_v into sparse prompt tokens for SAM-2's mask decoder.

Config group ``visual_prompt``. ``token`` is Sa2VA's prompt: one sparse token per ``[SEG]``.
"""

from __future__ import annotations

from torch import Tensor, nn


class TokenVisualPrompt(nn.Module):
    """z_v → one sparse prompt token [B, 1, C]."""

    def __init__(self, in_dim: int, prompt_dim: int) -> None:
        super().__init__()
        self.project = nn.Linear(in_dim, prompt_dim)

    def forward(self, z_visual: Tensor) -> Tensor:
        return self.project(z_visual).unsqueeze(1)
