"""Every method variant trains through the real stage 2, and each shows what defines it: exact orthogonality,
a falling soft penalty, masks decoded only when needed, confidence weights from SAM-2's IoU head. Every
stage trains only what its losses read, so plain DDP (no search for unused parameters) runs it."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from lightning_desa2va.diagnostics import principal_angle_cosines
from lightning_desa2va.models.decoupler import OrthogonalDecoupler
from lightning_desa2va.models.desa2va import FUSED_ONLY, Prompt

EXPRESSIONS = ["the red circle", "the blue square"]
NUM_FRAMES = 2
STEPS = 2
PENALTY_STEPS = 6
ORTHOGONAL_STEPS = 4
ORTHOGONALITY_TOLERANCE = 1e-5

# Every variant of every group appears once; a run combines variants of different groups (fewer fits).
VARIANT_RUNS = [
    ("decoupler=linear_ortho", "text_prompt=points", "visual_prompt=token", "fusion=dynamic"),  # default
    ("decoupler=none", "text_prompt=tokens", "visual_prompt=tokens", "fusion=visual"),
    ("decoupler=linear", "text_prompt=grounded_points", "fusion=text"),
    ("decoupler=orthogonal", "fusion=mean"),
    ("decoupler=mlp", "fusion=learned"),
    ("fusion=confidence", "loss.mask.num_points=256"),
    ("fusion=max",),
]


# Stage 1, and stage 2 runs whose losses leave a head or branch unread (VARIANT_RUNS: every variant).
STEP_RUNS = [
    ("stage=text_pretrain",),
    ("stage=text_pretrain", "decoupler=orthogonal", "text_prompt=tokens"),
    ("stage=text_pretrain", "decoupler=mlp", "text_prompt=grounded_points", "motion_cue=normal_flow"),
    ("stage=text_pretrain", "decoupler=none"),
    ("stage=decoupled_finetune", "experiment=sa2va_baseline"),
    ("stage=decoupled_finetune", "decoupler=linear", "fusion=visual", "loss.w_t=0", "motion_prompt=none"),
    ("stage=decoupled_finetune", "fusion=confidence", "loss.w_f=0"),
]


def without_gradient(module: torch.nn.Module) -> list[str]:
    """Trainable parameters that a backward pass left without a gradient: DDP with
    ``find_unused_parameters=False`` fails on the step after one."""
    return [name for name, p in module.named_parameters() if p.requires_grad and p.grad is None]


def stage_2(make_model, build_stage, *overrides: str):
    cfg, model = make_model("stage=decoupled_finetune", "stage.num_overlays=0", *overrides)
    return cfg, model, build_stage(cfg, model)


@pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated")
@pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")
@pytest.mark.parametrize("overrides", VARIANT_RUNS, ids=[" ".join(run) for run in VARIANT_RUNS])
def test_every_variant_trains_its_component_in_stage_2_and_every_trainable_parameter_gets_a_gradient(
    overrides, make_model, make_batch, build_stage, fit_on_batch, tmp_path
) -> None:
    _, model, stage = stage_2(make_model, build_stage, *overrides)
    groups = [override.split("=")[0] for override in overrides if not override.startswith("loss.")]
    before = {
        f"{group}.{name}": p.detach().clone()
        for group in groups
        for name, p in getattr(model, group).named_parameters()
        if p.requires_grad
    }
    batch = make_batch(model, EXPRESSIONS, num_frames=NUM_FRAMES)

    _, losses = fit_on_batch(stage, batch, STEPS, tmp_path)

    assert len(losses) == STEPS and all(math.isfinite(loss) for loss in losses), losses
    parameters = dict(model.named_parameters())
    frozen = [name for name, value in before.items() if torch.equal(parameters[name], value)]
    assert not frozen, f"{frozen} did not train"
    assert not without_gradient(stage), "trainable but read by no loss"  # the last step's gradients


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)` but the `self.trainer` reference")
@pytest.mark.parametrize("overrides", STEP_RUNS, ids=[" ".join(run) for run in STEP_RUNS])
def test_one_step_leaves_no_trainable_parameter_without_a_gradient(
    overrides, make_model, make_batch, build_stage
) -> None:
    cfg, model = make_model(*overrides, "stage.num_overlays=0")
    stage = build_stage(cfg, model)
    stage.training_step(make_batch(model, EXPRESSIONS, num_frames=NUM_FRAMES), 0).backward()
    assert any(p.grad is not None for p in stage.parameters())
    assert not without_gradient(stage), "trainable but read by no loss"


@pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated")
@pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")
def test_stage_1_trains_the_text_path_of_new_variants(
    make_model, make_batch, build_stage, fit_on_batch, tmp_path
) -> None:
    cfg, model = make_model("stage=text_pretrain", "decoupler=orthogonal", "text_prompt=tokens")
    stage = build_stage(cfg, model)
    text_path = {"text_prompt.to_tokens.weight", "decoupler.lift_text.weight", "decoupler.lift_visual.weight"}
    before = {name: p.detach().clone() for name, p in model.named_parameters() if name in text_path}
    _, losses = fit_on_batch(stage, make_batch(model, EXPRESSIONS, num_frames=NUM_FRAMES), STEPS, tmp_path)
    assert all(math.isfinite(loss) for loss in losses), losses
    moved = {
        name for name, p in model.named_parameters() if name in before and not torch.equal(p, before[name])
    }
    assert moved == text_path - {"decoupler.lift_visual.weight"}  # stage 1 reads z_t only


def test_orthogonal_subspaces_stay_orthogonal_through_training(make_model, make_batch, build_stage) -> None:
    _, model, stage = stage_2(make_model, build_stage, "decoupler=orthogonal", "stage.optimizer.lr=1e-2")
    batch = make_batch(model, EXPRESSIONS, num_frames=NUM_FRAMES)
    optimizer = stage.configure_optimizers()
    start = model.decoupler.rotation.weight.detach().clone()
    for _ in range(ORTHOGONAL_STEPS):
        loss = stage.compute_losses(batch)[1].total
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        cosines = principal_angle_cosines(*model.decoupler.subspace_maps())
        assert len(cosines) == model.decoupler.text_rank  # each path reads an r-dim subspace of ĥ
        assert cosines.max() < ORTHOGONALITY_TOLERANCE, cosines.max()
    assert (model.decoupler.rotation.weight - start).abs().max() > 1e-3  # the subspaces did rotate


def test_linear_decouplers_read_one_subspace_at_the_tiny_width(make_model) -> None:
    """d = C = 64: each of linear's two full-rank maps reads all of ĥ, so every principal cosine is 1."""
    _, model = make_model("decoupler=linear")
    cosines = principal_angle_cosines(*model.decoupler.subspace_maps())
    torch.testing.assert_close(cosines, torch.ones_like(cosines))


def test_linear_ortho_penalty_falls(make_model, make_batch, build_stage) -> None:
    _, model, stage = stage_2(
        make_model, build_stage, "decoupler=linear_ortho", "loss.w_orth=1", "stage.optimizer.lr=3e-3"
    )
    batch = make_batch(model, EXPRESSIONS, num_frames=NUM_FRAMES)
    optimizer = stage.configure_optimizers()
    penalties = []
    for _ in range(PENALTY_STEPS):
        losses = stage.compute_losses(batch)[1]
        penalties.append(losses.terms["orth"].item())
        optimizer.zero_grad()
        losses.total.backward()
        optimizer.step()
    assert penalties[-1] < 0.25 * penalties[0], penalties


def test_w_orth_without_a_penalty_is_reported_and_adds_no_term(make_model, make_batch, build_stage, caplog):
    with caplog.at_level(logging.WARNING):
        _, model, stage = stage_2(make_model, build_stage, "decoupler=linear", "loss.w_orth=0.1")
    assert "loss.w_orth=0.1 has no effect" in caplog.text
    batch = make_batch(model, EXPRESSIONS, num_frames=NUM_FRAMES)
    assert "orth" not in stage.compute_losses(batch)[1].terms


class DecoderCalls:
    """Counts SAM-2 mask decoder calls and the frames (rows) each decoded."""

    def __init__(self, model) -> None:
        self.rows: list[int] = []
        self.handle = model.sam.sam_mask_decoder.register_forward_hook(self.record, with_kwargs=True)

    def record(self, module, args, kwargs, output) -> None:
        self.rows.append(kwargs["image_embeddings"].shape[0])


def count_decodes(model, run) -> list[int]:
    calls = DecoderCalls(model)
    try:
        run()
    finally:
        calls.handle.remove()
    return calls.rows


def test_sa2va_baseline_decodes_once_per_frame(make_model, make_batch, build_stage) -> None:
    _, model, stage = stage_2(make_model, build_stage, "decoupler=none", "fusion=visual", "loss.w_t=0")
    batch = make_batch(model, EXPRESSIONS, num_frames=NUM_FRAMES)
    frames = len(EXPRESSIONS) * NUM_FRAMES

    output = None

    def train_step() -> None:
        nonlocal output
        output, losses = stage.compute_losses(batch)
        losses.total.backward()

    assert count_decodes(model, train_step) == [frames]  # one decoder call, one row per frame
    assert output.text_logits is None and output.visual_logits is not None
    with torch.no_grad():
        assert count_decodes(model, lambda: stage.predict_logits(batch)) == [frames]


@pytest.mark.parametrize(
    ("overrides", "skipped", "head"),
    [
        (("loss.w_t=0", "fusion=visual"), "text_logits", "text_prompt"),
        (("loss.w_v=0", "fusion=text"), "visual_logits", "visual_prompt"),
        (("loss.w_f=0",), "fused_logits", "fusion"),
    ],
)
def test_a_zero_weight_skips_its_mask_and_freezes_its_head(
    overrides, skipped, head, make_model, make_batch, build_stage
) -> None:
    _, model, stage = stage_2(make_model, build_stage, *overrides)
    batch = make_batch(model, EXPRESSIONS, num_frames=NUM_FRAMES)
    output = None

    def train_step() -> None:
        nonlocal output
        output, losses = stage.compute_losses(batch)
        losses.total.backward()

    decoded = count_decodes(model, train_step)
    assert getattr(output, skipped) is None
    assert len(decoded) == (1 if head != "fusion" else 2)  # the fusion itself decodes nothing
    parameters = list(getattr(model, head).parameters())
    assert all(p.grad is None and not p.requires_grad for p in parameters), f"{head} trains"
    assert not without_gradient(stage), "trainable but read by no loss"


def test_zero_w_orth_skips_the_penalty(make_model, make_batch, build_stage, monkeypatch) -> None:
    _, model, stage = stage_2(make_model, build_stage, "loss.w_orth=0")
    calls = []
    monkeypatch.setattr(model.decoupler, "orthogonality_penalty", lambda embeddings: calls.append(1))
    stage.compute_losses(make_batch(model, EXPRESSIONS, num_frames=NUM_FRAMES))
    assert not calls


def test_evaluation_decodes_only_what_the_fusion_reads(make_model, make_batch) -> None:
    _, model = make_model("fusion=text")
    batch = make_batch(model, EXPRESSIONS, num_frames=NUM_FRAMES)
    inputs = [batch[key] for key in ("frames", "vlm_pixels", "input_ids", "attention_mask")]
    with torch.no_grad():
        output = model.eval()(*inputs, masks=FUSED_ONLY)
        every_mask = model(*inputs)
    assert output.visual_logits is None and output.text_logits is None  # decoded for the fusion only
    torch.testing.assert_close(output.fused_logits, every_mask.text_logits)


def test_confidence_weights_follow_sam2_iou_predictions(make_model, make_batch) -> None:
    cfg, model = make_model("fusion=confidence")
    batch = make_batch(model, EXPRESSIONS, num_frames=NUM_FRAMES)
    inputs = [batch[key] for key in ("frames", "vlm_pixels", "input_ids", "attention_mask")]
    with torch.no_grad():
        out = model.eval()(*inputs)
    expected = torch.sigmoid((out.text_iou - out.visual_iou) / cfg.fusion.temperature)
    torch.testing.assert_close(out.gate, expected[..., None, None].expand_as(out.gate))
    # one gate per frame: fusing at the decoder's resolution and then upsampling is fusing the upsampled
    gate = out.gate[..., :1, :1]
    mixed = gate * out.text_logits + (1 - gate) * out.visual_logits
    torch.testing.assert_close(out.fused_logits, mixed)
    # the better-rated mask counts more, frame by frame
    assert torch.equal(out.gate[..., 0, 0] > 0.5, out.text_iou > out.visual_iou)


def test_the_default_checkpoint_keys_are_those_of_the_linear_decoupler(make_model) -> None:
    """Stage checkpoints written before linear_ortho existed (decoupler LinearDecoupler + w_orth) load."""
    _, default = make_model()
    _, linear = make_model("decoupler=linear")
    assert default.state_dict().keys() == linear.state_dict().keys()
    torch.testing.assert_close(default.state_dict(), linear.state_dict())  # same seed, same initialisation


def test_the_start_of_a_stage_reports_trainable_parameters_per_module(
    make_model, build_stage, caplog
) -> None:
    _, model, stage = stage_2(make_model, build_stage, "decoupler=orthogonal")
    with caplog.at_level(logging.INFO, logger="lightning_desa2va.stages.base"):
        stage.on_fit_start()  # what Lightning calls when training starts
    rows = {line.split()[0]: line.split()[1:] for line in caplog.text.splitlines() if line.strip()}

    def count(parameters) -> str:
        return f"{sum(p.numel() for p in parameters):,}"

    decoupler = count(model.decoupler.parameters())
    assert rows["decoupler"] == [decoupler, decoupler]
    decoder = model.sam.sam_mask_decoder
    heads = [*decoder.iou_prediction_head.parameters(), *decoder.pred_obj_score_head.parameters()]
    trained = count(p for p in decoder.parameters() if all(p is not head for head in heads))
    assert rows["sam.sam_mask_decoder"] == [trained, count(decoder.parameters())]  # less the unread heads
    assert rows["sam"] == [trained, count(model.sam.parameters())]
    lora = count(p for n, p in model.named_parameters() if "lora_" in n)
    assert rows["*lora_*"] == [lora, lora]
    assert rows["vlm"] == [lora, count(model.vlm.parameters())]


def test_orthogonal_decoupler_refuses_subspaces_that_do_not_fit() -> None:
    with pytest.raises(ValueError, match="decoupler.text_fraction=0.75"):
        OrthogonalDecoupler(in_dim=8, out_dim=8, text_fraction=0.75, visual_fraction=0.5)


def test_prompt_sets_of_one_shape_share_one_decoder_call_and_decode_as_alone(make_model, make_batch):
    _, model = make_model()
    model.eval()
    batch = make_batch(model, EXPRESSIONS, num_frames=NUM_FRAMES)
    rows = len(EXPRESSIONS) * NUM_FRAMES
    generator = torch.Generator().manual_seed(0)
    sets = {name: torch.randn(rows, 2, model.sam.prompt_dim, generator=generator) for name in "abc"}
    with torch.no_grad():
        features = model.encode_frames(batch["frames"])
        prompts = {"a": Prompt(sets["a"]), "b": Prompt(sets["b"]), "c": Prompt(sets["c"][:, :1])}
        calls = count_decodes(model, lambda: model.decode(features, prompts))
        together = model.decode(features, prompts)
        alone = {name: model.decode(features, {name: prompt})[name] for name, prompt in prompts.items()}
    assert calls == [2 * rows, rows]  # a and b (two tokens each) in one call, c (one token) in its own
    for name in prompts:
        torch.testing.assert_close(together[name].logits, alone[name].logits)
        torch.testing.assert_close(together[name].iou, alone[name].iou)
