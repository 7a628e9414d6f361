"""SAM-2 tracking through its own memory: one mask per frame, the prompt carried by memory, trainable."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate

NUM_CLIPS, NUM_FRAMES = 2, 3


@pytest.fixture(scope="module")
def sam(compose):
    """The tiny default SAM-2, seeded."""
    torch.manual_seed(0)
    return instantiate(compose().model.sam2)


@pytest.fixture(scope="module")
def frames(sam) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    size = sam.image_size
    return torch.randn(NUM_CLIPS, NUM_FRAMES, 3, size, size, generator=generator)


def point_prompt(x: float, y: float, clips: int = NUM_CLIPS) -> dict[str, torch.Tensor]:
    return {
        "point_coords": torch.tensor([[[x, y]]]).expand(clips, -1, -1),
        "point_labels": torch.ones(clips, 1, dtype=torch.int32),
    }


def test_tracking_gives_one_mask_per_frame(sam, frames) -> None:
    size = sam.image_size
    sam.eval()
    with torch.no_grad():
        batched = sam.track_from_prompt(frames, point_prompt(10.0, 20.0))
        single = sam.track_from_prompt(frames[0], point_prompt(10.0, 20.0, clips=1))
        from_mask = sam.track_from_prompt(frames, mask_inputs=torch.ones(NUM_CLIPS, 1, size, size))
    assert batched.shape == from_mask.shape == (NUM_CLIPS, NUM_FRAMES, size, size)
    assert single.shape == (NUM_FRAMES, size, size)
    # clips are tracked independently: clip 0 alone gives what it gave inside the batch
    torch.testing.assert_close(single, batched[0], atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="prompt"):
        sam.track_from_prompt(frames)


def test_the_frame_0_prompt_reaches_later_frames_through_memory(sam, frames) -> None:
    sam.eval()
    with torch.no_grad():
        features = sam.encode_clips(frames)
        left = sam.track(features, point_prompt(10.0, 20.0))
        again = sam.track(features, point_prompt(10.0, 20.0))
        right = sam.track(features, point_prompt(110.0, 100.0))
    torch.testing.assert_close(left.logits, again.logits)
    # frames 1.. see no prompt of their own: only the memory of frame 0 can make them differ
    assert not torch.allclose(left.object_score_logits[:, 1:], right.object_score_logits[:, 1:])
    assert not torch.allclose(left.logits[:, 1:], right.logits[:, 1:])


def test_gradients_of_tracked_frames_reach_memory_encoder_and_attention(sam, frames) -> None:
    sam.train()
    sam.zero_grad()
    output = sam.track(sam.encode_clips(frames), point_prompt(30.0, 40.0))
    tracked = sum(logits.sigmoid().mean() for logits in output.candidate_logits[1:])
    (tracked + output.object_score_logits[:, 1:].mean() + output.candidate_ious[-1].mean()).backward()
    for module in ("memory_encoder", "memory_attention", "obj_ptr_proj", "sam_mask_decoder"):
        grads = [p.grad for p in sam.get_submodule(module).parameters() if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads), f"no gradient reached {module}"
    sam.zero_grad()
