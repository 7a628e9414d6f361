"""Shards of an older schema version: the demo rewrites its own synthetic benchmark, anything else fails
before training with a message naming the directory and both versions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lightning_desa2va.data.schema import SCHEMA_VERSION, SchemaVersionError
from lightning_desa2va.data.shards import read_manifest, read_split, split_urls, update_manifest
from lightning_desa2va.pipeline import ensure_synthetic_shards

VIDEOS = {"train": 2, "val": 1, "test": 1}


def synthetic_cfg(compose, data_dir: Path):
    videos = ",".join(f"{split}:{count}" for split, count in VIDEOS.items())
    return compose(f"paths.data_dir={data_dir}", f"synthetic.videos={{{videos}}}")


def downgrade(data_dir: Path) -> None:
    manifest = read_manifest(data_dir)
    (data_dir / "manifest.json").write_text(json.dumps({**manifest, "schema_version": 1}))


def test_the_demo_rewrites_a_synthetic_benchmark_of_an_older_version(compose, tmp_path: Path) -> None:
    cfg = synthetic_cfg(compose, tmp_path)
    ensure_synthetic_shards(cfg)
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.tar")}
    ensure_synthetic_shards(cfg)  # current version: used as it is
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.tar")} == before
    downgrade(tmp_path)
    ensure_synthetic_shards(cfg)
    assert read_manifest(tmp_path)["schema_version"] == SCHEMA_VERSION
    assert len(list(read_split(split_urls(tmp_path, "train")))) == VIDEOS["train"]


def test_older_converted_shards_fail_before_training_naming_dir_and_versions(
    compose, tokenizer, tmp_path: Path
) -> None:
    from hydra.utils import instantiate

    cfg = synthetic_cfg(compose, tmp_path)
    ensure_synthetic_shards(cfg)
    update_manifest(tmp_path, {"format": "mevis", "root": "/raw/mevis", "max_size": None}, "train", {})
    downgrade(tmp_path)
    with pytest.raises(SchemaVersionError, match=rf"{tmp_path}.*version 1.*version {SCHEMA_VERSION}"):
        ensure_synthetic_shards(cfg)
    data = instantiate(cfg.data, tokenizer=tokenizer, image_tokens=4, sam_image_size=32, vlm_image_size=16)
    with pytest.raises(SchemaVersionError, match="shards build"):
        data.require_splits("train", "val")
