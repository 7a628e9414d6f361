"""Clips: frame sampling strategies, id-map resizing, and the original-size ground truth of eval batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from source_layouts import HEIGHT, WIDTH, write_mevis
from torch.nn import functional as F

from lightning_desa2va.data.clips import KEPT_INPUTS, SAMPLINGS, ClipEncoder, frame_indices, resize_ids
from lightning_desa2va.data.converters.build import build_shards
from lightning_desa2va.data.schema import VideoSample


def test_sampling_strategies_choose_the_documented_frames() -> None:
    torch.manual_seed(0)
    ordered = frame_indices(10, 4, "random_ordered").tolist()
    assert ordered == sorted(set(ordered)) and len(ordered) == 4
    window = frame_indices(10, 4, "random_window").tolist()
    assert window == list(range(window[0], window[0] + 4))
    assert frame_indices(10, 4, "uniform").tolist() == [0, 3, 6, 9]
    assert frame_indices(10, 4, "all").tolist() == list(range(10))
    assert frame_indices(10, None, "random_ordered").tolist() == list(range(10))  # evaluation
    for sampling in SAMPLINGS[:3]:  # shorter than T (an image): every frame, evenly repeated
        assert frame_indices(1, 3, sampling).tolist() == [0, 0, 0]
        assert frame_indices(2, 4, sampling).tolist() == [0, 0, 1, 1]


def test_random_windows_reach_both_ends_of_the_video() -> None:
    torch.manual_seed(0)
    starts = {frame_indices(6, 4, "random_window")[0].item() for _ in range(200)}
    assert starts == {0, 1, 2}


def test_the_default_sampling_draws_what_it_always_drew() -> None:
    torch.manual_seed(7)
    drawn = [frame_indices(8, 5, "random_ordered") for _ in range(3)]
    torch.manual_seed(7)
    assert all(torch.equal(d, torch.randperm(8)[:5].sort().values) for d in drawn)


def test_unknown_sampling_is_refused_naming_the_key(tokenizer) -> None:
    from lightning_desa2va.data.chat import ChatEncoder, ChatTemplates

    with pytest.raises(ValueError, match=r"data\.sampling.*'middle'"):
        ClipEncoder(
            ChatEncoder(tokenizer, ChatTemplates(), 4), 3, 32, 16, [0.5] * 3, [0.5] * 3, sampling="middle"
        )


@pytest.mark.parametrize(
    ("height", "width", "size"), [(24, 40, 32), (720, 1280, 128), (128, 128, 128), (7, 9, 64)]
)
def test_gathering_ids_equals_nearest_interpolation(height: int, width: int, size: int) -> None:
    ids = np.random.default_rng(0).integers(0, 300, (2, height, width))
    expected = F.interpolate(torch.from_numpy(ids)[:, None].float(), size=(size, size), mode="nearest")[:, 0]
    np.testing.assert_array_equal(resize_ids(ids, size), expected.long().numpy())


@pytest.fixture(scope="module")
def resized_val(tmp_path_factory: pytest.TempPathFactory):
    """MeViS fixture videos (4 and 3 frames) converted as the val split with frames scaled to 20 px."""
    root = tmp_path_factory.mktemp("mevis")
    truth = write_mevis(root / "mevis", split="val")
    build_shards("mevis", root / "mevis", "val", root / "shards", max_size=20)
    return root / "shards", truth


def datamodule(compose, tokenizer, data_dir: Path, *overrides: str):
    cfg = compose(f"paths.data_dir={data_dir}", "data.num_workers=0", *overrides)
    return instantiate(cfg.data, tokenizer=tokenizer, image_tokens=4, sam_image_size=32, vlm_image_size=16)


def test_eval_batches_carry_the_ground_truth_at_the_original_size(compose, tokenizer, resized_val) -> None:
    data_dir, truth = resized_val
    batches = list(datamodule(compose, tokenizer, data_dir, "data.eval_batch_size=1").val_dataloader())
    assert len(batches) == 4  # one clip per expression
    for batch in batches:
        (video,) = batch["video_id"]
        (original,) = batch["original_target_masks"]
        count = len(truth.frames[video])
        assert batch["original_size"] == [(HEIGHT, WIDTH)]
        assert original.dtype == torch.bool and original.shape == (count, HEIGHT, WIDTH)
        assert batch["target_masks"].shape == (1, count, 32, 32)
        (text,) = batch["expression"]
        (objects,) = [ids for t, ids in truth.expressions[video].values() if t == text]
        expected = np.any([truth.objects[video][o] for o in objects], axis=0)
        np.testing.assert_array_equal(original.numpy(), expected)


def test_eval_batches_of_videos_of_different_lengths_ask_for_batch_size_1(
    compose, tokenizer, resized_val
) -> None:
    data_dir, _ = resized_val
    loader = datamodule(compose, tokenizer, data_dir, "data.eval_batch_size=4").val_dataloader()
    with pytest.raises(ValueError, match=r"\[3, 4\] frames.*data\.eval_batch_size=1"):
        list(loader)


def test_kept_frame_inputs_equal_those_prepared_with_the_clip_and_are_not_decoded_again(
    compose, tokenizer, resized_val, monkeypatch
) -> None:
    data_dir, _ = resized_val
    one = "data.eval_batch_size=1"
    prepared = list(datamodule(compose, tokenizer, data_dir, one, "data.keep_frames=0").val_dataloader())
    keeping = datamodule(compose, tokenizer, data_dir, one, "data.keep_frames=64")
    first = list(keeping.val_dataloader())
    decoded = []
    frame = VideoSample.frame
    monkeypatch.setattr(
        VideoSample, "frame", lambda video, *args: decoded.append(args) or frame(video, *args)
    )
    again = list(keeping.val_dataloader())
    assert decoded == []
    for clip, kept, met_again in zip(prepared, first, again, strict=True):
        for key in ("frames", "vlm_pixels"):
            assert torch.equal(kept[key], clip[key])
            assert torch.equal(met_again[key], clip[key])


def test_only_the_frames_used_last_are_kept(compose, tokenizer, resized_val) -> None:
    data_dir, _ = resized_val
    list(
        datamodule(
            compose, tokenizer, data_dir, "data.eval_batch_size=1", "data.keep_frames=2"
        ).val_dataloader()
    )
    assert len(KEPT_INPUTS) == 2
