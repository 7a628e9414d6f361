"""The DataModule on a tiny synthetic benchmark: shapes, targets, LM labels, and complete evaluation."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from lightning_desa2va.build import build_datamodule
from lightning_desa2va.data.chat import IGNORE_INDEX
from lightning_desa2va.data.schema import VideoSample
from lightning_desa2va.data.shards import read_split, split_urls, write_synthetic_benchmark
from lightning_desa2va.data.stream import POSITION_KEY
from lightning_desa2va.data.synthetic import SyntheticConfig
from lightning_desa2va.models.tokenizer import ASSISTANT_ROLE, SEG_TOKEN, TURN_END_TOKEN, TURN_START_TOKEN

SYNTHETIC = SyntheticConfig()
COUNTS = {"train": 4, "val": 2, "test": 2}
BATCH_SIZE, EVAL_BATCH_SIZE, NUM_FRAMES = 3, 2, 3


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    write_synthetic_benchmark(out, SYNTHETIC, COUNTS, seed=0, max_videos_per_shard=2)
    return out


@pytest.fixture(scope="module")
def videos(data_dir: Path) -> dict[str, VideoSample]:
    """Every video of the benchmark, decoded straight from the shards: the ground truth to compare to."""
    return {v.video_id: v for split in COUNTS for v in read_split(split_urls(data_dir, split))}


@pytest.fixture(scope="module")
def setup(make_model, tokenizer, data_dir: Path) -> tuple[Any, Any]:
    cfg, model = make_model(
        f"paths.data_dir={data_dir}",
        "data.num_workers=0",
        f"data.batch_size={BATCH_SIZE}",
        f"data.eval_batch_size={EVAL_BATCH_SIZE}",
        f"data.num_frames={NUM_FRAMES}",
    )
    return model, build_datamodule(cfg, tokenizer, model)


@pytest.fixture(scope="module")
def train_batch(setup) -> dict[str, Any]:
    _, datamodule = setup
    torch.manual_seed(0)
    return next(iter(datamodule.train_dataloader()))


@pytest.fixture(scope="module")
def val_batches(setup) -> list[dict[str, Any]]:
    _, datamodule = setup
    return list(datamodule.val_dataloader())


def object_ids(videos: dict[str, VideoSample], video_id: str, text: str) -> list[int]:
    (expression,) = [e for e in videos[video_id].expressions if e.text == text]
    return expression.object_ids


def normalised(video: VideoSample, datamodule) -> torch.Tensor:
    """All frames of a video as the encoder normalises them [N, 3, H, W] (benchmark size = SAM-2 size)."""
    frames = [torch.from_numpy(video.frame(t)).permute(2, 0, 1) for t in range(video.num_frames)]
    rgb = torch.stack(frames).float() / 255.0
    encoder = datamodule.eval_encoder
    return (rgb - encoder.pixel_mean) / encoder.pixel_std


def check_batch_shapes(batch: dict[str, Any], max_rows: int, num_frames: int, model) -> None:
    rows = len(batch["expression"])
    sam, vlm = model.sam.image_size, model.vlm.image_size
    assert batch["frames"].shape == (rows, num_frames, 3, sam, sam)
    assert batch["vlm_pixels"].shape == (rows, num_frames, 3, vlm, vlm)
    assert batch["target_masks"].shape == batch["instance_masks"].shape == (rows, num_frames, sam, sam)
    assert batch["target_masks"].dtype == torch.bool
    length = batch["input_ids"].shape[1]
    for key in ("labels", "attention_mask"):
        assert batch[key].shape == (rows, length), key
    for prefix in ("label_", "expression_label_"):
        assert batch[f"{prefix}input_ids"].shape == batch[f"{prefix}attention_mask"].shape
        assert batch[f"{prefix}input_ids"].shape[0] == rows
    for key in ("expression", "expression_type", "video_id"):
        assert isinstance(batch[key], list) and len(batch[key]) == rows, key
    assert 0 < rows <= max_rows


def test_train_batch_has_every_key_and_num_frames_frames(setup, train_batch) -> None:
    model, _ = setup
    assert set(train_batch) == {
        "frames",
        "vlm_pixels",
        "target_masks",
        "instance_masks",
        "input_ids",
        "labels",
        "label_input_ids",
        "expression_label_input_ids",
        "referent_word_ids",
        "object_look_ids",
        "object_motion_ids",
        "referent_motion_ids",
        "stated_motion",
        "attention_mask",
        "label_attention_mask",
        "expression_label_attention_mask",
        "caption_input_ids",
        "caption_labels",
        "caption_attention_mask",
        "has_caption",
        "qa_questions",
        "expression",
        "expression_type",
        "video_id",
        POSITION_KEY,
    }
    assert train_batch[POSITION_KEY] == (0, 0, BATCH_SIZE)  # epoch 0, worker 0, through its 3rd sample
    assert len(train_batch["expression"]) == BATCH_SIZE
    check_batch_shapes(train_batch, BATCH_SIZE, NUM_FRAMES, model)
    image_tokens = (train_batch["input_ids"] == model.vlm.model.config.image_token_id).sum(dim=1)
    assert (image_tokens == NUM_FRAMES * model.vlm.image_tokens).all()  # one <image> block per frame


def test_train_clips_are_frames_of_the_video_in_order(setup, train_batch, videos) -> None:
    _, datamodule = setup
    for row, video_id in enumerate(train_batch["video_id"]):
        reference = normalised(videos[video_id], datamodule)
        previous = -1
        for frame in train_batch["frames"][row]:
            matches = [i for i in range(len(reference)) if torch.allclose(frame, reference[i], atol=1e-5)]
            later = [i for i in matches if i > previous]
            assert later, f"frame of {video_id} is not a later frame of the video"
            previous = later[0]


def test_val_clips_hold_every_frame_of_the_video(setup, val_batches, videos) -> None:
    model, datamodule = setup
    for batch in val_batches:
        check_batch_shapes(batch, EVAL_BATCH_SIZE, SYNTHETIC.num_frames, model)
        for row, video_id in enumerate(batch["video_id"]):
            video = videos[video_id]
            torch.testing.assert_close(batch["frames"][row], normalised(video, datamodule))
            masks = torch.stack(
                [torch.from_numpy(video.mask(t).astype(np.int64)) for t in range(video.num_frames)]
            )
            assert torch.equal(batch["instance_masks"][row], masks)


@pytest.mark.parametrize("split", ["train", "val"])
def test_targets_are_the_union_of_the_expressions_objects(split, train_batch, val_batches, videos) -> None:
    batches = [train_batch] if split == "train" else val_batches
    for batch in batches:
        for row, (video_id, text) in enumerate(zip(batch["video_id"], batch["expression"], strict=True)):
            ids = object_ids(videos, video_id, text)
            instances = batch["instance_masks"][row]
            expected = torch.isin(instances, torch.tensor(ids))
            assert torch.equal(batch["target_masks"][row], expected), (video_id, text)
            assert expected.any(), (video_id, text)


def test_stated_motion_is_the_direction_the_expression_names(val_batches, videos) -> None:
    seen = Counter()
    for batch in val_batches:
        for row, (video_id, text) in enumerate(zip(batch["video_id"], batch["expression"], strict=True)):
            (expression,) = [e for e in videos[video_id].expressions if e.text == text]
            x, y, stated = batch["stated_motion"][row].tolist()
            motion = expression.attributes.get("motion")
            seen[motion is not None] += 1
            if motion is None:  # static: states no motion
                assert (x, y, stated) == (0.0, 0.0, 0.0), text
                continue
            assert stated == 1.0, text
            targets = [o for o in videos[video_id].objects if o.id in expression.object_ids]
            assert all(o.motion == motion for o in targets), text
            norm = (x * x + y * y) ** 0.5
            assert norm == pytest.approx(0.0 if motion == "still" else 1.0, abs=1e-6), text
            words = set(text.split())
            if "left" in words or "right" in words:
                assert (x < 0) == ("left" in words) and x != 0, text
            if "up" in words or "down" in words:
                assert (y < 0) == ("up" in words) and y != 0, text  # y grows downwards
    assert seen[True] > 0 and seen[False] > 0


def test_stated_motion_is_unknown_without_a_structured_referent() -> None:
    from lightning_desa2va.data.clips import stated_motion
    from lightning_desa2va.data.schema import Expression

    assert stated_motion(Expression(text="the thing", object_ids=[1], type="static", label="")).isnan().all()
    unknown_word = Expression(
        text="a circle spinning", object_ids=[1], type="motion", label="", attributes={"motion": "spin"}
    )
    assert stated_motion(unknown_word).isnan().all()


def answer_positions(ids: list[int], start: int, assistant: int, end: int) -> set[int]:
    """Token positions of every assistant reply: after `<|im_start|> assistant`, up to its `<|im_end|>`."""
    positions: set[int] = set()
    inside = False
    for index, token in enumerate(ids):
        if inside:
            positions.add(index)
            inside = token != end
        elif token == assistant and index > 0 and ids[index - 1] == start:
            inside = True
    return positions


def test_labels_mark_only_the_answers_and_the_answer_holds_seg(train_batch, val_batches, tokenizer) -> None:
    start, assistant, end, seg = tokenizer.convert_tokens_to_ids(
        [TURN_START_TOKEN, ASSISTANT_ROLE, TURN_END_TOKEN, SEG_TOKEN]
    )
    for batch in [train_batch, *val_batches]:
        rows = zip(batch["input_ids"], batch["labels"], batch["attention_mask"], strict=True)
        for ids, labels, mask in rows:
            length = int(mask.sum())
            assert mask[:length].all() and not mask[length:].any()  # right padding
            answers = answer_positions(ids[:length].tolist(), start, assistant, end)
            labelled = set((labels != IGNORE_INDEX).nonzero().flatten().tolist())
            assert labelled == answers
            assert torch.equal(labels[sorted(labelled)], ids[sorted(labelled)])
            assert (ids[sorted(labelled)] == seg).sum() == 1  # the segmentation answer carries [SEG]
            assert (ids == seg).sum() == 1  # and the question does not


@pytest.mark.parametrize("prefix", ["label_", "expression_label_"])
def test_label_prompts_are_text_only_with_seg(train_batch, setup, prefix) -> None:
    model, _ = setup
    seg = model.vlm.seg_token_id
    ids, mask = train_batch[f"{prefix}input_ids"], train_batch[f"{prefix}attention_mask"]
    assert ((ids == seg) & mask.bool()).sum(dim=1).eq(1).all()
    assert not (ids == model.vlm.model.config.image_token_id).any()


def test_expression_label_prompt_asks_about_the_expression(train_batch, setup) -> None:
    _, datamodule = setup
    for row, expression in enumerate(train_batch["expression"]):
        real = train_batch["expression_label_attention_mask"][row].bool()
        text = datamodule.tokenizer.decode(train_batch["expression_label_input_ids"][row][real])
        assert expression in text, (expression, text)


def test_one_val_pass_visits_every_expression_exactly_once(val_batches, data_dir) -> None:
    seen = Counter(
        (video_id, text)
        for batch in val_batches
        for video_id, text in zip(batch["video_id"], batch["expression"], strict=True)
    )
    expected = Counter(
        (video.video_id, expression.text)
        for video in read_split(split_urls(data_dir, "val"))
        for expression in video.expressions
    )
    assert len(expected) == sum(expected.values())  # the benchmark's pairs are unique
    assert seen == expected


def test_missing_data_dir_fails_naming_it(make_model, tokenizer, tmp_path: Path) -> None:
    missing = tmp_path / "no_shards_here"
    cfg, model = make_model(f"paths.data_dir={missing}", "data.num_workers=0")
    datamodule = build_datamodule(cfg, tokenizer, model)
    for loader in (datamodule.train_dataloader, datamodule.val_dataloader, datamodule.test_dataloader):
        with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
            loader()


def training_order(make_model, tokenizer, data_dir: Path, seed: int, epochs: int) -> list[list[str]]:
    """(video, expression) order of a fresh datamodule's training epochs, for a run seeded with ``seed``."""
    cfg, model = make_model(f"paths.data_dir={data_dir}", "data.num_workers=0", f"seed={seed}")
    loader = build_datamodule(cfg, tokenizer, model).train_dataloader()
    return [
        [
            f"{video}/{text}"
            for batch in loader
            for video, text in zip(batch["video_id"], batch["expression"], strict=True)
        ]
        for _ in range(epochs)
    ]


def test_training_order_is_fixed_by_the_seed_and_changes_between_epochs(
    make_model, tokenizer, data_dir
) -> None:
    first = training_order(make_model, tokenizer, data_dir, seed=0, epochs=2)
    assert training_order(make_model, tokenizer, data_dir, seed=0, epochs=2) == first
    assert first[0] != first[1]
    assert sorted(first[0]) == sorted(first[1])
    assert training_order(make_model, tokenizer, data_dir, seed=1, epochs=1)[0] != first[0]
