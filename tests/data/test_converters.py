"""Converters: each dataset layout round-trips into shards pixel for pixel; bad source items are skipped
and counted by reason; the RefCOCO refs pickle admits builtins only."""

from __future__ import annotations

import json
import logging
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from source_layouts import (
    HEIGHT,
    REFCOCO_VAL_ANNS,
    WIDTH,
    Truth,
    overlap_objects,
    rectangle,
    rle,
    write_mevis,
    write_refcoco,
    write_refytvos,
)

from lightning_desa2va.cli import main
from lightning_desa2va.data.converters import DATASET_TYPES
from lightning_desa2va.data.converters.build import build_shards
from lightning_desa2va.data.converters.refcoco import load_refs
from lightning_desa2va.data.errors import SKIP_REASONS, ShardFormatError
from lightning_desa2va.data.schema import VideoSample
from lightning_desa2va.data.shards import read_manifest, read_split, split_urls


def shard_samples(out: Path, split: str) -> dict[str, VideoSample]:
    return {sample.video_id: sample for sample in read_split(split_urls(out, split))}


def check_round_trip(
    samples: dict[str, VideoSample], truth: Truth, fmt: str, exact_frames: bool = True
) -> None:
    """Masks, object ids, expressions (text, targets, ids) and frames of every video equal the source."""
    for video, sample in samples.items():
        count = len(truth.frames[video])
        assert sample.num_frames == count and len(sample.frame_names) == count
        ids = np.stack([sample.original_mask(t) for t in range(count)])
        shard_id = {track.source_id: track.id for track in sample.objects}
        assert set(shard_id) == {s for _, objects in truth.expressions[video].values() for s in objects}
        for source_id, shard_object in shard_id.items():
            np.testing.assert_array_equal(
                ids == shard_object, truth.objects[video][source_id], err_msg=source_id
            )
        source_of = {v: k for k, v in shard_id.items()}
        got = {e.source_id: (e.text, sorted(source_of[i] for i in e.object_ids)) for e in sample.expressions}
        assert got == {k: (text, sorted(objects)) for k, (text, objects) in truth.expressions[video].items()}
        assert {e.type for e in sample.expressions} == {DATASET_TYPES[fmt]}
        assert all(e.attributes == {} for e in sample.expressions)
        assert all((t.colour, t.shape, t.motion) == ("", "", "") for t in sample.objects)
        first = Image.open(truth.frames[video][0])
        assert sample.original_size == (first.height, first.width)
        if exact_frames:  # not resized: the source's JPEG bytes themselves
            assert sample.frame_data == [path.read_bytes() for path in truth.frames[video]]
            assert sample.frame(0).shape == (first.height, first.width, 3)


@pytest.mark.parametrize("workers", [1, 2])
def test_mevis_round_trips_pixel_for_pixel(tmp_path: Path, workers: int) -> None:
    truth = write_mevis(tmp_path / "mevis")
    report = build_shards("mevis", tmp_path / "mevis", "train", tmp_path / "out", workers=workers)
    samples = shard_samples(tmp_path / "out", "train")
    assert set(samples) == {"vid_a", "vid_b"}
    check_round_trip(samples, truth, "mevis")
    assert (report.videos, report.expressions, report.frames) == (2, 4, 7)
    assert sum(report.skipped.values()) == 0 and report.overlapping_pixels == 0
    vid_a = samples["vid_a"]
    assert vid_a.frame_names == ["00000", "00001", "00002", "00003"] and vid_a.source == "mevis/train"
    assert [(t.id, t.source_id) for t in vid_a.objects] == [(1, "0"), (2, "1"), (3, "2")]  # obj_id k -> k + 1
    assert not (vid_a.mask(2) == 2).any() and (vid_a.mask(1) == 2).any()  # object 1 leaves in frame 2
    (two,) = [e for e in vid_a.expressions if len(e.object_ids) == 2]
    target = np.isin(vid_a.mask(0), two.object_ids)
    np.testing.assert_array_equal(target, truth.objects["vid_a"]["0"][0] | truth.objects["vid_a"]["1"][0])
    manifest = read_manifest(tmp_path / "out")
    assert manifest["source"]["format"] == "mevis" and manifest["splits"]["train"]["num_expressions"] == 4


def test_workers_write_the_same_shards_as_one_process(tmp_path: Path) -> None:
    write_mevis(tmp_path / "mevis")
    one = build_shards("mevis", tmp_path / "mevis", "train", tmp_path / "one", workers=1, videos_per_shard=1)
    two = build_shards("mevis", tmp_path / "mevis", "train", tmp_path / "two", workers=2, videos_per_shard=1)
    assert [p.read_bytes() for p in one.shards] == [p.read_bytes() for p in two.shards]
    assert len(one.shards) == 2


def test_revos_layout_keeps_expressions_that_match_nothing(tmp_path: Path) -> None:
    truth = write_mevis(tmp_path / "ReVOS", split="train", revos=True)
    report = build_shards("revos", tmp_path / "ReVOS", "train", tmp_path / "out")
    samples = shard_samples(tmp_path / "out", "train")
    check_round_trip(samples, truth, "revos")
    (nothing,) = [e for e in samples["vid_b"].expressions if e.text == "the unicorn"]
    assert nothing.object_ids == [] and report.expressions == 5


@pytest.mark.parametrize("fmt", ["refytvos", "davis17"])
def test_palette_png_layouts_round_trip_with_non_contiguous_frames(tmp_path: Path, fmt: str) -> None:
    truth = write_refytvos(tmp_path / fmt)
    report = build_shards(fmt, tmp_path / fmt, "train", tmp_path / "out")
    samples = shard_samples(tmp_path / "out", "train")
    check_round_trip(samples, truth, fmt)
    video = samples["0a1b2c3d4e"]
    assert video.frame_names == ["00000", "00005", "00010"]
    assert [(t.id, t.source_id) for t in video.objects] == [(1, "1"), (2, "2")]  # palette ids as they are
    assert {e.source_id: e.label for e in video.expressions} == {"0": "person", "1": "dog"}  # meta.json
    assert (report.videos, report.expressions, report.frames) == (1, 2, 3)


def test_refcoco_images_become_one_frame_videos(tmp_path: Path) -> None:
    truth = write_refcoco(tmp_path / "data")
    for split in ("train", "val"):
        build_shards("refcoco", tmp_path / "data" / "refcoco", split, tmp_path / "out")
    build_shards("refcoco", tmp_path / "data" / "refcoco", "val", tmp_path / "out", out_split="test")
    assert shard_samples(tmp_path / "out", "test").keys() == shard_samples(tmp_path / "out", "val").keys()
    train, val = shard_samples(tmp_path / "out", "train"), shard_samples(tmp_path / "out", "val")
    in_val = {str(a) for a in REFCOCO_VAL_ANNS}
    for samples, wanted in ((train, False), (val, True)):
        split_truth = Truth(truth.frames, truth.objects, {})
        for video, expressions in truth.expressions.items():
            kept = {k: v for k, v in expressions.items() if (v[1][0] in in_val) == wanted}
            if kept:
                split_truth.expressions[video] = kept
        assert set(samples) == set(split_truth.expressions)
        check_round_trip(samples, split_truth, "refcoco")
    image = train["COCO_train2014_000000000001"]
    assert image.num_frames == 1 and image.original_size == (HEIGHT, WIDTH)
    assert {e.text: e.label for e in image.expressions} == {
        "man on the left": "bicycle",
        "homme à gauche": "bicycle",
        "bike in the corner": "person",
    }
    assert val["COCO_train2014_000000000002"].original_size == (30, 20)
    splits = read_manifest(tmp_path / "out")["splits"]
    assert set(splits) == {"train", "val", "test"} and splits["test"]["source_split"] == "val"


def test_max_size_resizes_frames_and_keeps_masks_at_both_sizes(tmp_path: Path) -> None:
    truth = write_mevis(tmp_path / "mevis")
    build_shards("mevis", tmp_path / "mevis", "train", tmp_path / "out", max_size=20)
    samples = shard_samples(tmp_path / "out", "train")
    check_round_trip(samples, truth, "mevis", exact_frames=False)
    video = samples["vid_a"]
    assert (video.size, video.original_size) == ((12, 20), (HEIGHT, WIDTH))
    assert video.frame(0).shape == (12, 20, 3)
    for t in range(video.num_frames):  # the small map samples the original at the pixel centres
        np.testing.assert_array_equal(video.mask(t), video.original_mask(t)[1::2, 1::2])
    source = np.asarray(Image.open(truth.frames["vid_a"][0]).resize((20, 12), Image.Resampling.LANCZOS))
    assert np.abs(video.frame(0).astype(int) - source).mean() < 8.0


def test_overlapping_masks_go_to_the_smaller_object_and_are_counted(tmp_path: Path) -> None:
    root = tmp_path / "mevis"
    write_mevis(root)
    small = overlap_objects(root)["11"][0]
    report = build_shards("mevis", root, "train", tmp_path / "out")
    video = shard_samples(tmp_path / "out", "train")["vid_a"]
    assert (video.mask(0)[small] == 2).all() and report.overlapping_pixels == 4 * int(small.sum())
    assert (
        read_manifest(tmp_path / "out")["splits"]["train"]["overlapping_pixels"] == report.overlapping_pixels
    )


def test_bad_source_items_are_skipped_counted_and_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "mevis"
    write_mevis(root)
    meta_path, mask_path = root / "train" / "meta_expressions.json", root / "train" / "mask_dict.json"
    meta, mask_dict = json.loads(meta_path.read_text()), json.loads(mask_path.read_text())
    vid_a = meta["videos"]["vid_a"]["expressions"]
    vid_a["3"] = {"exp": "an annotation nobody kept", "obj_id": [5], "anno_id": [99]}  # missing_mask
    vid_a["4"] = {"exp": "never visible", "obj_id": [6], "anno_id": [98]}  # object_without_mask
    vid_a["5"] = {"exp": "too few masks", "obj_id": [7], "anno_id": [97]}  # frame_count_mismatch
    mask_dict["98"] = [None] * 4
    mask_dict["97"] = [rle(rectangle(1, 1, 2, 2))] * 3
    meta_path.write_text(json.dumps(meta))
    mask_path.write_text(json.dumps(mask_dict))
    corrupt = root / "train" / "JPEGImages" / "vid_b" / "00001.jpg"
    corrupt.write_bytes(corrupt.read_bytes()[:200])  # truncated JPEG: vid_b is skipped
    with caplog.at_level(logging.WARNING):
        report = build_shards("mevis", root, "train", tmp_path / "out")
    expected = {**dict.fromkeys(SKIP_REASONS, 0), "missing_mask": 1, "object_without_mask": 1}
    assert report.skipped == {**expected, "frame_count_mismatch": 1, "corrupt_jpeg": 1}
    assert (report.videos, report.expressions) == (1, 3)
    assert any(str(corrupt) in record.getMessage() for record in caplog.records)
    assert any(
        "99" in record.getMessage() and "mask_dict" in record.getMessage() for record in caplog.records
    )
    assert read_manifest(tmp_path / "out")["splits"]["train"]["skipped"] == report.skipped
    (corrupt.parent / "00002.jpg").unlink()
    corrupt.write_bytes(b"")
    assert (
        build_shards("mevis", root, "train", tmp_path / "out2").skipped["missing_frame"] == 0
    )  # first error wins
    corrupt.unlink()
    assert build_shards("mevis", root, "train", tmp_path / "out3").skipped["missing_frame"] == 1


def test_palette_layout_skips_missing_and_corrupt_annotations(tmp_path: Path) -> None:
    root = tmp_path / "refytvos"
    write_refytvos(root)
    annotation = root / "train" / "Annotations" / "0a1b2c3d4e" / "00005.png"
    annotation.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    assert build_shards("refytvos", root, "train", tmp_path / "a").skipped["corrupt_png"] == 1
    annotation.unlink()
    report = build_shards("refytvos", root, "train", tmp_path / "b")
    assert report.skipped["missing_mask"] == 1 and report.videos == 0


def test_refs_pickle_with_anything_but_builtins_is_refused_naming_the_file(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (Path.touch, (marker,))

    path = tmp_path / "refs(unc).p"
    path.write_bytes(pickle.dumps([{"ref_id": 0, "payload": Exploit()}], protocol=2))
    with pytest.raises(ShardFormatError, match=r"refs\(unc\)\.p.*refuses global"):
        load_refs(path)
    assert not marker.exists()
    path.write_bytes(pickle.dumps({"not": "a list"}))
    with pytest.raises(ShardFormatError, match="list of dicts"):
        load_refs(path)


def test_python2_refs_strings_are_read_as_utf8(tmp_path: Path) -> None:
    # protocol 2 as Python 2 writes it: [{'sent': 'café'}] with SHORT_BINSTRING (8-bit str) opcodes
    text = "café".encode()
    data = b"\x80\x02]q\x00}q\x01U\x04sentq\x02U" + bytes([len(text)]) + text + b"q\x03sa."
    path = tmp_path / "refs(umd).p"
    path.write_bytes(data)
    assert load_refs(path) == [{"sent": "café"}]


def test_cli_builds_shards_and_prints_the_count(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_mevis(tmp_path / "mevis")
    out = tmp_path / "out"
    main(["shards", "build", "--format", "mevis", "--root", str(tmp_path / "mevis"), "--split", "train",
          "--as", "val", "--out", str(out), "--workers", "1", "--max-size", "32"])  # fmt: skip
    printed = capsys.readouterr().out
    assert "videos" in printed and "expressions" in printed and "frames" in printed
    assert re.search(r"\|\s*videos\s*\|\s*2\s*\|", printed) and re.search(
        r"\|\s*frames\s*\|\s*7\s*\|", printed
    )
    assert shard_samples(out, "val")["vid_a"].size == (19, 32)  # written as the split the DataModule reads
    with pytest.raises(SystemExit) as exit_info:
        main(["shards", "build", "--format", "mevis", "--root", str(tmp_path / "nowhere"), "--split", "train",
              "--out", str(out)])  # fmt: skip
    assert exit_info.value.code == 2
    assert "nowhere" in capsys.readouterr().err
