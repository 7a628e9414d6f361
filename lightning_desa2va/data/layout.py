"""The benchmarks' per-expression mask layout: ``<root>/<video>/<expression id>/<frame name>.png``.

MeViS, Ref-YouTube-VOS and ReVOS servers take predictions as
``Annotations/<video>/<expression id>/<frame>.png`` (zipped, ``Annotations/`` at the root): one greyscale PNG
per frame at the video's own size, 255 on the target and 0 elsewhere, named by the dataset's own video ids,
expression ids and frame names, which the shards keep (``video_id``, ``Expression.source_id``,
``frame_names``). ``desa2va shards masks`` writes a converted split's ground truth in the same layout, so a
conversion can be checked against its source.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from lightning_desa2va.data.schema import Expression, VideoSample
from lightning_desa2va.data.shards import check_schema_version, read_manifest, read_split, split_urls

log = logging.getLogger(__name__)

MASK_ON = 255
PNG_SUFFIX = ".png"
PARTIAL_SUFFIX = ".partial"


@dataclass
class ExpressionMasks:
    """Where one expression's masks go and the frames they are named after."""

    folder: Path
    frame_names: list[str]

    def paths(self) -> list[Path]:
        return [self.folder / f"{name}{PNG_SUFFIX}" for name in self.frame_names]

    def done(self) -> bool:
        """Whether every frame's mask is written (each is renamed into place once complete)."""
        return all(path.is_file() for path in self.paths())

    def write(self, masks: np.ndarray) -> None:
        """Masks [T, H, W] bool, one PNG a frame; each written under a temporary name, then renamed, so an
        interrupted run leaves no PNG that looks complete and is not."""
        self.folder.mkdir(parents=True, exist_ok=True)
        for path, mask in zip(self.paths(), masks, strict=True):
            partial = path.with_name(path.name + PARTIAL_SUFFIX)
            Image.fromarray(mask.astype(np.uint8) * MASK_ON).save(partial, format="PNG")
            os.replace(partial, path)

    def read(self) -> np.ndarray:
        """The written masks [T, H, W] bool."""
        return np.stack([np.asarray(Image.open(path)) > 0 for path in self.paths()])


def expression_id(expression: Expression, index: int) -> str:
    """The dataset's id of an expression (its position in the video where the source had none)."""
    return expression.source_id or str(index)


def expression_masks(root: Path, video: VideoSample, index: int) -> ExpressionMasks:
    """Where the masks of the ``index``-th expression of ``video`` go under ``root``."""
    folder = root / video.video_id / expression_id(video.expressions[index], index)
    return ExpressionMasks(folder, list(video.frame_names))


def split_expressions(data_dir: Path, split: str) -> int:
    """How many expressions the manifest counts in a split (for progress bars)."""
    return int(read_manifest(data_dir).get("splits", {}).get(split, {}).get("num_expressions", 0))


def videos_of(data_dir: Path, split: str) -> Iterator[VideoSample]:
    """The videos of a converted split, in shard order (shards whose ground truth is not the published one,
    version 2 with overlapping objects, refused first)."""
    check_schema_version(Path(data_dir))
    return read_split(split_urls(Path(data_dir), split))


def write_ground_truth(data_dir: Path, split: str, out: Path) -> int:
    """Every expression's ground-truth target mask per frame of a converted split, at the video's own size,
    in the benchmark layout under ``out``; the number of expressions written."""
    written, total = 0, split_expressions(data_dir, split)
    with tqdm(total=total, desc=f"{split} ground truth", unit="expression") as bar:
        for video in videos_of(data_dir, split):
            for index, expression in enumerate(video.expressions):
                frames = range(video.num_frames)
                target = [video.target_mask(t, expression.object_ids, original=True) for t in frames]
                expression_masks(out, video, index).write(np.stack(target))
                written += 1
                bar.update()
    log.info("wrote the ground truth of %d expressions of %s under %s", written, split, out)
    return written
