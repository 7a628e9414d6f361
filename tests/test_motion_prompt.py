"""Motion prompts: the mismatch map singles out cells that move as stated, starts as a no-op, trains."""

from __future__ import annotations

import pytest
import torch
from test_motion_cue import CELL, GRID, TRACKS, features, moving_clip

from lightning_desa2va.losses import stated_motion_loss
from lightning_desa2va.models.motion_prompt import FlowMatchPrompt, NoMotionPrompt, StatedMotion

SURE = 10.0  # a stated-motion logit the head is sure of
EXPRESSION = "red square"


def flow_match(prompt_dim: int = 8) -> FlowMatchPrompt:
    return FlowMatchPrompt(4, prompt_dim, stride=2, window=1, eps=1e-3, direction_eps=0.1)


def stating(prompt: FlowMatchPrompt, x: float, y: float, stated_logit: float) -> None:
    """Make the head read (x, y, stated) from any z_t."""
    with torch.no_grad():
        prompt.to_motion.weight.zero_()
        prompt.to_motion.bias.copy_(torch.tensor([x, y, stated_logit]))


def mismatch_at(mismatch: torch.Tensor, track: str, frame: int) -> float:
    (x, y), (dx, dy) = TRACKS[track]
    col, row = int((x + dx * frame) // CELL), int((y + dy * frame) // CELL)
    return mismatch[frame, 0, row, col].item()


@pytest.mark.parametrize(
    ("stated", "matching"), [((-1.0, 0.0), "left"), ((0.0, 1.0), "down"), ((0.0, 0.0), "still")]
)
def test_the_cells_moving_as_stated_mismatch_least(stated, matching) -> None:
    prompt = flow_match()
    stating(prompt, *stated, SURE)
    clip = moving_clip()
    stated_motion = prompt.stated_motion(torch.zeros(1, 4))
    with torch.no_grad():
        mismatch = prompt.mismatch(stated_motion, prompt.normal_flow(clip, GRID))
    for frame in range(1, 4):
        scores = {track: mismatch_at(mismatch, track, frame) for track in TRACKS}
        assert scores[matching] < 0.3, scores
        assert all(scores[other] > 0.6 for other in TRACKS if other != matching), scores


def test_an_expression_that_states_no_motion_gets_no_prompt() -> None:
    prompt = flow_match()
    stating(prompt, -1.0, 0.0, -SURE)
    with torch.no_grad():
        prompt.mismatch_embedding.fill_(1.0)
    output = prompt(torch.zeros(1, 4), moving_clip(), features(torch.zeros(5, 8, *GRID)))
    assert output.dense.shape == (5, 8, *GRID)
    assert output.dense.abs().max() < 1e-3


def test_the_prompt_starts_at_zero_and_none_adds_nothing() -> None:
    output = flow_match()(torch.randn(1, 4), moving_clip(), features(torch.zeros(5, 8, *GRID)))
    assert output.dense.abs().max() == 0
    assert output.stated.direction.shape == (1, 2) and output.stated.stated_logits.shape == (1,)
    nothing = NoMotionPrompt(4, 8)(torch.randn(1, 4), moving_clip(), features(torch.zeros(5, 8, *GRID)))
    assert nothing.dense is None and nothing.stated is None


@pytest.mark.parametrize(("key", "value"), [("stride", 0), ("window", 2)])
def test_bad_sizes_fail_naming_the_key(key, value) -> None:
    settings = {"stride": 2, "window": 1, key: value}
    with pytest.raises(ValueError, match=f"motion_prompt.{key}"):
        FlowMatchPrompt(4, 8, eps=1e-3, direction_eps=0.1, **settings)


def test_stated_motion_loss_skips_unknown_rows_and_unstated_directions() -> None:
    target = torch.tensor([[-1.0, 0.0, 1.0], [0.0, 0.0, 0.0], [float("nan")] * 3])
    right = StatedMotion(
        direction=torch.tensor([[-1.0, 0.0], [5.0, 5.0], [9.0, 9.0]]),
        stated_logits=torch.tensor([SURE, -SURE, SURE]),
    )
    assert stated_motion_loss(right, target) < 1e-3  # rows 2 and 3: direction and flag do not count
    wrong_way = StatedMotion(
        direction=torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]]), stated_logits=right.stated_logits
    )
    assert stated_motion_loss(wrong_way, target) == pytest.approx(2.0, abs=1e-3)  # mean of (2², 0)
    unknown = torch.full((3, 3), float("nan"))
    assert stated_motion_loss(wrong_way, unknown) == 0


def test_the_model_decodes_the_same_until_the_prompt_trains(make_model, make_batch) -> None:
    _, model = make_model("motion_prompt=flow_match")
    batch = make_batch(model, [EXPRESSION], num_frames=3)
    model.eval()
    inputs = (batch["frames"], batch["vlm_pixels"], batch["input_ids"], batch["attention_mask"])
    with torch.no_grad():
        prompted = model(*inputs)
        model.motion_prompt = NoMotionPrompt(4, 8)
        plain = model(*inputs)
    assert prompted.stated_motion is not None and plain.stated_motion is None
    torch.testing.assert_close(prompted.fused_logits, plain.fused_logits)


def test_w_stated_motion_without_a_motion_prompt_fails_naming_both(make_model, make_batch, build_stage):
    cfg, model = make_model("stage=decoupled_finetune", "motion_prompt=none", "loss.w_stated_motion=1")
    stage = build_stage(cfg, model)
    with pytest.raises(ValueError, match="w_stated_motion.*motion_prompt=flow_match"):
        stage.training_step(make_batch(model, [EXPRESSION]), 0)


@pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated")
def test_stage_2_trains_the_stated_motion_and_the_prompt_embedding(
    make_model, make_batch, build_stage, fit_on_batch, tmp_path
) -> None:
    cfg, model = make_model("stage=decoupled_finetune", "motion_prompt=flow_match", "loss.w_stated_motion=1")
    stage = build_stage(cfg, model)
    batch = make_batch(model, [EXPRESSION, EXPRESSION], num_frames=3)
    batch["stated_motion"] = torch.tensor([[-1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])  # "moving left", none
    head_before = model.motion_prompt.to_motion.weight.clone()

    fit_on_batch(stage, batch, 3, tmp_path)

    assert "train/loss_stated_motion" in stage.trainer.callback_metrics
    assert model.motion_prompt.mismatch_embedding.abs().sum() > 0, "the zero embedding did not move"
    assert not torch.equal(model.motion_prompt.to_motion.weight, head_before)
