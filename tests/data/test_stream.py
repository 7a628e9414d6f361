"""The training stream's position: a DataModule restored from a recorded position reads on with exactly the
batches (videos, expressions, sampled frames) an uninterrupted one reads, across epochs, with and without a
loader worker."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from hydra.utils import instantiate

from lightning_desa2va.data.shards import write_synthetic_benchmark
from lightning_desa2va.data.stream import POSITION_KEY, StreamPosition, stream_seed
from lightning_desa2va.data.synthetic import SyntheticConfig

SYNTHETIC = SyntheticConfig(num_frames=6, image_size=64, radius_range=(5, 8))
COUNTS = {"train": 4, "val": 1, "test": 1}
EPOCHS = 3


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("stream")
    write_synthetic_benchmark(out, SYNTHETIC, COUNTS, seed=0, max_videos_per_shard=2)
    return out


def datamodule(compose, tokenizer, data_dir: Path, workers: int) -> Any:
    cfg = compose(
        f"paths.data_dir={data_dir}",
        "data.num_frames=2",
        "data.batch_size=3",
        f"data.num_workers={workers}",
        "data.shuffle_buffer=8",
    )
    return instantiate(cfg.data, tokenizer=tokenizer, image_tokens=4, sam_image_size=32, vlm_image_size=16)


def fingerprint(batch: dict[str, Any]) -> tuple:
    """What a batch is: its clips (video, expression) and their frames' pixels."""
    return tuple(batch["video_id"]), tuple(batch["expression"]), round(float(batch["frames"].sum()), 3)


def read_epochs(module: Any, epochs: int, record: bool = False) -> list[tuple]:
    """Fingerprints of the batches of ``epochs`` passes; ``record``: the module records each batch's position
    as Lightning's batch hook would (the hook is called on every batch about to be trained on)."""
    loader = module.train_dataloader()
    batches = []
    for _ in range(epochs):
        for batch in loader:
            if record:
                module.train_position.advance(*batch[POSITION_KEY])
            batches.append((fingerprint(batch), batch[POSITION_KEY]))
    return batches


@pytest.mark.parametrize("workers", [0, 1])
@pytest.mark.parametrize("stop_after", [2, 5])
def test_a_restored_position_reads_on_with_the_uninterrupted_batches(
    compose, tokenizer, data_dir, workers, stop_after
) -> None:
    uninterrupted = read_epochs(datamodule(compose, tokenizer, data_dir, workers), EPOCHS)
    assert len({epoch for _, (epoch, _, _) in uninterrupted}) == EPOCHS
    torch.manual_seed(123)  # whatever the global generators hold, the stream draws from its own

    first = datamodule(compose, tokenizer, data_dir, workers)
    loader = first.train_dataloader()
    trained = []
    for batch in loader:
        first.train_position.advance(*batch[POSITION_KEY])
        trained.append(fingerprint(batch))
        if len(trained) == stop_after:
            break
    state = first.state_dict()

    resumed = datamodule(compose, tokenizer, data_dir, workers)
    resumed.load_state_dict(state)
    rest = [fp for fp, _ in read_epochs(resumed, EPOCHS)]
    expected = [fp for fp, _ in uninterrupted]
    assert trained + rest[: len(expected) - stop_after] == expected


def test_the_position_counts_per_worker_and_starts_over_each_epoch() -> None:
    position = StreamPosition()
    position.advance(0, 0, 3)
    position.advance(0, 1, 3)
    position.advance(0, 0, 6)
    assert (position.epoch, position.consumed) == (0, {0: 6, 1: 3})
    position.advance(1, 1, 2)
    assert (position.epoch, position.consumed) == (1, {1: 2})
    assert position.next_pass() == StreamPosition(2, {})


def test_stream_seeds_differ_for_neighbouring_parts_and_repeat_for_the_same() -> None:
    seeds = {
        stream_seed(0, epoch, 0, worker, index)
        for epoch in range(3)
        for worker in range(2)
        for index in range(50)
    }
    assert len(seeds) == 3 * 2 * 50
    assert stream_seed(1, 2, 3) == stream_seed(1, 2, 3) >= 0
