"""Stage 2, decoupled fine-tuning (``stage=decoupled_finetune``).

Frames and the expression go through the VLM (language model adapted with LoRA); the ``[SEG]`` state is
decoupled into z_t and z_v, each prompts SAM-2, the two masks are fused, and the triple supervision (plus
the orthogonality and LM terms) trains it. The model starts from a stage-1 checkpoint (``init_from``).
Training decodes only the masks the loss weighs or the fusion reads; evaluation only what the fused mask
needs, on the frames the inference protocol (``eval=per_frame|sa2va|sa2va_i``) decodes. Validation also
scores the QA turn that follows the ``[SEG]`` answer (exact match under teacher forcing) and logs the
disentanglement diagnostics (:mod:`lightning_desa2va.diagnostics`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torchmetrics
from peft import LoraConfig
from torch import Tensor
from torch.nn import functional as F

from lightning_desa2va.data.chat import IGNORE_INDEX
from lightning_desa2va.diagnostics import DisentanglementMetric, subspace_overlap
from lightning_desa2va.losses import LossTerms, TripleSupervisionLoss
from lightning_desa2va.metrics import PerTypeMean
from lightning_desa2va.models.desa2va import DeSa2VA, DeSa2VAOutput, MaskRequest
from lightning_desa2va.models.inference import InferenceProtocol, PerFrameInference
from lightning_desa2va.stages.answers import answer_spans, score_predictions
from lightning_desa2va.stages.base import IOU_HEAD, OBJECT_SCORE_HEAD, Optimizer, SegmentationStage
from lightning_desa2va.stages.checkpoints import load_model_weights

log = logging.getLogger(__name__)

SEGMENTATION_ANSWERS = 1
"""Labelled answers before the QA turns in a stage-2 conversation: the ``[SEG]`` answer."""


class DecoupledFinetuneStage(SegmentationStage):
    """Expression + frames → decoupled [SEG] → text, visual and fused masks; triple supervision."""

    label = "stage 2 (fused mask)"

    def __init__(
        self,
        model: DeSa2VA,
        loss: TripleSupervisionLoss,
        optimizer: Optimizer,
        train_modules: list[str],
        num_overlays: int,
        lora: LoraConfig | None = None,
        init_from: str | None = None,
        inference: InferenceProtocol | None = None,
        w_motion: float = 0.0,
        motion_grid: int = 32,
    ) -> None:
        super().__init__(model, optimizer, train_modules, num_overlays, w_motion, motion_grid)
        self.loss = loss
        self.inference = PerFrameInference() if inference is None else inference
        model.sam.chunk_frames = self.inference.chunk_frames
        if init_from is not None:
            self.initialised_keys = load_model_weights(model, Path(init_from))
        self.uses_penalty = loss.uses_orth and model.decoupler.has_penalty
        lora_parameters = () if lora is None else model.vlm.adapt(lora)
        self.select_trainable(extra=lora_parameters, unread=self.unread_modules())
        if loss.uses_orth and not model.decoupler.has_penalty:
            log.warning(
                "loss.w_orth=%s has no effect: %s defines no penalty (decoupler=linear_ortho does)",
                loss.weights["orth"],
                type(model.decoupler).__name__,
            )

    def unread_modules(self) -> list[str]:
        """What no loss term reads under this loss and fusion, left frozen: a prompt head whose mask is not
        decoded (the Sa2VA control's text prompt), the fusion when the fused mask has no weight, a decoupler
        branch whose embedding nothing reads, SAM-2's IoU head unless the fused mask is weighed by it
        (``fusion=confidence``) and its object-score head (read by memory tracking, not by a loss)."""
        request, fusion = self.loss.required_masks(), self.model.fusion
        decode_text, decode_visual = request.decodes(fusion)
        both = self.uses_penalty or (request.fused and fusion.reads_embeddings)
        reads = {
            "text": decode_text or both or self.model.motion_prompt.reads_text,
            "visual": decode_visual or both,
        }
        read_or_not = {
            IOU_HEAD: request.fused and fusion.reads_iou,
            "text_prompt": decode_text,
            "visual_prompt": decode_visual,
            "fusion": request.fused,
        }
        for path, read in reads.items():
            read_or_not.update({f"decoupler.{name}": read for name in self.model.decoupler.branches[path]})
        return [OBJECT_SCORE_HEAD, *(module for module, read in read_or_not.items() if not read)]

    def score_metrics(self) -> dict[str, torchmetrics.Metric]:
        """Beside the masks' scores: QA exact match and the disentanglement diagnostics, per type."""
        return {**super().score_metrics(), "qa": PerTypeMean("qa_accuracy"), "diag": DisentanglementMetric()}

    def forward_batch(self, batch: dict[str, Any], masks: MaskRequest | None = None) -> DeSa2VAOutput:
        """The model on a batch; ``masks`` (default: what the loss weighs) says which masks to decode."""
        return self.model(
            batch["frames"],
            batch["vlm_pixels"],
            batch["input_ids"],
            batch["attention_mask"],
            batch["labels"] if self.loss.uses_lm else None,
            masks=self.loss.required_masks() if masks is None else masks,
        )

    def predict_logits(self, batch: dict[str, Any]) -> Tensor:
        """The fused masks of every frame under the inference protocol (config group ``eval``)."""
        return self.inference(self.model, batch).logits

    def evaluation_logits(self, batch: dict[str, Any], split: str) -> Tensor:
        """The fused masks, and on the same forward pass the diagnostics; then QA exact match."""
        result = self.inference(self.model, batch)
        types = batch["expression_type"]
        scores = self.scores[split]
        scores["diag"].update(
            result.output.embeddings.text, result.output.embeddings.visual, result.output.gate, types
        )
        whole_conversation = len(result.key_frames) == batch["frames"].shape[1]
        self.score_qa(batch, scores["qa"], result.output.vlm_answers if whole_conversation else None)
        return result.logits

    def score_qa(self, batch: dict[str, Any], metric: PerTypeMean, answers: Tensor | None = None) -> None:
        """Exact match of every QA answer after the ``[SEG]`` answer, under teacher forcing: all its tokens
        (end of turn included) argmax-correct, which is what greedy decoding would answer. ``answers``: the
        head's argmax on the labelled positions from the segmentation pass, when the VLM saw the whole
        conversation; else one more VLM pass."""
        labels = batch["labels"]
        if max(len(spans) for spans in answer_spans(labels != IGNORE_INDEX)) <= SEGMENTATION_ANSWERS:
            return  # no QA turn in the batch (data.chat.max_qa_turns = 0 or clips without QA pairs)
        if answers is None:
            answers = self.model.vlm.answer_tokens(
                batch["input_ids"], batch["attention_mask"], batch["vlm_pixels"].flatten(0, 1), labels
            )
        hits, types = [], []
        for row, answered in enumerate(score_predictions(answers, labels).answers):
            qa_answers = answered[SEGMENTATION_ANSWERS:]
            hits += qa_answers
            types += [batch["expression_type"][row]] * len(qa_answers)
        if hits:
            metric.update(torch.tensor(hits, dtype=torch.float64, device=labels.device), types)

    def extra_results(self) -> dict[str, float]:
        """The principal angles between the subspaces z_t and z_v read (from the decoupler's weights)."""
        overlap = subspace_overlap(self.model.decoupler.subspace_maps())
        return {f"diag/{name}": value for name, value in overlap.items()}

    def compute_losses(self, batch: dict[str, Any]) -> tuple[DeSa2VAOutput, LossTerms]:
        """The model's output for a batch and every loss term on it (what a training step minimises)."""
        output = self.forward_batch(batch)
        penalty = self.model.decoupler.orthogonality_penalty(output.embeddings) if self.uses_penalty else None
        return output, self.loss(output, batch["target_masks"], penalty, batch["stated_motion"])

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        output, losses = self.compute_losses(batch)
        self.log_dict(self.diagnostics(output), batch_size=len(batch["expression"]))
        return self.log_losses(losses, self.motion_objective(output.image_embeddings, batch), batch)

    @torch.no_grad()
    def diagnostics(self, output: DeSa2VAOutput) -> dict[str, Tensor]:
        """How decoupled z_t and z_v are, and how the fusion gate leans (DESIGN: logged with every run)."""
        cosine = F.cosine_similarity(output.embeddings.text, output.embeddings.visual, dim=-1).abs().mean()
        stats = {"diag/abs_cos_zt_zv": cosine}
        if output.gate is not None:
            stats["diag/gate_mean"] = output.gate.mean()
            stats["diag/gate_std"] = output.gate.std()
        return stats
