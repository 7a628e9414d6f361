"""The DataModule: WebDataset shards of the sample schema → batches of (clip, one expression).

Every expression of every video is one training sample. Training clips are T frames drawn at random (in
order) from the video; validation and test clips use every frame, so J&F is measured on whole videos.
Frames are resized twice, for SAM-2 and for the VLM, and the expression is tokenized into the chat prompt
with ``[SEG]`` (plus the ground-truth label prompt that stage 1 uses, and the caption + QA conversation
that VLM pre-training uses).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import webdataset as wds
from torch import Tensor
from torch.nn import functional as F
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from lightning_desa2va.data.captions import clip_caption
from lightning_desa2va.data.chat import IGNORE_INDEX, ChatEncoder, ChatTemplates
from lightning_desa2va.data.schema import Expression, VideoSample, decode_sample
from lightning_desa2va.data.shards import SkipCounter, error_handler, split_urls
from lightning_desa2va.data.synthetic_words import MOTION, MOTION_VECTORS

log = logging.getLogger(__name__)

TRAIN, VAL, TEST = "train", "val", "test"


class ClipEncoder:
    """One video and one of its expressions → the tensors of one sample."""

    def __init__(
        self,
        chat: ChatEncoder,
        num_frames: int | None,
        sam_image_size: int,
        vlm_image_size: int,
        pixel_mean: list[float],
        pixel_std: list[float],
    ) -> None:
        self.chat = chat
        self.num_frames = num_frames
        self.sam_image_size = sam_image_size
        self.vlm_image_size = vlm_image_size
        self.pixel_mean = torch.tensor(pixel_mean).view(1, 3, 1, 1)
        self.pixel_std = torch.tensor(pixel_std).view(1, 3, 1, 1)

    def frame_indices(self, total: int) -> Tensor:
        """T random frames in order when training (``num_frames`` set), else every frame."""
        if self.num_frames is None:
            return torch.arange(total)
        if total < self.num_frames:
            raise ValueError(f"a video has {total} frames, fewer than data.num_frames={self.num_frames}")
        return torch.randperm(total)[: self.num_frames].sort().values

    def __call__(self, video: VideoSample, expression: Expression) -> dict[str, Any]:
        index = self.frame_indices(len(video.frames))
        rgb = torch.from_numpy(np.stack([video.frames[i] for i in index.tolist()])).permute(0, 3, 1, 2)
        rgb = rgb.float() / 255.0
        ids = torch.from_numpy(np.stack([video.masks[i] for i in index.tolist()])).long()
        target = torch.isin(ids, torch.tensor(expression.object_ids))
        chat = self.chat.segmentation(expression.text, len(index), video.qa)
        label_chat = self.chat.label_prompt(expression.label or expression.text)
        expression_chat = self.chat.label_prompt(expression.text)
        caption = clip_caption(video.objects, self.chat.templates)
        caption_chat = self.chat.caption_qa(caption, len(index), video.qa)
        questions = [pair.question for pair in video.qa[: self.chat.templates.caption_qa_turns]]
        return {
            "frames": self._normalise(self._resize(rgb, self.sam_image_size)),
            "vlm_pixels": self._normalise(self._resize(rgb, self.vlm_image_size)),
            "target_masks": self._resize_masks(target, self.sam_image_size).bool(),
            "instance_masks": self._resize_masks(ids, self.sam_image_size),
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

    def _resize(self, rgb: Tensor, size: int) -> Tensor:
        if rgb.shape[-1] == size and rgb.shape[-2] == size:
            return rgb
        return F.interpolate(rgb, size=(size, size), mode="bilinear", antialias=True, align_corners=False)

    def _resize_masks(self, masks: Tensor, size: int) -> Tensor:
        if masks.shape[-1] == size and masks.shape[-2] == size:
            return masks
        return F.interpolate(masks[:, None].float(), size=(size, size), mode="nearest")[:, 0].to(masks.dtype)

    def _normalise(self, rgb: Tensor) -> Tensor:
        return (rgb - self.pixel_mean) / self.pixel_std


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


def expand_expressions(videos: Iterator[VideoSample]) -> Iterator[tuple[VideoSample, Expression]]:
    """One sample per (video, expression): every expression is supervised, none dropped."""
    for video in videos:
        for expression in video.expressions:
            yield video, expression


def collate_clips(samples: list[dict[str, Any]], pad_token_id: int) -> dict[str, Any]:
    """Stack clip tensors and right-pad token sequences (attention masks mark the real tokens)."""
    batch: dict[str, Any] = {}
    for key in ("frames", "vlm_pixels", "target_masks", "instance_masks", "stated_motion"):
        batch[key] = torch.stack([sample[key] for sample in samples])
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
    for key in ("expression", "expression_type", "video_id", "has_caption", "qa_questions"):
        batch[key] = [sample[key] for sample in samples]
    return batch


class RefVOSDataModule(pl.LightningDataModule):
    """Referring-VOS shards (``{split}-%06d.tar``) → clip batches for the stages."""

    def __init__(
        self,
        data_dir: str,
        tokenizer: PreTrainedTokenizerBase,
        image_tokens: int,
        sam_image_size: int,
        vlm_image_size: int,
        chat: dict[str, Any],
        batch_size: int,
        eval_batch_size: int,
        num_frames: int,
        num_workers: int,
        shuffle_buffer: int,
        pixel_mean: list[float],
        pixel_std: list[float],
        on_error: str = "raise",
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.data_dir = Path(data_dir)
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.on_error = on_error
        self.seed = seed
        self.skips = SkipCounter()
        chat_encoder = ChatEncoder(tokenizer, ChatTemplates(**chat), image_tokens)
        sizes = {"sam_image_size": sam_image_size, "vlm_image_size": vlm_image_size}
        normalisation = {"pixel_mean": pixel_mean, "pixel_std": pixel_std}
        self.train_encoder = ClipEncoder(chat_encoder, num_frames, **sizes, **normalisation)
        self.eval_encoder = ClipEncoder(chat_encoder, None, **sizes, **normalisation)

    def require_splits(self, *splits: str) -> None:
        """Fail before any training starts when a split has no shards (the error names dir and split)."""
        for split in splits:
            split_urls(self.data_dir, split)

    def dataset(self, split: str) -> wds.WebDataset:
        """The WebDataset pipeline of one split: shards → videos → (video, expression) → tensors."""
        training = split == TRAIN
        encoder = self.train_encoder if training else self.eval_encoder
        urls = split_urls(self.data_dir, split)
        handler = error_handler(self.on_error, urls, self.skips)
        samples = (
            wds.WebDataset(
                urls,
                shardshuffle=len(urls) if training else False,
                detshuffle=True,
                seed=self.seed,
                nodesplitter=wds.split_by_node,
                workersplitter=wds.split_by_worker,
                handler=handler,
                empty_check=False,
            )
            .map(decode_sample, handler=handler)
            .compose(expand_expressions)
        )
        if training and self.shuffle_buffer > 0:
            # Seeded by ``seed`` and the epoch, so that a run sees the same order again (webdataset's
            # plain shuffle seeds itself from the clock).
            samples = samples.compose(wds.detshuffle(self.shuffle_buffer, seed=self.seed))
        return samples.map(lambda pair: encoder(*pair), handler=handler)

    def _loader(self, split: str, batch_size: int) -> DataLoader:
        return DataLoader(
            self.dataset(split),
            batch_size=batch_size,
            num_workers=self.num_workers,
            collate_fn=lambda samples: collate_clips(samples, self.tokenizer.pad_token_id),
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(TRAIN, self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader(VAL, self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader(TEST, self.eval_batch_size)
