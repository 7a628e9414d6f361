"""The stage LightningModules: they learn on a fixed batch, stop on NaN, and hand weights on to stage 2."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate

from lightning_desa2va.errors import NonFiniteLossError
from lightning_desa2va.models.desa2va import TextSegmentation

STEPS = 6
LEARNING_RATE = 1e-3  # fixed here, so the test does not depend on the tuned default
EXPRESSION = "the red circle"


@pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")
@pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated")
@pytest.mark.parametrize(
    ("stage_name", "logged"),
    [
        ("text_pretrain", {"train/loss"}),
        (
            "decoupled_finetune",
            {
                "train/loss",
                "train/loss_fused",
                "train/loss_text",
                "train/loss_visual",
                "train/loss_orth",
                "train/loss_lm",
                "diag/abs_cos_zt_zv",
                "diag/gate_mean",
            },
        ),
    ],
)
def test_training_decreases_the_loss_on_a_fixed_batch(
    stage_name, logged, make_model, make_batch, build_stage, fit_on_batch, tmp_path
) -> None:
    cfg, model = make_model(f"stage={stage_name}", f"stage.optimizer.lr={LEARNING_RATE}")
    stage = build_stage(cfg, model)
    batch = make_batch(model, [EXPRESSION], num_frames=1)
    frozen_before = {k: v.clone() for k, v in model.sam.image_encoder.state_dict().items()}
    decoder_before = {k: v.clone() for k, v in model.sam.sam_mask_decoder.state_dict().items()}

    _, losses = fit_on_batch(stage, batch, STEPS, tmp_path, gradient_clip_val=cfg.trainer.gradient_clip_val)

    assert len(losses) == STEPS and all(math.isfinite(loss) for loss in losses)
    assert losses[-1] < 0.8 * losses[0], losses
    assert logged <= set(stage.trainer.callback_metrics), sorted(stage.trainer.callback_metrics)
    for key, value in model.sam.image_encoder.state_dict().items():
        assert torch.equal(value, frozen_before[key]), f"frozen SAM-2 image encoder changed: {key}"
    assert any(
        not torch.equal(value, decoder_before[key])
        for key, value in model.sam.sam_mask_decoder.state_dict().items()
    ), "the mask decoder did not train"


@pytest.mark.parametrize("stage_name", ["text_pretrain", "decoupled_finetune"])
def test_both_stages_train_the_motion_cue(stage_name, make_model, build_stage) -> None:
    cfg, model = make_model(f"stage={stage_name}", "motion_cue=normal_flow")
    build_stage(cfg, model)
    assert model.motion_cue.project.weight.requires_grad
    assert not any(parameter.requires_grad for parameter in model.sam.image_encoder.parameters())


@pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated")
@pytest.mark.parametrize("stage_name", ["text_pretrain", "decoupled_finetune"])
def test_the_motion_objective_trains_its_probe_and_the_motion_cue(
    stage_name, make_model, make_batch, build_stage, fit_on_batch, tmp_path
) -> None:
    cfg, model = make_model(f"stage={stage_name}", "motion_cue=normal_flow", "stage.w_motion=1")
    stage = build_stage(cfg, model)
    probe_before = stage.motion_probe.head.weight.clone()
    batch = make_batch(model, [EXPRESSION], num_frames=2)  # per-frame noise: the flow is not zero

    fit_on_batch(stage, batch, 2, tmp_path)

    assert {"train/loss_motion", "train/motion_accuracy"} <= set(stage.trainer.callback_metrics)
    assert model.motion_cue.project.weight.abs().sum() > 0, "the cue's zero projection did not move"
    assert not torch.equal(stage.motion_probe.head.weight, probe_before)
    assert "motion_probe" not in {name.split(".")[0] for name, _ in model.named_parameters()}


def test_without_w_motion_there_is_no_motion_probe(make_model, build_stage) -> None:
    cfg, model = make_model("stage=text_pretrain")
    assert build_stage(cfg, model).motion_probe is None


@pytest.mark.parametrize(("text", "prefix"), [("label", "label_"), ("expression", "expression_label_")])
def test_stage_1_reads_the_configured_ground_truth_text(
    text, prefix, make_model, make_batch, build_stage, monkeypatch
) -> None:
    cfg, model = make_model("stage=text_pretrain", f"stage.text={text}")
    stage = build_stage(cfg, model)
    batch = make_batch(model, [EXPRESSION], num_frames=1)
    read = {}

    def record(frames, input_ids, attention_mask, clip_index=None):
        read.update(ids=input_ids, mask=attention_mask)
        return TextSegmentation(torch.zeros(1), None, torch.zeros(1))

    monkeypatch.setattr(model, "segment_text", record)
    stage.segment(batch)
    assert read["ids"] is batch[f"{prefix}input_ids"]
    assert read["mask"] is batch[f"{prefix}attention_mask"]


def test_stage_1_refuses_an_unknown_text(make_model, build_stage) -> None:
    cfg, model = make_model("stage=text_pretrain", "stage.text=caption")
    with pytest.raises((ValueError, InstantiationException), match="stage.text"):
        build_stage(cfg, model)


@pytest.mark.parametrize("stage_name", ["text_pretrain", "decoupled_finetune"])
def test_nan_loss_raises_naming_the_videos(stage_name, make_model, make_batch, build_stage) -> None:
    cfg, model = make_model(f"stage={stage_name}")
    stage = build_stage(cfg, model)
    batch = make_batch(model, [EXPRESSION, "the blue square"], num_frames=1)
    with torch.no_grad():
        model.text_prompt.to_content.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match="nan") as caught, torch.no_grad():
        stage.training_step(batch, 0)
    assert "video-0" in str(caught.value) and "video-1" in str(caught.value)


@pytest.fixture
def stage1_checkpoint(make_model, build_stage, tmp_path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A Lightning-style checkpoint of a stage-1 model whose weights were moved away from any init."""
    cfg, model = make_model("stage=text_pretrain", seed=1)
    stage = build_stage(cfg, model)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator))
    path = tmp_path / "stage1.ckpt"
    torch.save({"state_dict": stage.state_dict(), "global_step": 150}, path)
    return path, {k: v.clone() for k, v in model.state_dict().items()}


def test_stage_2_init_from_loads_the_stage_1_weights(stage1_checkpoint, make_model, build_stage) -> None:
    path, expected = stage1_checkpoint
    cfg, model = make_model("stage=decoupled_finetune", f"stage.init_from={path}", seed=2)
    build_stage(cfg, model)
    # LoRA wraps the adapted projections after loading: their weights now sit under `base_layer`
    loaded = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}
    assert set(loaded) == set(expected)
    mismatched = [key for key, value in expected.items() if not torch.equal(loaded[key], value)]
    assert not mismatched, mismatched[:5]
    assert any("lora_" in name for name, _ in model.named_parameters())


def test_stage_2_without_init_from_keeps_its_own_weights(stage1_checkpoint, make_model, build_stage):
    _, expected = stage1_checkpoint
    cfg, model = make_model("stage=decoupled_finetune", seed=2)
    build_stage(cfg, model)
    key = "decoupler.to_text.weight"
    assert not torch.equal(model.state_dict()[key], expected[key])


def construct_stage(cfg, model):
    """The configured stage, constructed outside Hydra so its own exception types surface unwrapped."""
    factory = instantiate(cfg.stage, _partial_=True)
    return factory(model=model, loss=instantiate(cfg.loss))


def test_init_from_a_checkpoint_with_foreign_weights_fails_naming_it(
    stage1_checkpoint, make_model, build_stage, tmp_path
) -> None:
    path, _ = stage1_checkpoint
    payload = torch.load(path, weights_only=True)
    payload["state_dict"]["model.bogus.weight"] = torch.zeros(2)
    foreign = tmp_path / "foreign.ckpt"
    torch.save(payload, foreign)
    cfg, model = make_model("stage=decoupled_finetune", f"stage.init_from={foreign}")
    with pytest.raises(ValueError, match=re.escape(str(foreign))) as caught:
        construct_stage(cfg, model)
    assert "bogus.weight" in str(caught.value)
    # through Hydra (how the CLI builds it) the wrapped error still names the file and the key
    with pytest.raises(InstantiationException, match=re.escape(str(foreign))) as wrapped:
        build_stage(cfg, model)
    assert isinstance(wrapped.value.__cause__, ValueError)


def test_init_from_a_missing_file_fails_naming_it(make_model, build_stage, tmp_path) -> None:
    missing = tmp_path / "nowhere" / "stage1.ckpt"
    cfg, model = make_model("stage=decoupled_finetune", f"stage.init_from={missing}")
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        construct_stage(cfg, model)
    with pytest.raises(InstantiationException, match=re.escape(str(missing))) as wrapped:
        build_stage(cfg, model)
    assert isinstance(wrapped.value.__cause__, FileNotFoundError)
