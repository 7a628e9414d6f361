"""The one versioned sample layout of every shard this project writes or reads.

A sample is one video (or one chunk of a video) with everything needed to train and evaluate
referring video segmentation on it. In a WebDataset tar a sample is the group of members sharing the
key ``<video_id>``:

``<video_id>.meta.json``
    UTF-8 JSON object::

        {
          "schema_version": 1,
          "video_id": "train-000042",
          "num_frames": 8, "height": 128, "width": 128,
          "objects":     [{"id": 1, "colour": "red", "shape": "circle", "motion": "left", "speed": "fast"}],
          "expressions": [{"text": "the red circle", "object_ids": [1], "type": "static",
                           "label": "red circle", "attributes": {"colour": "red", "shape": "circle"}}],
          "qa":          [{"question": "What shape is the red object?", "answer": "circle"}]
        }

    ``type`` is one of :data:`EXPRESSION_TYPES`: ``static`` (appearance only), ``motion`` (motion only) or
    ``mixed`` (both). ``label`` is a short category-style text for the target(s), the ground-truth text of
    stage-1 text pre-training. ``attributes`` is the structured referent (a subset of ``colour``,
    ``shape``, ``motion``) where the data has one, else empty. Object attributes may be ``""`` (unknown),
    as they are for real datasets.
``<video_id>.frame_000.jpg`` ... ``frame_{T-1:03d}.jpg``
    RGB frames, JPEG (quality :data:`JPEG_QUALITY`, 4:4:4 chroma so small shapes keep their colour).
``<video_id>.mask_000.png`` ... ``mask_{T-1:03d}.png``
    8-bit greyscale (mode ``L``) instance-id maps, lossless: ``0`` is background, an object's pixels hold
    its id. Only visible pixels are labelled, so occlusion is represented; ids are therefore 1..255.

Bump :data:`SCHEMA_VERSION` whenever this layout changes; readers refuse other versions.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from PIL import Image

SCHEMA_VERSION = 1
"""Version written into every sample's ``meta.json``; :func:`decode_sample` rejects any other."""

EXPRESSION_TYPES = ("static", "motion", "mixed")
"""Expression types, the axis along which per-type J&F is reported."""

JPEG_QUALITY = 90
"""JPEG quality of the frames: high enough that flat synthetic colours survive the round trip."""

JPEG_SUBSAMPLING = 0
"""PIL ``subsampling`` value 0 = 4:4:4, keeps colour edges of small objects sharp."""

MAX_OBJECT_ID = 255
"""Largest object id an 8-bit mask PNG can hold."""

META_KEY = "meta.json"
FRAME_KEY = "frame_{:03d}.jpg"
MASK_KEY = "mask_{:03d}.png"


class ShardFormatError(ValueError):
    """A shard or one of its samples does not follow this schema (the message names shard and key)."""


@dataclass
class ObjectTrack:
    """One annotated object of a video; attribute words are ``""`` when unknown (real datasets)."""

    id: int
    colour: str = ""
    shape: str = ""
    motion: str = ""
    speed: str = ""


@dataclass
class Expression:
    """A referring expression and the object(s) it picks out."""

    text: str
    object_ids: list[int]
    type: str
    label: str
    attributes: dict[str, str] = field(default_factory=dict)


@dataclass
class QAPair:
    """A question about the clip with its unambiguous short answer."""

    question: str
    answer: str


@dataclass
class VideoSample:
    """A decoded sample: frames (HxWx3 uint8 RGB), masks (HxW uint8 instance ids) and annotations."""

    video_id: str
    frames: list[np.ndarray]
    masks: list[np.ndarray]
    objects: list[ObjectTrack]
    expressions: list[Expression]
    qa: list[QAPair]

    @property
    def num_frames(self) -> int:
        """Number of frames (equal to the number of masks)."""
        return len(self.frames)

    def meta(self) -> dict[str, Any]:
        """The JSON-able metadata of this sample, exactly as stored in ``meta.json``."""
        height, width = self.frames[0].shape[:2] if self.frames else (0, 0)
        return {
            "schema_version": SCHEMA_VERSION,
            "video_id": self.video_id,
            "num_frames": self.num_frames,
            "height": int(height),
            "width": int(width),
            "objects": [asdict(o) for o in self.objects],
            "expressions": [asdict(e) for e in self.expressions],
            "qa": [asdict(q) for q in self.qa],
        }


def _where(raw: dict[str, Any]) -> str:
    """Name the input of a raw sample for error messages."""
    return f"shard {raw.get('__url__', '<unknown shard>')!s}, sample {raw.get('__key__', '<no key>')!r}"


def _check_sample(sample: VideoSample) -> None:
    """Refuse to write samples that readers would reject, so errors surface at the writer."""
    where = f"sample {sample.video_id!r}"
    if not sample.frames or len(sample.frames) != len(sample.masks):
        raise ShardFormatError(f"{where}: {len(sample.frames)} frames but {len(sample.masks)} masks")
    height, width = sample.frames[0].shape[:2]
    for t, (frame, mask) in enumerate(zip(sample.frames, sample.masks, strict=True)):
        if frame.dtype != np.uint8 or frame.shape != (height, width, 3):
            raise ShardFormatError(f"{where}: frame {t} is {frame.dtype} {frame.shape}, want uint8 HxWx3")
        if mask.dtype != np.uint8 or mask.shape != (height, width):
            raise ShardFormatError(f"{where}: mask {t} is {mask.dtype} {mask.shape}, want uint8 HxW")
    ids = {o.id for o in sample.objects}
    if any(not 0 < i <= MAX_OBJECT_ID for i in ids):
        raise ShardFormatError(f"{where}: object ids must lie in 1..{MAX_OBJECT_ID}, got {sorted(ids)}")
    for expr in sample.expressions:
        if expr.type not in EXPRESSION_TYPES:
            raise ShardFormatError(f"{where}: expression {expr.text!r} has unknown type {expr.type!r}")
        missing = set(expr.object_ids) - ids
        if missing:
            raise ShardFormatError(
                f"{where}: expression {expr.text!r} names unknown objects {sorted(missing)}"
            )


def encode_sample(sample: VideoSample, jpeg_quality: int = JPEG_QUALITY) -> dict[str, Any]:
    """Encode a sample as a WebDataset sample dict (bytes values) following the module's layout."""
    _check_sample(sample)
    raw: dict[str, Any] = {
        "__key__": sample.video_id,
        META_KEY: json.dumps(sample.meta(), sort_keys=True).encode("utf-8"),
    }
    for t, (frame, mask) in enumerate(zip(sample.frames, sample.masks, strict=True)):
        buf = io.BytesIO()
        Image.fromarray(frame).save(buf, format="JPEG", quality=jpeg_quality, subsampling=JPEG_SUBSAMPLING)
        raw[FRAME_KEY.format(t)] = buf.getvalue()
        buf = io.BytesIO()
        Image.fromarray(mask).save(buf, format="PNG")
        raw[MASK_KEY.format(t)] = buf.getvalue()
    return raw


def _decode_image(raw: dict[str, Any], key: str, mode: str) -> np.ndarray:
    """Decode one image member, naming it when it is missing or unreadable."""
    if key not in raw:
        raise ShardFormatError(f"{_where(raw)}: missing member {key!r}")
    try:
        with Image.open(io.BytesIO(raw[key])) as img:
            return np.asarray(img.convert(mode), dtype=np.uint8).copy()
    except Exception as exn:  # PIL raises several unrelated types for corrupt data
        raise ShardFormatError(f"{_where(raw)}: cannot decode {key!r}: {exn}") from exn


def decode_sample(raw: dict[str, Any]) -> VideoSample:
    """Decode and validate a raw WebDataset sample; raise :class:`ShardFormatError` naming what is wrong."""
    where = _where(raw)
    if META_KEY not in raw:
        raise ShardFormatError(f"{where}: missing member {META_KEY!r} (members: {sorted(raw)})")
    try:
        meta = json.loads(raw[META_KEY])
    except (UnicodeDecodeError, json.JSONDecodeError) as exn:
        raise ShardFormatError(f"{where}: {META_KEY} is not valid JSON: {exn}") from exn
    if not isinstance(meta, dict):
        raise ShardFormatError(f"{where}: {META_KEY} is not a JSON object")
    version = meta.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ShardFormatError(
            f"{where}: schema_version {version!r}, this reader understands {SCHEMA_VERSION}"
        )
    try:
        num_frames, height, width = int(meta["num_frames"]), int(meta["height"]), int(meta["width"])
        objects = [ObjectTrack(**o) for o in meta["objects"]]
        expressions = [Expression(**e) for e in meta["expressions"]]
        qa = [QAPair(**q) for q in meta["qa"]]
        video_id = str(meta["video_id"])
    except (KeyError, TypeError, ValueError) as exn:
        raise ShardFormatError(f"{where}: malformed {META_KEY}: {exn!r}") from exn
    if num_frames < 1:
        raise ShardFormatError(f"{where}: num_frames is {num_frames}")

    frames = [_decode_image(raw, FRAME_KEY.format(t), "RGB") for t in range(num_frames)]
    masks = [_decode_image(raw, MASK_KEY.format(t), "L") for t in range(num_frames)]
    for t, (frame, mask) in enumerate(zip(frames, masks, strict=True)):
        if frame.shape[:2] != (height, width) or mask.shape != (height, width):
            raise ShardFormatError(
                f"{where}: frame/mask {t} are {frame.shape[:2]}/{mask.shape}, meta says {(height, width)}"
            )
    ids = {o.id for o in objects}
    for expr in expressions:
        missing = set(expr.object_ids) - ids
        if missing:
            raise ShardFormatError(
                f"{where}: expression {expr.text!r} names unknown objects {sorted(missing)}"
            )
        if expr.type not in EXPRESSION_TYPES:
            raise ShardFormatError(f"{where}: expression {expr.text!r} has unknown type {expr.type!r}")
    return VideoSample(video_id, frames, masks, objects, expressions, qa)
