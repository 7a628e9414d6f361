"""MeViS and ReVOS: JPEG folders, expressions in ``meta_expressions.json``, one COCO RLE per annotation
and frame in ``mask_dict.json``.

Layouts (``--root``)::

    mevis/<split>/JPEGImages/<video>/<frame>.jpg
    mevis/<split>/meta_expressions.json    {"videos": {video: {"frames": [frame, ...],
                                             "expressions": {exp_id: {"exp": text, "obj_id": [int, ...],
                                                                      "anno_id": [int, ...]}}}}}
    mevis/<split>/mask_dict.json           {anno_id: [RLE or null, one per frame]}

    ReVOS/JPEGImages/<video>/<frame>.jpg
    ReVOS/meta_expressions_<split>_.json   (as above; ReVOS adds "type_id", not used)
    ReVOS/mask_dict.json

An expression's objects are its ``obj_id`` (object ``k`` of a video is shard object ``k + 1``, ``0``
being background; ``source_id`` keeps ``k``), each drawn from the RLEs of its ``anno_id``. A ReVOS
expression without objects (nothing in the video matches it) is kept, with an empty target. Where objects
overlap, every object's own mask is kept too (the sample's ``rle.json``). A split without ``mask_dict.json``
(MeViS ``valid``, published without masks) becomes samples without ground truth, for ``desa2va submit``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from lightning_desa2va.data.codec import encode_rle
from lightning_desa2va.data.converters.common import (
    Skip,
    VideoResult,
    build_sample,
    paint,
    read_frame,
    skip_of,
)
from lightning_desa2va.data.errors import ShardFormatError
from lightning_desa2va.data.schema import Expression, ObjectTrack

log = logging.getLogger(__name__)

FRAMES_DIR = "JPEGImages"
FRAME_SUFFIX = ".jpg"


@dataclass
class RLEVideo:
    """One video's work: its frames, its expressions and the RLEs of the annotations they name."""

    video: str
    frame_dir: Path
    frame_names: list[str]
    expressions: list[dict[str, Any]]
    """``{"id", "exp", "obj_id", "anno_id"}`` as in ``meta_expressions.json``."""
    masks: dict[str, list[Any] | None] | None
    """anno_id → one RLE (or null) per frame; ``None`` when ``mask_dict.json`` lacks the annotation; the
    whole dict ``None`` for a split published without masks."""
    expression_type: str
    max_size: int | None
    source: str


def layout(fmt: str, root: Path, split: str) -> tuple[Path, Path, Path]:
    """(meta_expressions, mask_dict, frame folder) of a split of MeViS or ReVOS."""
    if fmt == "revos":
        return root / f"meta_expressions_{split}_.json", root / "mask_dict.json", root / FRAMES_DIR
    base = root / split
    return base / "meta_expressions.json", base / "mask_dict.json", base / FRAMES_DIR


def _load_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"no {what} at {path}")
    return json.loads(path.read_text(encoding="utf-8"))


def tasks(
    fmt: str, root: Path, split: str, expression_type: str, max_size: int | None, source: str
) -> list[RLEVideo]:
    """One task per video of the split."""
    meta_path, mask_path, frame_dir = layout(fmt, root, split)
    videos = _load_json(meta_path, "expressions file (meta_expressions)").get("videos")
    if not isinstance(videos, dict):
        raise ShardFormatError(f"{meta_path}: no 'videos' object")
    mask_dict = _load_json(mask_path, "masks file (mask_dict.json)") if mask_path.is_file() else None
    if mask_dict is None:
        log.warning("no %s: converting %s without ground truth (for desa2va submit)", mask_path, split)
    out = []
    for video, entry in videos.items():
        expressions = [{"id": str(key), **value} for key, value in entry.get("expressions", {}).items()]
        anno_ids = {str(anno) for expression in expressions for anno in expression.get("anno_id", [])}
        out.append(
            RLEVideo(
                video=video,
                frame_dir=frame_dir / video,
                frame_names=[str(name) for name in entry.get("frames", [])],
                expressions=expressions,
                masks=None if mask_dict is None else {anno: mask_dict.get(anno) for anno in sorted(anno_ids)},
                expression_type=expression_type,
                max_size=max_size,
                source=source,
            )
        )
    return out


def decode_rle(rle: dict[str, Any] | None, size: tuple[int, int], where: str) -> np.ndarray:
    """A COCO RLE (compressed or not; ``None`` = absent from the frame) as an HxW binary mask."""
    if rle is None:
        return np.zeros(size, dtype=np.uint8)
    height, width = (int(v) for v in rle["size"])
    if (height, width) != size:
        raise ShardFormatError(
            f"{where}: RLE of size {height}x{width}, frame {size[0]}x{size[1]}", "size_mismatch"
        )
    if isinstance(rle["counts"], list):
        rle = mask_utils.frPyObjects(rle, height, width)
    mask = mask_utils.decode(rle)
    return mask.any(axis=2).astype(np.uint8) if mask.ndim == 3 else mask


def _expression(task: RLEVideo, entry: dict[str, Any], objects: dict[int, str]) -> Expression | Skip:
    """The expression of one ``meta_expressions`` entry, or why it is left out; records its objects."""
    where = f"video {task.video!r}, expression {entry['id']!r}"
    obj_ids, anno_ids = [int(o) for o in entry.get("obj_id", [])], [str(a) for a in entry.get("anno_id", [])]
    paired = len(obj_ids) == len(anno_ids)
    if not paired or any(objects.get(o, a) != a for o, a in zip(obj_ids, anno_ids, strict=True)):
        return Skip("bad_meta", f"{where}: obj_id {obj_ids} and anno_id {anno_ids} do not pair up")
    missing = [a for a in anno_ids if task.masks.get(a) is None]
    if missing:
        return Skip("missing_mask", f"{where}: annotations {missing} are not in mask_dict.json")
    counts = {a: len(task.masks[a] or []) for a in anno_ids}
    if any(count != len(task.frame_names) for count in counts.values()):
        return Skip("frame_count_mismatch", f"{where}: {counts} masks for {len(task.frame_names)} frames")
    empty = [a for a in anno_ids if all(rle is None for rle in task.masks[a] or [])]
    if empty:
        return Skip("object_without_mask", f"{where}: annotations {empty} have no mask in any frame")
    objects.update(zip(obj_ids, anno_ids, strict=True))
    return Expression(
        text=str(entry["exp"]),
        object_ids=[o + 1 for o in obj_ids],
        type=task.expression_type,
        label="",
        source_id=entry["id"],
    )


def convert_video(task: RLEVideo) -> VideoResult:
    """The sample of one MeViS / ReVOS video (frames read, RLEs painted into instance maps)."""
    if task.masks is None:
        return _without_ground_truth(task)
    skips: list[Skip] = []
    objects: dict[int, str] = {}
    expressions = []
    for entry in task.expressions:
        result = _expression(task, entry, objects)
        (skips if isinstance(result, Skip) else expressions).append(result)
    if not expressions:
        return VideoResult(None, skips)
    try:
        frames = [
            read_frame(task.frame_dir / f"{name}{FRAME_SUFFIX}", task.max_size) for name in task.frame_names
        ]
        if not frames:
            raise ShardFormatError(f"video {task.video!r}: no frames listed", "frame_count_mismatch")
        size = frames[0][1]
        per_object = {o + 1: task.masks[a] or [] for o, a in objects.items()}  # checked by _expression
        id_maps, overlaps = [], 0
        own: dict[int, list[dict[str, Any] | None]] = {i: [] for i in per_object}
        for t, name in enumerate(task.frame_names):
            where = f"video {task.video!r}, frame {name!r}"
            masks = {i: decode_rle(rles[t], size, where) for i, rles in per_object.items()}
            id_map, overlap = paint(masks, size)
            id_maps.append(id_map)
            overlaps += overlap
            for i, mask in masks.items():
                own[i].append(encode_rle(mask))
        tracks = [ObjectTrack(id=o + 1, source_id=str(o)) for o in sorted(objects)]
        sample = build_sample(
            task.video,
            frames,
            id_maps,
            tracks,
            expressions,
            frame_names=task.frame_names,
            source=task.source,
            object_rles=own if overlaps else {},
        )
    except ShardFormatError as error:
        return VideoResult(None, [*skips, skip_of(error)])
    return VideoResult(sample, skips, overlaps)


def _without_ground_truth(task: RLEVideo) -> VideoResult:
    """A video of a split published without masks: its frames and expressions, no objects."""
    expressions = [
        Expression(str(entry["exp"]), [], task.expression_type, "", source_id=entry["id"])
        for entry in task.expressions
    ]
    try:
        frames = [
            read_frame(task.frame_dir / f"{name}{FRAME_SUFFIX}", task.max_size) for name in task.frame_names
        ]
        if not frames:
            raise ShardFormatError(f"video {task.video!r}: no frames listed", "frame_count_mismatch")
        sample = build_sample(
            task.video, frames, None, [], expressions, frame_names=task.frame_names, source=task.source
        )
    except ShardFormatError as error:
        return VideoResult(None, [skip_of(error)])
    return VideoResult(sample)
