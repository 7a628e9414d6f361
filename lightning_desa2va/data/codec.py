"""How frames and masks are encoded in shards (JPEG; 16-bit greyscale PNG) and decoded one at a time."""

from __future__ import annotations

import io
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
