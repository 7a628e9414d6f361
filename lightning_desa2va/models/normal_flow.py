"""Normal flow: how each cell of a clip's frames moves, from image derivatives alone (no learned part).

Per pixel of the frames (average-pooled by ``stride``), ``-∂I/∂t · ∇I`` is the Lucas-Kanade numerator,
whose dot product with the true motion is never negative; summed over colour channels, pooled to a grid
(each cell with its neighbours within ``window``) and divided by the pooled gradient energy, it gives each
cell a scale-free (x, y) motion estimate. Both motion components read it: the motion cue
(:mod:`~lightning_desa2va.models.motion_cue`) adds it to SAM-2's features, the motion prompt
(:mod:`~lightning_desa2va.models.motion_prompt`) matches it against the motion an expression states.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

FLOW_CHANNELS = 2
TIME_DIM, HEIGHT_DIM, WIDTH_DIM = 1, 3, 4  # of clips [B, T, 3, H, W]


class NormalFlow:
    """The normal-flow estimate of clips [B, T, 3, H, W] on any grid; ``config_group`` names the
    component whose settings these are in errors."""

    def __init__(self, stride: int, window: int, eps: float, config_group: str) -> None:
        if stride < 1:
            raise ValueError(f"{config_group}.stride must be a positive pixel count, got {stride}")
        if window < 1 or window % 2 == 0:
            raise ValueError(f"{config_group}.window must be an odd number of cells, got {window}")
        self.stride = stride
        self.window = window
        self.eps = eps

    def __call__(self, clips: Tensor, grid: tuple[int, int]) -> Tensor:
        """Motion estimate [B·T, 2, *grid] (x, y); zero for one-frame clips."""
        return self.pooled(*self.terms(clips), grid)

    def terms(self, clips: Tensor) -> tuple[Tensor, Tensor]:
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

    def pooled(self, numerator: Tensor, energy: Tensor, grid: tuple[int, int]) -> Tensor:
        """The flow of the per-pixel terms on ``grid`` [B·T, 2, *grid]."""
        return self.pool(numerator, grid) / (self.pool(energy, grid) + self.eps)

    def pool(self, maps: Tensor, grid: tuple[int, int]) -> Tensor:
        """Sum over each cell and its neighbours within ``window``: one cell sees too little of an edge to
        average out the aperture problem (a curved edge's normal flow points every way)."""
        cells = F.adaptive_avg_pool2d(maps, grid)
        return F.avg_pool2d(cells, self.window, stride=1, padding=self.window // 2, count_include_pad=False)
