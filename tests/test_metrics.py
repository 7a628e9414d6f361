"""J and F against a plain numpy/scipy reference of the DAVIS definitions, JFMetric aggregation, cIoU and
gIoU against hand counts (empty masks included), and the per-type mean."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from lightning_desa2va.data.chat import IGNORE_INDEX
from lightning_desa2va.metrics import (
    EXPRESSION_TYPES,
    JFMetric,
    MaskShareMetric,
    PerTypeMean,
    ReferringIoUMetric,
    boundary_f_measure,
    boundary_map,
    region_similarity,
)

# --- reference: the DAVIS definitions written pixel by pixel ---------------------------------------


def ref_iou(pred: np.ndarray, gt: np.ndarray) -> float:
    union = np.logical_or(pred, gt).sum()
    if union == 0:
        return 1.0
    return float(np.logical_and(pred, gt).sum() / union)


def ref_bmap(seg: np.ndarray) -> np.ndarray:
    """Boundary: differs from the right, lower or lower-right neighbour (only those inside the image;
    last row compares right only, last column below only, bottom-right corner never)."""
    h, w = seg.shape
    out = np.zeros_like(seg, dtype=bool)
    for i in range(h):
        for j in range(w):
            if i < h - 1 and j < w - 1:
                neighbours = [seg[i, j + 1], seg[i + 1, j], seg[i + 1, j + 1]]
            elif i == h - 1 and j < w - 1:
                neighbours = [seg[i, j + 1]]
            elif j == w - 1 and i < h - 1:
                neighbours = [seg[i + 1, j]]
            else:
                neighbours = []
            out[i, j] = any(n != seg[i, j] for n in neighbours)
    return out


def ref_f(pred: np.ndarray, gt: np.ndarray, bound_th: float = 0.008) -> float:
    bound_pix = bound_th if bound_th >= 1 else math.ceil(bound_th * np.linalg.norm(pred.shape))
    r = int(bound_pix)
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    disk = xx**2 + yy**2 <= r**2
    pb, gb = ref_bmap(pred), ref_bmap(gt)
    p_dil = ndimage.binary_dilation(pb, structure=disk)
    g_dil = ndimage.binary_dilation(gb, structure=disk)
    n_p, n_g = pb.sum(), gb.sum()
    if n_p == 0 and n_g > 0:
        precision, recall = 1.0, 0.0
    elif n_p > 0 and n_g == 0:
        precision, recall = 0.0, 1.0
    elif n_p == 0 and n_g == 0:
        precision, recall = 1.0, 1.0
    else:
        precision = (pb & g_dil).sum() / n_p
        recall = (gb & p_dil).sum() / n_g
    if precision + recall == 0:
        return 0.0
    return float(2 * precision * recall / (precision + recall))


# --- helpers -----------------------------------------------------------------------------------------


def rect(h: int, w: int, top: int, left: int, height: int, width: int) -> torch.Tensor:
    mask = torch.zeros(h, w, dtype=torch.bool)
    mask[top : top + height, left : left + width] = True
    return mask


def random_masks(rng: np.random.Generator, n: int, h: int, w: int) -> np.ndarray:
    """Blobby masks (smoothed noise) plus a few salt-and-pepper ones, and the empty mask."""
    masks = []
    for k in range(n):
        noise = rng.random((h, w))
        if k % 3:
            noise = ndimage.gaussian_filter(noise, sigma=rng.uniform(1, 4))
        masks.append(noise > np.quantile(noise, rng.uniform(0.3, 0.9)))
    masks.append(np.zeros((h, w), dtype=bool))
    return np.stack(masks)


# --- J ---------------------------------------------------------------------------------------------


def test_j_identical_disjoint_partial_and_empty() -> None:
    a = rect(8, 8, 0, 0, 4, 4)
    b = rect(8, 8, 4, 4, 4, 4)
    c = rect(8, 8, 2, 0, 4, 4)  # overlaps a on 2x4 = 8 pixels; union 24
    empty = torch.zeros(8, 8, dtype=torch.bool)
    pred = torch.stack([a, a, c, empty, empty])
    gt = torch.stack([a, b, a, empty, a])
    j = region_similarity(pred, gt)
    torch.testing.assert_close(j, torch.tensor([1.0, 0.0, 1 / 3, 1.0, 0.0]))


def test_j_matches_reference_on_random_masks() -> None:
    rng = np.random.default_rng(0)
    pred, gt = random_masks(rng, 8, 23, 31), random_masks(rng, 8, 23, 31)
    got = region_similarity(torch.from_numpy(pred), torch.from_numpy(gt))
    expected = torch.tensor([ref_iou(p, g) for p, g in zip(pred, gt, strict=True)], dtype=torch.float32)
    torch.testing.assert_close(got, expected)


def test_inputs_are_checked() -> None:
    a = rect(4, 4, 0, 0, 2, 2)
    with pytest.raises(TypeError):
        region_similarity(a.float(), a)
    with pytest.raises(ValueError, match="shapes differ"):
        boundary_f_measure(a, a[:3])


# --- F ---------------------------------------------------------------------------------------------


def test_boundary_map_matches_reference() -> None:
    rng = np.random.default_rng(1)
    masks = random_masks(rng, 6, 13, 17)
    got = boundary_map(torch.from_numpy(masks)).numpy()
    for m, g in zip(masks, got, strict=True):
        np.testing.assert_array_equal(g, ref_bmap(m))


@pytest.mark.parametrize("bound_th", [0.008, 0.05, 2.0])
def test_f_matches_reference_on_random_masks(bound_th: float) -> None:
    rng = np.random.default_rng(2)
    pred, gt = random_masks(rng, 8, 29, 41), random_masks(rng, 8, 29, 41)
    # add near-misses so the tolerance matters: gt shifted by one pixel
    pred = np.concatenate([pred, np.roll(gt[:4], 1, axis=-1)])
    gt = np.concatenate([gt, gt[:4]])
    got = boundary_f_measure(torch.from_numpy(pred), torch.from_numpy(gt), bound_th=bound_th)
    expected = [ref_f(p, g, bound_th) for p, g in zip(pred, gt, strict=True)]
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float32))


def test_f_matches_reference_for_small_objects_in_large_frames() -> None:
    """Objects in different corners per frame, one frame empty: the per-frame crops must not matter."""
    h, w = 60, 90
    pred = torch.stack(
        [rect(h, w, 0, 0, 5, 7), rect(h, w, 50, 80, 10, 10), rect(h, w, 20, 30, 3, 3), rect(h, w, 0, 0, 0, 0)]
    )
    gt = torch.stack(
        [rect(h, w, 1, 1, 5, 6), rect(h, w, 49, 78, 11, 12), rect(h, w, 40, 60, 4, 4), rect(h, w, 0, 0, 0, 0)]
    )
    for bound_th in (0.008, 3.0):
        got = boundary_f_measure(pred, gt, bound_th=bound_th)
        expected = [ref_f(p.numpy(), g.numpy(), bound_th) for p, g in zip(pred, gt, strict=True)]
        torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float32))


def test_f_tolerates_shifts_within_tolerance_only() -> None:
    gt = rect(40, 40, 10, 10, 20, 20)
    one = rect(40, 40, 10, 11, 20, 20)
    three = rect(40, 40, 10, 13, 20, 20)
    far = rect(40, 40, 15, 18, 20, 20)
    pred, target = torch.stack([gt, one, three, far]), gt.expand(4, 40, 40)
    f1 = boundary_f_measure(pred, target, bound_th=1.0)
    assert f1[0] == 1.0 and f1[1] == 1.0
    assert f1[2] < 0.95 and f1[3] < 0.5
    f3 = boundary_f_measure(pred, target, bound_th=3.0)
    assert f3[2] == 1.0 and f3[3] < 0.75
    # the default fraction of the diagonal: 40 * sqrt(2) * 0.008 = 0.45 -> 1 pixel
    torch.testing.assert_close(boundary_f_measure(pred, target), f1)


def test_f_degenerate_cases() -> None:
    empty = torch.zeros(10, 10, dtype=torch.bool)
    square = rect(10, 10, 2, 2, 5, 5)
    f = boundary_f_measure(torch.stack([empty, empty, square]), torch.stack([empty, square, empty]))
    torch.testing.assert_close(f, torch.tensor([1.0, 0.0, 0.0]))


# --- JFMetric ----------------------------------------------------------------------------------------


def test_jf_metric_per_type_aggregation() -> None:
    h = w = 32
    obj = rect(h, w, 4, 4, 8, 8)
    far = rect(h, w, 20, 20, 8, 8)  # > 1 pixel tolerance from obj: J = 0, F = 0
    empty = torch.zeros(h, w, dtype=torch.bool)
    gt = torch.stack([torch.stack([obj, obj])] * 3)
    pred = torch.stack(
        [
            torch.stack([obj, obj]),  # static: J = F = 1
            torch.stack([empty, empty]),  # motion: J = F = 0
            torch.stack([obj, far]),  # motion: J = F = 0.5
        ]
    )
    metric = JFMetric()
    metric.update(pred[:2], gt[:2], ["static", "motion"])
    metric.update(pred[2:], gt[2:], ["motion"])
    result = metric.compute()
    expected = {
        "J": 0.5,
        "F": 0.5,
        "JF": 0.5,
        "J/static": 1.0,
        "F/static": 1.0,
        "JF/static": 1.0,
        "J/motion": 0.25,
        "F/motion": 0.25,
        "JF/motion": 0.25,
    }
    assert set(result) == set(expected)  # no "mixed" keys: no mixed expressions seen
    for key, value in expected.items():
        assert result[key] == pytest.approx(value), key
    assert all(isinstance(v, float) and not math.isnan(v) for v in result.values())

    metric.reset()
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert metric.compute() == {}


def test_jf_metric_rejects_bad_input() -> None:
    masks = torch.zeros(2, 3, 8, 8, dtype=torch.bool)
    metric = JFMetric()
    with pytest.raises(ValueError, match="'funny'"):
        metric.update(masks, masks, ["static", "funny"])
    with pytest.raises(ValueError, match="expression types"):
        metric.update(masks, masks, ["static"])
    with pytest.raises(ValueError, match=r"\[B, T, H, W\]"):
        metric.update(masks[0], masks[0], ["static", "motion", "mixed"])
    assert EXPRESSION_TYPES == ("static", "motion", "mixed")


def share_clip() -> tuple[torch.Tensor, torch.Tensor]:
    """Instance ids [1, 1, 8, 8] of three 2×4 objects (1 and 2 look alike, 3 differs) and their look words."""
    ids = torch.zeros(1, 1, 8, 8, dtype=torch.long)
    ids[..., 0:2, 0:4], ids[..., 3:5, 0:4], ids[..., 6:8, 0:4] = 1, 2, 3
    looks = torch.tensor([[[IGNORE_INDEX] * 2, [10, 20], [10, 20], [11, 21]]])
    return ids, looks


def test_mask_share_splits_the_predicted_area_between_target_lookalike_other_and_background() -> None:
    ids, looks = share_clip()
    target = ids == 1
    metric = MaskShareMetric()
    both_twins = (ids == 1) | (ids == 2)
    metric.update(both_twins, target, ids, looks, ["mixed"])
    everything = torch.ones_like(target)  # 8 + 8 + 8 object pixels, 40 background pixels
    metric.update(everything, target, ids, looks, ["static"])
    shares = metric.compute()
    assert shares["target/mixed"] == pytest.approx(0.5) and shares["lookalike/mixed"] == pytest.approx(0.5)
    assert shares["other/static"] == pytest.approx(8 / 64) and shares["background/static"] == pytest.approx(
        40 / 64
    )
    assert shares["lookalike"] == pytest.approx((8 + 8) / (16 + 64))
    assert "target/motion" not in shares  # no motion expression, no made-up share


def test_mask_share_without_look_words_counts_no_lookalikes() -> None:
    ids, looks = share_clip()
    metric = MaskShareMetric()
    metric.update(ids > 0, ids == 1, ids, torch.full_like(looks, IGNORE_INDEX), ["motion"])
    shares = metric.compute()
    assert shares["lookalike"] == 0.0 and shares["other"] == pytest.approx(2 / 3)


def box(size: int, rows: slice, cols: slice) -> torch.Tensor:
    mask = torch.zeros(size, size, dtype=torch.bool)
    mask[rows, cols] = True
    return mask


EMPTY = box(4, slice(0, 0), slice(0, 0))
# (type, prediction, ground truth) with hand-counted intersection / union
IOU_SAMPLES = [
    ("static", box(4, slice(0, 2), slice(0, 3)), box(4, slice(0, 2), slice(0, 2))),  # I 4, U 6
    ("static", EMPTY, box(4, slice(2, 3), slice(0, 2))),  # empty prediction: I 0, U 2
    ("motion", EMPTY, EMPTY),  # empty and empty: IoU 1 for gIoU, adds 0/0 to cIoU
    ("motion", box(4, slice(3, 4), slice(0, 3)), EMPTY),  # empty ground truth: I 0, U 3
    ("mixed", box(4, slice(0, 2), slice(0, 4)), box(4, slice(0, 2), slice(0, 4))),  # I 8, U 8
]


def iou_metric_of(samples) -> ReferringIoUMetric:
    metric = ReferringIoUMetric()
    types, preds, gts = zip(*samples, strict=True)
    metric.update(torch.stack(preds), torch.stack(gts), list(types))
    return metric


def test_ciou_and_giou_match_hand_counts_with_empty_masks() -> None:
    results = iou_metric_of(IOU_SAMPLES).compute()
    expected = {
        "cIoU": (4 + 0 + 0 + 8) / (6 + 2 + 3 + 8),
        "gIoU": (4 / 6 + 0 + 1 + 0 + 1) / 5,
        "cIoU/static": 4 / 8,
        "gIoU/static": (4 / 6 + 0) / 2,
        "cIoU/motion": 0 / 3,
        "gIoU/motion": (1 + 0) / 2,
        "cIoU/mixed": 1.0,
        "gIoU/mixed": 1.0,
    }
    assert results.keys() == expected.keys()
    for name, value in expected.items():
        assert results[name] == pytest.approx(value), name


def test_ciou_is_left_out_when_every_sample_is_empty_and_correct() -> None:
    assert iou_metric_of([("motion", EMPTY, EMPTY)]).compute() == {"gIoU": 1.0, "gIoU/motion": 1.0}


def test_a_video_sample_sums_intersection_and_union_over_its_frames() -> None:
    pred = torch.stack([box(4, slice(0, 1), slice(0, 2)), box(4, slice(0, 1), slice(0, 3))])[None]
    gt = torch.stack([box(4, slice(0, 1), slice(0, 1)), box(4, slice(0, 1), slice(0, 3))])[None]
    metric = ReferringIoUMetric()
    metric.update(pred, gt, ["static"])  # frame 0: I 1 U 2, frame 1: I 3 U 3
    assert metric.compute()["gIoU"] == pytest.approx(4 / 5)  # not the mean of per-frame IoUs (0.75)


def test_iou_metric_states_merge_as_a_multi_process_sync_reduces_them() -> None:
    whole = iou_metric_of(IOU_SAMPLES)
    first, second = iou_metric_of(IOU_SAMPLES[:2]), iou_metric_of(IOU_SAMPLES[2:])
    first.merge_state(second)
    assert first.compute() == pytest.approx(whole.compute())


def test_iou_metric_rejects_unknown_types_and_logits() -> None:
    with pytest.raises(ValueError, match="unknown expression type"):
        iou_metric_of([("spatial", EMPTY, EMPTY)])
    with pytest.raises(TypeError, match="bool"):
        ReferringIoUMetric().update(torch.zeros(1, 4, 4), torch.zeros(1, 4, 4, dtype=torch.bool), ["static"])


def test_per_type_mean_averages_overall_and_per_type_and_merges() -> None:
    metric = PerTypeMean("qa_accuracy")
    metric.update(torch.tensor([1.0, 0.0, 1.0]), ["static", "static", "mixed"])
    other = PerTypeMean("qa_accuracy")
    other.update(torch.tensor([0.0]), ["mixed"])
    metric.merge_state(other)
    assert metric.compute() == pytest.approx(
        {"qa_accuracy": 0.5, "qa_accuracy/static": 0.5, "qa_accuracy/mixed": 0.5}
    )
