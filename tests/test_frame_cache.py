"""The frozen image encoder's per-frame feature cache: same features, fewer encodes, never stale."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from hydra.utils import instantiate

from lightning_desa2va.models.frame_cache import CachingImageEncoder

FRAMES = 6


@pytest.fixture
def build_sam(compose: Callable[..., Any]) -> Callable[..., Any]:
    """``build_sam(*overrides, cache_frames=N)``: the tiny SAM-2 (seeded random weights), image encoder
    frozen as every stage but SAM-2's pre-training freezes it."""

    def build(*overrides: str, cache_frames: int = 64) -> Any:
        torch.manual_seed(0)
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


def test_a_batch_mixing_kept_and_new_frames_encodes_only_the_new_ones(build_sam) -> None:
    sam = build_sam()
    frames = _frames()
    everything = sam.encode_frames(frames)
    sam.image_encoder.clear()
    sam.encode_frames(frames[:2])
    mixed = sam.encode_frames(frames)
    assert sam.image_encoder.misses == FRAMES + FRAMES
    assert sam.image_encoder.hits == 2
    for whole, part in zip(_levels(everything), _levels(mixed), strict=True):
        assert torch.equal(whole, part)


def test_the_cache_keeps_only_the_frames_used_last(build_sam) -> None:
    sam = build_sam(cache_frames=4)
    frames = _frames()
    sam.encode_frames(frames)
    assert len(sam.image_encoder.features) == 4
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
    assert not sam.image_encoder.features
    assert features.image_embeddings.requires_grad


def test_loading_weights_forgets_the_kept_features(build_sam) -> None:
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
