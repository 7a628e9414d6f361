"""Trainable-only stage checkpoints: they hold what the run changed, Lightning resumes from them to the same
weights, and a checkpoint of another model is one line naming the first key that does not fit and the
overrides that would."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_desa2va.errors import CheckpointError
from lightning_desa2va.stages.checkpoints import RECORD_KEY, load_model_weights

STAGE_2 = ["stage=decoupled_finetune", "stage.num_overlays=0"]
pytestmark = pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated")


def fit(cfg, batch, steps: int, root: Path, ckpt_path: Path | None = None):
    """A fresh build of ``cfg``'s stage (frozen weights from the foundations) fitted to ``steps`` on
    ``batch`` repeated, from ``ckpt_path`` when given; the stage and its trainer."""
    from lightning_desa2va.build import build_components

    stage = build_components(cfg).stage
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=root,
    )
    trainer.fit(stage, DataLoader([batch] * steps, batch_size=None), ckpt_path=ckpt_path)
    return stage, trainer


@pytest.fixture(scope="module")
def trained(compose, make_model, make_batch, tmp_path_factory):
    """Stage 2 of the tiny default fitted 2 steps, its checkpoint, and the batch it trained on."""
    cfg = compose(*STAGE_2)
    _, model = make_model(*STAGE_2)
    batch = make_batch(model, ["the red circle", "the blue square"])
    root = tmp_path_factory.mktemp("checkpoints")
    stage, trainer = fit(cfg, batch, 2, root)
    trainer.save_checkpoint(root / "step2.ckpt")
    return cfg, batch, stage, root / "step2.ckpt"


def test_a_checkpoint_keeps_what_trained_and_records_what_the_base_rebuilds(trained) -> None:
    _, _, stage, checkpoint = trained
    payload = torch.load(checkpoint, map_location="cpu", weights_only=True)
    kept = {key.removeprefix("model.") for key in payload["state_dict"] if key.startswith("model.")}
    trainable = {name for name, parameter in stage.model.named_parameters() if parameter.requires_grad}
    frozen_foundation = {
        name
        for name, parameter in stage.model.named_parameters()
        if not parameter.requires_grad and name.startswith(("vlm.", "sam."))
    }
    assert trainable <= kept and frozen_foundation and not frozen_foundation & kept
    record = payload[RECORD_KEY]
    assert frozen_foundation <= set(record["rebuilt"])
    assert stage.saved_weights == {
        "model_tensors_kept": len(kept),
        "rebuilt_from_base": len(record["rebuilt"]),
    }
    assert "model=tiny" in record["model_overrides"] and "decoupler=linear_ortho" in record["model_overrides"]


def test_a_stage_resumed_from_a_trainable_only_checkpoint_continues_with_identical_weights(
    trained, tmp_path
) -> None:
    """2 steps, saved, resumed by Lightning to 3 steps: the same weights as 3 steps straight."""
    cfg, batch, _, checkpoint = trained
    straight, _ = fit(cfg, batch, 3, tmp_path / "straight")
    resumed, trainer = fit(cfg, batch, 3, tmp_path / "resumed", ckpt_path=checkpoint)
    assert trainer.global_step == 3
    expected = straight.state_dict()
    assert expected.keys() == resumed.state_dict().keys()
    for key, value in resumed.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_a_checkpoint_of_another_model_names_the_first_key_and_the_overrides_that_fit(
    trained, make_model, build_stage
) -> None:
    _, _, _, checkpoint = trained
    cfg, other = make_model(*STAGE_2, "decoupler=mlp")
    build_stage(cfg, other)  # LoRA as stage 2 adds it
    with pytest.raises(CheckpointError) as error:
        load_model_weights(other, checkpoint, complete=True)
    message = str(error.value)
    assert "\n" not in message and str(checkpoint) in message
    assert "decoupler." in message and "which the model does not have" in message
    assert message.endswith("model=tiny decoupler=linear_ortho text_prompt=points visual_prompt=token "
                            "fusion=dynamic motion_cue=none motion_prompt=flow_match")  # fmt: skip
