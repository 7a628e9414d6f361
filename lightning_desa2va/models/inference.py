"""Inference protocols (config group ``eval``): how a stage-2 model turns a clip and an expression into a
mask on every frame, wherever it is evaluated (validation, test, ``desa2va eval``, ``desa2va predict``).

- ``per_frame`` (:class:`PerFrameInference`): the VLM sees every frame and the fused mask is decoded on
  every frame, M_t = fuse(D(z_t; x_t), D(z_v; x_t)) for t = 1..T.
- ``sa2va`` (:class:`Sa2VAInference`): the VLM sees K key frames k ∈ K (the first K, as Sa2VA infers), the
  fused mask is decoded on them, and SAM-2's memory tracks it through the others:
  M_t = track(x_t | {(x_k, M_k)}_{k∈K}, recent frames) for t ∉ K.
- ``sa2va_i`` (:class:`Sa2VAiInference`): as ``sa2va``, with K key frames sampled uniformly over the clip
  and tracking by the foundation SAM-2's own mask decoder, kept frozen (Sa2VA-i): the language-tuned
  decoder never learned to read memory-conditioned features.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_desa2va.models.desa2va import FUSED_ONLY, DeSa2VA, DeSa2VAOutput
from lightning_desa2va.models.sam2 import LanguagePromptedSAM2

SAMPLINGS = ("first", "uniform")
TRACKING_DECODERS = ("tuned", "foundation")


@dataclass
class Inference:
    """The model's pass on the frames the VLM saw (for diagnostics) and the mask logits of every frame."""

    output: DeSa2VAOutput
    logits: Tensor  # [B, T, H, W]
    key_frames: list[int]  # the frames the fused mask was decoded on


class InferenceProtocol(ABC):
    """Turns a batch (``frames``, ``vlm_pixels``, ``input_ids``, ``attention_mask``) into mask logits.

    ``chunk_frames``: frames SAM-2's image encoder (and ``desa2va predict``'s resizing) takes at a time
    (``None``: all at once), so a long video fits the accelerator's memory."""

    def __init__(self, chunk_frames: int | None = None) -> None:
        if chunk_frames is not None and chunk_frames < 1:
            raise ValueError(f"eval.chunk_frames must be >= 1 or null, got {chunk_frames}")
        self.chunk_frames = chunk_frames

    @abstractmethod
    def __call__(self, model: DeSa2VA, batch: Mapping[str, Any]) -> Inference:
        """The fused masks of every frame of the batch's clips."""


def distinct_clips(frames: Tensor, video_ids: Sequence[str] | None) -> tuple[Tensor, Tensor | None]:
    """Each distinct clip of a batch once [V, T, 3, H, W] and the clip every row reads [B] (``None`` when no
    two rows share one, or the batch names no videos). An evaluation batch holds the expressions of a video
    one row each, all with the video's frames: the model encodes those once. Rows share a clip when their
    video and pixels agree."""
    if video_ids is None:
        return frames, None
    kept: list[int] = []
    index: list[int] = []
    for row, video in enumerate(video_ids):
        same = (
            position
            for position, first in enumerate(kept)
            if video_ids[first] == video and torch.equal(frames[first], frames[row])
        )
        position = next(same, len(kept))
        if position == len(kept):
            kept.append(row)
        index.append(position)
    if len(kept) == len(index):
        return frames, None
    return frames[kept], torch.tensor(index, device=frames.device)


class PerFrameInference(InferenceProtocol):
    """Every frame to the VLM, the fused mask decoded on every frame."""

    def __call__(self, model: DeSa2VA, batch: Mapping[str, Any]) -> Inference:
        clips, clip_index = distinct_clips(batch["frames"], batch.get("video_id"))
        output = model(
            clips,
            batch["vlm_pixels"],
            batch["input_ids"],
            batch["attention_mask"],
            batch.get("labels"),  # the answers' tokens, for QA scoring off this pass (head on them alone)
            masks=FUSED_ONLY,
            clip_index=clip_index,
        )
        assert output.fused_logits is not None  # FUSED_ONLY decodes it
        return Inference(output, output.fused_logits, list(range(batch["frames"].shape[1])))


class Sa2VAInference(InferenceProtocol):
    """K key frames to the VLM, the fused mask decoded on them, SAM-2's memory through every frame.

    ``sampling``: ``first`` (the first K frames, Sa2VA) or ``uniform`` (K frames spread over the clip,
    first and last included). ``tracking_decoder``: ``tuned`` (the model's own, language-tuned mask
    decoder tracks) or ``foundation`` (the mask decoder of ``foundation_sam2``, frozen, tracks).
    """

    def __init__(
        self,
        key_frames: int = 5,
        sampling: str = "first",
        tracking_decoder: str = "tuned",
        foundation_sam2: LanguagePromptedSAM2 | None = None,
        chunk_frames: int | None = None,
    ) -> None:
        super().__init__(chunk_frames)
        if key_frames < 1:
            raise ValueError(f"eval.key_frames must be >= 1, got {key_frames}")
        if sampling not in SAMPLINGS:
            raise ValueError(f"eval.sampling must be one of {SAMPLINGS}, got {sampling!r}")
        if tracking_decoder not in TRACKING_DECODERS:
            raise ValueError(
                f"eval.tracking_decoder must be one of {TRACKING_DECODERS}, got {tracking_decoder!r}"
            )
        if tracking_decoder == "foundation" and foundation_sam2 is None:
            raise ValueError(
                "eval.tracking_decoder=foundation needs eval.foundation_sam2 (the foundation SAM-2)"
            )
        self.key_frames = key_frames
        self.sampling = sampling
        # Not a registered submodule of anything: outside the checkpoint, the optimizer and train().
        self.foundation_decoder: nn.Module | None = None
        if tracking_decoder == "foundation" and foundation_sam2 is not None:
            self.foundation_decoder = foundation_sam2.sam_mask_decoder.eval().requires_grad_(False)

    def key_frame_indices(self, num_frames: int) -> list[int]:
        """The key frames of a clip of ``num_frames`` frames (all of them when it has at most K)."""
        count = min(self.key_frames, num_frames)
        if self.sampling == "first":
            return list(range(count))
        return torch.linspace(0, num_frames - 1, count).round().long().tolist()

    def __call__(self, model: DeSa2VA, batch: Mapping[str, Any]) -> Inference:
        frames = batch["frames"]
        num_frames = frames.shape[1]
        keys = self.key_frame_indices(num_frames)
        index = torch.tensor(keys, device=frames.device)
        input_ids, attention_mask = keep_image_blocks(
            batch["input_ids"],
            batch["attention_mask"],
            model.vlm.model.config.image_token_id,
            num_frames,
            keys,
        )
        clips, clip_index = distinct_clips(frames, batch.get("video_id"))
        output = model(
            clips[:, index],
            batch["vlm_pixels"][:, index],
            input_ids,
            attention_mask,
            masks=FUSED_ONLY,
            clip_index=clip_index,
        )
        assert output.fused_logits is not None  # FUSED_ONLY decodes it
        if len(keys) == num_frames:
            return Inference(output, output.fused_logits, keys)
        with tracking_with(model.sam, self.foundation_decoder):
            logits = model.propagate(clips, keys, output.fused_logits, clip_index)
        return Inference(output, logits, keys)


class Sa2VAiInference(Sa2VAInference):
    """Sa2VA-i's inference: uniform key frames, tracking by the frozen foundation mask decoder."""

    def __init__(
        self,
        foundation_sam2: LanguagePromptedSAM2 | None,
        key_frames: int = 5,
        sampling: str = "uniform",
        tracking_decoder: str = "foundation",
        chunk_frames: int | None = None,
    ) -> None:
        super().__init__(key_frames, sampling, tracking_decoder, foundation_sam2, chunk_frames)


@contextmanager
def tracking_with(sam: LanguagePromptedSAM2, decoder: nn.Module | None) -> Iterator[None]:
    """SAM-2 with ``decoder`` as its mask decoder for the block (``None``: its own), then its own again.

    The decoder also projects the finer feature levels (``conv_s0``/``conv_s1``) when frames are encoded
    for tracking, so tracking reads the features its decoder was trained with."""
    if decoder is None:
        yield
        return
    tuned = sam.sam_mask_decoder
    weight = next(tuned.parameters())
    sam.sam_mask_decoder = decoder.to(weight.device, weight.dtype)
    try:
        yield
    finally:
        sam.sam_mask_decoder = tuned


def keep_image_blocks(
    input_ids: Tensor, attention_mask: Tensor, image_token_id: int, num_frames: int, keep: list[int]
) -> tuple[Tensor, Tensor]:
    """Token ids and attention mask [B, L] of conversations that show ``num_frames`` frames, each an image
    block ``<img><IMG_CONTEXT>×n</img>``, cut to the blocks of the frames ``keep``."""
    batch = input_ids.shape[0]
    context = (input_ids == image_token_id).nonzero()[:, 1].view(batch, num_frames, -1)
    dropped = [t for t in range(num_frames) if t not in keep]
    if not dropped:
        return input_ids, attention_mask
    blocks = context[:, dropped]  # [B, D, n] positions of the dropped frames' context tokens
    edges = torch.stack([blocks[..., 0] - 1, blocks[..., -1] + 1], dim=-1)  # <img> and </img>
    positions = torch.cat([blocks, edges], dim=-1).flatten(1)
    retained = torch.ones_like(input_ids, dtype=torch.bool).scatter(1, positions, False)
    return input_ids[retained].view(batch, -1), attention_mask[retained].view(batch, -1)
