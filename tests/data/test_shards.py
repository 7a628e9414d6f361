"""Shard writing and reading: naming, manifest, round trip, and what corrupt input does."""

from __future__ import annotations

import json
import tarfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import webdataset

from lightning_desa2va.data.schema import SCHEMA_VERSION, SchemaVersionError, ShardFormatError, encode_sample
from lightning_desa2va.data.shards import (
    check_schema_version,
    read_manifest,
    read_split,
    split_urls,
    tar_problem,
    update_manifest,
    write_split,
    write_synthetic_benchmark,
)
from lightning_desa2va.data.skips import SkipCounter, error_handler
from lightning_desa2va.data.synthetic import SyntheticConfig, expression_type_counts, generate_split

CFG = SyntheticConfig(num_frames=3, image_size=64, radius_range=(5, 8), speeds={"slow": 1.0, "fast": 2.0})
COUNTS = {"train": 7, "val": 3, "test": 2}
PER_SHARD = 3
SEED = 11
JPEG_MEAN_ABS_TOL = 2.0
TAR_BLOCK = 512


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[Path]]]:
    out = tmp_path_factory.mktemp("bench")
    return out, write_synthetic_benchmark(out, CFG, COUNTS, SEED, PER_SHARD)


@pytest.fixture
def copy_of_train(bench, tmp_path: Path) -> list[str]:
    """A private copy of the train shards that a test may damage."""
    _, shards = bench
    for p in shards["train"]:
        (tmp_path / p.name).write_bytes(p.read_bytes())
    return split_urls(tmp_path, "train")


def test_shard_names_and_counts(bench) -> None:
    out, shards = bench
    assert [p.name for p in shards["train"]] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert [p.name for p in shards["val"]] == ["val-000000.tar"]
    assert split_urls(out, "train") == [str(p) for p in shards["train"]]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["manifest.json", *(p.name for s in shards.values() for p in s)]
    )


def test_manifest(bench) -> None:
    out, _ = bench
    manifest = read_manifest(out)
    assert manifest["schema_version"] == SCHEMA_VERSION
    assert manifest["seed"] == SEED
    assert SyntheticConfig(**manifest["config"]) == CFG
    assert json.loads(json.dumps(asdict(CFG))) == manifest["config"]
    for split, count in COUNTS.items():
        entry = manifest["splits"][split]
        expected = expression_type_counts(generate_split(CFG, split, count, SEED))
        assert entry["num_videos"] == count
        assert entry["num_frames"] == count * CFG.num_frames
        assert entry["expression_types"] == {k: expected[k] for k in ("static", "motion", "mixed")}
        assert entry["multi_object_expressions"] == expected["multi_object"]
        assert entry["num_expressions"] == sum(entry["expression_types"].values())


def test_round_trip(bench) -> None:
    out, _ = bench
    for split, count in COUNTS.items():
        read = list(read_split(split_urls(out, split)))
        made = list(generate_split(CFG, split, count, SEED))
        assert [r.video_id for r in read] == [m.video_id for m in made]
        for r, m in zip(read, made, strict=True):
            assert r.meta() == m.meta()
            for t in range(m.num_frames):
                np.testing.assert_array_equal(r.mask(t), m.mask(t))
                assert np.abs(r.frame(t).astype(int) - m.frame(t).astype(int)).mean() < JPEG_MEAN_ABS_TOL


def test_writing_is_reproducible_and_replaces_stale_shards(bench, tmp_path: Path) -> None:
    _, shards = bench
    (tmp_path / "train-000009.tar").write_bytes(b"stale")
    (tmp_path / "train-extra-000000.tar").write_bytes(b"another split")
    written = write_split(generate_split(CFG, "train", COUNTS["train"], SEED), tmp_path, "train", PER_SHARD)
    assert [p.read_bytes() for p in written] == [p.read_bytes() for p in shards["train"]]
    assert not (tmp_path / "train-000009.tar").exists()
    assert (tmp_path / "train-extra-000000.tar").exists()


def test_missing_split_names_dir_and_split(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=rf"'nope'.*{tmp_path}"):
        split_urls(tmp_path, "nope")
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        read_manifest(tmp_path)


def test_truncated_shard(copy_of_train: list[str]) -> None:
    broken = Path(copy_of_train[1])
    data = broken.read_bytes()
    broken.write_bytes(data[: len(data) // 2 + 7])
    with pytest.raises(ShardFormatError, match=str(broken)):
        list(read_split(copy_of_train))
    skips = SkipCounter()
    survivors = list(read_split(copy_of_train, on_error="skip", skips=skips))
    assert skips.count >= 1 and any(str(broken) in m for m in skips.messages)
    assert skips.totals()["truncated_tar"] >= 1
    ids = [s.video_id for s in survivors]
    assert {"train-000000", "train-000001", "train-000002", "train-000006"} <= set(ids)
    assert len(ids) < COUNTS["train"]


def test_garbage_header(copy_of_train: list[str]) -> None:
    broken = Path(copy_of_train[0])
    data = bytearray(broken.read_bytes())
    data[:TAR_BLOCK] = bytes(range(256)) * (TAR_BLOCK // 256)
    broken.write_bytes(bytes(data))
    with pytest.raises(ShardFormatError, match=str(broken)):
        list(read_split(copy_of_train))
    skips = SkipCounter()
    survivors = list(read_split(copy_of_train, on_error="skip", skips=skips))
    assert skips.count >= 1
    assert [s.video_id for s in survivors][-4:] == [f"train-{i:06d}" for i in range(3, 7)]


def test_a_sample_of_another_schema_version_raises_even_when_skipping(tmp_path: Path) -> None:
    good, old = list(generate_split(CFG, "val", 2, SEED))
    raw = encode_sample(old)
    meta = json.loads(raw["meta.json"])
    meta["schema_version"] = 1
    raw["meta.json"] = json.dumps(meta).encode()
    path = tmp_path / "val-000000.tar"
    with webdataset.TarWriter(str(path)) as sink:
        sink.write(encode_sample(good))
        sink.write(raw)
    for on_error in ("raise", "skip"):
        with pytest.raises(SchemaVersionError, match=rf"{path}.*{old.video_id}.*schema_version 1"):
            list(read_split([str(path)], on_error=on_error))


def test_a_bad_sample_is_skipped_and_counted_by_reason(tmp_path: Path) -> None:
    good, bad = list(generate_split(CFG, "val", 2, SEED))
    raw = encode_sample(bad)
    del raw["mask_001.png"]
    path = tmp_path / "val-000000.tar"
    with webdataset.TarWriter(str(path)) as sink:
        sink.write(raw)
        sink.write(encode_sample(good))
    with pytest.raises(ShardFormatError, match=rf"{path}.*{bad.video_id}.*mask"):
        list(read_split([str(path)]))
    skips = SkipCounter()
    assert [s.video_id for s in read_split([str(path)], on_error="skip", skips=skips)] == [good.video_id]
    assert skips.totals() == {**dict.fromkeys(skips.totals(), 0), "missing_mask": 1}
    assert bad.video_id in skips.messages[0]


def test_manifest_version_check_and_converted_splits_merge(tmp_path: Path) -> None:
    source = {"format": "mevis", "root": "/data/mevis"}
    update_manifest(tmp_path, source, "train", {"num_videos": 3})
    manifest = update_manifest(tmp_path, source, "valid_u", {"num_videos": 1})
    assert set(manifest["splits"]) == {"train", "valid_u"} and manifest["schema_version"] == SCHEMA_VERSION
    check_schema_version(tmp_path)
    other = update_manifest(tmp_path, {"format": "refcoco", "root": "/x"}, "val", {"num_videos": 2})
    assert set(other["splits"]) == {"val"}  # another source starts afresh
    (tmp_path / "manifest.json").write_text(json.dumps({"schema_version": 1}))
    with pytest.raises(SchemaVersionError, match=rf"{tmp_path}.*version 1.*version {SCHEMA_VERSION}"):
        check_schema_version(tmp_path)


def test_version_2_shards_read_unless_their_objects_overlapped(tmp_path: Path) -> None:
    """Version 2 painted overlapping objects into one id map: shards without overlaps read as they are,
    shards whose manifest counted overlapping pixels must be rebuilt to score against the published masks."""
    splits = {"train": {"overlapping_pixels": 0}, "val": {"overlapping_pixels": 0}}
    (tmp_path / "manifest.json").write_text(json.dumps({"schema_version": 2, "splits": splits}))
    check_schema_version(tmp_path)
    splits["val"]["overlapping_pixels"] = 37
    (tmp_path / "manifest.json").write_text(json.dumps({"schema_version": 2, "splits": splits}))
    with pytest.raises(
        SchemaVersionError, match=r"version 2.*'val': 37.*rebuild them with desa2va shards build"
    ):
        check_schema_version(tmp_path)


def test_unknown_on_error(bench) -> None:
    out, _ = bench
    with pytest.raises(ValueError, match="on_error"):
        next(read_split(split_urls(out, "val"), on_error="ignore"))


def test_handlers() -> None:
    train, val = "/d/train-000000.tar", "/d/val-000000.tar"
    raising = error_handler("raise", [train])
    with pytest.raises(KeyError):  # not about reading a shard: left as it is
        raising(KeyError("frames"))
    with pytest.raises(ShardFormatError, match=train):
        raising(OSError("unexpected end of data", train))
    shared = SkipCounter()
    with pytest.raises(KeyError):  # a bug is not bad data: never skipped
        shared(KeyError("frames"))
    assert error_handler("skip", [train], shared) is shared
    error_handler("skip", [val], shared)  # one counter may serve several splits
    assert shared(OSError("bad header", train)) is True
    assert shared(OSError("bad header", val)) is True
    assert shared.count == 2 and train in shared.messages[0] and val in shared.messages[1]


def test_a_tar_cut_right_before_a_member_is_reported_not_read_as_shorter(copy_of_train: list[str]) -> None:
    path = Path(copy_of_train[0])
    with tarfile.open(path) as tar:
        second = next(m for m in tar.getmembers() if m.name.startswith("train-000001."))
    path.write_bytes(path.read_bytes()[: second.offset])  # whole blocks, ends where a header would start
    assert tar_problem(str(path)) is not None and tar_problem(copy_of_train[1]) is None
    with pytest.raises(ShardFormatError, match=rf"{path}.*end-of-archive"):
        list(read_split([str(path)]))
    skips = SkipCounter()
    assert [s.video_id for s in read_split([str(path)], on_error="skip", skips=skips)] == ["train-000000"]
    assert skips.totals()["truncated_tar"] == 1
