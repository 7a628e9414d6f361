"""Promptable SAM-2 pre-training: prompts come from the chosen object, the stage learns and evaluates."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_desa2va.data.chat import IGNORE_INDEX
from lightning_desa2va.errors import NonFiniteLossError
from lightning_desa2va.stages.look import look_hits
from lightning_desa2va.stages.sam2_pretrain import PromptSampler, centroid_points, visible_objects

SIZE = 32
STEPS = 8
LEARNING_RATE = 3e-3  # fixed here, so the test does not depend on the tuned default
LOOKS = torch.tensor([[IGNORE_INDEX] * 2, [5, 7], [6, 8]])[None]  # colour, shape word ids of objects 1, 2
POINTS_ONLY = ["stage.prompts.prob_box=0", "stage.prompts.prob_mask=0", "stage.prompts.max_positive_points=1"]


def blob_masks() -> torch.Tensor:
    """Masks [3, SIZE, SIZE]: a small square, a thin bar, and a ring whose centroid lies outside it."""
    masks = torch.zeros(3, SIZE, SIZE, dtype=torch.bool)
    masks[0, 3:7, 20:24] = True
    masks[1, 10:12, 2:30] = True
    masks[2, 8:24, 8:24] = True
    masks[2, 11:21, 11:21] = False
    return masks


def inside(masks: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Whether each (x, y) point [B, P, 2] falls on a True pixel of its mask [B, H, W]."""
    cols, rows = coords.floor().long().unbind(-1)
    return masks[torch.arange(len(masks))[:, None], rows, cols]


def test_sampled_clicks_lie_inside_and_negatives_outside_the_object() -> None:
    masks = blob_masks()
    sampler = PromptSampler(
        prob_box=0, prob_mask=0, max_positive_points=3, max_negative_points=2, box_jitter=0
    )
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        points = sampler.points(masks, positives=3, negatives=2, generator=generator)
        labels = points["point_labels"]
        assert labels.dtype == torch.int32 and labels.tolist() == [[1, 1, 1, 0, 0]] * 3
        hits = inside(masks, points["point_coords"])
        assert hits[:, :3].all() and not hits[:, 3:].any()
    centre = centroid_points(masks)
    assert inside(masks, centre["point_coords"]).all() and centre["point_labels"].tolist() == [[1]] * 3


def test_boxes_are_the_object_bounds_and_prompt_kinds_follow_their_probabilities() -> None:
    masks = blob_masks()
    boxes = PromptSampler(0, 0, 1, 0, box_jitter=0).boxes(masks)
    assert boxes["point_labels"].tolist() == [[2, 3]] * 3
    assert boxes["point_coords"][0].tolist() == [[20.0, 3.0], [24.0, 7.0]]
    points, mask = PromptSampler(
        prob_box=0, prob_mask=1, max_positive_points=1, max_negative_points=0, box_jitter=0
    )(masks)
    assert points is None and torch.equal(mask[:, 0].bool(), masks)
    points, mask = PromptSampler(0, 1, 1, 0, box_jitter=0)(masks, allow_mask=False)  # single-frame clips
    assert mask is None and points["point_labels"].tolist() == [[1]] * 3
    points, mask = PromptSampler(1, 0, 1, 0, box_jitter=0.1)(masks)
    assert mask is None and points["point_labels"].tolist() == [[2, 3]] * 3


def clip_batch(image_size: int, num_frames: int = 3) -> dict:
    """Two clips, each a bright rectangle (object 1, moving right) on a dim noisy background."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.zeros(2, num_frames, image_size, image_size, dtype=torch.long)
    for clip in range(2):
        top, left = image_size // 8 + 8 * clip, image_size // 4 + 4 * clip
        for frame in range(num_frames):
            shift = left + 4 * frame
            ids[clip, frame, top : top + image_size // 3, shift : shift + image_size // 4] = 1
    noise = 0.2 * torch.randn(2, num_frames, 3, image_size, image_size, generator=generator)
    return {
        "frames": noise + 1.5 * (ids > 0)[:, :, None].float() - 0.5,
        "instance_masks": ids,
        "target_masks": ids > 0,
        "object_look_ids": LOOKS.expand(2, -1, -1),
        "video_id": ["video-0", "video-1"],
    }


@pytest.fixture
def stage_and_batch(make_model, build_stage):
    cfg, model = make_model("stage=sam2_pretrain", f"stage.optimizer.lr={LEARNING_RATE}", *POINTS_ONLY)
    return cfg, model, build_stage(cfg, model), clip_batch(model.sam.image_size)


def test_visible_objects_lists_every_frame_0_object_of_the_given_clips() -> None:
    ids = torch.zeros(3, 2, 8, 8, dtype=torch.long)
    ids[0, 0, :2, :2], ids[0, 0, 4:, 4:] = 4, 7
    ids[1, 0, :3, :3] = 2
    ids[1, 1, 5:, 5:] = 9  # only in a later frame: not prompted
    ids[2, 0, :1, :1] = 5  # clip not asked for
    clip_index, object_ids = visible_objects(ids, [0, 1])
    assert clip_index.tolist() == [0, 0, 1] and object_ids.tolist() == [4, 7, 2]
    assert [len(x) for x in visible_objects(ids, [])] == [0, 0]


def test_all_objects_training_tracks_one_row_per_visible_object(make_model, build_stage) -> None:
    cfg, model = make_model("stage=sam2_pretrain", "stage.all_objects=true", *POINTS_ONLY)
    stage = build_stage(cfg, model)
    batch = clip_batch(model.sam.image_size)
    batch["instance_masks"][0, :, -16:, -16:] = 2  # a second object in clip 0
    rows = len(visible_objects(batch["instance_masks"], list(range(len(batch["instance_masks"]))))[0])
    tracked = []
    original = model.sam.track
    model.sam.track = lambda features, *args: tracked.append(features.num_clips) or original(features, *args)
    loss = stage.training_step(batch, 0)
    assert tracked == [rows] and rows > len(batch["instance_masks"])
    assert math.isfinite(float(loss))


def test_objects_are_chosen_among_those_visible_in_frame_0(stage_and_batch) -> None:
    _, _, stage, _ = stage_and_batch
    ids = torch.zeros(2, 2, 8, 8, dtype=torch.long)
    ids[:, 0, :2, :2] = 4
    ids[:, 0, 4:, 4:] = 7
    ids[:, 1, :, :] = 9  # only in a later frame: never the prompted object
    generator = torch.Generator().manual_seed(0)
    chosen = {int(i) for _ in range(30) for i in stage.choose_objects(ids, generator)}
    assert chosen == {4, 7}
    with pytest.raises(ValueError, match="no object"):
        stage.choose_objects(torch.zeros(1, 2, 8, 8, dtype=torch.long))


@pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")
@pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated")
def test_the_stage_learns_to_track_a_fixed_batch(stage_and_batch, fit_on_batch, tmp_path) -> None:
    cfg, model, stage, batch = stage_and_batch
    memory_before = {k: v.clone() for k, v in model.sam.memory_encoder.state_dict().items()}
    vlm_before = {k: v.clone() for k, v in model.vlm.state_dict().items()}
    torch.manual_seed(0)
    trainer, losses = fit_on_batch(
        stage, batch, STEPS, tmp_path, gradient_clip_val=cfg.trainer.gradient_clip_val
    )
    assert len(losses) == STEPS and all(math.isfinite(loss) for loss in losses)
    assert sum(losses[-2:]) < 0.8 * sum(losses[:2]), losses
    logged = {"train/loss", "train/loss_mask", "train/loss_iou", "train/loss_object", "train/track_iou"}
    assert logged | {"train/loss_look"} <= set(trainer.callback_metrics)
    assert any(not torch.equal(v, memory_before[k]) for k, v in model.sam.memory_encoder.state_dict().items())
    assert all(torch.equal(v, vlm_before[k]) for k, v in model.vlm.state_dict().items()), "the VLM trained"


def test_nan_loss_raises_naming_the_videos(stage_and_batch) -> None:
    _, model, stage, batch = stage_and_batch
    with torch.no_grad():
        model.sam.sam_mask_decoder.iou_prediction_head.layers[0].weight.fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match="nan") as caught, torch.no_grad():
        stage.training_step(batch, 0)
    assert "video-0" in str(caught.value)


def test_validation_tracks_every_object_of_each_video_once(stage_and_batch) -> None:
    _, model, stage, batch = stage_and_batch
    batch["instance_masks"][1, :, :4, :4] = 2  # a second object in the second clip
    batch = {
        key: value + value if isinstance(value, list) else torch.cat([value, value])
        for key, value in batch.items()
    }
    stage.num_overlays = 0  # overlays un-normalise frames with the DataModule's statistics: none here
    model.eval()
    with torch.no_grad():
        stage.on_validation_epoch_start()
        stage._evaluate_tracking(batch, stage.val_tracking, "val")
        stage._evaluate_tracking(
            batch, stage.val_tracking, "val"
        )  # the same videos again (other expressions)
    # each batch shows each video twice, once per expression: 3 objects in 2 videos are tracked once
    assert sum(len(values) for values in stage.val_tracking.point_iou) == 3
    results = stage.val_tracking.compute()
    assert set(results) == {"point_iou", "track_J", "track_F", "track_JF"}
    assert all(0 <= value <= 1 for value in results.values())
    assert math.isclose(results["track_JF"], (results["track_J"] + results["track_F"]) / 2)


@pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")
@pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated")
def test_the_look_objective_teaches_the_image_embedding_the_objects_words(
    make_model, build_stage, fit_on_batch, tmp_path
) -> None:
    cfg, model = make_model("stage=sam2_pretrain", "stage.optimizer.lr=1e-2", *POINTS_ONLY)
    stage = build_stage(cfg, model)
    batch = clip_batch(model.sam.image_size)

    def look_accuracy() -> float:
        with torch.no_grad():
            return float(
                look_hits(*stage.look_logits(model.sam.encode_clips(batch["frames"]), batch)).float().mean()
            )

    before = look_accuracy()
    torch.manual_seed(0)
    fit_on_batch(stage, batch, STEPS, tmp_path)
    assert look_accuracy() > before + 0.5
    assert not any(name.startswith("look_head") for name in model.state_dict()), "the probe is exported"


def test_without_the_look_weight_there_is_no_look_head_or_term(make_model, build_stage) -> None:
    cfg, model = make_model("stage=sam2_pretrain", "stage.w_look=0", *POINTS_ONLY)
    stage = build_stage(cfg, model)
    batch = clip_batch(model.sam.image_size)
    del batch["object_look_ids"]  # not needed without the objective
    assert stage.look_head is None
    assert math.isfinite(float(stage.training_step(batch, 0)))
