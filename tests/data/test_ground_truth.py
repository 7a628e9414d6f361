"""Ground truth as published: where objects overlap each keeps its own mask (schema 3's ``rle.json``) and an
expression scores 1.0 J&F against the published masks; ``desa2va shards masks`` writes it in the servers'
layout; splits published without masks convert for inference only."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from source_layouts import YTVOS_FRAMES, overlap_objects, write_mevis, write_refytvos

from lightning_desa2va.cli import main
from lightning_desa2va.data.clips import original_target
from lightning_desa2va.data.converters.build import build_shards
from lightning_desa2va.data.schema import SCHEMA_VERSION, VideoSample, decode_sample, encode_sample
from lightning_desa2va.data.shards import read_manifest, read_split, split_urls
from lightning_desa2va.metrics import JFMetric


def samples(out: Path, split: str) -> dict[str, VideoSample]:
    return {sample.video_id: sample for sample in read_split(split_urls(out, split))}


@pytest.fixture
def overlapping(tmp_path: Path) -> tuple[Path, Path, dict[str, np.ndarray]]:
    """MeViS with objects 0 and 1 of "vid_a" overlapping (1 inside 0), converted (frames resized too)."""
    root, out = tmp_path / "mevis", tmp_path / "shards"
    write_mevis(root)
    published = overlap_objects(root)
    build_shards("mevis", root, "train", out, max_size=20)
    return root, out, published


def test_overlapping_objects_each_score_1_against_the_published_masks(overlapping) -> None:
    """The ground truth scoring reads (original size) is each expression's union of published masks; the
    painted id map alone would have cut the small object out of the large one's."""
    root, out, published = overlapping
    video = samples(out, "train")["vid_a"]
    assert video.object_rles and video.resized
    meta = json.loads((root / "train" / "meta_expressions.json").read_text())["videos"]["vid_a"]
    frames = list(range(video.num_frames))
    stored = np.stack([video.mask(t) for t in frames])
    for expression in video.expressions:
        annos = [str(a) for a in meta["expressions"][expression.source_id]["anno_id"]]
        if not set(annos) & set(published):
            continue
        truth = np.any([published[a] for a in annos], axis=0)
        scored = original_target(video, expression.object_ids, frames, stored)
        jf = JFMetric()
        jf.update(scored[None], torch.from_numpy(truth)[None], [expression.type])
        assert jf.compute()["JF"] == 1.0, expression.text
    painted = np.stack([video.original_mask(t) for t in frames]) == 1  # object 0, painted
    assert not np.array_equal(painted, published["10"])  # what version 2 scored against


def test_training_targets_keep_the_overlap_at_the_stored_size(overlapping, compose, tokenizer) -> None:
    from hydra.utils import instantiate

    _, out, published = overlapping
    video = samples(out, "train")["vid_a"]
    expression = next(e for e in video.expressions if e.object_ids == [1])  # object 0: the large one
    data = instantiate(
        compose(f"paths.data_dir={out}").data,
        tokenizer=tokenizer,
        image_tokens=4,
        sam_image_size=20,
        vlm_image_size=16,
    )
    target = data.eval_encoder(video, expression)["target_masks"]  # 20 x 20 from the 12 x 20 stored masks
    small_inside = torch.from_numpy(np.isin(video.mask(0), [2]))  # object 1's pixels, stored size
    assert target.any() and small_inside.any()
    stored = torch.from_numpy(video.target_mask(0, [1]))
    assert stored[small_inside].all()  # the large object's own mask covers the small one
    assert torch.equal(
        torch.from_numpy(video.target_mask(0, [1], original=True)), torch.from_numpy(published["10"][0])
    )


def test_shards_masks_writes_each_expressions_ground_truth_in_the_servers_layout(overlapping, capsys) -> None:
    root, out, published = overlapping
    gt = out.parent / "gt"
    main(["shards", "masks", str(out), "--split", "train", "--out", str(gt)])
    assert "ground truth of 4 expressions" in capsys.readouterr().out
    meta = json.loads((root / "train" / "meta_expressions.json").read_text())["videos"]
    written = sorted(path.relative_to(gt).as_posix() for path in gt.rglob("*.png"))
    assert written == sorted(
        f"{video}/{exp_id}/{frame}.png"
        for video, entry in meta.items()
        for exp_id in entry["expressions"]
        for frame in entry["frames"]
    )
    for frame_index, frame in enumerate(meta["vid_a"]["frames"]):
        mask = np.asarray(Image.open(gt / "vid_a" / "0" / f"{frame}.png"))  # expression 0 names object 0
        assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
        np.testing.assert_array_equal(mask > 0, published["10"][frame_index])


@pytest.mark.parametrize("fmt", ["mevis", "refytvos"])
def test_splits_published_without_masks_convert_for_inference_only(tmp_path: Path, fmt: str, capsys) -> None:
    root, out = tmp_path / fmt, tmp_path / "shards"
    if fmt == "mevis":
        write_mevis(root, "valid", ground_truth=False)
    else:
        write_refytvos(root, "valid", ground_truth=False)
    report = build_shards(fmt, root, "valid", out)
    assert not report.ground_truth and not read_manifest(out)["splits"]["valid"]["ground_truth"]
    videos = samples(out, "valid")
    assert all(not v.ground_truth and not v.objects and not v.mask_data for v in videos.values())
    assert all(e.source_id and e.object_ids == [] for v in videos.values() for e in v.expressions)
    if fmt == "refytvos":
        assert videos["0a1b2c3d4e"].frame_names == YTVOS_FRAMES
    with pytest.raises(SystemExit):
        main(["shards", "masks", str(out), "--split", "valid", "--out", str(tmp_path / "gt")])
    assert "has no ground truth" in capsys.readouterr().err


def test_schema_3_round_trips_per_object_masks_and_reads_version_2(overlapping) -> None:
    _, out, _ = overlapping
    video = samples(out, "train")["vid_a"]
    raw = encode_sample(video)
    assert json.loads(raw["meta.json"])["schema_version"] == SCHEMA_VERSION == 3
    again = decode_sample(raw)
    assert again.object_rles == video.object_rles and again.ground_truth
    old = {key: value for key, value in raw.items() if key != "rle.json"}
    meta = json.loads(raw["meta.json"])
    for key in ("ground_truth", "object_rles"):
        del meta[key]
    old["meta.json"] = json.dumps({**meta, "schema_version": 2}).encode()
    version_2 = decode_sample(old)  # a version-2 sample: id maps only, ground truth as painted
    assert version_2.ground_truth and not version_2.object_rles
    np.testing.assert_array_equal(version_2.target_mask(0, [2]), video.mask(0) == 2)
