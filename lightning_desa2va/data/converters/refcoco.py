"""RefCOCO, RefCOCO+ and RefCOCOg: the refs pickle of the dataset's authors with COCO ``instances.json``
and the COCO images. An image is a one-frame video; each sentence of each ref is one expression.

Layout (``--root``, refer's per-dataset folder)::

    <root>/refs(unc).p     (refcocog: refs(umd).p or refs(google).p; several: choose with --refs)
        [{"ref_id", "image_id", "ann_id", "category_id", "split": "train|val|testA|testB|test",
          "sentences": [{"sent_id", "sent", "raw"}, ...]}, ...]
    <root>/instances.json  COCO: images (id, file_name, height, width), annotations (id, image_id,
                           segmentation: polygons or RLE), categories (id, name)
    <root>/../images/mscoco/images/train2014/<file_name>   (or --images DIR)

The pickle is read by :class:`BuiltinsUnpickler`, which admits builtin containers and scalars only, so a
doctored refs file cannot run code. Objects are the image's referred annotations, ids 1..N in ``ann_id``
order (``source_id`` the ``ann_id``); the label of an expression is its object's COCO category. Where
annotations overlap, each keeps its own mask too (the sample's ``rle.json``).
"""

from __future__ import annotations

import builtins
import json
import pickle
from dataclasses import dataclass, field
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

SAFE_GLOBALS = frozenset(
    (module, name) for module in ("builtins", "__builtin__") for name in ("set", "frozenset")
)
"""The only globals a refs pickle may name: builtin containers that pickle by reference."""

REFS_GLOB = "refs(*).p"
REFER_IMAGES = Path("images/mscoco/images/train2014")
"""Where refer keeps the COCO images, relative to the parent of a dataset's folder."""


class BuiltinsUnpickler(pickle.Unpickler):
    """An unpickler that builds builtin containers and scalars only; any other global is refused.

    Python 2 byte strings (the refs files were written by Python 2) are read as UTF-8.
    """

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in SAFE_GLOBALS:
            return getattr(builtins, name)
        raise pickle.UnpicklingError(f"refuses global {module}.{name}: only builtin containers and scalars")


def load_refs(path: Path) -> list[dict[str, Any]]:
    """The refs of a refs pickle, or a ShardFormatError naming the file when it holds anything else."""
    try:
        with path.open("rb") as stream:
            refs = BuiltinsUnpickler(stream, encoding="utf-8").load()
    except Exception as exn:  # a malformed pickle raises many types; none of them may pass unnamed
        raise ShardFormatError(f"{path}: not a refs pickle of builtin containers and scalars: {exn}") from exn
    if not isinstance(refs, list) or not all(isinstance(ref, dict) for ref in refs):
        raise ShardFormatError(f"{path}: a refs pickle holds a list of dicts, found {type(refs).__name__}")
    return refs


@dataclass
class ImageTask:
    """One image's work: the file, its referred annotations and the sentences about them."""

    image_id: int
    path: Path
    size: tuple[int, int]
    annotations: dict[int, dict[str, Any]]
    """ann_id → {"segmentation", "category"}."""
    sentences: list[tuple[str, str, int]] = field(default_factory=list)
    """(sent_id, text, ann_id)."""
    expression_type: str = "static"
    max_size: int | None = None
    source: str = ""


def find_refs(root: Path, refs: str | None) -> Path:
    """The refs pickle to read: ``--refs`` (a name in the root or a path), else the root's only one."""
    if refs:
        path = Path(refs) if Path(refs).is_file() else root / refs
        if not path.is_file():
            raise FileNotFoundError(f"no refs file {refs} (looked at {path})")
        return path
    found = sorted(root.glob(REFS_GLOB))
    if len(found) != 1:
        names = [p.name for p in found]
        raise FileNotFoundError(
            f"{root}: want one {REFS_GLOB}, found {names or 'none'}; choose one with --refs"
        )
    return found[0]


def tasks(
    root: Path,
    split: str,
    expression_type: str,
    max_size: int | None,
    source: str,
    refs: str | None = None,
    images: Path | None = None,
) -> tuple[list[ImageTask], list[Skip]]:
    """One task per image with refs in the split, and the refs that cannot become one (their sentences
    are skipped: an annotation or image missing from instances.json)."""
    refs_path = find_refs(root, refs)
    instances_path = root / "instances.json"
    if not instances_path.is_file():
        raise FileNotFoundError(f"no COCO instances file at {instances_path}")
    image_dir = Path(images) if images else root.parent / REFER_IMAGES
    if not image_dir.is_dir():
        raise FileNotFoundError(f"no image folder at {image_dir}; give it with --images")
    instances = json.loads(instances_path.read_text(encoding="utf-8"))
    images_by_id = {image["id"]: image for image in instances["images"]}
    annotations = {ann["id"]: ann for ann in instances["annotations"]}
    categories = {cat["id"]: cat["name"] for cat in instances["categories"]}
    by_image: dict[int, ImageTask] = {}
    skips: list[Skip] = []
    for ref in load_refs(refs_path):
        if ref.get("split") != split:
            continue
        sentences = [
            (str(s["sent_id"]), str(s.get("sent") or s.get("raw", "")), ref["ann_id"])
            for s in ref["sentences"]
        ]
        ann, image = annotations.get(ref["ann_id"]), images_by_id.get(ref["image_id"])
        if ann is None or image is None:
            what = ("missing_mask", "annotation") if ann is None else ("missing_frame", "image")
            where = f"{refs_path.name} ref {ref.get('ref_id')}"
            skips += [Skip(what[0], f"{where}: its {what[1]} is not in {instances_path}")] * len(sentences)
            continue
        task = by_image.setdefault(
            image["id"],
            ImageTask(
                image_id=image["id"],
                path=image_dir / image["file_name"],
                size=(int(image["height"]), int(image["width"])),
                annotations={},
                expression_type=expression_type,
                max_size=max_size,
                source=source,
            ),
        )
        task.annotations[ann["id"]] = {
            "segmentation": ann["segmentation"],
            "category": categories.get(ann.get("category_id"), ""),
        }
        task.sentences += sentences
    return [by_image[key] for key in sorted(by_image)], skips


def decode_segmentation(segmentation: Any, size: tuple[int, int]) -> np.ndarray:
    """A COCO segmentation (polygons, uncompressed or compressed RLE) as an HxW binary mask."""
    height, width = size
    if isinstance(segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation.get("counts"), list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    return mask_utils.decode(rle)


def convert_image(task: ImageTask) -> VideoResult:
    """The one-frame sample of an image: its referred objects painted, one expression per sentence."""
    video_id = task.path.stem
    try:
        frame = read_frame(task.path, task.max_size)
        if frame[1] != task.size:
            raise ShardFormatError(
                f"{task.path}: {frame[1]}, instances.json says {task.size}", "size_mismatch"
            )
    except ShardFormatError as error:
        return VideoResult(None, [skip_of(error)] * len(task.sentences))
    skips: list[Skip] = []
    local = {ann_id: index + 1 for index, ann_id in enumerate(sorted(task.annotations))}
    masks = {a: decode_segmentation(ann["segmentation"], task.size) for a, ann in task.annotations.items()}
    empty = {a for a, mask in masks.items() if not mask.any()}
    expressions = []
    for sent_id, text, ann_id in task.sentences:
        if ann_id in empty:
            skips.append(
                Skip("object_without_mask", f"{task.path.name}: annotation {ann_id} has an empty mask")
            )
            continue
        label = task.annotations[ann_id]["category"]
        expressions.append(Expression(text, [local[ann_id]], task.expression_type, label, source_id=sent_id))
    if not expressions:
        return VideoResult(None, skips)
    own = {local[a]: m for a, m in masks.items() if a not in empty}
    id_map, overlaps = paint(own, task.size)
    tracks = [ObjectTrack(id=local[a], source_id=str(a)) for a in sorted(task.annotations) if a not in empty]
    rles = {object_id: [encode_rle(mask)] for object_id, mask in own.items()} if overlaps else {}
    try:
        sample = build_sample(
            video_id,
            [frame],
            [id_map],
            tracks,
            expressions,
            frame_names=[video_id],
            source=task.source,
            object_rles=rles,
        )
    except ShardFormatError as error:
        return VideoResult(None, [*skips, skip_of(error)])
    return VideoResult(sample, skips, overlaps)
