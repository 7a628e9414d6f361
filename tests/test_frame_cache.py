"""The frozen image encoder's per-frame feature cache: same features, fewer encodes, shared by encoders with
the same weights, never stale."""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hydra.utils import instantiate

from lightning_desa2va.models.frame_cache import KEPT, CachingImageEncoder

FRAMES = 6


@pytest.fixture
def build_sam(compose: Callable[..., Any], request: pytest.FixtureRequest) -> Callable[..., Any]:
    """``build_sam(*overrides, cache_frames=N)``: the tiny SAM-2, image encoder frozen as every stage but
    SAM-2's pre-training freezes it. Random weights seeded by the test's name: the same in one test, others
    in the next one, whose encoders so find nothing this one kept in the process."""
    seed = zlib.crc32(request.node.name.encode())

    def build(*overrides: str, cache_frames: int = 64) -> Any:
        torch.manual_seed(seed)
        sam_cfg = compose().model.sam2
        sam = instantiate(
            sam_cfg, checkpoint=None, cache_frames=cache_frames, overrides=[*sam_cfg.overrides, *overrides]
        )
        sam.image_encoder.requires_grad_(False)
        return sam

    return build


def _frames(count: int = FRAMES, seed: int = 1) -> torch.Tensor:
    return torch.randn(count, 3, 128, 128, generator=torch.Generator().manual_seed(seed))


def _levels(features: Any) -> list[torch.Tensor]:
    return [features.image_embeddings, *features.high_res_features]


def test_cached_features_equal_freshly_encoded_ones(build_sam) -> None:
    cached, plain = build_sam(), build_sam(cache_frames=0)
    frames = _frames()
    first, again = cached.encode_frames(frames), cached.encode_frames(frames)
    fresh = plain.encode_frames(frames)
    assert isinstance(cached.image_encoder, CachingImageEncoder)
    assert type(plain.image_encoder) is not CachingImageEncoder
    assert (cached.image_encoder.misses, cached.image_encoder.hits) == (FRAMES, FRAMES)
    for kept, recomputed, reference in zip(_levels(first), _levels(again), _levels(fresh), strict=True):
        assert torch.equal(kept, recomputed)
        torch.testing.assert_close(kept, reference)


def test_a_batch_mixing_kept_and_new_frames_encodes_only_the_new_ones_each_alone(build_sam) -> None:
    sam, plain = build_sam(), build_sam(cache_frames=0)
    frames = _frames()
    sam.encode_frames(frames[:2])
    mixed = sam.encode_frames(frames)
    assert (sam.image_encoder.misses, sam.image_encoder.hits) == (FRAMES, 2)
    alone = [_levels(plain.encode_frames(frame[None])) for frame in frames]
    for level, kept in enumerate(_levels(mixed)):
        assert torch.equal(kept, torch.cat([frame[level] for frame in alone]))


def test_a_second_encoder_with_the_same_weights_meets_the_frames_the_first_kept(build_sam) -> None:
    first, second = build_sam(), build_sam()
    frames = _frames()
    encoded = first.encode_frames(frames)
    met = second.encode_frames(frames)
    assert (second.image_encoder.misses, second.image_encoder.hits) == (0, FRAMES)
    for a, b in zip(_levels(encoded), _levels(met), strict=True):
        assert torch.equal(a, b)


def test_the_same_weights_in_other_windows_are_another_encoder(build_sam) -> None:
    sam, windows = build_sam(), build_sam("++model.image_encoder.trunk.window_spec=[8,2,14,7]")
    windows.load_state_dict(sam.state_dict())
    frames = _frames()
    sam.encode_frames(frames)
    windows.encode_frames(frames)
    assert (windows.image_encoder.misses, windows.image_encoder.hits) == (FRAMES, 0)


def test_the_cache_keeps_only_the_frames_used_last(build_sam) -> None:
    sam = build_sam(cache_frames=4)
    frames = _frames()
    sam.encode_frames(frames)
    assert len(KEPT) == 4
    sam.encode_frames(frames[-4:])
    assert sam.image_encoder.hits == 4
    sam.encode_frames(frames[:1])
    assert sam.image_encoder.misses == FRAMES + 1


def test_a_trainable_encoder_is_never_served_from_the_cache(build_sam) -> None:
    sam = build_sam()
    frames = _frames()
    sam.encode_frames(frames)
    sam.image_encoder.requires_grad_(True)
    features = sam.encode_frames(frames)
    assert sam.image_encoder.hits == 0
    assert features.image_embeddings.requires_grad


def test_loaded_weights_are_another_encoder(build_sam) -> None:
    sam, other = build_sam(), build_sam()
    with torch.no_grad():
        for parameter in other.image_encoder.parameters():
            parameter.add_(0.1)
    frames = _frames()
    sam.encode_frames(frames)
    sam.load_state_dict(other.state_dict())
    reloaded = sam.encode_frames(frames)
    assert sam.image_encoder.hits == 0
    torch.testing.assert_close(reloaded.image_embeddings, other.encode_frames(frames).image_embeddings)


def test_weights_changed_in_place_are_another_encoder(build_sam) -> None:
    sam, plain = build_sam(), build_sam(cache_frames=0)
    frames = _frames()
    sam.encode_frames(frames)
    with torch.no_grad():
        for module in (sam, plain):
            next(module.image_encoder.parameters()).add_(0.1)
    edited = sam.encode_frames(frames)
    assert (sam.image_encoder.misses, sam.image_encoder.hits) == (2 * FRAMES, 0)
    torch.testing.assert_close(edited.image_embeddings, plain.encode_frames(frames).image_embeddings)


def test_another_thread_count_keeps_its_own_features(build_sam) -> None:
    sam = build_sam()
    frames = _frames()
    threads = torch.get_num_threads()
    sam.encode_frames(frames)
    try:
        torch.set_num_threads(threads + 1)
        sam.encode_frames(frames)
    finally:
        torch.set_num_threads(threads)
    sam.encode_frames(frames)
    assert (sam.image_encoder.misses, sam.image_encoder.hits) == (2 * FRAMES, FRAMES)


def test_different_pixels_or_dtypes_are_different_frames(build_sam) -> None:
    sam = build_sam()
    frames = _frames()
    sam.encode_frames(frames)
    nudged = frames.clone()
    nudged[0, 0, 0, 0] += 1e-3
    sam.encode_frames(nudged[:1])
    sam.encode_frames(frames[:1].double().float())
    assert (sam.image_encoder.misses, sam.image_encoder.hits) == (FRAMES + 1, 1)


def test_a_stochastic_encoder_in_training_mode_encodes_every_time(build_sam) -> None:
    sam = build_sam("++model.image_encoder.trunk.drop_path_rate=0.1")
    assert sam.image_encoder.stochastic
    frames = _frames()
    sam.train()
    sam.encode_frames(frames)
    sam.encode_frames(frames)
    assert sam.image_encoder.hits == 0
    sam.eval()
    sam.encode_frames(frames)
    sam.encode_frames(frames)
    assert sam.image_encoder.hits == FRAMES
