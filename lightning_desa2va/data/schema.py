"""The one versioned sample layout of every shard this project writes or reads (schema version 3).

A sample is one video (an image is a one-frame video) with everything needed to train and evaluate
referring video segmentation on it. In a WebDataset tar it is the group of members sharing one key, the
video id with every character other than letters, digits, ``-`` and ``_`` replaced by ``_`` (see
:func:`sample_key`; the true id is in the metadata):

``<key>.meta.json``
    UTF-8 JSON object::

        {
          "schema_version": 3,
          "video_id": "train-000042", "source": "synthetic",
          "num_frames": 8, "height": 128, "width": 128,
          "original_height": 128, "original_width": 128,
          "frame_names": ["00000", "00001", ...],
          "objects":     [{"id": 1, "source_id": "", "colour": "red", "shape": "circle",
                           "motion": "left", "speed": "fast"}],
          "expressions": [{"text": "the red circle", "object_ids": [1], "type": "static",
                           "label": "red circle", "attributes": {"colour": "red", "shape": "circle"},
                           "source_id": ""}],
          "qa":          [{"question": "What shape is the red object?", "answer": "circle"}],
          "ground_truth": true, "object_rles": false
        }

    ``height`` × ``width`` is the size of the stored frames and masks, ``original_height`` ×
    ``original_width`` the source's (they differ when a converter resized the frames, ``--max-size``).
    ``type`` is one of :data:`EXPRESSION_TYPES`: ``static`` (appearance only), ``motion`` (motion only) or
    ``mixed`` (both); real datasets get their dataset's type (docs/data.md). ``label`` is a short
    category-style text for the target(s), the ground truth of stage-1 text pre-training (``""``: use the
    expression). ``attributes`` is the structured referent (a subset of ``colour``, ``shape``, ``motion``)
    where the data has one, else empty; object attributes are ``""`` when unknown, as for real datasets.
    ``source_id`` is the dataset's own id of an object or expression (MeViS ``obj_id``, COCO ``ann_id``,
    an expression's key), ``frame_names`` its frame names, so predictions can be written in its layout.
    ``ground_truth`` is false for a split published without masks (MeViS ``valid``): no mask members, no
    objects, no target ids, for inference only. ``object_rles``: the sample has an ``rle.json`` member.
``<key>.frame_000.jpg`` ... ``frame_{T-1:03d}.jpg``
    RGB frames at the stored size, JPEG.
``<key>.mask_000.png`` ... ``mask_{T-1:03d}.png``
    16-bit greyscale PNG (mode ``I;16``) instance-id maps at the stored size, lossless: ``0`` is
    background, an object's visible pixels hold its id (1..65535). One id per pixel, so occlusion is
    represented; where a source's masks overlap, the converter's rule decides (docs/data.md).
``<key>.original_mask_000.png`` ...
    The same maps at the original size, present only when the stored size differs from it, so scores can
    be computed at the original resolution while training decodes the small maps.
``<key>.rle.json``
    Only where objects overlap in the source (the id maps give a pixel to one of them): every object's own
    mask per frame at the original size, compressed COCO RLE (``null``: absent), ``{"<id>": [rle, ...]}``.
    An expression's ground truth is the union of its objects' masks (:meth:`VideoSample.target_mask`).

Version 2 samples read as version 3 ones with ground truth and no overlap; ``check_schema_version`` refuses
a version-2 data set whose manifest counted overlapping pixels (its ground truth is not the published one).

Frames and masks stay encoded in :class:`VideoSample`, decoded one at a time when asked for (a training
clip of T frames decodes T frames). Bump :data:`SCHEMA_VERSION` whenever this layout changes; readers refuse
other versions (:class:`SchemaVersionError`). Encodings: :mod:`~lightning_desa2va.data.codec`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from lightning_desa2va.data.codec import (
    MAX_OBJECT_ID,
    RLE_KEY,
    check_object_rles,
    decode_frame,
    decode_mask,
    decode_union,
    encode_jpeg,
    encode_mask,
    image_size,
    object_rles_member,
    sample_members,
)
from lightning_desa2va.data.errors import SchemaVersionError, ShardFormatError

SCHEMA_VERSION = 3
"""Version written into every sample's ``meta.json`` and manifest."""
READ_VERSIONS = (2, 3)
"""Versions this reader reads (version 2 has no per-object masks: see the module docstring)."""

EXPRESSION_TYPES = ("static", "motion", "mixed")
"""Expression types, the axis along which per-type J&F is reported."""

META_KEY = "meta.json"
FRAME_KEY = "frame_{:03d}.jpg"
MASK_KEY = "mask_{:03d}.png"
ORIGINAL_MASK_KEY = "original_mask_{:03d}.png"
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


@dataclass
class ObjectTrack:
    """One annotated object of a video; attribute words are ``""`` when unknown (real datasets)."""

    id: int
    colour: str = ""
    shape: str = ""
    motion: str = ""
    speed: str = ""
    source_id: str = ""


@dataclass
class Expression:
    """A referring expression and the object(s) it picks out (none for a "no such object" expression)."""

    text: str
    object_ids: list[int]
    type: str
    label: str
    attributes: dict[str, str] = field(default_factory=dict)
    source_id: str = ""


@dataclass
class QAPair:
    """A question about the clip with its unambiguous short answer."""

    question: str
    answer: str


def sample_key(video_id: str) -> str:
    """The WebDataset key of a video: no dots (they start the extension) and no path separators."""
    return _KEY_UNSAFE.sub("_", video_id)


@dataclass
class VideoSample:
    """One video: annotations decoded, frames (JPEG) and masks (PNG) kept as bytes until asked for."""

    video_id: str
    objects: list[ObjectTrack]
    expressions: list[Expression]
    qa: list[QAPair]
    frame_data: list[bytes]
    mask_data: list[bytes]
    size: tuple[int, int]
    """(height, width) of the stored frames and masks."""
    original_size: tuple[int, int] | None = None
    """(height, width) of the source; ``None``: the stored size."""
    original_mask_data: list[bytes] = field(default_factory=list)
    """Masks at the original size; empty when it is the stored size."""
    frame_names: list[str] = field(default_factory=list)
    source: str = ""
    ground_truth: bool = True
    """False for a split published without masks: no masks, objects or target object ids."""
    object_rles: dict[int, list[dict[str, Any] | None]] = field(default_factory=dict)
    """Each object's own mask per frame (COCO RLE, original size) where objects overlap, else empty."""
    origin: str = ""
    """Where the sample was read from (shard and key), for error messages; not stored."""

    def __post_init__(self) -> None:
        self.size = (int(self.size[0]), int(self.size[1]))
        original = self.size if self.original_size is None else self.original_size
        self.original_size = (int(original[0]), int(original[1]))
        if not self.frame_names:
            self.frame_names = [f"{t:05d}" for t in range(len(self.frame_data))]

    @classmethod
    def from_arrays(
        cls,
        video_id: str,
        frames: Sequence[np.ndarray],
        masks: Sequence[np.ndarray],
        objects: list[ObjectTrack],
        expressions: list[Expression],
        qa: list[QAPair],
        **extra: Any,
    ) -> VideoSample:
        """Encode decoded frames (HxWx3 uint8) and instance-id masks (HxW) into a sample."""
        where = f"sample {video_id!r}"
        if not frames or len(frames) != len(masks):
            raise ShardFormatError(f"{where}: {len(frames)} frames but {len(masks)} masks", "missing_mask")
        height, width = frames[0].shape[:2]
        for t, (frame, mask) in enumerate(zip(frames, masks, strict=True)):
            if frame.dtype != np.uint8 or frame.shape != (height, width, 3):
                raise ShardFormatError(f"{where}: frame {t} is {frame.dtype} {frame.shape}, want uint8 HxWx3")
            if not np.issubdtype(mask.dtype, np.integer) or mask.shape != (height, width):
                raise ShardFormatError(f"{where}: mask {t} is {mask.dtype} {mask.shape}, want integer HxW")
        return cls(
            video_id,
            objects,
            expressions,
            qa,
            frame_data=[encode_jpeg(frame) for frame in frames],
            mask_data=[encode_mask(mask) for mask in masks],
            size=(height, width),
            **extra,
        )

    @property
    def num_frames(self) -> int:
        """Number of frames (equal to the number of masks)."""
        return len(self.frame_data)

    @property
    def resized(self) -> bool:
        """Whether the stored frames are smaller than the source's (original masks stored apart)."""
        return self.size != self.original_size

    def frame(self, t: int, min_size: int = 0) -> np.ndarray:
        """Frame ``t`` as HxWx3 uint8 RGB; with ``min_size``, decoded at the smallest 1/2^k JPEG scale
        whose sides stay >= ``min_size`` (see :func:`~lightning_desa2va.data.codec.decode_frame`)."""
        return decode_frame(self.frame_data[t], self.size, min_size, self._where(), FRAME_KEY.format(t))

    def mask(self, t: int) -> np.ndarray:
        """Instance ids of frame ``t`` at the stored size, HxW uint16."""
        self._require_ground_truth()
        return decode_mask(self.mask_data[t], self.size, self._where(), MASK_KEY.format(t))

    def target_mask(self, t: int, object_ids: Sequence[int], original: bool = False) -> np.ndarray:
        """Where any of ``object_ids`` is on frame ``t``, HxW bool at the stored size (or the original):
        the union of the objects' own masks, overlaps included, as the benchmarks score it."""
        if not self.object_rles:
            return np.isin(self.original_mask(t) if original else self.mask(t), object_ids)
        assert self.original_size is not None
        rles = [self.object_rles[object_id][t] for object_id in object_ids]
        return decode_union(rles, self.original_size, self.original_size if original else self.size)

    def _require_ground_truth(self) -> None:
        if not self.ground_truth:
            message = "no ground truth (a split published without masks): infer on it, do not train or score"
            raise ShardFormatError(f"{self._where()} has {message}", "missing_mask")

    def original_mask(self, t: int) -> np.ndarray:
        """Instance ids of frame ``t`` at the original size, H0xW0 uint16."""
        if not self.resized:
            return self.mask(t)
        self._require_ground_truth()
        assert self.original_size is not None
        key = ORIGINAL_MASK_KEY.format(t)
        return decode_mask(self.original_mask_data[t], self.original_size, self._where(), key)

    def _where(self) -> str:
        return self.origin or f"sample {self.video_id!r}"

    def meta(self) -> dict[str, Any]:
        """The JSON-able metadata of this sample, exactly as stored in ``meta.json``."""
        assert self.original_size is not None
        return {
            "schema_version": SCHEMA_VERSION,
            "video_id": self.video_id,
            "source": self.source,
            "num_frames": self.num_frames,
            "height": self.size[0],
            "width": self.size[1],
            "original_height": self.original_size[0],
            "original_width": self.original_size[1],
            "frame_names": list(self.frame_names),
            "objects": [asdict(o) for o in self.objects],
            "expressions": [asdict(e) for e in self.expressions],
            "qa": [asdict(q) for q in self.qa],
            "ground_truth": self.ground_truth,
            "object_rles": bool(self.object_rles),
        }


def _check_annotations(where: str, objects: list[ObjectTrack], expressions: list[Expression]) -> None:
    ids = [o.id for o in objects]
    if len(set(ids)) != len(ids) or any(not 0 < i <= MAX_OBJECT_ID for i in ids):
        raise ShardFormatError(f"{where}: object ids must be distinct, in 1..{MAX_OBJECT_ID}, got {ids}")
    for expr in expressions:
        if expr.type not in EXPRESSION_TYPES:
            raise ShardFormatError(f"{where}: expression {expr.text!r} has unknown type {expr.type!r}")
        missing = set(expr.object_ids) - set(ids)
        if missing:
            raise ShardFormatError(
                f"{where}: expression {expr.text!r} names objects {sorted(missing)} that have no mask",
                "object_without_mask",
            )


def _check_sample(sample: VideoSample) -> None:
    """Refuse to write samples that readers would reject, so errors surface at the writer."""
    where = f"sample {sample.video_id!r}"
    count = sample.num_frames
    masks = count if sample.ground_truth else 0
    if not count or len(sample.mask_data) != masks or len(sample.frame_names) != count:
        raise ShardFormatError(
            f"{where}: {count} frames, {len(sample.mask_data)} masks, {len(sample.frame_names)} frame names",
            "frame_count_mismatch",
        )
    resized = sample.resized and sample.ground_truth
    if resized != bool(sample.original_mask_data) or len(sample.original_mask_data) not in (0, count):
        raise ShardFormatError(
            f"{where}: {len(sample.original_mask_data)} original-size masks for {count} frames stored at "
            f"{sample.size}, original {sample.original_size}",
            "missing_mask",
        )
    members = [(sample.frame_data, sample.size), (sample.mask_data, sample.size)]
    members.append((sample.original_mask_data, sample.original_size))
    for data, size in members:
        for t, item in enumerate(data):
            if image_size(item) != size:
                raise ShardFormatError(
                    f"{where}: member {t} is {image_size(item)}, want {size}", "size_mismatch"
                )
    _check_annotations(where, sample.objects, sample.expressions)
    _check_rles(where, sample)
    if not sample.ground_truth and (sample.objects or any(e.object_ids for e in sample.expressions)):
        raise ShardFormatError(f"{where}: objects or target object ids without ground truth")


def _check_rles(where: str, sample: VideoSample) -> None:
    ids = [o.id for o in sample.objects]
    check_object_rles(where, sample.object_rles, ids, sample.num_frames, sample.original_size)


def encode_sample(sample: VideoSample) -> dict[str, Any]:
    """A sample as a WebDataset sample dict (bytes values) following the module's layout."""
    _check_sample(sample)
    raw: dict[str, Any] = {
        "__key__": sample_key(sample.video_id),
        META_KEY: json.dumps(sample.meta(), sort_keys=True).encode("utf-8"),
    }
    for t in range(sample.num_frames):
        raw[FRAME_KEY.format(t)] = sample.frame_data[t]
        if sample.mask_data:
            raw[MASK_KEY.format(t)] = sample.mask_data[t]
        if sample.original_mask_data:
            raw[ORIGINAL_MASK_KEY.format(t)] = sample.original_mask_data[t]
    if sample.object_rles:
        rles = {str(object_id): rles for object_id, rles in sorted(sample.object_rles.items())}
        raw[RLE_KEY] = json.dumps(rles, sort_keys=True).encode("utf-8")
    return raw


def _where(raw: dict[str, Any]) -> str:
    """Name the input of a raw sample for error messages."""
    return f"shard {raw.get('__url__', '<unknown shard>')!s}, sample {raw.get('__key__', '<no key>')!r}"


def decode_sample(raw: dict[str, Any]) -> VideoSample:
    """Parse and check a raw WebDataset sample, keeping its images encoded; raise
    :class:`ShardFormatError` naming shard, key and what is wrong (:class:`SchemaVersionError` for
    another schema version)."""
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
    if version not in READ_VERSIONS:
        raise SchemaVersionError(
            f"{where}: schema_version {version!r}, this reader reads version {SCHEMA_VERSION} (and 2); "
            "rewrite the shards with this version (desa2va shards synthetic / desa2va shards build)"
        )
    try:
        num_frames = int(meta["num_frames"])
        size = (int(meta["height"]), int(meta["width"]))
        original_size = (int(meta["original_height"]), int(meta["original_width"]))
        objects = [ObjectTrack(**o) for o in meta["objects"]]
        expressions = [Expression(**e) for e in meta["expressions"]]
        qa = [QAPair(**q) for q in meta["qa"]]
        frame_names = [str(name) for name in meta["frame_names"]]
        video_id, source = str(meta["video_id"]), str(meta["source"])
        ground_truth, has_rles = bool(meta.get("ground_truth", True)), bool(meta.get("object_rles", False))
        object_rles = object_rles_member(raw, where) if has_rles else {}
    except (KeyError, TypeError, ValueError) as exn:
        raise ShardFormatError(f"{where}: malformed {META_KEY}: {exn!r}") from exn
    if num_frames < 1 or len(frame_names) != num_frames:
        raise ShardFormatError(
            f"{where}: num_frames is {num_frames} with {len(frame_names)} frame names", "frame_count_mismatch"
        )
    _check_annotations(where, objects, expressions)
    members = sample_members(raw, where, num_frames, size != original_size and ground_truth, ground_truth)
    sample = VideoSample(
        video_id,
        objects,
        expressions,
        qa,
        frame_data=members["frame"],
        mask_data=members.get("mask", []),
        size=size,
        original_size=original_size,
        original_mask_data=members.get("original_mask", []),
        frame_names=frame_names,
        source=source,
        ground_truth=ground_truth,
        object_rles=object_rles,
        origin=where,
    )
    try:
        _check_rles(where, sample)
    except (KeyError, TypeError) as exn:
        raise ShardFormatError(f"{where}: malformed {RLE_KEY}: {exn!r}") from exn
    return sample
