"""Bad shards through the DataModule: every kind of bad input is skipped and counted by reason (default)
or raised naming shard and key; the counts made in a DataLoader worker reach the main process and MLflow."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import webdataset
from hydra.utils import instantiate
from lightning.pytorch.loggers import MLFlowLogger
from mlflow.tracking import MlflowClient
from torch import nn

from lightning_desa2va.data.callbacks import SkippedDataLogger
from lightning_desa2va.data.errors import SKIP_REASONS, ShardFormatError
from lightning_desa2va.data.shards import write_synthetic_benchmark
from lightning_desa2va.data.synthetic import SyntheticConfig

SYNTHETIC = SyntheticConfig(
    num_frames=3, image_size=64, radius_range=(5, 8), speeds={"slow": 1.0, "fast": 2.0}
)
COUNTS = {"train": 6, "val": 4, "test": 1}


def rewrite(path: Path, damage: dict[str, Any]) -> None:
    """Rewrite a shard, passing each raw sample whose key is in ``damage`` through that function."""
    raws = list(webdataset.WebDataset(str(path), shardshuffle=False, empty_check=False))
    with webdataset.TarWriter(str(path)) as sink:
        for raw in raws:
            raw = {k: v for k, v in raw.items() if k in ("__key__",) or not k.startswith("__")}
            sink.write(damage.get(raw["__key__"], lambda r: r)(raw))


def with_meta(raw: dict, **changes: Any) -> dict:
    meta = json.loads(raw["meta.json"])
    meta.update(changes)
    return {**raw, "meta.json": json.dumps(meta).encode()}


def expressions_of(raw: dict) -> int:
    return len(json.loads(raw["meta.json"])["expressions"])


@pytest.fixture
def damaged(tmp_path: Path) -> tuple[Path, dict[str, int]]:
    """A benchmark with one bad sample per kind in train (two videos a shard) and a truncated val shard;
    returns it with the expected train skips by reason."""
    write_synthetic_benchmark(tmp_path, SYNTHETIC, COUNTS, seed=3, max_videos_per_shard=2)
    raws = {
        r["__key__"]: r
        for r in webdataset.WebDataset(str(tmp_path / "train-00000{0..2}.tar"), shardshuffle=False)
    }
    garbage = {f"frame_{t:03d}.jpg": b"not a jpeg" for t in range(SYNTHETIC.num_frames)}
    ghost = {
        "text": "the ghost",
        "object_ids": [99],
        "type": "static",
        "label": "",
        "attributes": {},
        "source_id": "",
    }
    rewrite(
        tmp_path / "train-000000.tar",
        {
            "train-000000": lambda r: {k: v for k, v in r.items() if k != "mask_001.png"},  # missing mask
            "train-000001": lambda r: {**r, **garbage},  # corrupt JPEG: every sample of the video fails
        },
    )
    rewrite(
        tmp_path / "train-000001.tar",
        {
            "train-000002": lambda r: with_meta(r, expressions=[ghost]),  # an object with no mask
            "train-000003": lambda r: {**r, "frame_003.jpg": r["frame_000.jpg"]},  # frame count
        },
    )
    rewrite(tmp_path / "train-000002.tar", {"train-000004": lambda r: {**r, "mask_002.png": b"\x89PNG junk"}})
    val = tmp_path / "val-000001.tar"
    val.write_bytes(val.read_bytes()[: val.stat().st_size // 2 + 7])  # mid-member, not at a 512-byte block
    expected = {
        **dict.fromkeys(SKIP_REASONS, 0),
        "missing_mask": 1,
        "corrupt_jpeg": expressions_of(raws["train-000001"]),
        "object_without_mask": 1,
        "frame_count_mismatch": 1,
        "corrupt_png": expressions_of(raws["train-000004"]),
    }
    return tmp_path, expected


def make_datamodule(compose, tokenizer, data_dir: Path, *overrides: str) -> Any:
    cfg = compose(f"paths.data_dir={data_dir}", "data.num_frames=3", "data.batch_size=2", *overrides)
    return instantiate(cfg.data, tokenizer=tokenizer, image_tokens=4, sam_image_size=32, vlm_image_size=16)


def test_skips_made_in_a_worker_reach_the_main_process_by_reason(compose, tokenizer, damaged) -> None:
    data_dir, expected = damaged
    data = make_datamodule(compose, tokenizer, data_dir, "data.num_workers=1", "data.sampling=all")
    assert data.on_error == "skip"  # the default
    videos = [video for batch in data.train_dataloader() for video in batch["video_id"]]
    assert set(videos) == {"train-000005"}  # the one good video
    assert data.skipped() == expected
    list(data.val_dataloader())
    assert data.skips["val"].totals()["truncated_tar"] >= 1


def test_on_error_raise_names_shard_and_key(compose, tokenizer, damaged) -> None:
    data_dir, _ = damaged
    data = make_datamodule(compose, tokenizer, data_dir, "data.num_workers=0", "data.on_error=raise")
    with pytest.raises(ShardFormatError, match=r"train-00000\d\.tar.*train-00000\d"):
        list(data.train_dataloader())
    with pytest.raises(ShardFormatError, match=r"val-000001\.tar"):
        list(data.val_dataloader())


class Consumer(pl.LightningModule):
    """The least a training loop needs: one parameter fitted to the batch's pixels."""

    def __init__(self) -> None:
        super().__init__()
        self.level = nn.Parameter(torch.zeros(()))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return (self.level - batch["frames"].mean()) ** 2

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_skip_counts_reach_mlflow_as_metrics(compose, tokenizer, damaged, tmp_path: Path) -> None:
    data_dir, expected = damaged
    data = make_datamodule(compose, tokenizer, data_dir, "data.num_workers=1", "data.sampling=all")
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    logger = MLFlowLogger(experiment_name="skips", tracking_uri=store)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=logger,
        callbacks=[SkippedDataLogger()],
        log_every_n_steps=1,
        limit_val_batches=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(Consumer(), datamodule=data)
    metrics = MlflowClient(tracking_uri=store).get_run(logger.run_id).data.metrics
    assert {name: int(value) for name, value in metrics.items()} == {
        f"data/skipped/{reason}": count for reason, count in expected.items()
    }
