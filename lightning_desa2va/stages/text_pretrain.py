"""Stage 1, text pre-training (``stage=text_pretrain``).

A ground-truth text alone goes through the VLM's language model (``text``: the category-style label, or
the referring expression itself, DESIGN's two options); its ``[SEG]`` state becomes z_t
(the decoupler's text branch), point prompts for SAM-2 and a text mask, trained with the hybrid mask loss.
What it learns (text branch, text prompt head, mask decoder) is what stage 2 starts from.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from lightning_desa2va.losses import TripleSupervisionLoss
from lightning_desa2va.models.desa2va import DeSa2VA, TextSegmentation
from lightning_desa2va.models.inference import distinct_clips
from lightning_desa2va.stages.base import IOU_HEAD, OBJECT_SCORE_HEAD, Optimizer, SegmentationStage

TEXT_KEYS = {"label": "label_", "expression": "expression_label_"}
"""Batch key prefix of each ground-truth text stage 1 can read."""


class TextPretrainStage(SegmentationStage):
    """Label text → point prompts → SAM-2 → text mask; hybrid mask loss (+ point loss when grounded)."""

    label = "stage 1 (text mask)"

    def __init__(
        self,
        model: DeSa2VA,
        loss: TripleSupervisionLoss,
        optimizer: Optimizer,
        train_modules: list[str],
        num_overlays: int,
        text: str = "label",
        w_motion: float = 0.0,
        motion_grid: int = 32,
    ) -> None:
        super().__init__(model, optimizer, train_modules, num_overlays, w_motion, motion_grid)
        if text not in TEXT_KEYS:
            raise ValueError(f"stage.text must be one of {sorted(TEXT_KEYS)}, got '{text}'")
        self.loss = loss
        self.text_key = TEXT_KEYS[text]
        self.select_trainable(unread=self.unread_modules())

    def unread_modules(self) -> list[str]:
        """What stage 1 never reads, left frozen: z_v's branch of the decoupler (the label prompts the text
        path alone) and SAM-2's IoU and object-score heads (the text mask is all the loss scores)."""
        visual = [f"decoupler.{name}" for name in self.model.decoupler.branches["visual"]]
        return [*visual, IOU_HEAD, OBJECT_SCORE_HEAD]

    def segment(self, batch: dict[str, Any], share_clips: bool = False) -> TextSegmentation:
        """The text masks of a batch; ``share_clips``: encode each distinct clip once (evaluation batches
        hold every expression of a video with the same frames)."""
        frames, clip_index = batch["frames"], None
        if share_clips:
            frames, clip_index = distinct_clips(frames, batch.get("video_id"))
        return self.model.segment_text(
            frames,
            batch[f"{self.text_key}input_ids"],
            batch[f"{self.text_key}attention_mask"],
            clip_index,
        )

    def predict_logits(self, batch: dict[str, Any]) -> Tensor:
        return self.segment(batch, share_clips=True).logits

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        output = self.segment(batch)
        logits, prompt = output.logits, output.prompt
        heatmap = None
        if prompt.heatmap_logits is not None:
            heatmap = prompt.heatmap_logits.view(*logits.shape[:2], *prompt.heatmap_logits.shape[1:])
        losses = self.loss.text_only(logits, heatmap, batch["target_masks"])
        return self.log_losses(losses, self.motion_objective(output.image_embeddings, batch), batch)
