"""Ref-YouTube-VOS and Ref-DAVIS17: JPEG folders, palette-PNG instance annotations, and the expressions
in ``meta_expressions/<split>/meta_expressions.json``.

Layout (``--root``; Ref-DAVIS17 as ReferFormer's preparation script lays it out)::

    <root>/meta_expressions/<split>/meta_expressions.json
        {"videos": {video: {"frames": [frame, ...],
                            "expressions": {exp_id: {"exp": text, "obj_id": "1"}}}}}
    <root>/<split>/JPEGImages/<video>/<frame>.jpg
    <root>/<split>/Annotations/<video>/<frame>.png    palette PNG, value = object id
    <root>/<split>/meta.json                          optional: {"videos": {video: {"objects":
                                                          {obj_id: {"category": name}}}}}

Frame names are the listed ones, not a contiguous range (Ref-YouTube-VOS keeps every fifth frame). Every
object of the annotations is kept with its own id (``source_id`` the same); an expression names one. The
category of ``meta.json``, when there, is the expression's stage-1 label. One id per pixel in the source, so
objects never overlap. A split without ``Annotations`` (Ref-YouTube-VOS ``valid``, published without masks)
becomes samples without ground truth, for ``desa2va submit``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lightning_desa2va.data.codec import MAX_OBJECT_ID
from lightning_desa2va.data.converters.common import (
    Skip,
    VideoResult,
    build_sample,
    read_frame,
    read_id_png,
    skip_of,
)
from lightning_desa2va.data.errors import ShardFormatError
from lightning_desa2va.data.schema import Expression, ObjectTrack

log = logging.getLogger(__name__)


@dataclass
class PaletteVideo:
    """One video's work: where its frames and annotations are, and its expressions."""

    video: str
    frame_dir: Path
    annotation_dir: Path | None
    """``None`` for a split published without masks."""
    frame_names: list[str]
    expressions: list[dict[str, Any]]
    """``{"id", "exp", "obj_id"}`` as in ``meta_expressions.json``."""
    categories: dict[str, str]
    expression_type: str
    max_size: int | None
    source: str


def tasks(
    root: Path, split: str, expression_type: str, max_size: int | None, source: str
) -> list[PaletteVideo]:
    """One task per video of the split."""
    meta_path = root / "meta_expressions" / split / "meta_expressions.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"no expressions file at {meta_path}")
    videos = json.loads(meta_path.read_text(encoding="utf-8")).get("videos")
    if not isinstance(videos, dict):
        raise ShardFormatError(f"{meta_path}: no 'videos' object")
    annotations = root / split / "Annotations"
    if not annotations.is_dir():
        log.warning("no %s: converting %s without ground truth (for desa2va submit)", annotations, split)
    objects_path = root / split / "meta.json"
    objects = json.loads(objects_path.read_text()).get("videos", {}) if objects_path.is_file() else {}
    return [
        PaletteVideo(
            video=video,
            frame_dir=root / split / "JPEGImages" / video,
            annotation_dir=annotations / video if annotations.is_dir() else None,
            frame_names=[str(name) for name in entry.get("frames", [])],
            expressions=[{"id": str(key), **value} for key, value in entry.get("expressions", {}).items()],
            categories={
                str(k): str(v.get("category", ""))
                for k, v in objects.get(video, {}).get("objects", {}).items()
            },
            expression_type=expression_type,
            max_size=max_size,
            source=source,
        )
        for video, entry in videos.items()
    ]


def convert_video(task: PaletteVideo) -> VideoResult:
    """The sample of one video: its frames, its annotation PNGs as they are, the expressions whose
    object appears in them."""
    try:
        if not task.frame_names:
            raise ShardFormatError(f"video {task.video!r}: no frames listed", "frame_count_mismatch")
        frames = [read_frame(task.frame_dir / f"{name}.jpg", task.max_size) for name in task.frame_names]
        if task.annotation_dir is None:
            return _without_ground_truth(task, frames)
        id_maps = [read_id_png(task.annotation_dir / f"{name}.png") for name in task.frame_names]
    except ShardFormatError as error:
        return VideoResult(None, [skip_of(error)])
    sizes = sorted({size for _, size in frames} | {id_map.shape for id_map in id_maps})
    if len(sizes) > 1:
        return VideoResult(
            None, [Skip("size_mismatch", f"video {task.video!r}: frames and masks of sizes {sizes}")]
        )
    present = sorted(set(np.unique(np.stack(id_maps)).tolist()) - {0})
    skips: list[Skip] = []
    expressions = []
    for entry in task.expressions:
        object_id = int(entry["obj_id"])
        if object_id not in present:
            where = f"video {task.video!r}, expression {entry['id']!r}"
            skips.append(Skip("object_without_mask", f"{where}: object {object_id} is in no annotation"))
            continue
        label = task.categories.get(str(object_id), "")
        expressions.append(
            Expression(str(entry["exp"]), [object_id], task.expression_type, label, source_id=entry["id"])
        )
    if not expressions:
        return VideoResult(None, skips)
    if present[-1] > MAX_OBJECT_ID:
        return VideoResult(None, [*skips, Skip("corrupt_png", f"video {task.video!r}: ids {present[-1]}")])
    tracks = [ObjectTrack(id=i, source_id=str(i)) for i in present]
    try:
        sample = build_sample(
            task.video, frames, id_maps, tracks, expressions, frame_names=task.frame_names, source=task.source
        )
    except ShardFormatError as error:
        return VideoResult(None, [*skips, skip_of(error)])
    return VideoResult(sample, skips)


def _without_ground_truth(task: PaletteVideo, frames: list[tuple[bytes, tuple[int, int]]]) -> VideoResult:
    """A video of a split published without masks: its frames and expressions, no objects."""
    expressions = [
        Expression(str(entry["exp"]), [], task.expression_type, "", source_id=entry["id"])
        for entry in task.expressions
    ]
    sample = build_sample(
        task.video, frames, None, [], expressions, frame_names=task.frame_names, source=task.source
    )
    return VideoResult(sample)
