"""One video and one of its expressions → the tensors of one sample; samples → a batch.

A training clip is ``num_frames`` frames chosen by the ``sampling`` strategy (:data:`SAMPLINGS`); an
evaluation clip is every frame of the video and also carries the ground truth at the original size.
Only the chosen frames and masks are decoded. Frames are resized twice, for SAM-2 and for the VLM (each
frame's two inputs kept for the process, :data:`KEPT_INPUTS`, with ``keep_frames`` > 0), and the expression
is tokenized into the chat prompt with ``[SEG]`` (plus the ground-truth label prompt that
stage 1 uses, and the caption + QA conversation that VLM pre-training uses).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F
from torch.nn.utils.rnn import pad_sequence

from lightning_desa2va.data.captions import clip_caption
from lightning_desa2va.data.chat import IGNORE_INDEX, ChatEncoder
from lightning_desa2va.data.schema import Expression, VideoSample
from lightning_desa2va.data.synthetic_words import MOTION, MOTION_VECTORS

SAMPLINGS = ("random_ordered", "random_window", "uniform", "all")
"""Training frame sampling (``data.sampling``): T distinct random frames in order (Sa2VA's sampler and
the default), T consecutive frames from a random start, T evenly spaced frames, or every frame. A video
shorter than T (an image) gives its frames evenly repeated up to T."""

STACKED_KEYS = ("frames", "vlm_pixels", "target_masks", "instance_masks", "stated_motion")
LIST_KEYS = ("expression", "expression_type", "video_id", "has_caption", "qa_questions")
ORIGINAL_KEYS = ("original_target_masks", "original_union_masks", "original_size")
"""Evaluation only: per clip, bool [T, H0, W0] ground truth and union of every object at the source's size,
and (H0, W0)."""


KEPT_INPUTS: OrderedDict[tuple[Any, ...], tuple[Tensor, Tensor]] = OrderedDict()
"""Each frame's SAM-2 and VLM inputs, by the digest of its JPEG bytes and the settings that made them, for the
frames used last; the process's, shared by every encoder (the next stage's, each validation's). Why: the demo
reads each training frame ~15 times over its two stages, and decoding, resizing and normalising frames is
half of loading a stage-2 batch (38 → 19 ms kept, one thread) and a third of a stage-1 one (19 → 13 ms)."""


def frame_indices(
    total: int, num_frames: int | None, sampling: str, generator: torch.Generator | None = None
) -> Tensor:
    """Indices of the frames a clip uses, in order (see :data:`SAMPLINGS`), random choices drawn from
    ``generator``; every frame without ``num_frames``."""
    if num_frames is None or sampling == "all":
        return torch.arange(total)
    if total < num_frames or sampling == "uniform":
        return torch.linspace(0, total - 1, num_frames).round().long()
    if sampling == "random_ordered":
        return torch.randperm(total, generator=generator)[:num_frames].sort().values
    start = int(torch.randint(total - num_frames + 1, (), generator=generator))
    return torch.arange(start, start + num_frames)


def nearest_indices(source: int, target: int) -> np.ndarray:
    """The source rows (or columns) ``F.interpolate(mode="nearest")`` picks for ``target`` outputs:
    floor(i · source / target) in float32, as torch computes it; gathering them resizes an id map
    exactly as interpolation would, without converting it to float first."""
    scale = torch.tensor(source, dtype=torch.float32) / target
    picks = (torch.arange(target, dtype=torch.float32) * scale).floor().long().clamp(max=source - 1)
    return picks.numpy()


def resize_ids(ids: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour resize of [T, H, W] id maps to [T, size, size]."""
    if ids.shape[-2:] == (size, size):
        return ids
    rows, cols = nearest_indices(ids.shape[-2], size), nearest_indices(ids.shape[-1], size)
    return ids[:, rows[:, None], cols[None, :]]


def targets(instances: Tensor, object_ids: list[int]) -> Tensor:
    """Where any of the objects is: the union of their id maps (``torch.isin``, a few times faster for the
    one or two objects an expression names)."""
    union = torch.zeros_like(instances, dtype=torch.bool)
    for object_id in object_ids:
        union |= instances == object_id
    return union


def stated_motion(expression: Expression) -> Tensor:
    """(x, y, stated) of the motion an expression states, the motion prompt's target: its unit direction
    (zero for "still") and 1, or zeros when it states none; NaN where the data has no structured referent
    (real datasets) or names a motion without a known direction."""
    if not expression.attributes:
        return torch.full((3,), float("nan"))
    if MOTION not in expression.attributes:
        return torch.zeros(3)
    direction = MOTION_VECTORS.get(expression.attributes[MOTION])
    if direction is None:
        return torch.full((3,), float("nan"))
    return torch.tensor([*direction, 1.0])


def original_target(video: VideoSample, object_ids: list[int], index: list[int], ids: np.ndarray) -> Tensor:
    """Where any of ``object_ids`` is [T, H0, W0] bool, on frames ``index`` at the video's own size: from the
    objects' own masks where they overlap, else from the id maps (``ids``: the frames' stored ones)."""
    if video.object_rles:
        return torch.from_numpy(np.stack([video.target_mask(i, object_ids, original=True) for i in index]))
    originals = np.stack([video.original_mask(i) for i in index]) if video.resized else ids
    return torch.from_numpy(np.isin(originals, object_ids))


class ClipEncoder:
    """One video and one of its expressions → the tensors of one sample.

    ``num_frames=None`` makes an evaluation encoder: every frame, plus the original-size ground truth.
    ``jpeg_draft`` decodes frames at the smallest JPEG scale that still covers the larger model input.
    ``keep_frames`` > 0 keeps that many frames' model inputs (:data:`KEPT_INPUTS`), each prepared alone, so
    that a frame's inputs do not depend on the clip it was first met in.
    """

    def __init__(
        self,
        chat: ChatEncoder,
        num_frames: int | None,
        sam_image_size: int,
        vlm_image_size: int,
        pixel_mean: list[float],
        pixel_std: list[float],
        sampling: str = "random_ordered",
        jpeg_draft: bool = True,
        keep_frames: int = 0,
    ) -> None:
        if keep_frames < 0:
            raise ValueError(f"data.keep_frames must be >= 0, got {keep_frames}")
        if sampling not in SAMPLINGS:
            raise ValueError(f"data.sampling must be one of {SAMPLINGS}, got {sampling!r}")
        if num_frames is not None and num_frames < 1:
            raise ValueError(f"data.num_frames must be >= 1, got {num_frames}")
        self.chat = chat
        self.num_frames = num_frames
        self.sampling = sampling
        self.sam_image_size = sam_image_size
        self.vlm_image_size = vlm_image_size
        self.decode_size = max(sam_image_size, vlm_image_size) if jpeg_draft else 0
        self.pixel_mean = torch.tensor(pixel_mean).view(1, 3, 1, 1)
        self.pixel_std = torch.tensor(pixel_std).view(1, 3, 1, 1)
        self.keep_frames = keep_frames
        self.settings = (
            self.decode_size,
            sam_image_size,
            vlm_image_size,
            tuple(pixel_mean),
            tuple(pixel_std),
        )

    @property
    def evaluation(self) -> bool:
        """Whether clips are whole videos with original-size ground truth."""
        return self.num_frames is None

    def __call__(
        self, video: VideoSample, expression: Expression, generator: torch.Generator | None = None
    ) -> dict[str, Any]:
        """The sample's tensors; a training clip's random frame choice is drawn from ``generator``."""
        index = frame_indices(video.num_frames, self.num_frames, self.sampling, generator).tolist()
        frames, vlm_pixels = self.clip_inputs(video, index)
        ids = np.stack([video.mask(i) for i in index])
        instances = torch.from_numpy(resize_ids(ids, self.sam_image_size).astype(np.int64))
        target = targets(instances, expression.object_ids)
        if video.object_rles:  # objects overlap: the union of the objects' own masks, not of the id map's
            own = np.stack([video.target_mask(i, expression.object_ids) for i in index])
            target = torch.from_numpy(resize_ids(own, self.sam_image_size))
        chat = self.chat.segmentation(expression.text, len(index), video.qa)
        label_chat = self.chat.label_prompt(expression.label or expression.text)
        expression_chat = self.chat.label_prompt(expression.text)
        caption = clip_caption(video.objects, self.chat.templates)
        caption_chat = self.chat.caption_qa(caption, len(index), video.qa)
        questions = [pair.question for pair in video.qa[: self.chat.templates.caption_qa_turns]]
        sample = {
            "frames": frames,
            "vlm_pixels": vlm_pixels,
            "target_masks": target,
            "instance_masks": instances,
            "input_ids": chat.input_ids,
            "labels": chat.labels,
            "label_input_ids": label_chat.input_ids,
            "expression_label_input_ids": expression_chat.input_ids,
            "referent_word_ids": self.chat.referent_words(video.objects, expression.object_ids),
            "referent_motion_ids": self.chat.referent_motions(video.objects, expression.object_ids),
            "object_look_ids": self.chat.object_looks(video.objects),
            "object_motion_ids": self.chat.object_motions(video.objects),
            "stated_motion": stated_motion(expression),
            "caption_input_ids": caption_chat.input_ids,
            "caption_labels": caption_chat.labels,
            "has_caption": caption is not None,
            "qa_questions": questions,
            "expression": expression.text,
            "expression_type": expression.type,
            "video_id": video.video_id,
        }
        if self.evaluation:
            every_object = [track.id for track in video.objects]
            for key, object_ids in (("target", expression.object_ids), ("union", every_object)):
                sample[f"original_{key}_masks"] = original_target(video, object_ids, index, ids)
            sample["original_size"] = video.original_size
        return sample

    def clip_inputs(self, video: VideoSample, index: list[int]) -> tuple[Tensor, Tensor]:
        """SAM-2 frames [T, 3, S, S] and VLM frames [T, 3, s, s] of the frames ``index``: prepared together,
        or with ``keep_frames``, frame by frame from those kept."""
        if not self.keep_frames:
            return self.model_inputs(np.stack([video.frame(i, self.decode_size) for i in index]))
        inputs = [self.frame_inputs(video, i) for i in index]
        return torch.stack([sam for sam, _ in inputs]), torch.stack([vlm for _, vlm in inputs])

    def frame_inputs(self, video: VideoSample, t: int) -> tuple[Tensor, Tensor]:
        """Frame ``t``'s SAM-2 and VLM inputs, from :data:`KEPT_INPUTS` or prepared and kept."""
        key = (*self.settings, hashlib.sha256(video.frame_data[t]).digest())
        if key in KEPT_INPUTS:
            KEPT_INPUTS.move_to_end(key)
        else:
            sam, vlm = self.model_inputs(video.frame(t, self.decode_size)[None])
            KEPT_INPUTS[key] = (sam[0], vlm[0])
        while len(KEPT_INPUTS) > self.keep_frames:
            KEPT_INPUTS.popitem(last=False)
        return KEPT_INPUTS[key]

    def model_inputs(self, frames: np.ndarray) -> tuple[Tensor, Tensor]:
        """RGB frames [T, H, W, 3] uint8 → normalised SAM-2 frames [T, 3, S, S], VLM frames [T, 3, s, s]."""
        rgb = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255.0
        sam_rgb = self._resize(rgb, self.sam_image_size)
        # the (usually smaller) VLM input from the SAM-2 one: one resize of the full frame, not two
        vlm_source = sam_rgb if self.vlm_image_size <= self.sam_image_size else rgb
        return self._normalise(sam_rgb), self._normalise(self._resize(vlm_source, self.vlm_image_size))

    def _resize(self, rgb: Tensor, size: int) -> Tensor:
        if rgb.shape[-1] == size and rgb.shape[-2] == size:
            return rgb
        return F.interpolate(rgb, size=(size, size), mode="bilinear", antialias=True, align_corners=False)

    def _normalise(self, rgb: Tensor) -> Tensor:
        return (rgb - self.pixel_mean) / self.pixel_std


def collate_clips(samples: list[dict[str, Any]], pad_token_id: int) -> dict[str, Any]:
    """Stack clip tensors and right-pad token sequences (attention masks mark the real tokens); clips of
    one batch must have the same number of frames."""
    lengths = sorted({sample["frames"].shape[0] for sample in samples})
    if len(lengths) > 1:
        videos = sorted({sample["video_id"] for sample in samples})
        raise ValueError(
            f"clips of {lengths} frames in one batch (videos {videos}): evaluation (and data.sampling=all) "
            "use every frame, so videos of different lengths need batches of 1 (data.eval_batch_size=1)"
        )
    batch: dict[str, Any] = {key: torch.stack([sample[key] for sample in samples]) for key in STACKED_KEYS}
    for key, pad in (
        ("input_ids", pad_token_id),
        ("labels", IGNORE_INDEX),
        ("label_input_ids", pad_token_id),
        ("expression_label_input_ids", pad_token_id),
        ("caption_input_ids", pad_token_id),
        ("caption_labels", IGNORE_INDEX),
        ("referent_word_ids", IGNORE_INDEX),
        ("referent_motion_ids", IGNORE_INDEX),
        ("object_look_ids", IGNORE_INDEX),
        ("object_motion_ids", IGNORE_INDEX),
    ):
        batch[key] = pad_sequence([sample[key] for sample in samples], batch_first=True, padding_value=pad)
    for prefix in ("", "label_", "expression_label_", "caption_"):
        batch[f"{prefix}attention_mask"] = pad_sequence(
            [torch.ones_like(sample[f"{prefix}input_ids"]) for sample in samples], batch_first=True
        )
    present = [key for key in ORIGINAL_KEYS if key in samples[0]]
    for key in (*LIST_KEYS, *present):
        batch[key] = [sample[key] for sample in samples]
    return batch
