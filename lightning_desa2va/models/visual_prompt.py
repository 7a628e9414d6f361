"""Visual prompts: turn the visual embedding z_v into sparse prompt tokens for SAM-2's mask decoder.

Config group ``visual_prompt``. ``token`` is Sa2VA's prompt: one sparse token per ``[SEG]``; ``tokens``
gives the decoder K tokens, so z_v can describe the object by several parts.
"""

from __future__ import annotations

from torch import Tensor, nn


class TokenVisualPrompt(nn.Module):
    """z_v → one sparse prompt token [B, 1, C] = W z_v + b."""

    def __init__(self, in_dim: int, prompt_dim: int) -> None:
        super().__init__()
        self.project = nn.Linear(in_dim, prompt_dim)

    def forward(self, z_visual: Tensor) -> Tensor:
        return self.project(z_visual).unsqueeze(1)


class TokensVisualPrompt(nn.Module):
    """z_v → K sparse prompt tokens [B, K, C] = reshape(W z_v + b)."""

    def __init__(self, in_dim: int, prompt_dim: int, num_tokens: int) -> None:
        super().__init__()
        self.num_tokens = num_tokens
        self.project = nn.Linear(in_dim, num_tokens * prompt_dim)

    def forward(self, z_visual: Tensor) -> Tensor:
        return self.project(z_visual).view(z_visual.shape[0], self.num_tokens, -1)
