"""Motion cues: the normal-flow estimate points the way each object moves, and starts as a no-op."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_desa2va.data.synthetic import rasterise
from lightning_desa2va.models.motion_cue import NoMotionCue, NormalFlowCue
from lightning_desa2va.models.sam2 import FrameFeatures

SIZE = 128
GRID = (8, 8)
CELL = SIZE // GRID[0]
COLOUR = (0.9, 0.1, 0.1)
STEP = 3.0
HIGH_RES_DIMS = [2, 4]  # stride 4 and 8 levels
# Three objects of one look: moving left, moving down, still.
TRACKS = {
    "left": ((88.0, 32.0), (-STEP, 0.0)),
    "down": ((32.0, 40.0), (0.0, STEP)),
    "still": ((96.0, 96.0), (0.0, 0.0)),
}


def moving_clip(num_frames: int = 5) -> torch.Tensor:
    """One clip [1, T, 3, H, W] of the three tracks above."""
    frames = []
    for t in range(num_frames):
        image = np.zeros((SIZE, SIZE, 3), dtype=np.float32)
        for (x, y), (dx, dy) in TRACKS.values():
            image[rasterise("circle", (x + dx * t, y + dy * t), 11, (SIZE, SIZE))] = COLOUR
        frames.append(torch.from_numpy(image).permute(2, 0, 1))
    return torch.stack(frames).unsqueeze(0)


def flow_cue(stride: int = 2, window: int = 3, high_res: bool = False) -> NormalFlowCue:
    return NormalFlowCue(8, HIGH_RES_DIMS, stride=stride, window=window, eps=1e-3, high_res=high_res)


def features(embeddings: torch.Tensor) -> FrameFeatures:
    """Features of the clip's 5 frames: the given embedding, random finer levels at strides 4 and 8."""
    high_res = [
        torch.randn(5, dim, SIZE // s, SIZE // s) for dim, s in zip(HIGH_RES_DIMS, (4, 8), strict=True)
    ]
    return FrameFeatures(image_embeddings=embeddings, high_res_features=high_res, frames=torch.zeros(0))


def flow_at(flow: torch.Tensor, track: str, frame: int) -> torch.Tensor:
    """The (x, y) flow of the cell under a track's centre in a frame."""
    (x, y), (dx, dy) = TRACKS[track]
    col, row = int((x + dx * frame) // CELL), int((y + dy * frame) // CELL)
    return flow[frame, :, row, col]


@pytest.mark.parametrize("stride", [1, 2])
def test_normal_flow_points_the_way_each_object_moves(stride: int) -> None:
    flow = flow_cue(stride=stride).normal_flow(moving_clip(), GRID)
    assert flow.shape == (5, 2, *GRID)
    for frame in range(5):  # the end frames use one-sided differences, and must still agree
        left, down, still = (flow_at(flow, name, frame) for name in ("left", "down", "still"))
        assert left[0] < -0.1 and abs(left[1]) < abs(left[0]), (frame, left)
        assert down[1] > 0.1 and abs(down[0]) < abs(down[1]), (frame, down)
        assert still.abs().max() < 1e-6, (frame, still)


def test_background_far_from_objects_has_zero_flow() -> None:
    flow = flow_cue(window=1).normal_flow(moving_clip(), GRID)
    assert flow[:, :, 7, 0].abs().max() == 0  # bottom-left corner: nothing ever there


def test_one_frame_clip_has_no_motion() -> None:
    flow = flow_cue().normal_flow(moving_clip(num_frames=1), GRID)
    assert flow.shape == (1, 2, *GRID) and flow.abs().max() == 0


def test_fresh_cue_leaves_the_embedding_unchanged_until_trained() -> None:
    cue = flow_cue()
    embeddings = torch.randn(5, 8, *GRID)
    assert torch.equal(cue(moving_clip(), features(embeddings)).image_embeddings, embeddings)
    torch.nn.init.normal_(cue.project.weight)
    moved = cue(moving_clip(), features(embeddings)).image_embeddings
    assert not torch.allclose(moved, embeddings)
    assert torch.equal(moved[:, :, 7, 0], embeddings[:, :, 7, 0])  # no motion there, no change


def test_the_zero_initialised_projections_still_get_a_gradient() -> None:
    cue = flow_cue(high_res=True)
    cued = cue(moving_clip(), features(torch.zeros(5, 8, *GRID)))
    (cued.image_embeddings.sum() + sum(level.sum() for level in cued.high_res_features)).backward()
    for project in [cue.project, *cue.project_high_res]:
        assert project.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("high_res", [False, True])
def test_the_finer_levels_get_the_cue_only_with_high_res(high_res: bool) -> None:
    cue = flow_cue(high_res=high_res)
    for project in [cue.project, *cue.project_high_res]:
        torch.nn.init.normal_(project.weight)
    before = features(torch.zeros(5, 8, *GRID))
    after = cue(moving_clip(), before)
    assert len(cue.project_high_res) == (len(HIGH_RES_DIMS) if high_res else 0)
    for old, new in zip(before.high_res_features, after.high_res_features, strict=True):
        assert new.shape == old.shape
        assert torch.equal(new, old) != high_res


@pytest.mark.parametrize(("stride", "window", "key"), [(2, 0, "window"), (2, 2, "window"), (0, 3, "stride")])
def test_bad_sizes_fail_naming_the_key(stride: int, window: int, key: str) -> None:
    with pytest.raises(ValueError, match=f"motion_cue.{key}"):
        flow_cue(stride=stride, window=window)


def test_no_motion_cue_is_the_identity() -> None:
    frame_features = features(torch.randn(5, 8, *GRID))
    assert NoMotionCue(8, HIGH_RES_DIMS)(moving_clip(), frame_features) is frame_features
