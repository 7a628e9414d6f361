"""``build_shards``: one split of a dataset in its own layout → shards, with the final count."""

from __future__ import annotations

import logging
from pathlib import Path

from lightning_desa2va.data.converters import (
    DATASET_TYPES,
    DEFAULT_VIDEOS_PER_SHARD,
    FORMATS,
    mevis,
    refcoco,
    refytvos,
)
from lightning_desa2va.data.converters.common import ConversionReport, convert

log = logging.getLogger(__name__)


def build_shards(
    fmt: str,
    root: Path,
    split: str,
    out: Path,
    workers: int = 1,
    max_size: int | None = None,
    videos_per_shard: int = DEFAULT_VIDEOS_PER_SHARD,
    refs: str | None = None,
    images: Path | None = None,
    out_split: str | None = None,
) -> ConversionReport:
    """Convert one split of a dataset at ``root`` into ``out/{out_split}-%06d.tar`` (``out_split`` default:
    ``split``; the DataModule reads ``train``, ``val`` and ``test``) and record it in ``out/manifest.json``;
    ``max_size`` scales frames whose longer side exceeds it (masks are kept at the original size too).
    ``refs``/``images``: RefCOCO's refs file and image folder when not the defaults."""
    if fmt not in DATASET_TYPES:
        raise ValueError(f"unknown format {fmt!r}; known: {FORMATS}")
    root, out = Path(root), Path(out)
    if not root.is_dir():
        raise FileNotFoundError(f"no dataset folder at {root}")
    kind = DATASET_TYPES[fmt]
    origin = f"{fmt}/{split}"
    report = ConversionReport(fmt, out_split or split, out, source_split=split)
    if fmt in ("mevis", "revos"):
        work, fn = mevis.tasks(fmt, root, split, kind, max_size, origin), mevis.convert_video
    elif fmt in ("refytvos", "davis17"):
        work, fn = refytvos.tasks(root, split, kind, max_size, origin), refytvos.convert_video
    else:
        work, skips = refcoco.tasks(root, split, kind, max_size, origin, refs, images)
        fn = refcoco.convert_image
        for skip in skips:
            report.skipped[skip.reason] += 1
            log.warning("skipping (%s): %s", skip.reason, skip.message)
    if not work:
        raise FileNotFoundError(f"no videos of {fmt} split {split!r} in {root}")
    source = {"format": fmt, "root": str(root.resolve()), "max_size": max_size}
    return convert(fn, work, report, source, workers, videos_per_shard)
