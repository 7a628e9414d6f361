"""Device and dtype handling of stage 2, checked on CPU.

A GPU is not always at hand, so CPU checks stand in for it: tensors the package makes on the host are
tagged and may not meet the module's tensors (tests/device_check.py), through a training step, validation
with QA turns (what ``desa2va eval`` runs too) and predict; and a GPU run's config holds its frozen weights
in bf16 and its trained ones in fp32.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from device_check import HostTensorCheck

EXPRESSIONS = ["the red circle", "the blue square moving left"]
QA = [("What colour is the circle?", "red")]
STAGE_2 = ["stage=decoupled_finetune", "stage.num_overlays=0", "eval=sa2va_i", "eval.key_frames=1"]
pytestmark = pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated")


def checked(check: HostTensorCheck, method):
    """``method`` run with ``check`` active."""

    def run(*args, **kwargs):
        with check:
            return method(*args, **kwargs)

    return run


def video_of(batch: dict, index: int) -> np.ndarray:
    """A batch clip's SAM-2 frames as a uint8 video [T, H, W, 3]."""
    frames = batch["frames"][index].permute(0, 2, 3, 1)
    return ((frames - frames.min()) / (frames.max() - frames.min()) * 255).to(torch.uint8).numpy()


def test_stage_2_makes_no_tensor_off_the_module_device(
    make_model, make_batch, build_stage, fit_on_batch, tmp_path
):
    from lightning_desa2va.predict import load_predictor

    cfg, model = make_model(*STAGE_2)
    stage = build_stage(cfg, model)
    batch = make_batch(model, EXPRESSIONS, num_frames=3, qa=QA)
    check = HostTensorCheck()
    for name in ("training_step", "validation_step"):
        setattr(stage, name, checked(check, getattr(stage, name)))
    trainer, _ = fit_on_batch(stage, batch, 1, tmp_path, val_batch=batch)
    assert "val/qa_accuracy" in trainer.logged_metrics  # the QA turn was scored
    trainer.save_checkpoint(tmp_path / "stage2.ckpt")
    predictor = load_predictor(cfg, tmp_path / "stage2.ckpt")
    masks = checked(check, predictor.masks)(video_of(batch, 0), EXPRESSIONS[0])
    assert masks.shape == (3, *batch["frames"].shape[-2:])
    assert not check.violations


def test_the_check_names_where_the_package_made_a_host_tensor() -> None:
    """``type_index`` without a device makes its index on the host; adding through it into a module's state
    is what fails on a GPU."""
    from lightning_desa2va.metrics import type_index

    state = torch.zeros(3)
    check = HostTensorCheck()
    with pytest.raises(RuntimeError, match=r"metrics\.py:\d+"), check:
        state.index_add_(0, type_index(["static", "motion"], device=None), torch.ones(2))
    with check:
        state.index_add_(0, type_index(["static", "motion"], device=state.device), torch.ones(2))
    assert state.tolist() == [1.0, 1.0, 0.0]  # the refused add never ran


def test_a_gpu_run_in_bf16_holds_the_frozen_base_in_bf16_and_the_trained_weights_in_fp32(compose, tmp_path):
    """``trainer=gpu`` (bf16-mixed): the frozen weights in bf16, what trains in fp32 (the optimizer's master
    copy), and the stage's checkpoint keeps only the fp32 trained weights."""
    from lightning_desa2va.build import build_components
    from lightning_desa2va.stages.checkpoints import RECORD_KEY

    stage = build_components(compose(*STAGE_2, "trainer=gpu")).stage
    dtypes: dict[bool, set[torch.dtype]] = {False: set(), True: set()}
    for parameter in stage.parameters():
        dtypes[parameter.requires_grad].add(parameter.dtype)
    assert dtypes == {False: {torch.bfloat16}, True: {torch.float32}}
    checkpoint = {"state_dict": stage.state_dict()}
    stage.on_save_checkpoint(checkpoint)
    kept = {key.removeprefix("model.") for key in checkpoint["state_dict"] if key.startswith("model.")}
    trainable = {name for name, parameter in stage.model.named_parameters() if parameter.requires_grad}
    assert trainable <= kept and not any(key.startswith(("vlm.", "sam.")) for key in kept - trainable)
    assert set(checkpoint[RECORD_KEY]["rebuilt"]) == set(stage.model.state_dict()) - kept
