"""Motion cues: the normal-flow estimate points the way each object moves, and starts as a no-op."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_desa2va.data.synthetic import rasterise
from lightning_desa2va.models.motion_cue import NoMotionCue, NormalFlowCue

SIZE = 128
GRID = (8, 8)
CELL = SIZE // GRID[0]
COLOUR = (0.9, 0.1, 0.1)
STEP = 3.0
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


def flow_at(flow: torch.Tensor, track: str, frame: int) -> torch.Tensor:
    """The (x, y) flow of the cell under a track's centre in a frame."""
    (x, y), (dx, dy) = TRACKS[track]
    col, row = int((x + dx * frame) // CELL), int((y + dy * frame) // CELL)
    return flow[frame, :, row, col]


@pytest.mark.parametrize("stride", [1, 2])
def test_normal_flow_points_the_way_each_object_moves(stride: int) -> None:
    flow = NormalFlowCue(embed_dim=8, stride=stride, window=3, eps=1e-3).flow(moving_clip(), GRID)
    assert flow.shape == (5, 2, *GRID)
    for frame in range(5):  # the end frames use one-sided differences, and must still agree
        left, down, still = (flow_at(flow, name, frame) for name in ("left", "down", "still"))
        assert left[0] < -0.1 and abs(left[1]) < abs(left[0]), (frame, left)
        assert down[1] > 0.1 and abs(down[0]) < abs(down[1]), (frame, down)
        assert still.abs().max() < 1e-6, (frame, still)


def test_background_far_from_objects_has_zero_flow() -> None:
    flow = NormalFlowCue(embed_dim=8, stride=2, window=1, eps=1e-3).flow(moving_clip(), GRID)
    assert flow[:, :, 7, 0].abs().max() == 0  # bottom-left corner: nothing ever there


def test_one_frame_clip_has_no_motion() -> None:
    flow = NormalFlowCue(embed_dim=8, stride=2, window=3, eps=1e-3).flow(moving_clip(num_frames=1), GRID)
    assert flow.shape == (1, 2, *GRID) and flow.abs().max() == 0


def test_fresh_cue_leaves_the_embedding_unchanged_until_trained() -> None:
    cue = NormalFlowCue(embed_dim=8, stride=2, window=3, eps=1e-3)
    embeddings = torch.randn(5, 8, *GRID)
    assert torch.equal(cue(moving_clip(), embeddings), embeddings)
    torch.nn.init.normal_(cue.project.weight)
    moved = cue(moving_clip(), embeddings)
    assert not torch.allclose(moved, embeddings)
    assert torch.equal(moved[:, :, 7, 0], embeddings[:, :, 7, 0])  # no motion there, no change


def test_the_zero_initialised_projection_still_gets_a_gradient() -> None:
    cue = NormalFlowCue(embed_dim=8, stride=2, window=3, eps=1e-3)
    cue(moving_clip(), torch.zeros(5, 8, *GRID)).sum().backward()
    assert cue.project.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(("stride", "window", "key"), [(2, 0, "window"), (2, 2, "window"), (0, 3, "stride")])
def test_bad_sizes_fail_naming_the_key(stride: int, window: int, key: str) -> None:
    with pytest.raises(ValueError, match=f"motion_cue.{key}"):
        NormalFlowCue(embed_dim=8, stride=stride, window=window, eps=1e-3)


def test_no_motion_cue_is_the_identity() -> None:
    embeddings = torch.randn(5, 8, *GRID)
    assert NoMotionCue(embed_dim=8)(moving_clip(), embeddings) is embeddings
