"""Overlay grids and metric bar charts are written as readable PNGs with the expected content."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_desa2va.visualize import (
    FILL_ALPHA,
    GT_COLOR,
    LABEL_COLUMN_WIDTH,
    MARGIN,
    PRED_COLOR,
    OverlayItem,
    overlay_grid,
    plot_metric_bars,
    save_overlays,
)

T, H, W = 3, 32, 48
PANEL_H = 64
PANEL_W = W * PANEL_H // H


def _clip() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Black frames; GT = left half of frame 0 only, prediction = right half of frame 0 only."""
    frames = torch.zeros(T, 3, H, W)
    gt = torch.zeros(T, H, W, dtype=torch.bool)
    pred = torch.zeros_like(gt)
    gt[0, :, : W // 2] = True
    pred[0, :, W // 2 :] = True
    return frames, pred, gt


def _pixels_of(image: Image.Image, color: tuple[int, int, int]) -> np.ndarray:
    """(y, x) of pixels exactly equal to ``color``."""
    return np.argwhere((np.asarray(image) == np.asarray(color, dtype=np.uint8)).all(axis=-1))


def test_overlay_grid_layout_and_colours() -> None:
    frames, pred, gt = _clip()
    image = overlay_grid(frames, pred, gt, "the shape on the left", panel_height=PANEL_H)
    assert image.mode == "RGB"
    assert image.width == LABEL_COLUMN_WIDTH + T * (PANEL_W + MARGIN) + MARGIN
    assert image.height > 2 * PANEL_H

    # GT fill over black: exactly FILL_ALPHA * GT_COLOR, only inside the left half of panel 0
    gt_fill = tuple(round(FILL_ALPHA * c) for c in GT_COLOR)
    gt_ys, gt_xs = _pixels_of(image, gt_fill).T
    assert len(gt_xs) > 0.8 * (PANEL_W // 2) * PANEL_H
    assert gt_xs.min() >= LABEL_COLUMN_WIDTH and gt_xs.max() < LABEL_COLUMN_WIDTH + PANEL_W // 2

    # prediction fill: right half of panel 0, in the row below the GT row
    pred_fill = tuple(round(FILL_ALPHA * c) for c in PRED_COLOR)
    pred_ys, pred_xs = _pixels_of(image, pred_fill).T
    assert len(pred_xs) > 0.8 * (PANEL_W // 2) * PANEL_H
    assert pred_xs.min() >= LABEL_COLUMN_WIDTH + PANEL_W // 2 and pred_xs.max() < LABEL_COLUMN_WIDTH + PANEL_W
    assert pred_ys.min() > gt_ys.max()


def test_uint8_frames_match_float_frames() -> None:
    frames, pred, gt = _clip()
    frames[:, 2] = 0.5
    as_uint8 = (frames * 255).round().to(torch.uint8)
    a = np.asarray(overlay_grid(frames, pred, gt, "x", panel_height=PANEL_H))
    b = np.asarray(overlay_grid(as_uint8, pred, gt, "x", panel_height=PANEL_H))
    np.testing.assert_array_equal(a, b)


def test_overlay_grid_rejects_mismatched_masks() -> None:
    frames, pred, gt = _clip()
    with pytest.raises(ValueError, match="masks must be"):
        overlay_grid(frames, pred[:2], gt[:2], "x")


def test_save_overlays_writes_named_pngs(tmp_path: Path) -> None:
    frames, pred, gt = _clip()
    items = [
        OverlayItem(frames, pred, gt, "The red triangle, moving LEFT!", name="vid 7/exp 2"),
        OverlayItem(frames, pred, gt, "The red triangle, moving LEFT!"),
    ]
    paths = save_overlays(items, tmp_path / "overlays")
    assert [p.name for p in paths] == ["0000_vid_7_exp_2.png", "0001_the_red_triangle_moving_left.png"]
    for path in paths:
        with Image.open(path) as image:
            assert image.format == "PNG"
            assert image.size == overlay_grid(frames, pred, gt, items[0].title).size


def test_plot_metric_bars_writes_png(tmp_path: Path) -> None:
    results = {
        "model": {"JF": 0.7, "JF/static": 0.8, "JF/motion": 0.6, "JF/mixed": 0.7},
        "union baseline": {"JF": 0.4, "JF/static": 0.35},
    }
    out = plot_metric_bars(results, tmp_path / "plots" / "jf.png")
    with Image.open(out) as image:
        assert image.format == "PNG" and image.width > 200 and image.height > 200
