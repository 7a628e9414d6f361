"""Motion cues: tell SAM-2's per-frame image embedding how each cell moves through the clip.

Config group ``motion_cue``. The mask decoder here decodes every frame of a clip on its own, so nothing it
sees says which way an object moves, and "the circle moving left" cannot be told from a twin circle moving
right (the benchmark's motion expressions) however well the prompt is written. ``normal_flow`` adds the
clip's normal flow (:mod:`~lightning_desa2va.models.normal_flow`: a scale-free (x, y) motion estimate per
cell) to the image embedding through a 1x1 projection, initialised at zero: the pretrained SAM-2 is
unchanged until training gives the cue a use. ``none`` leaves the embedding as it is (no temporal cue).
"""

from __future__ import annotations

from dataclasses import replace

from torch import Tensor, nn

from lightning_desa2va.models.normal_flow import FLOW_CHANNELS, NormalFlow
from lightning_desa2va.models.sam2 import FrameFeatures


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
        self.normal_flow = NormalFlow(stride, window, eps, config_group="motion_cue")
        self.project = zero_projection(embed_dim)
        # The mask decoder's finer levels (stride 4 and 8), where a mask is read out pixel by pixel.
        self.project_high_res = nn.ModuleList(zero_projection(dim) for dim in high_res_dims if high_res)

    def forward(self, clips: Tensor, features: FrameFeatures) -> FrameFeatures:
        """``clips`` [B, T, 3, H, W]; ``features`` of their B·T frames, clip by clip."""
        terms = self.normal_flow.terms(clips.to(features.image_embeddings.dtype))

        def cued(maps: Tensor, project: nn.Module) -> Tensor:
            return maps + project(self.normal_flow.pooled(*terms, tuple(maps.shape[-2:])))

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
