"""The training stream and its position, so that a resumed run reads exactly the samples an uninterrupted one
would have read.

A pass (epoch) over the training data is a deterministic function of (seed, epoch, rank, loader worker):
the shard order and the shuffle buffer are seeded by the epoch, and each sample's own random choices (which
frames a clip takes) come from a generator seeded by its place in its worker's stream. Every batch carries
where it came from (:data:`POSITION_KEY`); the DataModule records the position of each batch that is trained
on, and Lightning keeps that record in the checkpoint. A resumed stream starts at the recorded epoch and
skips, in each worker, the samples already trained on before anything is decoded.
"""

from __future__ import annotations

import hashlib
import itertools
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset
from webdataset.utils import pytorch_worker_info

from lightning_desa2va.data.schema import Expression, VideoSample

POSITION_KEY = "stream_position"
"""A training batch's origin: (epoch, loader worker, samples of the worker's pass up to the batch's last)."""
SEED_BYTES = 8

Pairs = Callable[[int], Iterable[tuple[VideoSample, Expression]]]
"""The (video, expression) pairs of one pass, given its epoch, in this worker's order."""
Encode = Callable[[VideoSample, Expression, torch.Generator], dict[str, Any]]
Handler = Callable[[Exception], bool]


def stream_seed(*parts: int) -> int:
    """A seed mixed from integers (seed, epoch, rank, worker, index): unrelated streams for neighbouring
    values, the same value on every platform and Python version."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=SEED_BYTES).digest()
    return int.from_bytes(digest, "little") >> 1  # non-negative, as torch.Generator.manual_seed requires


@dataclass
class StreamPosition:
    """How far training has read: the epoch of the last trained batch and, per loader worker of each rank,
    how many samples of that epoch's pass it has consumed."""

    epoch: int = 0
    consumed: dict[int, int] = field(default_factory=dict)

    def advance(self, epoch: int, worker: int, through: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.consumed = epoch, {}
        self.consumed[worker] = through

    def next_pass(self) -> StreamPosition:
        """Where the pass after a finished one starts."""
        return StreamPosition(self.epoch + 1)


class TrainStream(IterableDataset):
    """The training samples, one deterministic pass after another, the first starting at :attr:`start`.

    ``pairs(epoch)`` gives a pass's (video, expression) pairs in this worker's order (already split by rank
    and worker, shuffled by the epoch); ``encode`` turns a pair into tensors, drawing its random choices from
    the generator it is given. Bad samples go to ``handler`` (skip and count, or raise) as in the rest of
    the pipeline.
    """

    def __init__(self, pairs: Pairs, encode: Encode, handler: Handler, seed: int) -> None:
        self.pairs = pairs
        self.encode = encode
        self.handler = handler
        self.seed = seed
        self.start = StreamPosition()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        # read the position now: a loader worker is forked with it, and the loader moves on for the next pass
        return self._pass(self.start.epoch, dict(self.start.consumed))

    def _pass(self, epoch: int, skip: dict[int, int]) -> Iterator[dict[str, Any]]:
        rank, _, worker, _ = pytorch_worker_info()
        seed_libraries(stream_seed(self.seed, epoch, rank, worker))  # e.g. webdataset's RandomMix draws
        consumed = skip.get(worker, 0)
        pairs = iter(self.pairs(epoch))
        for index in itertools.count():
            # bad data met while skipping what was trained on was counted before the run was interrupted
            self._count_skips(index >= consumed)
            pair = next(pairs, None)
            if pair is None:
                return
            if index < consumed:
                continue
            generator = torch.Generator().manual_seed(stream_seed(self.seed, epoch, rank, worker, index))
            try:
                sample = self.encode(*pair, generator)
            except Exception as error:  # the handler raises what it does not skip
                self.handler(error)
                continue
            sample[POSITION_KEY] = (epoch, worker, index + 1)
            yield sample

    def _count_skips(self, counting: bool) -> None:
        if hasattr(self.handler, "counting"):
            self.handler.counting = counting


def seed_libraries(seed: int) -> None:
    """Seed the global generators a library may draw from inside a pass (Python's, NumPy's, torch's)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def batch_position(samples: list[dict[str, Any]]) -> tuple[int, int, int] | None:
    """The position of a batch collated from ``samples``: that of its last sample (a worker's samples come in
    order), or ``None`` for samples that are not from a :class:`TrainStream`."""
    return samples[-1].get(POSITION_KEY) if samples else None


class PassLoader(DataLoader):
    """A DataLoader over a :class:`TrainStream` that starts each pass (``iter``) where the last one left off:
    the first at the stream's start (a resumed position), every later one at the next epoch's beginning."""

    dataset: TrainStream

    def __iter__(self) -> Any:
        iterator = super().__iter__()  # workers are forked here, each with the stream's current start
        self.dataset.start = self.dataset.start.next_pass()
        return iterator
