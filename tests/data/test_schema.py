"""The sample layout: encoding, decoding and the validation errors readers rely on."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from lightning_desa2va.data.schema import (
    EXPRESSION_TYPES,
    SCHEMA_VERSION,
    Expression,
    ShardFormatError,
    VideoSample,
    decode_sample,
    encode_sample,
)
from lightning_desa2va.data.synthetic import SyntheticConfig, generate_video

CFG = SyntheticConfig(num_frames=3, image_size=64, radius_range=(5, 8), speeds={"slow": 1.0, "fast": 2.0})
JPEG_MEAN_ABS_TOL = 2.0
URL = "/data/train-000007.tar"


@pytest.fixture(scope="module")
def sample() -> VideoSample:
    return generate_video(CFG, 3, "train-000042")


def _raw(sample: VideoSample) -> dict:
    raw = encode_sample(sample)
    raw["__url__"] = URL
    return raw


def _with_meta(raw: dict, **changes) -> dict:
    meta = json.loads(raw["meta.json"])
    meta.update(changes)
    return {**raw, "meta.json": json.dumps(meta).encode()}


def test_constants() -> None:
    assert SCHEMA_VERSION == 1
    assert EXPRESSION_TYPES == ("static", "motion", "mixed")


def test_encoded_layout(sample: VideoSample) -> None:
    raw = encode_sample(sample)
    frames = [f"frame_{t:03d}.jpg" for t in range(CFG.num_frames)]
    masks = [f"mask_{t:03d}.png" for t in range(CFG.num_frames)]
    assert set(raw) == {"__key__", "meta.json", *frames, *masks}
    assert raw["__key__"] == "train-000042"
    assert all(isinstance(v, bytes) for k, v in raw.items() if k != "__key__")
    meta = json.loads(raw["meta.json"])
    assert meta["schema_version"] == SCHEMA_VERSION
    assert (meta["num_frames"], meta["height"], meta["width"]) == (
        CFG.num_frames,
        CFG.image_size,
        CFG.image_size,
    )
    assert {"video_id", "objects", "expressions", "qa"} <= set(meta)
    assert set(meta["expressions"][0]) == {"text", "object_ids", "type", "label", "attributes"}
    assert Image.open(io.BytesIO(raw[frames[0]])).format == "JPEG"
    with Image.open(io.BytesIO(raw[masks[0]])) as png:
        assert (png.format, png.mode) == ("PNG", "L")


def test_round_trip(sample: VideoSample) -> None:
    back = decode_sample(_raw(sample))
    assert back.meta() == sample.meta()
    for a, b in zip(sample.masks, back.masks, strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(sample.frames, back.frames, strict=True):
        assert a.shape == b.shape and b.dtype == np.uint8
        assert np.abs(a.astype(int) - b.astype(int)).mean() < JPEG_MEAN_ABS_TOL


def test_wrong_schema_version_names_shard_and_key(sample: VideoSample) -> None:
    raw = _with_meta(_raw(sample), schema_version=SCHEMA_VERSION + 1)
    with pytest.raises(ShardFormatError, match=r"train-000007\.tar.*train-000042.*schema_version 2"):
        decode_sample(raw)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda raw: {k: v for k, v in raw.items() if k != "mask_002.png"}, "missing member 'mask_002.png'"),
        (lambda raw: {k: v for k, v in raw.items() if k != "meta.json"}, "missing member 'meta.json'"),
        (lambda raw: {**raw, "meta.json": b"{not json"}, "not valid JSON"),
        (lambda raw: {**raw, "frame_001.jpg": b"garbage"}, "cannot decode 'frame_001.jpg'"),
        (lambda raw: _with_meta(raw, height=CFG.image_size + 1), "meta says"),
        (lambda raw: _with_meta(raw, qa=[{"question": "q"}]), "malformed meta.json"),
        (
            lambda raw: _with_meta(
                raw,
                expressions=[
                    {"text": "x", "object_ids": [99], "type": "static", "label": "x", "attributes": {}}
                ],
            ),
            r"unknown objects \[99\]",
        ),
    ],
)
def test_invalid_samples_are_named(sample: VideoSample, damage, message: str) -> None:
    with pytest.raises(ShardFormatError, match=message) as info:
        decode_sample(damage(_raw(sample)))
    assert URL in str(info.value) and "train-000042" in str(info.value)


def test_encoder_refuses_what_the_reader_would_reject(sample: VideoSample) -> None:
    short = VideoSample(sample.video_id, sample.frames, sample.masks[:-1], sample.objects, [], [])
    with pytest.raises(ShardFormatError, match="train-000042"):
        encode_sample(short)
    bad_type = Expression("the red circle", [1], "colour", "red circle", {"colour": "red"})
    with pytest.raises(ShardFormatError, match="unknown type"):
        encode_sample(
            VideoSample(sample.video_id, sample.frames, sample.masks, sample.objects, [bad_type], [])
        )
    float_frames = [f.astype(np.float32) for f in sample.frames]
    with pytest.raises(ShardFormatError, match="uint8"):
        encode_sample(VideoSample(sample.video_id, float_frames, sample.masks, sample.objects, [], []))
