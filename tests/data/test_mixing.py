"""Training across data sets and processes: weighted mixing of two converted formats, and splitting by
node and worker so that each sample is read once an epoch."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hydra.utils import instantiate
from source_layouts import write_mevis, write_refcoco

from lightning_desa2va.data.converters.build import build_shards
from lightning_desa2va.data.shards import read_split, split_urls, write_synthetic_benchmark
from lightning_desa2va.data.synthetic import SyntheticConfig

MIX_SAMPLES = 1000
MIX_TOLERANCE = 0.05
RANKS, WORKERS = 2, 2
SYNTHETIC = SyntheticConfig(
    num_frames=3, image_size=64, radius_range=(5, 8), speeds={"slow": 1.0, "fast": 2.0}
)


def datamodule(compose, tokenizer, data_dir: Path, *overrides: str) -> Any:
    """The configured DataModule over ``data_dir`` with small model inputs (tokens as the tiny VLM's)."""
    cfg = compose(f"paths.data_dir={data_dir}", "data.num_workers=0", *overrides)
    return instantiate(cfg.data, tokenizer=tokenizer, image_tokens=4, sam_image_size=32, vlm_image_size=16)


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """MeViS and RefCOCO fixtures converted to shards (train split)."""
    root = tmp_path_factory.mktemp("sources")
    write_mevis(root / "mevis")
    write_refcoco(root / "data")
    out = {"mevis": root / "mevis_shards", "refcoco": root / "refcoco_shards"}
    build_shards("mevis", root / "mevis", "train", out["mevis"])
    build_shards("refcoco", root / "data" / "refcoco", "train", out["refcoco"])
    return out


def test_two_formats_mix_in_the_configured_ratio(compose, tokenizer, converted) -> None:
    mix = f"[{{data_dir:'{converted['mevis']}',weight:0.7}},{{data_dir:'{converted['refcoco']}',weight:0.3}}]"
    data = datamodule(
        compose,
        tokenizer,
        converted["mevis"],
        f"data.train_mix={mix}",
        f"data.samples_per_epoch={MIX_SAMPLES}",
    )
    data.require_splits("train")
    samples = list(data.dataset("train"))
    assert len(samples) == MIX_SAMPLES  # the epoch is samples_per_epoch long, from endlessly resampled shards
    refcoco = sum(sample["video_id"].startswith("COCO_") for sample in samples)
    assert abs(refcoco / MIX_SAMPLES - 0.3) < MIX_TOLERANCE
    assert {s["frames"].shape[0] for s in samples} == {
        data.train_encoder.num_frames
    }  # images: frame repeated
    assert {s["expression_type"] for s in samples} == {"motion", "static"}


def test_mixing_needs_an_epoch_length_and_positive_weights(compose, tokenizer, converted) -> None:
    mix = f"[{{data_dir:'{converted['mevis']}',weight:1}}]"
    with pytest.raises(Exception, match="samples_per_epoch"):
        datamodule(compose, tokenizer, converted["mevis"], f"data.train_mix={mix}")
    zero = f"[{{data_dir:'{converted['mevis']}',weight:0}}]"
    with pytest.raises(Exception, match="weights must be positive"):
        datamodule(
            compose, tokenizer, converted["mevis"], f"data.train_mix={zero}", "data.samples_per_epoch=4"
        )


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    write_synthetic_benchmark(
        out, SYNTHETIC, {"train": 10, "val": 8, "test": 1}, seed=0, max_videos_per_shard=2
    )
    return out


@pytest.mark.parametrize("split", ["train", "val"])
def test_two_ranks_of_two_workers_read_each_sample_once(
    compose, tokenizer, synthetic: Path, split: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = datamodule(compose, tokenizer, synthetic, f"data.num_frames={SYNTHETIC.num_frames}")
    expected = Counter(
        (video.video_id, expression.text)
        for video in read_split(split_urls(synthetic, split))
        for expression in video.expressions
    )
    seen: Counter = Counter()
    per_reader = []
    monkeypatch.setenv("WORLD_SIZE", str(RANKS))
    monkeypatch.setenv("NUM_WORKERS", str(WORKERS))
    for rank in range(RANKS):
        for worker in range(WORKERS):
            monkeypatch.setenv("RANK", str(rank))  # what webdataset reads for the node and worker split
            monkeypatch.setenv("WORKER", str(worker))
            pairs = [(s["video_id"], s["expression"]) for s in data.dataset(split)]
            per_reader.append(len(pairs))
            seen.update(pairs)
    assert seen == expected  # every (video, expression) once, none twice
    assert all(count > 0 for count in per_reader)


def test_the_mixed_config_composes_over_the_defaults(compose) -> None:
    data = compose("data=mixed").data
    assert [(entry.data_dir, entry.weight) for entry in data.train_mix] == [
        ("data/mevis", 0.7),
        ("data/refcoco", 0.3),
    ]
    assert (data.samples_per_epoch, data.eval_batch_size, data.on_error) == (20000, 1, "skip")
    assert data.num_frames == compose().data.num_frames  # the rest is shapes.yaml's
