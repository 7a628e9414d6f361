"""Motion cues: tell SAM-2's per-frame image embedding how each cell moves through the clip.

Config group ``motion_cue``. The mask decoder here decodes every frame of a clip on its own, so nothing it
sees says which way an object moves, and "the circle moving left" cannot be told from a twin circle moving
right (the benchmark's motion expressions) however well the prompt is written. ``normal_flow`` adds the
clip's normal flow to the image embedding: per pixel of the frames (average-pooled by ``stride``)
``-∂I/∂t · ∇I`` (the Lucas-Kanade numerator, whose dot product with the true motion is never negative),
summed over colour channels, pooled to the embedding's grid (each cell with its neighbours) and divided
by the pooled gradient energy, so each cell carries a scale-free (x, y) motion estimate. A 1x1
projection, initialised at zero, maps it to SAM-2's width: the pretrained SAM-2 is unchanged until
training gives the cue a use. ``none`` leaves the embedding as it is (no temporal cue).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_desa2va.models.sam2 import FrameFeatures

FLOW_CHANNELS = 2
TIME_DIM, HEIGHT_DIM, WIDTH_DIM = 1, 3, 4  # of clips [B, T, 3, H, W]


class NoMotionCue(nn.Module):
    """Each frame's embedding as SAM-2 computed it."""

    def __init__(self, embed_dim: int, high_res_dims: list[int]) -> None:
        super().__init__()

    def forward(self, clips: Tensor, features: FrameFeatures) -> FrameFeatures:
        return features


class NormalFlowCue(nn.Module):
    """Adds a projection of each cell's normal-flow estimate to the image embedding."""

    def __init__(
        self,
        embed_dim: int,
        high_res_dims: list[int],
        stride: int,
        window: int,
        eps: float,
        high_res: bool = False,
    ) -> None:
        super().__init__()
        if stride < 1:
            raise ValueError(f"motion_cue.stride must be a positive pixel count, got {stride}")
        self.stride = stride
        if window < 1 or window % 2 == 0:
            raise ValueError(f"motion_cue.window must be an odd number of cells, got {window}")
        self.window = window
        self.eps = eps
        self.project = zero_projection(embed_dim)
        # The mask decoder's finer levels (stride 4 and 8), where a mask is read out pixel by pixel.
        self.project_high_res = nn.ModuleList(zero_projection(dim) for dim in high_res_dims if high_res)

    def flow(self, clips: Tensor, grid: tuple[int, int]) -> Tensor:
        """Motion estimate [B·T, 2, *grid] (x, y) of clips [B, T, 3, H, W]; zero for one-frame clips."""
        return self.pooled_flow(*self.flow_terms(clips), grid)

    def flow_terms(self, clips: Tensor) -> tuple[Tensor, Tensor]:
        """Per-pixel Lucas-Kanade numerator [B·T, 2, h, w] and gradient energy [B·T, 1, h, w] of the
        (pooled) frames, computed once for every grid; both zero for one-frame clips (no motion)."""
        batch, num_frames = clips.shape[:2]
        if self.stride > 1:
            frames = F.avg_pool2d(clips.flatten(0, 1), self.stride)
            clips = frames.view(batch, num_frames, *frames.shape[1:])
        if num_frames < 2:
            energy = torch.zeros_like(clips.flatten(0, 1)[:, :1])
            return energy.repeat(1, FLOW_CHANNELS, 1, 1), energy
        (d_t,) = torch.gradient(clips, dim=TIME_DIM)
        d_y, d_x = torch.gradient(clips, dim=(HEIGHT_DIM, WIDTH_DIM))
        numerator = torch.stack([-(d_t * d_x).sum(2), -(d_t * d_y).sum(2)], dim=2).flatten(0, 1)
        energy = (d_x.square() + d_y.square()).sum(2).flatten(0, 1).unsqueeze(1)
        return numerator, energy

    def pooled_flow(self, numerator: Tensor, energy: Tensor, grid: tuple[int, int]) -> Tensor:
        """The flow of the per-pixel terms on ``grid`` [B·T, 2, *grid]."""
        return self.pool(numerator, grid) / (self.pool(energy, grid) + self.eps)

    def pool(self, maps: Tensor, grid: tuple[int, int]) -> Tensor:
        """Sum over each cell and its neighbours within ``window``: one cell sees too little of an edge to
        average out the aperture problem (a curved edge's normal flow points every way)."""
        cells = F.adaptive_avg_pool2d(maps, grid)
        return F.avg_pool2d(cells, self.window, stride=1, padding=self.window // 2, count_include_pad=False)

    def forward(self, clips: Tensor, features: FrameFeatures) -> FrameFeatures:
        """``clips`` [B, T, 3, H, W]; ``features`` of their B·T frames, clip by clip."""
        terms = self.flow_terms(clips.to(features.image_embeddings.dtype))

        def cued(maps: Tensor, project: nn.Module) -> Tensor:
            return maps + project(self.pooled_flow(*terms, tuple(maps.shape[-2:])))

        high_res = list(features.high_res_features)
        for level, project in enumerate(self.project_high_res):
            high_res[level] = cued(high_res[level], project)
        return replace(
            features,
            image_embeddings=cued(features.image_embeddings, self.project),
            high_res_features=high_res,
        )


def zero_projection(dim: int) -> nn.Conv2d:
    """1×1 flow → ``dim`` channels, zero at first (the pretrained SAM-2 unchanged); no bias: a shift of every
    cell alike says nothing about motion."""
    project = nn.Conv2d(FLOW_CHANNELS, dim, kernel_size=1, bias=False)
    nn.init.zeros_(project.weight)
    return project
