"""Stage-2 validation: masks scored with J&F, cIoU and gIoU, QA answers by exact match and the
disentanglement diagnostics, each per expression type."""

from __future__ import annotations

import pytest
import torch

from lightning_desa2va.data.chat import IGNORE_INDEX
from lightning_desa2va.metrics import PerTypeMean
from lightning_desa2va.models.tokenizer import TURN_END_TOKEN
from lightning_desa2va.stages.answers import answer_spans

EXPRESSIONS = ["the red circle", "the blue square moving left"]
TYPES = ["static", "motion"]
QA = [("What colour is the circle?", "red")]


@pytest.fixture
def stage_and_batch(make_model, make_batch, build_stage):
    cfg, model = make_model("stage=decoupled_finetune", "stage.num_overlays=0")
    stage = build_stage(cfg, model)
    batch = make_batch(model, EXPRESSIONS, num_frames=2, qa=QA)
    batch["expression_type"] = list(TYPES)
    return stage, batch


@pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated")
def test_stage_2_validation_logs_scores_qa_and_diagnostics_per_type(stage_and_batch, fit_on_batch, tmp_path):
    stage, batch = stage_and_batch
    fit_on_batch(stage, batch, 1, tmp_path, val_batch=batch)
    logged = set(stage.trainer.callback_metrics)
    expected = {"val/JF", "val/cIoU", "val/gIoU", "val/qa_accuracy"}
    for kind in TYPES:
        expected |= {f"val/cIoU/{kind}", f"val/gIoU/{kind}", f"val/qa_accuracy/{kind}"}
        expected |= {
            f"val/diag/abs_cos_zt_zv/{kind}",
            f"val/diag/gate_mean/{kind}",
            f"val/diag/gate_std/{kind}",
        }
    expected |= {"val/diag/abs_cos_zt_zv", "val/diag/principal_cos_max", "val/diag/principal_cos_mean"}
    expected |= {"diag/abs_cos_zt_zv", "diag/gate_mean", "diag/gate_std"}  # training keeps its diagnostics
    assert expected <= logged, sorted(expected - logged)


def test_qa_exact_match_needs_every_answer_token_end_of_turn_included(stage_and_batch, tokenizer) -> None:
    """Labels set to the VLM's own argmax make an answer right; one wrong end-of-turn token makes it wrong;
    the [SEG] answer before it is not a QA answer and does not count."""
    stage, batch = stage_and_batch
    vlm = stage.model.vlm.model
    with torch.no_grad():
        logits = vlm(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch["vlm_pixels"].flatten(0, 1),
        ).logits
    predicted = logits[:, :-1].argmax(-1)
    labels = batch["labels"].clone()
    spans = answer_spans(labels[:, 1:] != IGNORE_INDEX)
    assert [len(row) for row in spans] == [2, 2]  # the [SEG] answer, then the QA answer
    for row in range(2):
        start, end = spans[row][1]
        labels[row, 1 + start : 1 + end] = predicted[row, start:end]
    _, end = spans[1][1]
    assert batch["labels"][1, end] == tokenizer.convert_tokens_to_ids(TURN_END_TOKEN)  # the answer's last
    labels[1, end] = (predicted[1, end - 1] + 1) % logits.shape[-1]  # row 1's end-of-turn token is wrong
    seg_start, seg_end = spans[0][0]
    labels[0, 1 + seg_start : 1 + seg_end] = (predicted[0, seg_start:seg_end] + 1) % logits.shape[-1]
    metric = PerTypeMean("qa_accuracy")
    with torch.no_grad():
        stage.score_qa({**batch, "labels": labels}, metric)
    assert metric.compute() == {"qa_accuracy": 0.5, "qa_accuracy/static": 1.0, "qa_accuracy/motion": 0.0}


def test_batches_without_qa_turns_score_no_answers(make_model, make_batch, build_stage) -> None:
    cfg, model = make_model("stage=decoupled_finetune")
    stage = build_stage(cfg, model)
    metric = PerTypeMean("qa_accuracy")
    with torch.no_grad():
        stage.score_qa(make_batch(model, EXPRESSIONS, num_frames=2), metric)
    assert not metric.update_called


def test_evaluation_reads_the_qa_answers_off_the_segmentation_pass(stage_and_batch) -> None:
    stage, batch = stage_and_batch
    stage.eval()
    vlm = stage.model.vlm
    passes: list[int] = []
    hook = vlm.model.base_model.register_forward_hook(lambda *_: passes.append(1))
    with torch.no_grad():
        stage.evaluation_logits(batch, "val")
        assert len(passes) == 1  # one VLM pass gives the [SEG] state and the QA answers' tokens
        hook.remove()
        reused = stage.inference(stage.model, batch).output.vlm_answers
        separate = vlm.answer_tokens(
            batch["input_ids"], batch["attention_mask"], batch["vlm_pixels"].flatten(0, 1), batch["labels"]
        )
    assert torch.equal(reused, separate)
    assert stage.scores["val"]["qa"].update_called
