"""Motion prompts: tell SAM-2's mask decoder which cells move the way the expression says.

Config group ``motion_prompt``. Twins (same colour and shape, different motion) are the benchmark's hard
case: a prompt that finds "the red circle moving left" by its look finds both red circles, and the mask
decoder, which sees one frame, never learned to read the motion cue's features for the difference (README,
"Referring"). Yet the clip's normal flow (:mod:`~lightning_desa2va.models.normal_flow`) tells the target
from its twin on ~99% of the benchmark's pairs. ``flow_match`` makes the comparison explicit: z_t states a
motion (a direction, zero for "still", and whether the expression states one at all; trained by
``loss.w_stated_motion``), each cell's flow direction is compared with it, and the mismatch enters the
decoder as a dense prompt, through a learned embedding that starts at zero (the decoder is unchanged until
training finds a use). ``none`` adds nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from lightning_desa2va.models.normal_flow import FLOW_CHANNELS, NormalFlow
from lightning_desa2va.models.sam2 import FrameFeatures

STATED_FLAG = 1  # z_t → (x, y) direction + one "states a motion" logit


@dataclass
class StatedMotion:
    """The motion z_t says the expression states, one row per clip."""

    direction: Tensor  # [B, 2] (x, y): a unit vector for a direction, zero for "still"
    stated_logits: Tensor  # [B]: whether the expression states a motion at all


@dataclass
class MotionPromptOutput:
    """Dense prompt embeddings [B·T, C, h, w] for every frame (``None``: no prompt) and what was read."""

    dense: Tensor | None = None
    stated: StatedMotion | None = None


class NoMotionPrompt(nn.Module):
    """No motion prompt: the decoder sees the language prompts alone."""

    #: Whether the prompt reads z_t (a stage whose masks do not need z_t then freezes its branch).
    reads_text: ClassVar[bool] = False

    def __init__(self, in_dim: int, prompt_dim: int) -> None:
        super().__init__()

    def forward(
        self, z_text: Tensor, clips: Tensor, features: FrameFeatures, clip_index: Tensor | None = None
    ) -> MotionPromptOutput:
        return MotionPromptOutput()


class FlowMatchPrompt(nn.Module):
    """Dense prompt = how far each cell's flow direction is from the stated one, times a learned embedding.

    A cell's direction is its flow over (|flow| + ``direction_eps``): about a unit vector where something
    moves, near zero where nothing does, so "still" (direction zero) matches still objects. The squared
    distance to the stated direction (0 same way, 2 at right angles, 4 opposite) is scaled by the
    probability that the expression states a motion, so static expressions get no prompt.

    The embedding is multiplied by ``embedding_scale``: Adam moves a parameter that starts at zero by about
    the learning rate a step, so without it the prompt stays small next to SAM-2's image embedding for a
    whole stage (norm 0.9 after 500 steps at 3e-4, against ~18 for an embedding cell).
    """

    reads_text: ClassVar[bool] = True  # the stated direction comes from z_t

    def __init__(
        self,
        in_dim: int,
        prompt_dim: int,
        stride: int,
        window: int,
        eps: float,
        direction_eps: float,
        embedding_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.normal_flow = NormalFlow(stride, window, eps, config_group="motion_prompt")
        self.direction_eps = direction_eps
        self.embedding_scale = embedding_scale
        self.to_motion = nn.Linear(in_dim, FLOW_CHANNELS + STATED_FLAG)
        self.mismatch_embedding = nn.Parameter(torch.zeros(prompt_dim))

    def stated_motion(self, z_text: Tensor) -> StatedMotion:
        motion = self.to_motion(z_text)
        return StatedMotion(direction=motion[:, :FLOW_CHANNELS], stated_logits=motion[:, FLOW_CHANNELS])

    def mismatch(self, stated: StatedMotion, flow: Tensor) -> Tensor:
        """[B·T, 1, h, w]: squared distance of each cell's direction to the stated one, weighted by how
        sure z_t is that a motion is stated; ``flow`` [B·T, 2, h, w] clip by clip."""
        frames_per_clip = flow.shape[0] // stated.direction.shape[0]
        cells = flow / (flow.norm(dim=1, keepdim=True) + self.direction_eps)
        expected = stated.direction.repeat_interleave(frames_per_clip, dim=0)[:, :, None, None]
        weight = stated.stated_logits.sigmoid().repeat_interleave(frames_per_clip)[:, None, None, None]
        return weight * (cells - expected).square().sum(dim=1, keepdim=True)

    def forward(
        self, z_text: Tensor, clips: Tensor, features: FrameFeatures, clip_index: Tensor | None = None
    ) -> MotionPromptOutput:
        """``z_text`` [B, C], ``clips`` [V, T, 3, H, W], ``features`` of their V·T frames, clip by clip;
        ``clip_index`` [B] the clip each row of ``z_text`` reads (``None``: row b reads clip b). A clip's
        flow is computed once, however many rows read it."""
        embeddings = features.image_embeddings
        stated = self.stated_motion(z_text)
        flow = self.normal_flow(clips.to(embeddings.dtype), tuple(embeddings.shape[-2:]))
        if clip_index is not None:
            flow = flow.unflatten(0, clips.shape[:2])[clip_index].flatten(0, 1)
        embedding = self.embedding_scale * self.mismatch_embedding
        dense = self.mismatch(stated, flow) * embedding[None, :, None, None]
        return MotionPromptOutput(dense=dense, stated=stated)
