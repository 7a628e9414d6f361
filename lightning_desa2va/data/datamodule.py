"""The DataModule: WebDataset shards of the sample schema → batches of (clip, one expression).

Every expression of every video is one sample. Training reads ``data_dir``'s train shards once per epoch,
split by node and by DataLoader worker so that no sample repeats within an epoch, shuffled by shard and
through a buffer seeded by the epoch; or, with ``train_mix``, several data sets drawn by weight from endlessly
resampled shards, ``samples_per_epoch`` samples an epoch. Validation and test read ``data_dir`` in order,
whole videos (:mod:`~lightning_desa2va.data.clips` turns the pairs into tensors). Bad data is skipped and
counted by reason (``on_error=skip``, :meth:`RefVOSDataModule.skipped`) or raised (``on_error=raise``).

The training stream's position (:mod:`~lightning_desa2va.data.stream`) and the skip counts are the
DataModule's state: Lightning saves them in every checkpoint, and a run resumed from one reads on exactly
where it stopped.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import lightning.pytorch as pl
import torch
import webdataset as wds
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from lightning_desa2va.data.chat import ChatEncoder, ChatTemplates
from lightning_desa2va.data.clips import ClipEncoder, collate_clips
from lightning_desa2va.data.errors import SKIP_REASONS
from lightning_desa2va.data.schema import Expression, VideoSample, decode_sample
from lightning_desa2va.data.shards import check_schema_version, shard_reader, split_urls, verified
from lightning_desa2va.data.skips import ON_ERROR_CHOICES, SkipCounter, error_handler
from lightning_desa2va.data.stream import (
    POSITION_KEY,
    PassLoader,
    StreamPosition,
    TrainStream,
    batch_position,
)

log = logging.getLogger(__name__)

TRAIN, VAL, TEST = "train", "val", "test"
# The pipelines hold closures (error handlers, encoders) that only a forked loader worker inherits; a process
# whose default start method is spawn (a sweep worker) or forkserver (Python 3.14) cannot pickle them.
LOADER_START_METHOD = "fork"
Gathered = TypeVar("Gathered")


@dataclass
class MixEntry:
    """One data set of ``data.train_mix``: its shard directory and its share of the training samples."""

    data_dir: str
    weight: float


def expand_expressions(videos: Iterator[VideoSample]) -> Iterator[tuple[VideoSample, Expression]]:
    """One sample per (video, expression): every expression is supervised, none dropped."""
    for video in videos:
        for expression in video.expressions:
            yield video, expression


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
        on_error: str = "skip",
        seed: int = 0,
        sampling: str = "random_ordered",
        jpeg_draft: bool = True,
        keep_frames: int = 0,
        train_mix: list[dict[str, Any]] | None = None,
        samples_per_epoch: int | None = None,
    ) -> None:
        super().__init__()
        if on_error not in ON_ERROR_CHOICES:
            raise ValueError(f"data.on_error must be one of {ON_ERROR_CHOICES}, got {on_error!r}")
        self.data_dir = Path(data_dir)
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.on_error = on_error
        self.seed = seed
        self.train_mix = [MixEntry(str(e["data_dir"]), float(e["weight"])) for e in train_mix or []]
        self.samples_per_epoch = samples_per_epoch
        self._check_mix()
        self.skips = {split: SkipCounter(num_workers) for split in (TRAIN, VAL, TEST)}
        self.skips_before: dict[str, int] = dict.fromkeys(SKIP_REASONS, 0)
        """Skips counted before this process (by the run a resumed run continues)."""
        self.train_position = StreamPosition()
        """Where training has read up to on this rank (the batches trained on, not those prefetched)."""
        chat_encoder = ChatEncoder(tokenizer, ChatTemplates(**chat), image_tokens)
        sizes = {"sam_image_size": sam_image_size, "vlm_image_size": vlm_image_size}
        common = {
            "pixel_mean": pixel_mean,
            "pixel_std": pixel_std,
            "jpeg_draft": jpeg_draft,
            "keep_frames": keep_frames,
        }
        self.train_encoder = ClipEncoder(chat_encoder, num_frames, **sizes, **common, sampling=sampling)
        self.eval_encoder = ClipEncoder(chat_encoder, None, **sizes, **common)

    def _check_mix(self) -> None:
        if not self.train_mix:
            return
        if any(entry.weight <= 0 for entry in self.train_mix):
            weights = [entry.weight for entry in self.train_mix]
            raise ValueError(f"data.train_mix weights must be positive, got {weights}")
        if not self.samples_per_epoch or self.samples_per_epoch < 1:
            raise ValueError(
                "data.train_mix resamples its data sets endlessly: set data.samples_per_epoch >= 1"
            )

    def skipped(self) -> dict[str, int]:
        """Samples skipped so far by reason (every reason, zeros included), all splits and workers."""
        totals = dict(self.skips_before)
        for counter in self.skips.values():
            for reason, count in counter.totals().items():
                totals[reason] += count
        return totals

    def require_splits(self, *splits: str) -> None:
        """Fail before any training starts when a split has no shards or shards of another schema
        version (the error names directory and split)."""
        for split in splits:
            for data_dir in self._dirs(split):
                check_schema_version(data_dir)
                split_urls(data_dir, split)

    def _dirs(self, split: str) -> list[Path]:
        if split == TRAIN and self.train_mix:
            return [Path(entry.data_dir) for entry in self.train_mix]
        return [self.data_dir]

    def _expressions(
        self, source: wds.DataPipeline, handler: Any, shuffle_epoch: int | None = None
    ) -> wds.DataPipeline:
        """Raw samples → (video, expression) pairs, shuffled through a buffer seeded by ``seed`` and
        ``shuffle_epoch`` when one is given (webdataset's plain shuffle seeds itself from the clock)."""
        stages: list[Any] = [wds.map(decode_sample, handler=handler), expand_expressions]
        if shuffle_epoch is not None and self.shuffle_buffer > 0:
            stages.append(wds.detshuffle(self.shuffle_buffer, seed=self.seed, epoch=shuffle_epoch - 1))
        return source.compose(*stages)

    def dataset(self, split: str) -> TrainStream | wds.DataPipeline:
        """The samples of one split: shards → videos → (video, expression) → tensors. Training's is a
        :class:`~lightning_desa2va.data.stream.TrainStream` starting at :attr:`train_position`."""
        if split == TRAIN:
            stream = self._mixed_train() if self.train_mix else self._plain_train()
            stream.start = StreamPosition(self.train_position.epoch, dict(self.train_position.consumed))
            return stream
        check_schema_version(self.data_dir)
        urls = split_urls(self.data_dir, split)
        handler = error_handler(self.on_error, urls, self.skips[split])
        samples = self._expressions(shard_reader(urls, handler, split=True, split_samples=True), handler)
        return samples.compose(wds.map(lambda pair: self.eval_encoder(*pair), handler=handler))

    def _plain_train(self) -> TrainStream:
        """``data_dir``'s train shards, each pass shuffled by shard and through the buffer by its epoch."""
        check_schema_version(self.data_dir)
        urls = split_urls(self.data_dir, TRAIN)
        handler = error_handler(self.on_error, urls, self.skips[TRAIN])

        def pairs(epoch: int) -> wds.DataPipeline:
            shards = shard_reader(urls, handler, split=True, shuffle_seed=self.seed, epoch=epoch)
            return self._expressions(shards, handler, shuffle_epoch=epoch)

        return TrainStream(pairs, self.train_encoder, handler, self.seed)

    def _mixed_train(self) -> TrainStream:
        """Every data set of ``train_mix`` resampled endlessly (each rank and worker seeded apart, so
        they read different shards), drawn by weight, ``samples_per_epoch`` samples per rank an epoch."""
        urls = {}
        for entry in self.train_mix:
            check_schema_version(Path(entry.data_dir))
            urls[entry.data_dir] = split_urls(Path(entry.data_dir), TRAIN)
        every_url = [url for group in urls.values() for url in group]
        handler = error_handler(self.on_error, every_url, self.skips[TRAIN])
        assert self.samples_per_epoch is not None
        per_worker = math.ceil(self.samples_per_epoch / max(1, self.num_workers))

        def pairs(epoch: int) -> wds.DataPipeline:
            sources = []
            for index, entry in enumerate(self.train_mix):
                # each data set drawn by its own stream (seeded apart), each rank and worker too
                shards = wds.ResampledShards(urls[entry.data_dir], seed=self.seed + index, deterministic=True)
                shards.epoch = epoch - 1  # it counts its passes itself; a resumed stream starts at `epoch`
                source = wds.DataPipeline(shards, verified(handler), wds.tarfile_to_samples(handler=handler))
                sources.append(self._expressions(source, handler, shuffle_epoch=epoch))
            weights = [entry.weight for entry in self.train_mix]
            return wds.DataPipeline(wds.RandomMix(sources, weights)).with_epoch(per_worker)

        return TrainStream(pairs, self.train_encoder, handler, self.seed)

    def _loader(self, split: str, batch_size: int) -> DataLoader:
        training = split == TRAIN
        return (PassLoader if training else DataLoader)(
            self.dataset(split),
            batch_size=batch_size,
            num_workers=self.num_workers,
            collate_fn=self._collate,
            # training forks its workers anew each pass, with the stream's position for that pass
            persistent_workers=self.num_workers > 0 and not training,
            multiprocessing_context=LOADER_START_METHOD if self.num_workers > 0 else None,
        )

    def _collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = collate_clips(samples, self.tokenizer.pad_token_id)
        position = batch_position(samples)
        if position is not None:
            batch[POSITION_KEY] = position
        return batch

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Record the position of a batch about to be trained on (Lightning calls this hook just before the
        step, after any prefetching, so a checkpoint's position counts the batches actually trained on)."""
        position = batch.pop(POSITION_KEY, None) if isinstance(batch, dict) else None
        if position is not None and self.trainer is not None and self.trainer.training:
            self.train_position.advance(*position)
        return batch

    def state_dict(self) -> dict[str, Any]:
        """The training stream's position on every rank and the skip counts, for the checkpoint."""
        consumed = {str(worker): count for worker, count in self.train_position.consumed.items()}
        ranks = all_ranks(consumed)
        return {
            "epoch": self.train_position.epoch,
            "consumed": {str(rank): per_rank for rank, per_rank in enumerate(ranks)},
            "skipped": self.skipped(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint: the next training stream starts at its position (this rank's)."""
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        consumed = state.get("consumed", {}).get(str(rank), {})
        self.train_position = StreamPosition(
            int(state.get("epoch", 0)), {int(worker): int(n) for worker, n in consumed.items()}
        )
        self.skips_before = {reason: int(state.get("skipped", {}).get(reason, 0)) for reason in SKIP_REASONS}

    def train_dataloader(self) -> PassLoader:
        return self._loader(TRAIN, self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader(VAL, self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader(TEST, self.eval_batch_size)


def all_ranks(value: Gathered) -> list[Gathered]:
    """``value`` (any picklable object) of every rank, in rank order (this rank's alone outside distributed
    training)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return [value]
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, value)
    return gathered
