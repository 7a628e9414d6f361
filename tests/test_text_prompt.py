"""Grounded point prompts: points read off a heatmap over the frame, and the point loss that trains it."""

from __future__ import annotations

import pytest
import torch

from lightning_desa2va.losses import MaskLoss, TripleSupervisionLoss, point_loss
from lightning_desa2va.models.text_prompt import GroundedPointTextPrompt

B, T = 2, 2


@pytest.fixture(scope="module")
def grounded(make_model):
    _, built = make_model("text_prompt=grounded_points", "text_prompt.num_points=2")
    return built.eval()


def test_grounded_points_come_with_a_heatmap_per_frame_and_lie_inside_the_image(grounded, make_batch):
    batch = make_batch(grounded, ["the red circle", "the blue square"], num_frames=T)
    with torch.no_grad():
        out = grounded(batch["frames"], batch["vlm_pixels"], batch["input_ids"], batch["attention_mask"])
    cells = tuple(2 * side for side in grounded.sam.sam_prompt_encoder.image_embedding_size)  # stride 8
    size = grounded.sam.image_size
    assert out.text_heatmap.shape == (B, T, 2, *cells)
    centres = GroundedPointTextPrompt.cell_centres(*cells, image_size=size, device=torch.device("cpu"))
    points = GroundedPointTextPrompt.click_positions(out.text_heatmap.flatten(-2), centres)
    assert points.shape == (B, T, 2, 2)
    assert ((points >= 0) & (points <= size)).all()


def test_the_click_is_the_best_cell_centre_not_the_mean_between_two_peaks() -> None:
    centres = GroundedPointTextPrompt.cell_centres(4, 4, image_size=64, device=torch.device("cpu"))
    heatmap = torch.full((1, 1, 16), -10.0, requires_grad=True)
    with torch.no_grad():
        heatmap[0, 0, 6] = 5.0  # row 1, column 2: the best cell
        heatmap[0, 0, 9] = 4.9  # row 2, column 1: a close second
    point = GroundedPointTextPrompt.click_positions(heatmap, centres)
    assert torch.allclose(point, torch.tensor([[[40.0, 24.0]]]))
    point.sum().backward()
    assert heatmap.grad is not None and heatmap.grad.abs().sum() > 0  # trainable through the soft mean


def test_point_loss_is_low_on_the_target_and_high_off_it() -> None:
    target = torch.zeros(1, 1, 16, 16, dtype=torch.bool)
    target[..., :8, :8] = True  # the top-left quarter: cells (0, 0) of a 2 × 2 heatmap
    on_target = torch.tensor([10.0, -10.0, -10.0, -10.0]).view(1, 1, 1, 2, 2)
    off_target = torch.tensor([-10.0, 10.0, -10.0, -10.0]).view(1, 1, 1, 2, 2)
    assert point_loss(on_target, target) < 1e-3
    assert point_loss(off_target, target) > 10


def test_point_loss_ignores_frames_without_the_target() -> None:
    target = torch.zeros(1, 2, 16, 16, dtype=torch.bool)
    target[0, 0, :8, :8] = True
    heatmap = torch.tensor([10.0, -10.0, -10.0, -10.0]).view(1, 1, 1, 2, 2).repeat(1, 2, 1, 1, 1)
    assert point_loss(heatmap, target) < 1e-3


def test_point_weight_without_a_heatmap_is_a_clear_error() -> None:
    loss = TripleSupervisionLoss(MaskLoss(1.0, 1.0), 1.0, 0.0, 0.0, 0.0, 0.0, w_point=1.0)
    with pytest.raises(ValueError, match="grounded_points"):
        loss.point_terms(None, torch.zeros(1, 1, 8, 8))


def test_stage_1_loss_adds_the_weighted_point_loss_to_the_text_mask_loss() -> None:
    target = torch.rand(1, 2, 16, 16) > 0.5
    logits, heatmap = torch.randn(1, 2, 16, 16), torch.randn(1, 2, 1, 2, 2)
    loss = TripleSupervisionLoss(MaskLoss(1.0, 1.0), 1.0, 0.5, 0.5, 0.0, 0.0, w_point=0.3)
    result = loss.text_only(logits, heatmap, target)
    expected = loss.mask(logits, target) + 0.3 * point_loss(heatmap, target)
    assert torch.allclose(result.total, expected)
    assert set(result.terms) == {"text", "point"}


def test_a_single_click_is_decoded_as_sam2_does_keeping_its_best_rated_candidate(grounded, make_batch):
    batch = make_batch(grounded, ["the red circle"], num_frames=2)
    sam = grounded.sam
    with torch.no_grad():
        features = sam.encode_frames(batch["frames"].flatten(0, 1))
        click = torch.tensor([[[40.0, 50.0]], [[40.0, 50.0]]])
        tokens = sam.embed_points(click, torch.ones(2, 1, dtype=torch.int32))
        chosen = sam.decode_prompts(features, tokens, multimask=True)
        _, dense = sam.sam_prompt_encoder(points=None, boxes=None, masks=None)
        _, candidate_ious, _, _ = sam.sam_mask_decoder(
            image_embeddings=features.image_embeddings,
            image_pe=sam.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=tokens,
            dense_prompt_embeddings=dense.expand(2, -1, -1, -1),
            multimask_output=True,
            repeat_image=False,
            high_res_features=features.high_res_features,
        )
    assert chosen.logits.shape == (2, 1, sam.image_size // 4, sam.image_size // 4)  # the decoder's own
    assert candidate_ious.shape[1] > 1
    assert torch.allclose(chosen.iou[:, 0], candidate_ious.max(dim=1).values)
    assert GroundedPointTextPrompt(8, 8, num_points=1, hidden_dim=8).single_click
