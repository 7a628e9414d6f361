"""``desa2va predict``: masks of an expression on a video (a folder of frames or an MP4) from a stage-2
checkpoint, as PNGs at the video's size plus an overlay GIF or MP4."""

from __future__ import annotations

import argparse
from pathlib import Path

from lightning_desa2va.cli.help import add_command

DEFAULT_OUT = Path("predictions")
DEFAULT_FPS = 10.0


def register(commands: argparse._SubParsersAction) -> None:
    predict = add_command(
        commands,
        "predict",
        "segment an expression on a video with a stage-2 checkpoint or export: PNG masks + overlay",
        'desa2va predict --video clip.mp4 --expression "the red circle" --ckpt outputs/.../last.ckpt '
        "experiment=desa2va_tiny",
        takes_overrides=True,
    )
    predict.add_argument(
        "--video", type=Path, required=True, help="a folder of .jpg/.png frames or a video file"
    )
    predict.add_argument("--expression", required=True, help="what to segment, e.g. 'the red circle'")
    predict.add_argument(
        "--ckpt", type=Path, required=True, help="a stage-2 (decoupled_finetune) checkpoint or export folder"
    )
    predict.add_argument(
        "--out", type=Path, default=None, help=f"output folder (default {DEFAULT_OUT}/<video>)"
    )
    predict.add_argument("--overlay", choices=("gif", "mp4"), default="gif", help="the overlay's format")
    predict.add_argument(
        "--fps", type=float, default=DEFAULT_FPS, help="overlay frame rate for a folder of frames"
    )
    predict.set_defaults(run=_predict)


def _predict(args: argparse.Namespace) -> None:
    from lightning_desa2va.predict import predict, predict_config

    cfg = predict_config(args.overrides, args.ckpt, args.experiments_dir)
    out_dir = args.out or DEFAULT_OUT / args.video.stem
    result = predict(cfg, args.video, args.expression, args.ckpt, out_dir, args.overlay, args.fps)
    print(f"{len(result.mask_paths)} masks in {out_dir}, overlay {result.overlay}")
