"""``desa2va predict``: masks at the video's own size and an overlay from a stage-2 checkpoint, masks that
follow a moving object through SAM-2's memory, and one-line errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_desa2va.cli import main
from lightning_desa2va.config import SHIPPED_FOUNDATIONS_DIR
from lightning_desa2va.data.synthetic import SyntheticConfig, render_video
from lightning_desa2va.runs import RUN_FILE

VIDEO_SIZE = 160  # the video's own size; the model reads 128
NUM_FRAMES = 6
TRAIN_STEPS = 12
MIN_TRAVEL = 15.0  # pixels the object moves over the clip, so a mask that stays put fails
MAX_CENTROID_ERROR = 6.0
pytestmark = [
    pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated"),
    pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`"),
]
STAGE_2 = ["stage=decoupled_finetune", "stage.optimizer.lr=1e-3", "stage.num_overlays=0"]


def centroid(mask: np.ndarray) -> np.ndarray:
    return np.argwhere(mask).mean(axis=0)


@pytest.fixture(scope="module")
def moving_object_video(tmp_path_factory):
    """Frames of a synthetic video in a folder, an expression naming one moving object and its masks."""
    config = SyntheticConfig(image_size=VIDEO_SIZE, num_frames=NUM_FRAMES)
    for seed in range(100):
        video = render_video(config, seed, f"video-{seed}")
        for expression in video.sample.expressions:
            if len(expression.object_ids) != 1:
                continue
            truth = video.masks == expression.object_ids[0]
            if not truth.any(axis=(1, 2)).all():  # visible on every frame
                continue
            if np.linalg.norm(centroid(truth[-1]) - centroid(truth[0])) >= MIN_TRAVEL:
                folder = tmp_path_factory.mktemp("frames")
                for index, frame in enumerate(video.frames):
                    Image.fromarray(frame).save(folder / f"{index:03d}.png")
                return folder, video, expression, truth
    raise AssertionError("no synthetic video with a moving object referred to alone")


@pytest.fixture(scope="module")
def stage_2_checkpoint(moving_object_video, compose, tmp_path_factory) -> Path:
    """A stage-2 Lightning checkpoint trained a few steps on the test video (from the shipped foundations)."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from lightning_desa2va.build import build_components
    from lightning_desa2va.data.clips import collate_clips

    _, video, expression, _ = moving_object_video
    parts = build_components(compose(*STAGE_2))
    batch = collate_clips(
        [parts.datamodule.eval_encoder(video.sample, expression)], parts.tokenizer.pad_token_id
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=TRAIN_STEPS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(parts.stage, DataLoader([batch] * TRAIN_STEPS, batch_size=None))
    path = tmp_path_factory.mktemp("run") / "last.ckpt"
    trainer.save_checkpoint(path)
    return path


def run_predict(*args: str) -> None:
    main(["predict", *args, *STAGE_2])


def test_predict_writes_a_mask_per_frame_at_the_videos_size_and_an_overlay(
    moving_object_video, stage_2_checkpoint, tmp_path
) -> None:
    folder, _, expression, _ = moving_object_video
    out = tmp_path / "out"
    run_predict(
        "--video",
        str(folder),
        "--expression",
        expression.text,
        "--ckpt",
        str(stage_2_checkpoint),
        "--out",
        str(out),
    )
    masks = sorted(out.glob("mask_*.png"))
    assert len(masks) == NUM_FRAMES
    assert all(Image.open(path).size == (VIDEO_SIZE, VIDEO_SIZE) for path in masks)
    with Image.open(out / "overlay.gif") as overlay:
        assert overlay.n_frames == NUM_FRAMES and overlay.size == (VIDEO_SIZE, VIDEO_SIZE)


def test_masks_after_the_key_frame_follow_the_moving_object(
    moving_object_video, stage_2_checkpoint, compose, tmp_path
) -> None:
    """One key frame: every later mask comes from SAM-2's memory alone; its centroid must travel with the
    object's (which moves at least MIN_TRAVEL pixels, so a mask left where the key frame had it fails)."""
    from lightning_desa2va.predict import predict

    folder, _, expression, truth = moving_object_video
    cfg = compose(*STAGE_2, "eval=sa2va", "eval.key_frames=1")
    result = predict(cfg, folder, expression.text, stage_2_checkpoint, tmp_path, "gif", 10.0)
    assert result.masks.shape == truth.shape
    for index in range(1, NUM_FRAMES):
        error = np.linalg.norm(centroid(result.masks[index]) - centroid(truth[index]))
        assert error <= MAX_CENTROID_ERROR, (index, error)


def test_predict_writes_an_mp4_overlay(moving_object_video, stage_2_checkpoint, tmp_path) -> None:
    import av

    folder, _, expression, _ = moving_object_video
    run_predict(
        "--video", str(folder), "--expression", expression.text, "--ckpt", str(stage_2_checkpoint),
        "--out", str(tmp_path), "--overlay", "mp4", "eval=sa2va_i",
    )  # fmt: skip
    with av.open(str(tmp_path / "overlay.mp4")) as container:
        assert sum(1 for _ in container.decode(video=0)) == NUM_FRAMES


def fails_with_one_line(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run_predict(*args)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "Traceback" not in error, error
    assert error.startswith("desa2va: error: ")
    return error


def test_unreadable_or_missing_videos_fail_in_one_line(
    moving_object_video, stage_2_checkpoint, tmp_path, capsys
):
    junk = tmp_path / "clip.mp4"
    junk.write_text("not a video")
    empty = tmp_path / "empty"
    empty.mkdir()
    checkpoint = str(stage_2_checkpoint)
    for video, reason in (
        (junk, "cannot read video"),
        (empty, "has no"),
        (tmp_path / "nowhere", "not found"),
    ):
        error = fails_with_one_line(
            capsys, "--video", str(video), "--expression", "the red circle", "--ckpt", checkpoint
        )
        assert str(video) in error and reason in error


def test_an_empty_expression_fails_in_one_line(moving_object_video, stage_2_checkpoint, capsys) -> None:
    folder = str(moving_object_video[0])
    error = fails_with_one_line(
        capsys, "--video", folder, "--expression", "  ", "--ckpt", str(stage_2_checkpoint)
    )
    assert "expression is empty" in error


def test_checkpoints_of_other_models_fail_in_one_line(
    moving_object_video, stage_2_checkpoint, make_model, tmp_path, capsys
) -> None:
    folder = str(moving_object_video[0])
    # a stage-1 checkpoint in its run folder: the run record names its stage
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    record = {"experiment": "default", "stage": "text_pretrain", "mlflow_run_id": None, "tracking_uri": None}
    (run / RUN_FILE).write_text(json.dumps({**record, "started": "now"}))
    in_run = run / "checkpoints" / "last.ckpt"
    in_run.write_bytes(stage_2_checkpoint.read_bytes())
    # a stage-1 model's weights on their own: no LoRA, so not the stage-2 model
    _, stage_1 = make_model("stage=text_pretrain")
    alone = tmp_path / "stage1.ckpt"
    torch.save({"state_dict": {f"model.{key}": value for key, value in stage_1.state_dict().items()}}, alone)
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint")
    cases = {
        in_run: "checkpoint of stage text_pretrain",
        alone: "another stage or model",
        SHIPPED_FOUNDATIONS_DIR / "sam2.safetensors": "not a Lightning checkpoint",
        text: "not a PyTorch checkpoint",
    }
    for checkpoint, reason in cases.items():
        error = fails_with_one_line(
            capsys, "--video", folder, "--expression", "the red circle", "--ckpt", str(checkpoint)
        )
        assert str(checkpoint) in error and reason in error, error
