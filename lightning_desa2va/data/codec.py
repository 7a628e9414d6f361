"""How frames and masks are encoded in shards (JPEG; 16-bit greyscale PNG; COCO RLE per object) and decoded
one at a time, and how a raw sample's members are sorted out (the layout is schema.py's)."""

from __future__ import annotations

import io
import json
import re
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from lightning_desa2va.data.errors import ShardFormatError

JPEG_QUALITY = 90
"""JPEG quality of encoded frames: high enough that flat synthetic colours survive the round trip."""

JPEG_SUBSAMPLING = 0
"""PIL ``subsampling`` value 0 = 4:4:4, keeps colour edges of small objects sharp."""

MASK_PNG_COMPRESS_LEVEL = 1
"""zlib level of the mask PNGs: level 1 decodes ~2.5x faster than PIL's default 6 (measured on 720p
instance maps), for masks ~3x larger, still a few kB."""

MAX_OBJECT_ID = 65535
"""Largest object id a 16-bit mask PNG holds."""

MASK_MODES = ("I;16", "I", "L")
"""PIL modes a mask PNG may decode to (16-bit greyscale; ``I``/``L`` from other writers)."""

MEMBER_RE = re.compile(r"^(frame|mask|original_mask)_(\d+)\.(jpg|png)$")
"""Names of a sample's frame and mask members (schema.py: ``frame_000.jpg``, ``mask_000.png``, ...)."""
RLE_KEY = "rle.json"
"""The member holding each object's own masks where objects overlap."""


def encode_jpeg(frame: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    """An HxWx3 uint8 RGB frame as JPEG bytes."""
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="JPEG", quality=quality, subsampling=JPEG_SUBSAMPLING)
    return buf.getvalue()


def encode_mask(ids: np.ndarray) -> bytes:
    """An HxW instance-id map (values 0..65535) as 16-bit greyscale PNG bytes."""
    if ids.size and (ids.min() < 0 or ids.max() > MAX_OBJECT_ID):
        raise ValueError(f"mask ids must lie in 0..{MAX_OBJECT_ID}, got {ids.min()}..{ids.max()}")
    buf = io.BytesIO()
    Image.fromarray(ids.astype(np.uint16)).save(buf, format="PNG", compress_level=MASK_PNG_COMPRESS_LEVEL)
    return buf.getvalue()


def image_size(data: bytes) -> tuple[int, int]:
    """(height, width) from an encoded image's header, without decoding it."""
    with Image.open(io.BytesIO(data)) as img:
        return img.height, img.width


def _mismatch(where: str, key: str, found: tuple[int, int], size: tuple[int, int]) -> ShardFormatError:
    return ShardFormatError(
        f"{where}: {key!r} is {found[0]}x{found[1]}, meta says {size[0]}x{size[1]}", "size_mismatch"
    )


def decode_frame(data: bytes, size: tuple[int, int], min_size: int, where: str, key: str) -> np.ndarray:
    """A JPEG frame as HxWx3 uint8 RGB; with ``min_size``, decoded at the smallest 1/2^k JPEG scale (PIL
    ``draft``) whose sides stay >= ``min_size``, when that is a real reduction."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            if (img.height, img.width) != size:
                raise _mismatch(where, key, (img.height, img.width), size)
            if min_size and min(img.size) >= 2 * min_size:
                img.draft("RGB", (min_size, min_size))
            return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()
    except ShardFormatError:
        raise
    except Exception as exn:  # PIL raises several unrelated types for corrupt data
        raise ShardFormatError(f"{where}: cannot decode {key!r}: {exn}", "corrupt_jpeg") from exn


def decode_mask(data: bytes, size: tuple[int, int], where: str, key: str) -> np.ndarray:
    """A mask PNG as its HxW uint16 instance ids."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.mode not in MASK_MODES:
                raise ShardFormatError(
                    f"{where}: {key!r} is a {img.mode} image, want 16-bit greyscale", "corrupt_png"
                )
            ids = np.asarray(img)
    except ShardFormatError:
        raise
    except Exception as exn:  # PIL raises several unrelated types for corrupt data
        raise ShardFormatError(f"{where}: cannot decode {key!r}: {exn}", "corrupt_png") from exn
    if ids.shape != size:
        raise _mismatch(where, key, ids.shape, size)
    return ids.astype(np.uint16, copy=False)


def centre_indices(source: int, target: int) -> np.ndarray:
    """Source rows (or columns) under the centres of ``target`` resized pixels (how image resizing maps
    pixels, so masks resized this way stay aligned with the resized frames)."""
    return np.minimum(((np.arange(target) + 0.5) * source / target).astype(np.int64), source - 1)


def encode_rle(mask: np.ndarray) -> dict[str, Any] | None:
    """A binary HxW mask as compressed COCO RLE with str counts (JSON-able), ``None`` when empty."""
    if not mask.any():
        return None
    encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(side) for side in encoded["size"]], "counts": encoded["counts"].decode("ascii")}


def decode_rle(rle: dict[str, Any] | None, size: tuple[int, int]) -> np.ndarray:
    """A mask of :func:`encode_rle` (``None``: empty) as an HxW bool array."""
    if rle is None:
        return np.zeros(size, dtype=bool)
    return mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode("ascii")}).astype(bool)


def sample_members(
    raw: dict[str, Any], where: str, num_frames: int, resized: bool, masks: bool
) -> dict[str, list[bytes]]:
    """A raw sample's frame and mask members by kind, checked against the frame count (reasons as the skip
    counts say); ``resized``: original-size masks too, ``masks``: any mask at all (ground truth)."""
    found: dict[str, dict[int, bytes]] = {"frame": {}, "mask": {}, "original_mask": {}}
    for name, value in raw.items():
        match = MEMBER_RE.match(name)
        if match:
            found[match.group(1)][int(match.group(2))] = value
    frames = found["frame"]
    if sorted(frames) != list(range(num_frames)):
        raise ShardFormatError(
            f"{where}: meta says {num_frames} frames, the sample has frames {sorted(frames)}",
            "frame_count_mismatch",
        )
    kinds = ("mask", "original_mask") if resized else ("mask",) if masks else ()
    for kind in kinds:
        missing = [t for t in range(num_frames) if t not in found[kind]]
        if missing:
            raise ShardFormatError(f"{where}: no {kind} member for frames {missing}", "missing_mask")
        extra = sorted(set(found[kind]) - set(range(num_frames)))
        if extra:
            raise ShardFormatError(
                f"{where}: {kind} members {extra} beyond {num_frames} frames", "frame_count_mismatch"
            )
    return {kind: [found[kind][t] for t in range(num_frames)] for kind in ("frame", *kinds)}


def object_rles_member(raw: dict[str, Any], where: str) -> dict[int, list[dict[str, Any] | None]]:
    """Each object's own masks (COCO RLE per frame) from a raw sample's ``rle.json`` member."""
    if RLE_KEY not in raw:
        raise ShardFormatError(f"{where}: meta says objects overlap, no {RLE_KEY} member", "missing_mask")
    try:
        return {int(key): list(rles) for key, rles in json.loads(raw[RLE_KEY]).items()}
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError, AttributeError) as exn:
        raise ShardFormatError(f"{where}: {RLE_KEY} is not a JSON object of RLE lists: {exn}") from exn


def decode_union(
    rles: list[dict[str, Any] | None], size: tuple[int, int], stored: tuple[int, int]
) -> np.ndarray:
    """The union of RLE masks of ``size`` as an HxW bool array at the ``stored`` size (nearest pixel
    centres, as the stored id maps were resized)."""
    union = np.zeros(size, dtype=bool)
    for rle in rles:
        union |= decode_rle(rle, size)
    if stored == size:
        return union
    rows, cols = centre_indices(size[0], stored[0]), centre_indices(size[1], stored[1])
    return union[rows[:, None], cols[None, :]]


def check_object_rles(
    where: str,
    object_rles: dict[int, list[dict[str, Any] | None]],
    object_ids: list[int],
    num_frames: int,
    original_size: tuple[int, int] | None,
) -> None:
    """Per-object masks: one per frame for exactly the sample's objects, at the original size."""
    if not object_rles:
        return
    if sorted(object_rles) != sorted(object_ids):
        raise ShardFormatError(
            f"{where}: {RLE_KEY} has objects {sorted(object_rles)}, want {sorted(object_ids)}"
        )
    for object_id, rles in object_rles.items():
        sizes = {tuple(rle["size"]) for rle in rles if rle is not None}
        if len(rles) != num_frames or not sizes <= {original_size}:
            raise ShardFormatError(
                f"{where}: object {object_id} has {len(rles)} masks of sizes {sorted(sizes)} in {RLE_KEY}, "
                f"want {num_frames} of {original_size}",
                "size_mismatch",
            )
