"""What every converter shares: reading source frames, painting instance maps (and keeping each object's
own mask where objects overlap), resizing, running the per-video work on a process pool, and writing the
results through the one shard writer with a count.

A converter turns its dataset's annotations into picklable per-video tasks and a function that turns one
task into a :class:`VideoResult` (the sample, or nothing, plus what it skipped and why). Unreadable
source files are skipped like bad shard samples: counted by reason (:data:`SKIP_REASONS`) and logged
naming the file.
"""

from __future__ import annotations

import io
import logging
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from PIL import Image
from tqdm import tqdm

from lightning_desa2va.data.codec import centre_indices, encode_jpeg, encode_mask, image_size
from lightning_desa2va.data.errors import SKIP_REASONS, ShardFormatError
from lightning_desa2va.data.schema import Expression, ObjectTrack, VideoSample
from lightning_desa2va.data.shards import SplitStats, update_manifest, write_split

log = logging.getLogger(__name__)

Task = TypeVar("Task")

TASKS_AHEAD_PER_WORKER = 4
"""Tasks handed to the pool before their results are taken, per worker: keeps workers busy without
holding a whole dataset's annotations twice in memory."""

MASK_MODES = ("P", "L", "I;16", "I")
"""PIL modes of a source annotation PNG whose values are object ids (palette indices for ``P``)."""


@dataclass
class Skip:
    """One source item left out, and why."""

    reason: str
    message: str


@dataclass
class VideoResult:
    """What converting one video gave: its sample (``None`` when nothing of it is usable) and its skips."""

    sample: VideoSample | None
    skips: list[Skip] = field(default_factory=list)
    overlapping_pixels: int = 0


@dataclass
class ConversionReport:
    """The final count of a conversion."""

    format: str
    split: str
    """The split written (``{split}-%06d.tar``)."""
    out: Path
    source_split: str = ""
    """The dataset's split it was converted from."""
    videos: int = 0
    expressions: int = 0
    frames: int = 0
    skipped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SKIP_REASONS, 0))
    overlapping_pixels: int = 0
    """Pixels covered by more than one source mask: the id maps give them to the smaller object, the
    samples' ``rle.json`` keeps each object's own mask."""
    ground_truth: bool = True
    """Whether the split has masks (false: published without them, converted for inference only)."""
    shards: list[Path] = field(default_factory=list)


def skip_of(error: ShardFormatError) -> Skip:
    """A data error as a skip record."""
    return Skip(error.reason, str(error))


def stored_size(size: tuple[int, int], max_size: int | None) -> tuple[int, int]:
    """(height, width) after scaling the longer side down to ``max_size`` (never up)."""
    height, width = size
    if not max_size or max(height, width) <= max_size:
        return size
    scale = max_size / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def read_frame(path: Path, max_size: int | None) -> tuple[bytes, tuple[int, int]]:
    """A source frame as JPEG bytes at the stored size, and its original (height, width).

    The source's own JPEG bytes are kept when the frame is not resized (no second compression); the
    whole image is decoded once either way, so a corrupt file is found here, not in training.
    """
    if not path.is_file():
        raise ShardFormatError(f"{path}: no such frame", "missing_frame")
    data = path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            original = (img.height, img.width)
            target = stored_size(original, max_size)
            if target == original and img.format == "JPEG":
                return data, original
            rgb = img.convert("RGB")
            if target != original:
                rgb = rgb.resize((target[1], target[0]), Image.Resampling.LANCZOS)
            return encode_jpeg(np.asarray(rgb)), original
    except Exception as exn:  # PIL raises several unrelated types for corrupt data
        raise ShardFormatError(f"{path}: cannot decode: {exn}", "corrupt_jpeg") from exn


def read_id_png(path: Path) -> np.ndarray:
    """A source annotation PNG (palette or greyscale) as its object-id values, HxW."""
    if not path.is_file():
        raise ShardFormatError(f"{path}: no such annotation", "missing_mask")
    try:
        with Image.open(path) as img:
            if img.mode not in MASK_MODES:
                raise ShardFormatError(
                    f"{path}: a {img.mode} image, want palette or greyscale ids", "corrupt_png"
                )
            return np.asarray(img).astype(np.int64)
    except ShardFormatError:
        raise
    except Exception as exn:  # PIL raises several unrelated types for corrupt data
        raise ShardFormatError(f"{path}: cannot decode: {exn}", "corrupt_png") from exn


def paint(masks: dict[int, np.ndarray], size: tuple[int, int]) -> tuple[np.ndarray, int]:
    """One frame's instance-id map from per-object binary masks, and how many pixels were claimed by
    more than one object: those go to the smaller object (drawn last), which is usually in front."""
    ids = np.zeros(size, dtype=np.int64)
    coverage = np.zeros(size, dtype=np.int64)
    for object_id, mask in sorted(masks.items(), key=lambda item: (-int(item[1].sum()), item[0])):
        ids[mask.astype(bool)] = object_id
        coverage += mask.astype(bool)
    return ids, int((coverage > 1).sum())


def build_sample(
    video_id: str,
    frames: list[tuple[bytes, tuple[int, int]]],
    id_maps: list[np.ndarray] | None,
    objects: list[ObjectTrack],
    expressions: list[Expression],
    **extra: Any,
) -> VideoSample:
    """A sample from frames read by :func:`read_frame` and instance maps at the original size (``None``:
    a split without ground truth); with resized frames, the maps are stored at both sizes (nearest pixel
    centres for the small ones). ``extra`` may carry ``object_rles`` where objects overlap."""
    original = frames[0][1]
    for (_, size), id_map in zip(frames, id_maps or [None] * len(frames), strict=True):
        shape = original if id_map is None else id_map.shape
        if size != original or shape != original:
            raise ShardFormatError(
                f"video {video_id!r}: a frame of {size} and mask of {shape}, first frame {original}",
                "size_mismatch",
            )
    size = image_size(frames[0][0])
    rows, cols = centre_indices(original[0], size[0]), centre_indices(original[1], size[1])
    resized = size != original
    maps = id_maps or []
    return VideoSample(
        video_id,
        objects,
        expressions,
        [],
        frame_data=[data for data, _ in frames],
        mask_data=[encode_mask(m[rows[:, None], cols[None, :]] if resized else m) for m in maps],
        size=size,
        original_size=original,
        original_mask_data=[encode_mask(m) for m in maps] if resized else [],
        ground_truth=id_maps is not None,
        **extra,
    )


def _ordered(fn: Callable[[Task], VideoResult], tasks: Iterable[Task], workers: int) -> Iterator[VideoResult]:
    """``fn`` over the tasks in order, on ``workers`` processes (in this process for 1)."""
    if workers <= 1:
        yield from map(fn, tasks)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        pending: deque = deque()
        for task in tasks:
            pending.append(pool.submit(fn, task))
            if len(pending) >= workers * TASKS_AHEAD_PER_WORKER:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def convert(
    fn: Callable[[Task], VideoResult],
    tasks: list[Task],
    report: ConversionReport,
    source: dict[str, Any],
    workers: int,
    videos_per_shard: int,
) -> ConversionReport:
    """Run ``fn`` over the tasks, write the samples as ``{split}-%06d.tar`` shards in ``report.out`` and
    record the split in its manifest; fills and returns ``report``."""
    stats = SplitStats()

    def samples() -> Iterator[VideoSample]:
        results = _ordered(fn, tasks, workers)
        for result in tqdm(results, total=len(tasks), desc=f"{report.format} {report.split}", unit="video"):
            for skip in result.skips:
                report.skipped[skip.reason] += 1
                log.warning("skipping (%s): %s", skip.reason, skip.message)
            report.overlapping_pixels += result.overlapping_pixels
            if result.sample is not None:
                yield result.sample

    report.shards = write_split(stats.tap(samples()), report.out, report.split, videos_per_shard)
    report.videos, report.expressions, report.frames = (
        stats.num_videos,
        stats.num_expressions,
        stats.num_frames,
    )
    report.ground_truth = stats.ground_truth
    entry = stats.entry(
        report.shards,
        source_split=report.source_split,
        skipped=report.skipped,
        overlapping_pixels=report.overlapping_pixels,
    )
    update_manifest(report.out, source, report.split, entry)
    return report
