"""``desa2va predict``: the masks of one expression on one video, from a stage-2 checkpoint.

The video is a folder of frames (``.jpg``/``.png``, in name order) or a video file (read with PyAV). The
frames go through the same encoder as evaluation (resized and normalised for SAM-2 and the VLM), the model
infers under the configured protocol (the experiment's, or ``eval=sa2va`` where that would be ``per_frame``:
key frames to the VLM, SAM-2's memory through the rest) on the trainer config's accelerator and precision,
and the mask logits are upsampled back to the video's own size. Written: one PNG mask per frame
(``mask_00000.png`` ..., 255 on the object) and an overlay of the masks on the frames (GIF or MP4). The
checkpoint may be a stage-2 Lightning checkpoint or a ``desa2va export`` folder.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import torch
from lightning.fabric import Fabric
from omegaconf import DictConfig
from PIL import Image, UnidentifiedImageError
from torch.nn import functional as F
from tqdm import tqdm

from lightning_desa2va.build import build_components
from lightning_desa2va.config import compose_config
from lightning_desa2va.data.clips import ClipEncoder
from lightning_desa2va.errors import CheckpointError, ExpressionError, VideoError
from lightning_desa2va.runs import read_record, run_dir_of_checkpoint
from lightning_desa2va.stages.base import SegmentationStage
from lightning_desa2va.stages.checkpoints import apply_model_weights, export_overrides, read_model_weights
from lightning_desa2va.strategies import check_accelerator
from lightning_desa2va.visualize import tint_prediction

log = logging.getLogger(__name__)

FRAME_SUFFIXES = (".jpg", ".jpeg", ".png")
MASK_NAME = "mask_{:05d}.png"
OVERLAY_NAME = "overlay.{}"
OVERLAY_FORMATS = ("gif", "mp4")
PREDICT_STAGE = ["stage=decoupled_finetune"]
PER_FRAME = "per_frame"
EVAL_OVERRIDE = "eval="
PREDICT_EVAL = "eval=sa2va"
"""The protocol predict runs where the config's would give the VLM every frame."""
DEFAULT_PRECISION = "32-true"
MP4_CODEC = "libx264"
MP4_PIXEL_FORMAT = "yuv420p"  # what players read; it needs even frame sides
MASK_ON = 255
MS_PER_SECOND = 1000


@dataclass
class Video:
    """RGB frames [T, H, W, 3] uint8 and the frame rate to write the overlay at."""

    frames: np.ndarray
    fps: float


@dataclass
class Prediction:
    """Masks [T, H, W] bool at the video's size and the files written."""

    masks: np.ndarray
    mask_paths: list[Path]
    overlay: Path


def read_video(path: Path, fps: float) -> Video:
    """The frames of a folder of images (name order) or of a video file; ``fps`` for a folder (a video file
    keeps its own rate)."""
    if not path.exists():
        raise FileNotFoundError(f"video not found: {path}")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
        if not files:
            raise VideoError(f"video folder {path} has no {'/'.join(FRAME_SUFFIXES)} frames")
        try:
            frames = [np.asarray(Image.open(file).convert("RGB")) for file in files]
        except (UnidentifiedImageError, OSError) as error:
            raise VideoError(f"cannot read a frame of {path}: {error}") from error
        sizes = {frame.shape for frame in frames}
        if len(sizes) > 1:
            raise VideoError(f"frames of {path} differ in size: {sorted(sizes)}")
        return Video(np.stack(frames), fps)
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoError(f"{path} has no video stream")
            stream = container.streams.video[0]
            rate = float(stream.average_rate) if stream.average_rate else fps
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
    except av.error.FFmpegError as error:
        raise VideoError(f"cannot read video {path}: {error}") from error
    if not frames:
        raise VideoError(f"video {path} has no frames")
    return Video(np.stack(frames), rate)


def check_stage(cfg: DictConfig, checkpoint: Path) -> None:
    """A checkpoint in a run folder must come from a run of the configured stage."""
    run_dir = run_dir_of_checkpoint(checkpoint)
    stage = cfg.run.choices.stage
    if run_dir is not None and (trained := read_record(run_dir).stage) != stage:
        raise CheckpointError(f"{checkpoint} is a checkpoint of stage {trained}, not of {stage} (stage 2)")


def predict_config(overrides: list[str], checkpoint: Path, experiments_dir: Path | None = None) -> DictConfig:
    """The config ``desa2va predict`` (and ``submit``) runs: stage 2, an export folder's own overrides, the
    user's; inferring as the config says, or as Sa2VA does (``eval=sa2va``) where it would decode every
    frame with the VLM (``eval=per_frame``, the default's), which a long video does not fit."""
    chosen = [*PREDICT_STAGE, *export_overrides(checkpoint), *overrides]
    cfg = compose_config(chosen, experiments_dir)
    if cfg.run.choices.get("eval") == PER_FRAME and not any(o.startswith(EVAL_OVERRIDE) for o in overrides):
        cfg = compose_config([*chosen, PREDICT_EVAL], experiments_dir)
    return cfg


@dataclass
class Predictor:
    """A stage-2 model on the trainer config's accelerator, in its precision, ready for videos."""

    stage: SegmentationStage
    encoder: ClipEncoder
    fabric: Fabric
    chunk_frames: int | None

    def masks(self, frames: np.ndarray, expression: str) -> np.ndarray:
        """Masks [T, H, W] bool of ``expression`` on ``frames`` [T, H, W, 3] under the configured protocol.

        Frames are resized for the models and the masks back to the video's size ``chunk_frames`` at a time,
        so the video is never held as float at its own size."""
        step = self.chunk_frames or len(frames)
        starts = range(0, len(frames), step)
        inputs = [self.encoder.model_inputs(frames[start : start + step]) for start in starts]
        input_ids = self.encoder.chat.segmentation(expression, len(frames), []).input_ids
        batch = {
            "frames": torch.cat([sam for sam, _ in inputs])[None],
            "vlm_pixels": torch.cat([vlm for _, vlm in inputs])[None],
            "input_ids": input_ids[None],
            "attention_mask": torch.ones_like(input_ids)[None],
        }
        with torch.no_grad(), self.fabric.autocast():
            logits = self.stage.predict_logits(self.fabric.to_device(batch))[0]
            size = frames.shape[1:3]
            chunks = [
                F.interpolate(logits[None, start : start + step].float(), size=size, mode="bilinear")[0] > 0
                for start in starts
            ]
        return np.concatenate([chunk.cpu().numpy() for chunk in chunks])


def load_predictor(cfg: DictConfig, checkpoint: Path) -> Predictor:
    """Build the configured stage-2 model from ``checkpoint`` (a stage-2 checkpoint or an export folder)
    on one device of ``trainer.accelerator`` in ``trainer.precision``."""
    check_stage(cfg, checkpoint)
    check_accelerator(cfg.trainer.accelerator)
    weights = read_model_weights(checkpoint)  # a wrong file fails before the model is built
    parts = build_components(cfg)
    apply_model_weights(parts.model, weights, complete=True)
    precision = cfg.trainer.get("precision", DEFAULT_PRECISION)
    fabric = Fabric(accelerator=cfg.trainer.accelerator, devices=1, precision=precision)
    stage = fabric.setup_module(parts.stage).module.eval()
    log.info("inferring under eval=%s on %s in %s", cfg.run.choices.get("eval"), fabric.device, precision)
    return Predictor(stage, parts.datamodule.eval_encoder, fabric, stage.inference.chunk_frames)


def write_prediction(video: Video, masks: np.ndarray, out_dir: Path, overlay: str) -> Prediction:
    """One PNG per mask and the overlay (``gif`` or ``mp4``) in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    mask_paths, tinted = [], []
    for index, (frame, mask) in enumerate(
        tqdm(zip(video.frames, masks, strict=True), total=len(masks), desc="writing masks", unit="frame")
    ):
        path = out_dir / MASK_NAME.format(index)
        Image.fromarray(mask.astype(np.uint8) * MASK_ON).save(path)
        mask_paths.append(path)
        tinted.append(tint_prediction(frame, mask))
    overlay_path = out_dir / OVERLAY_NAME.format(overlay)
    if overlay == "gif":
        images = [Image.fromarray(image) for image in tinted]
        duration = round(MS_PER_SECOND / video.fps)
        images[0].save(overlay_path, save_all=True, append_images=images[1:], duration=duration, loop=0)
    else:
        write_mp4(tinted, overlay_path, video.fps)
    return Prediction(masks, mask_paths, overlay_path)


def write_mp4(images: list[np.ndarray], path: Path, fps: float) -> None:
    """H.264 frames (sides cropped to even numbers, as yuv420p needs)."""
    height, width = (side - side % 2 for side in images[0].shape[:2])
    with av.open(str(path), "w") as container:
        stream = container.add_stream(MP4_CODEC, rate=round(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, MP4_PIXEL_FORMAT
        for image in images:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image[:height, :width]), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def predict(
    cfg: DictConfig,
    video_path: Path,
    expression: str,
    checkpoint: Path,
    out_dir: Path,
    overlay: str,
    fps: float,
) -> Prediction:
    """Read the video, segment ``expression`` on it and write the masks and the overlay."""
    if not expression.strip():
        raise ExpressionError("the expression is empty: say which object to segment (--expression)")
    if overlay not in OVERLAY_FORMATS:
        raise ValueError(f"overlay must be one of {OVERLAY_FORMATS}, got {overlay!r}")
    video = read_video(video_path, fps)
    masks = load_predictor(cfg, checkpoint).masks(video.frames, expression.strip())
    return write_prediction(video, masks, out_dir, overlay)
