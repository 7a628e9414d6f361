"""The look objective of SAM-2 pre-training: SAM-2's image features say what is where.

A SAM-2 trained only for class-agnostic masks keeps little of an object's colour in the image embedding
its mask decoder attends to (a linear probe of such features named the colour on under half of the object
cells), yet the language prompts of the segmentation stages must find "the red circle" there. A 1×1
convolution from that embedding to logits over the vocabulary, trained to name the colour and shape word
of the object at every pixel (the referent objective of :mod:`lightning_desa2va.stages.referent`, one row
per pixel), makes the features carry the look, as the image-pretrained backbone of the real SAM-2 does.
The head is a probe the pre-training stage holds; it is not exported.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from lightning_desa2va.stages.referent import referent_hits, referent_loss, referent_rows


def pixel_looks(instance_ids: Tensor, object_look_ids: Tensor, clip_of_frame: Tensor, size: int) -> Tensor:
    """[N, size, size, W] word ids of the object at each pixel of N frames: its colour and shape word
    here, its direction words for the motion objective (:mod:`lightning_desa2va.stages.motion`).

    ``instance_ids`` [N, H, W] (resized to ``size`` by nearest neighbour), ``object_look_ids`` [B, L, W]
    per clip (row = object id, ``IGNORE_INDEX`` for the background), ``clip_of_frame`` [N] the clip of
    each frame.
    """
    ids = F.interpolate(instance_ids[:, None].float(), size=(size, size), mode="nearest")[:, 0].long()
    return object_look_ids[clip_of_frame[:, None, None], ids]


def look_rows(logits: Tensor, looks: Tensor) -> tuple[Tensor, Tensor]:
    """Pixel rows of the object pixels: logits [N, V, h, w] upsampled to the looks' grid [N, s, s, 2]
    → ([P, V], [P, 2])."""
    logits = F.interpolate(logits, size=looks.shape[1:3], mode="bilinear", align_corners=False)
    rows_logits, rows_words = logits.permute(0, 2, 3, 1).flatten(0, 2), looks.flatten(0, 2)
    objects = referent_rows(rows_words)
    return rows_logits[objects], rows_words[objects]


def look_loss(logits: Tensor, looks: Tensor) -> Tensor | None:
    """Cross-entropy of every object pixel against its words (colour and shape); ``None`` without any."""
    return referent_loss(*look_rows(logits, looks))


def look_hits(logits: Tensor, looks: Tensor) -> Tensor:
    """[P] bool per object pixel: its n most likely words are its object's n words (colour and shape)."""
    return referent_hits(*look_rows(logits, looks))


def frame_clips(num_clips: int, num_frames: int, device: torch.device) -> Tensor:
    """Clip index of every frame of frame-major features (frame t of clip b at ``t·B + b``)."""
    return torch.arange(num_clips, device=device).repeat(num_frames)
