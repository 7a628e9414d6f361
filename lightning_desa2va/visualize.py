"""Pictures for people: mask overlays per expression and metric bar charts, written as PNG artifacts.

Overlays are composed with PIL at exact pixel positions (fast enough to write one per expression
during evaluation, and predictable for tests); the bar chart uses matplotlib's object API with the
Agg canvas, so no global backend or pyplot state is touched.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib import font_manager
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from lightning_desa2va.data.schema import EXPRESSION_TYPES
from lightning_desa2va.metrics import boundary_f_measure, region_similarity

logger = logging.getLogger(__name__)

RGB = tuple[int, int, int]

GT_COLOR: RGB = (0, 200, 0)
PRED_COLOR: RGB = (230, 20, 20)
GT_OUTLINE_ON_PRED: RGB = (120, 255, 120)
TEXT_COLOR: RGB = (20, 20, 20)
BACKGROUND: RGB = (255, 255, 255)

HALO_COLOR: RGB = (255, 255, 255)

FILL_ALPHA = 0.5
DESATURATE = 0.5  # mix of grey in the frames, so the tints stand out even on red or green objects
CONTOUR_WIDTH = 2
PANEL_HEIGHT = 192
MARGIN = 8
LABEL_COLUMN_WIDTH = 64
TITLE_FONT_SIZE = 18
TEXT_FONT_SIZE = 14
LINE_SPACING = 4
MAX_NAME_CHARS = 60
UINT8_MAX = 255
LUMA_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R BT.601 luma
_FRAME_DIMS = 4  # T, 3, H, W
_RGB_CHANNELS = 3

BAR_GROUPS = ("overall", *EXPRESSION_TYPES)
BAR_FIGSIZE = (7.0, 4.0)
BAR_DPI = 120
BAR_GROUP_WIDTH = 0.8
BAR_Y_TOP = 1.1  # headroom above a perfect score for the value labels
GRID_ALPHA = 0.3


@dataclass(frozen=True)
class OverlayItem:
    """One expression to draw: its clip, predicted and GT masks, text, and an optional file name."""

    frames: Tensor
    pred: Tensor
    gt: Tensor
    title: str
    name: str | None = None


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """DejaVu Sans ships with matplotlib, so text is readable without depending on system fonts."""
    try:
        return ImageFont.truetype(font_manager.findfont("DejaVu Sans"), size)
    except OSError:
        logger.warning("DejaVu Sans not found; falling back to PIL's default font")
        return ImageFont.load_default(size)


def _frames_to_uint8(frames: Tensor) -> np.ndarray:
    """``[T, 3, H, W]`` float in [0, 1] or uint8 -> ``[T, H, W, 3]`` uint8."""
    if frames.ndim != _FRAME_DIMS or frames.shape[1] != _RGB_CHANNELS:
        raise ValueError(f"frames must be [T, 3, H, W], got {tuple(frames.shape)}")
    frames = frames.detach().cpu()
    if frames.dtype != torch.uint8:
        frames = (frames.float().clamp(0, 1) * UINT8_MAX).round().to(torch.uint8)
    return frames.permute(0, 2, 3, 1).contiguous().numpy()


def _erode(mask: np.ndarray) -> np.ndarray:
    padded = np.pad(mask, 1, mode="edge")
    return mask & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]


def _dilate(mask: np.ndarray) -> np.ndarray:
    padded = np.pad(mask, 1, mode="constant")
    return mask | padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]


def _contour(mask: np.ndarray, width: int) -> np.ndarray:
    """Inner band of ``width`` pixels along the mask border (mask minus its 4-neighbour erosion)."""
    eroded = mask
    for _ in range(width):
        eroded = _erode(eroded)
    return mask & ~eroded


def _desaturate(image: np.ndarray) -> np.ndarray:
    """Frames partly greyed, so a red prediction over a red object is still told apart."""
    grey = image.astype(np.float32) @ np.asarray(LUMA_WEIGHTS, dtype=np.float32)
    mixed = (1 - DESATURATE) * image.astype(np.float32) + DESATURATE * grey[..., None]
    return mixed.round().astype(np.uint8)


def _overlay(image: np.ndarray, mask: np.ndarray, color: RGB) -> np.ndarray:
    """Tint the masked pixels and draw a haloed contour so thin or small masks stay visible."""
    out = image.astype(np.float32)
    tint = np.asarray(color, dtype=np.float32)
    out[mask] = (1 - FILL_ALPHA) * out[mask] + FILL_ALPHA * tint
    out[_dilate(mask) & ~mask] = np.asarray(HALO_COLOR, dtype=np.float32)
    out[_contour(mask, CONTOUR_WIDTH)] = tint
    return out.round().astype(np.uint8)


def tint_prediction(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A frame [H, W, 3] uint8, partly greyed, with the predicted mask [H, W] tinted and outlined."""
    return _overlay(_desaturate(image), mask, PRED_COLOR)


def _resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(mask.astype(np.uint8) * UINT8_MAX).resize(size, Image.NEAREST)) > 0


def _wrap(text: str, font: ImageFont.ImageFont, max_width: int) -> list[str]:
    """Greedy word wrap by rendered width, so long expressions do not run off the image."""
    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}".strip()
        if current and font.getlength(candidate) > max_width:
            lines.append(current)
            current = word
        else:
            current = candidate
    lines.append(current)
    return lines


def _line_height(font: ImageFont.ImageFont) -> int:
    left, top, right, bottom = font.getbbox("Ag")
    return int(bottom - top) + LINE_SPACING


def overlay_grid(
    frames: Tensor,
    pred: Tensor,
    gt: Tensor,
    title: str,
    frame_ids: Sequence[int] | None = None,
    panel_height: int = PANEL_HEIGHT,
) -> Image.Image:
    """Two-row grid: GT over the frames in green (top), prediction in red (bottom).

    The GT outline is repeated on the prediction row so misses and false positives can be read off
    one panel; per-frame J is written above each prediction panel and clip means under the title.
    ``frames`` is ``[T, 3, H, W]`` (float in [0, 1] or uint8), ``pred``/``gt`` are ``[T, H, W]`` bool.
    """
    images = _frames_to_uint8(frames)
    pred = pred.detach().cpu()
    gt = gt.detach().cpu()
    num_frames, height, width = images.shape[:3]
    if pred.shape != (num_frames, height, width) or gt.shape != pred.shape:
        raise ValueError(
            f"masks must be [T, H, W] = {(num_frames, height, width)}, "
            f"got pred {tuple(pred.shape)}, gt {tuple(gt.shape)}"
        )
    frame_ids = list(range(num_frames)) if frame_ids is None else list(frame_ids)
    j_values = region_similarity(pred, gt)
    f_values = boundary_f_measure(pred, gt)

    panel_width = max(1, round(width * panel_height / height))
    size = (panel_width, panel_height)
    title_font, text_font = _font(TITLE_FONT_SIZE), _font(TEXT_FONT_SIZE)
    title_h, text_h = _line_height(title_font), _line_height(text_font)

    grid_width = LABEL_COLUMN_WIDTH + num_frames * (panel_width + MARGIN)
    canvas_width = grid_width + MARGIN
    title_lines = _wrap(f"“{title}”", title_font, canvas_width - 2 * MARGIN)
    summary = (
        f"clip mean  J = {j_values.mean().item():.3f}   F = {f_values.mean().item():.3f}   "
        f"J&F = {(j_values.mean().item() + f_values.mean().item()) / 2:.3f}"
    )
    header_h = MARGIN + len(title_lines) * title_h + text_h + MARGIN
    row_gt_top = header_h + text_h
    row_pred_top = row_gt_top + panel_height + text_h + MARGIN
    canvas_height = row_pred_top + panel_height + MARGIN

    canvas = Image.new("RGB", (canvas_width, canvas_height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    y = MARGIN
    for line in title_lines:
        draw.text((MARGIN, y), line, fill=TEXT_COLOR, font=title_font)
        y += title_h
    draw.text((MARGIN, y), summary, fill=TEXT_COLOR, font=text_font)
    draw.text((MARGIN, row_gt_top + panel_height // 2), "GT", fill=GT_COLOR, font=title_font)
    draw.text((MARGIN, row_pred_top + panel_height // 2), "pred", fill=PRED_COLOR, font=title_font)

    for t in range(num_frames):
        frame = _desaturate(np.asarray(Image.fromarray(images[t]).resize(size, Image.BILINEAR)))
        gt_mask = _resize_mask(gt[t].numpy(), size)
        pred_mask = _resize_mask(pred[t].numpy(), size)
        gt_panel = _overlay(frame, gt_mask, GT_COLOR)
        pred_panel = _overlay(frame, pred_mask, PRED_COLOR)
        gt_outline = _contour(gt_mask, 1) & ~_contour(pred_mask, CONTOUR_WIDTH)
        pred_panel[gt_outline] = GT_OUTLINE_ON_PRED
        x = LABEL_COLUMN_WIDTH + t * (panel_width + MARGIN)
        draw.text((x, header_h), f"frame {frame_ids[t]}", fill=TEXT_COLOR, font=text_font)
        canvas.paste(Image.fromarray(gt_panel), (x, row_gt_top))
        label = f"J = {j_values[t].item():.3f}"
        draw.text((x, row_pred_top - text_h), label, fill=TEXT_COLOR, font=text_font)
        canvas.paste(Image.fromarray(pred_panel), (x, row_pred_top))
    return canvas


def _slug(text: str) -> str:
    """File-system-safe short name: lowercase words joined by underscores."""
    slug = re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")
    return slug[:MAX_NAME_CHARS].rstrip("_") or "overlay"


def save_overlays(items: Sequence[OverlayItem], out_dir: Path) -> list[Path]:
    """Write one PNG per item as ``{index:04d}_{name or expression}.png`` (index keeps names unique)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for index, item in enumerate(items):
        path = out_dir / f"{index:04d}_{_slug(item.name or item.title)}.png"
        overlay_grid(item.frames, item.pred, item.gt, item.title).save(path)
        paths.append(path)
    logger.info("wrote %d overlays to %s", len(paths), out_dir)
    return paths


def plot_metric_bars(results: Mapping[str, Mapping[str, float]], out_path: Path, metric: str = "JF") -> Path:
    """Grouped bars of ``metric`` overall and per expression type, one bar colour per named run.

    ``results`` maps a run name to a ``JFMetric.compute()`` dict; types a run lacks are left blank.
    """
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=BAR_FIGSIZE, dpi=BAR_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    bar_width = BAR_GROUP_WIDTH / max(1, len(results))
    group_x = np.arange(len(BAR_GROUPS), dtype=float)
    for run_index, (run_name, values) in enumerate(results.items()):
        keys = [metric if group == "overall" else f"{metric}/{group}" for group in BAR_GROUPS]
        present = [(x, values[key]) for x, key in zip(group_x, keys, strict=True) if key in values]
        if not present:
            continue
        xs = [x - BAR_GROUP_WIDTH / 2 + (run_index + 0.5) * bar_width for x, _ in present]
        heights = [v for _, v in present]
        bars = ax.bar(xs, heights, width=bar_width, label=run_name)
        ax.bar_label(bars, fmt="%.2f", fontsize="small")
    ax.set_xticks(group_x, BAR_GROUPS)
    ax.set_ylim(0, BAR_Y_TOP)
    ax.set_ylabel(metric.replace("JF", "J&F"))
    ax.set_title(f"{metric.replace('JF', 'J&F')} by expression type")
    fig.legend(loc="outside right upper", fontsize="small")
    ax.grid(axis="y", alpha=GRID_ALPHA)
    fig.savefig(out_path)
    return out_path
