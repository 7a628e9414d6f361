"""The union-of-objects baseline: every instance id > 0 is foreground."""

from __future__ import annotations

import pytest
import torch

from lightning_desa2va.baselines import union_of_objects
from lightning_desa2va.metrics import region_similarity


def test_union_of_objects_marks_every_instance() -> None:
    ids = torch.zeros(1, 2, 4, 4, dtype=torch.int64)
    ids[0, 0, 0, 0] = 1
    ids[0, 0, 3, 3] = 2
    ids[0, 1, 1:3, 1:3] = 7
    union = union_of_objects(ids)
    assert union.dtype == torch.bool and union.shape == ids.shape
    assert union.sum() == 6
    assert union[0, 0, 0, 0] and union[0, 0, 3, 3] and not union[0, 0, 1, 1]
    assert union[0, 1, 1:3, 1:3].all()


def test_union_baseline_scores_partial_j_when_expression_names_one_of_two_objects() -> None:
    ids = torch.zeros(1, 1, 4, 4, dtype=torch.uint8)
    ids[..., :, :2] = 1  # target, 8 pixels
    ids[..., :, 2:] = 2  # distractor, 8 pixels
    j = region_similarity(union_of_objects(ids), ids == 1)
    assert j.item() == pytest.approx(0.5)


def test_union_of_objects_rejects_non_id_masks() -> None:
    with pytest.raises(TypeError):
        union_of_objects(torch.zeros(1, 1, 2, 2))
    with pytest.raises(TypeError):
        union_of_objects(torch.zeros(1, 1, 2, 2, dtype=torch.bool))
