"""The sample layout (schema v2): encoding, lazy decoding and the errors readers rely on."""

from __future__ import annotations

import io
import json
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from lightning_desa2va.data.codec import encode_jpeg, encode_mask
from lightning_desa2va.data.schema import (
    EXPRESSION_TYPES,
    SCHEMA_VERSION,
    Expression,
    ObjectTrack,
    SchemaVersionError,
    ShardFormatError,
    VideoSample,
    decode_sample,
    encode_sample,
    sample_key,
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


def _gradient(height: int, width: int) -> np.ndarray:
    ys, xs = np.mgrid[:height, :width]
    return np.stack([xs * 255 // width, ys * 255 // height, (xs + ys) % 256], axis=-1).astype(np.uint8)


def test_constants() -> None:
    assert SCHEMA_VERSION == 3
    assert EXPRESSION_TYPES == ("static", "motion", "mixed")


def test_encoded_layout(sample: VideoSample) -> None:
    raw = encode_sample(sample)
    frames = [f"frame_{t:03d}.jpg" for t in range(CFG.num_frames)]
    masks = [f"mask_{t:03d}.png" for t in range(CFG.num_frames)]
    assert set(raw) == {"__key__", "meta.json", *frames, *masks}  # not resized: no original masks
    assert raw["__key__"] == "train-000042"
    assert all(isinstance(v, bytes) for k, v in raw.items() if k != "__key__")
    meta = json.loads(raw["meta.json"])
    assert meta["schema_version"] == SCHEMA_VERSION
    size = (CFG.num_frames, CFG.image_size, CFG.image_size, CFG.image_size, CFG.image_size)
    assert (
        meta["num_frames"],
        meta["height"],
        meta["width"],
        meta["original_height"],
        meta["original_width"],
    ) == size
    assert meta["source"] == "synthetic" and meta["frame_names"] == ["00000", "00001", "00002"]
    assert {"video_id", "objects", "expressions", "qa"} <= set(meta)
    assert set(meta["expressions"][0]) == {"text", "object_ids", "type", "label", "attributes", "source_id"}
    assert set(meta["objects"][0]) == {"id", "source_id", "colour", "shape", "motion", "speed"}
    assert Image.open(io.BytesIO(raw[frames[0]])).format == "JPEG"
    with Image.open(io.BytesIO(raw[masks[0]])) as png:
        assert (png.format, png.mode) == ("PNG", "I;16")


def test_round_trip_keeps_images_encoded_until_asked(sample: VideoSample) -> None:
    back = decode_sample(_raw(sample))
    assert back.meta() == sample.meta()
    assert back.frame_data == sample.frame_data and back.mask_data == sample.mask_data  # nothing decoded yet
    for t in range(CFG.num_frames):
        np.testing.assert_array_equal(back.mask(t), sample.mask(t))
        assert back.mask(t).dtype == np.uint16
        assert back.frame(t).shape == (CFG.image_size, CFG.image_size, 3) and back.frame(t).dtype == np.uint8


def test_ids_above_255_do_not_wrap() -> None:
    ids = np.zeros((6, 10), dtype=np.int64)
    ids[0, :3], ids[1, :3], ids[2, :3] = 256, 1000, 65535
    objects = [ObjectTrack(id=i) for i in (256, 1000, 65535)]
    expression = Expression("the last one", [65535], "static", "")
    video = VideoSample.from_arrays("many", [_gradient(6, 10)], [ids], objects, [expression], [])
    back = decode_sample(encode_sample(video))
    np.testing.assert_array_equal(back.mask(0), ids)
    with pytest.raises(ValueError, match="0..65535"):
        encode_mask(np.full((2, 2), 65536))


def test_resized_sample_stores_and_returns_original_masks() -> None:
    original = np.zeros((24, 40), dtype=np.uint16)
    original[2:20, 5:9] = 1
    small = original[::2, ::2]
    video = VideoSample(
        "clip",
        [ObjectTrack(id=1)],
        [Expression("the bar", [1], "static", "")],
        [],
        frame_data=[encode_jpeg(_gradient(12, 20))],
        mask_data=[encode_mask(small)],
        size=(12, 20),
        original_size=(24, 40),
        original_mask_data=[encode_mask(original)],
    )
    raw = encode_sample(video)
    assert "original_mask_000.png" in raw
    back = decode_sample(raw)
    assert back.resized and back.original_size == (24, 40)
    np.testing.assert_array_equal(back.mask(0), small)
    np.testing.assert_array_equal(back.original_mask(0), original)
    without = {k: v for k, v in raw.items() if k != "original_mask_000.png"}
    with pytest.raises(ShardFormatError, match="original_mask") as info:
        decode_sample(without)
    assert info.value.reason == "missing_mask"


def test_draft_decoding_reduces_only_by_whole_jpeg_scales() -> None:
    frame = _gradient(128, 256)
    video = VideoSample.from_arrays("wide", [frame], [np.zeros((128, 256), np.uint8)], [], [], [])
    reduced = video.frame(0, min_size=32)
    assert reduced.shape == (32, 64, 3)  # 1/4: both sides stay >= 32
    expected = frame.reshape(32, 4, 64, 4, 3).mean(axis=(1, 3))
    assert np.abs(reduced.astype(float) - expected).mean() < 4.0
    assert video.frame(0, min_size=100).shape == (128, 256, 3)  # 1/2 would go below 100
    np.testing.assert_array_equal(video.frame(0, min_size=100), video.frame(0))


def test_sample_keys_have_no_dots_or_slashes() -> None:
    assert sample_key("LVVIS/train_000170.v2") == "LVVIS_train_000170_v2"
    assert sample_key("0a2d4f9e4bb5") == "0a2d4f9e4bb5"


def test_wrong_schema_version_names_the_version_found_and_read(sample: VideoSample) -> None:
    raw = _with_meta(_raw(sample), schema_version=1)
    with pytest.raises(
        SchemaVersionError, match=r"train-000007\.tar.*train-000042.*schema_version 1.*version 3"
    ):
        decode_sample(raw)


def _drop(name: str):
    return lambda raw: {k: v for k, v in raw.items() if k != name}


@pytest.mark.parametrize(
    ("damage", "message", "reason"),
    [
        (_drop("mask_002.png"), r"no mask member for frames \[2\]", "missing_mask"),
        (_drop("meta.json"), "missing member 'meta.json'", "bad_meta"),
        (lambda raw: {**raw, "meta.json": b"{not json"}, "not valid JSON", "bad_meta"),
        (lambda raw: _with_meta(raw, qa=[{"question": "q"}]), "malformed meta.json", "bad_meta"),
        (_drop("frame_001.jpg"), r"3 frames, the sample has frames \[0, 2\]", "frame_count_mismatch"),
        (lambda raw: {**raw, "frame_003.jpg": raw["frame_000.jpg"]}, "has frames", "frame_count_mismatch"),
        (lambda raw: _with_meta(raw, num_frames=2), "frame names", "frame_count_mismatch"),
        (
            lambda raw: _with_meta(
                raw,
                expressions=[
                    {"text": "x", "object_ids": [99], "type": "static", "label": "x", "attributes": {}}
                ],
            ),
            r"objects \[99\] that have no mask",
            "object_without_mask",
        ),
    ],
)
def test_invalid_samples_are_named_with_their_reason(sample: VideoSample, damage, message, reason) -> None:
    with pytest.raises(ShardFormatError, match=message) as info:
        decode_sample(damage(_raw(sample)))
    assert URL in str(info.value) and "train-000042" in str(info.value)
    assert info.value.reason == reason


@pytest.mark.parametrize(
    ("member", "data", "read", "message", "reason"),
    [
        ("frame_001.jpg", b"garbage", lambda v: v.frame(1), "cannot decode 'frame_001.jpg'", "corrupt_jpeg"),
        (
            "mask_001.png",
            b"\x89PNG garbage",
            lambda v: v.mask(1),
            "cannot decode 'mask_001.png'",
            "corrupt_png",
        ),
        ("frame_001.jpg", encode_jpeg(_gradient(8, 8)), lambda v: v.frame(1), "meta says", "size_mismatch"),
        ("mask_001.png", encode_mask(np.zeros((8, 8))), lambda v: v.mask(1), "meta says", "size_mismatch"),
    ],
)
def test_bad_images_fail_when_decoded_naming_shard_and_member(
    sample: VideoSample, member, data, read, message, reason
) -> None:
    video = decode_sample({**_raw(sample), member: data})  # the sample itself parses: images are lazy
    assert video.frame(0).shape[:2] == video.mask(0).shape == video.size  # the other frames still decode
    with pytest.raises(ShardFormatError, match=message) as info:
        read(video)
    assert URL in str(info.value) and info.value.reason == reason


def test_encoder_refuses_what_the_reader_would_reject(sample: VideoSample) -> None:
    short = replace(sample, mask_data=sample.mask_data[:-1])
    with pytest.raises(ShardFormatError, match="train-000042"):
        encode_sample(short)
    bad_type = Expression("the red circle", [1], "colour", "red circle", {"colour": "red"})
    with pytest.raises(ShardFormatError, match="unknown type"):
        encode_sample(replace(sample, expressions=[bad_type]))
    unknown = Expression("the thing", [42], "static", "")
    with pytest.raises(ShardFormatError, match="no mask"):
        encode_sample(replace(sample, expressions=[unknown]))
    frames = [sample.frame(t).astype(np.float32) for t in range(sample.num_frames)]
    masks = [sample.mask(t) for t in range(sample.num_frames)]
    with pytest.raises(ShardFormatError, match="uint8"):
        VideoSample.from_arrays(sample.video_id, frames, masks, sample.objects, [], [])
    wrong_size = replace(sample, mask_data=[encode_mask(np.zeros((5, 5)))] * sample.num_frames)
    with pytest.raises(ShardFormatError, match="want"):
        encode_sample(wrong_size)
