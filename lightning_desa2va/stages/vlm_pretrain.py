"""VLM pre-training (``stage=vlm_pretrain``): captions and QA about the clips, before any segmentation.

A randomly initialised tiny VLM barely refers: its ``[SEG]`` state hardly depends on the expression and
the gradient that reaches it through SAM-2 is tiny (DESIGN §7). As the real pipeline starts from a VLM
pretrained on image-text data, the embedded default first trains its VLM with the language-model loss on
a caption of the frames (every object by colour, shape and motion) and on the clip's QA answers, so its
hidden states carry appearance and motion. Validation reports the LM loss, teacher-forced accuracies (per
answer token, per caption, per QA answer and per question kind) and a probe of whether the ``[SEG]``
state of the segmentation prompt separates the expressions of one clip. With ``w_referent`` > 0 the
``[SEG]`` state also learns to name the referred object (:mod:`lightning_desa2va.stages.referent`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchmetrics import MeanMetric

from lightning_desa2va.data.chat import IGNORE_INDEX
from lightning_desa2va.data.schema import EXPRESSION_TYPES
from lightning_desa2va.metrics import synced
from lightning_desa2va.models.desa2va import DeSa2VA
from lightning_desa2va.stages.answers import score_answers
from lightning_desa2va.stages.base import Optimizer, Scheduler, TrainingStage
from lightning_desa2va.stages.referent import referent_hits, referent_loss, referent_rows

log = logging.getLogger(__name__)

CAPTION_KIND = "caption"
OTHER_KIND = "other"
VAL, TEST = "val", "test"
METRIC_NAMES = ("lm_loss", "answer_token_accuracy", "caption_accuracy", "qa_accuracy", "seg_state_separation")
"""What validation and test log (plus ``qa_accuracy/<kind>`` per configured question kind)."""
REFERENT_FRAMES, REFERENT_LABEL = "referent_accuracy", "referent_accuracy_label"
"""With the referent objective: top words of the ``[SEG]`` state of the expression with its frames (also
per expression type, ``referent_accuracy/<type>``) and of the text-only label prompt."""
REFERENT_MOTION = "referent_motion_accuracy"
"""With the motion referent objective: the direction words named from the expression with its frames (also
per expression type)."""


def question_kind(question: str, qa_kinds: dict[str, list[str]]) -> str:
    """The kind of a question by its opening words (config ``stage.qa_kinds``), else ``other``."""
    text = question.lower()
    for kind, openings in qa_kinds.items():
        if any(text.startswith(opening.lower()) for opening in openings):
            return kind
    return OTHER_KIND


def expression_separation(seg_hidden: Tensor, video_ids: Sequence[str], expressions: Sequence[str]) -> Tensor:
    """Cosine distances between ``[SEG]`` states of different expressions of the same clip, [pairs].

    Why this probe: a VLM whose ``[SEG]`` state does not depend on the expression gives SAM-2 nothing to
    refer with; within one clip the frames are equal, so any distance comes from the expression alone.
    """
    unit = F.normalize(seg_hidden.float(), dim=-1)
    distances = 1.0 - unit @ unit.T
    pairs = [
        distances[i, j]
        for i in range(len(video_ids))
        for j in range(i + 1, len(video_ids))
        if video_ids[i] == video_ids[j] and expressions[i] != expressions[j]
    ]
    return torch.stack(pairs) if pairs else distances.new_zeros(0)


class NoAnswersError(ValueError):
    """A batch without a single labelled answer token: nothing to pre-train on (names the videos)."""


class VLMPretrainStage(TrainingStage):
    """LM loss on the caption and QA answers of each clip; trains the VLM (from scratch by default).

    ``loss`` (the segmentation loss every stage is built with) is accepted and not used: this stage's loss
    is the transformers model's own next-token cross-entropy on the answer tokens.
    """

    label = "VLM pre-training (captions + QA)"

    def __init__(
        self,
        model: DeSa2VA,
        optimizer: Optimizer,
        train_modules: list[str] | None = None,
        qa_kinds: dict[str, list[str]] | None = None,
        scheduler: Scheduler | None = None,
        seg_probe: bool = True,
        w_referent: float = 0.0,
        w_referent_motion: float = 0.0,
        loss: object | None = None,
    ) -> None:
        super().__init__(model, optimizer, train_modules if train_modules is not None else ["vlm"], scheduler)
        self.qa_kinds = dict(qa_kinds or {})
        self.seg_probe = seg_probe
        self.w_referent = w_referent
        self.referent_head = (
            nn.Linear(model.vlm.hidden_size, model.vlm.vocab_size) if w_referent > 0 else None
        )
        self.w_referent_motion = w_referent_motion
        self.motion_referent_head = (
            nn.Linear(model.vlm.hidden_size, model.vlm.vocab_size) if w_referent_motion > 0 else None
        )
        self.metrics = nn.ModuleDict({split: self._split_metrics() for split in (VAL, TEST)})
        self._seen_videos: set[str] = set()
        self._captionless_warned = False
        self.select_trainable()

    def _split_metrics(self) -> nn.ModuleDict:
        names = [*METRIC_NAMES, *(f"qa_accuracy/{kind}" for kind in [*self.qa_kinds, OTHER_KIND])]
        for name in (REFERENT_FRAMES, REFERENT_MOTION):
            names += [name, *(f"{name}/{kind}" for kind in EXPRESSION_TYPES)]
        names += [REFERENT_LABEL]
        return nn.ModuleDict({name: MeanMetric() for name in names})

    def language_model_pass(self, batch: dict[str, Any], rows: Iterable[int] | None = None) -> Any:
        """The transformers model on the caption + QA conversations (optionally a subset of the rows)."""
        labels = batch["caption_labels"]
        index = torch.as_tensor(list(rows) if rows is not None else range(len(labels)), device=labels.device)
        labels = batch["caption_labels"][index]
        if not (labels != IGNORE_INDEX).any():
            videos = [batch["video_id"][i] for i in index.tolist()]
            raise NoAnswersError(
                f"no caption or QA answer to train on in videos {videos}: their objects have no "
                "colour/shape/motion attributes and they have no QA pairs"
            )
        return self.model.vlm.model(
            input_ids=batch["caption_input_ids"][index],
            attention_mask=batch["caption_attention_mask"][index],
            pixel_values=batch["vlm_pixels"][index].flatten(0, 1),
            labels=labels,
        )

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        output = self.language_model_pass(batch)
        loss = output.loss
        batch_size = len(batch["video_id"])
        captioned = sum(batch["has_caption"])
        if captioned < batch_size and not self._captionless_warned:
            log.warning(
                "%d of %d clips have no caption (objects without attributes, e.g. a real dataset): "
                "they train on their QA answers only; train/caption_fraction tracks the share",
                batch_size - captioned,
                batch_size,
            )
            self._captionless_warned = True
        self.log("train/lm_loss", loss, prog_bar=True, batch_size=batch_size)
        self.log("train/caption_fraction", captioned / batch_size, batch_size=batch_size)
        weights = {"referent": self.w_referent, "referent_motion": self.w_referent_motion}
        terms = self.referent_terms(batch)
        for name, value in terms.items():
            self.log(f"train/{name}_loss", value, batch_size=batch_size)
            loss = loss + weights[name] * value
        # one check of the total: every rank joins its collective once a step, whatever terms its batch has
        return self.check_finite(loss, batch, {"lm": output.loss, **terms})

    def seg_states(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """``[SEG]`` states of the segmentation prompt with the frames (as stage 2 asks) and of the
        text-only label prompt (as stage 1 asks)."""
        vlm = self.model.vlm
        return {
            REFERENT_FRAMES: vlm(
                batch["input_ids"], batch["attention_mask"], batch["vlm_pixels"].flatten(0, 1)
            ).seg_hidden,
            REFERENT_LABEL: vlm(batch["label_input_ids"], batch["label_attention_mask"]).seg_hidden,
        }

    def referent_terms(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """``referent``: the look words, mean over both prompts; ``referent_motion``: the direction words,
        from the expression with its frames only (a label says nothing of motion). A term is left out when
        its head is off or no clip of the batch has its words (which spares the VLM passes)."""
        wanted = {
            name: head
            for name, head, key in (
                ("referent", self.referent_head, "referent_word_ids"),
                ("referent_motion", self.motion_referent_head, "referent_motion_ids"),
            )
            if head is not None and referent_rows(batch[key]).any()
        }
        if not wanted:
            return {}
        states = self.seg_states(batch)
        terms = {}
        if "referent" in wanted:
            looks = batch["referent_word_ids"]
            terms["referent"] = torch.stack(
                [referent_loss(self.referent_head(seg), looks) for seg in states.values()]
            ).mean()
        if "referent_motion" in wanted:
            terms["referent_motion"] = referent_loss(
                self.motion_referent_head(states[REFERENT_FRAMES]), batch["referent_motion_ids"]
            )
        return terms

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, VAL)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, TEST)

    def on_validation_epoch_start(self) -> None:
        self._seen_videos.clear()

    def on_test_epoch_start(self) -> None:
        self._seen_videos.clear()

    def _evaluate(self, batch: dict[str, Any], split: str) -> None:
        """LM scores once per video (a clip's expressions share its caption and QA), then the probe."""
        metrics = self.metrics[split]
        rows = []
        for row, video in enumerate(batch["video_id"]):
            if video not in self._seen_videos:
                self._seen_videos.add(video)
                rows.append(row)
        if rows:
            output = self.language_model_pass(batch, rows)
            labels = batch["caption_labels"][rows]
            scores = score_answers(output.logits, labels)
            metrics["lm_loss"].update(output.loss, weight=int(scores.token_hits.numel()))
            metrics["answer_token_accuracy"].update(scores.token_hits.float())
            for row, answers in zip(rows, scores.answers, strict=True):
                self._update_answer_metrics(metrics, batch, row, answers)
        if not (self.seg_probe or self.referent_head is not None or self.motion_referent_head is not None):
            return
        states = self.seg_states(batch)
        if self.seg_probe:
            distances = expression_separation(states[REFERENT_FRAMES], batch["video_id"], batch["expression"])
            if distances.numel():
                metrics["seg_state_separation"].update(distances)
        if self.referent_head is not None:
            self._update_referent_metrics(metrics, batch, self.referent_head, "referent_word_ids", states)
        if self.motion_referent_head is not None:
            frames_only = {REFERENT_MOTION: states[REFERENT_FRAMES]}
            self._update_referent_metrics(
                metrics, batch, self.motion_referent_head, "referent_motion_ids", frames_only
            )

    def _update_referent_metrics(
        self,
        metrics: nn.ModuleDict,
        batch: dict[str, Any],
        head: nn.Module,
        words_key: str,
        states: dict[str, Tensor],
    ) -> None:
        """Hits of ``head`` on each prompt's ``[SEG]`` states (metric name → states), and per expression type
        for the first (the expression with its frames)."""
        rows = referent_rows(batch[words_key]).cpu()
        if not rows.any():
            return
        hits = {name: referent_hits(head(seg), batch[words_key]).float() for name, seg in states.items()}
        for name, row_hits in hits.items():
            metrics[name].update(row_hits[rows])
        frames_name = next(iter(hits))
        for kind in EXPRESSION_TYPES:
            of_kind = rows & torch.tensor([t == kind for t in batch["expression_type"]])
            if of_kind.any():
                metrics[f"{frames_name}/{kind}"].update(hits[frames_name][of_kind])

    def _update_answer_metrics(
        self, metrics: nn.ModuleDict, batch: dict[str, Any], row: int, answers: list[bool]
    ) -> None:
        kinds = [question_kind(question, self.qa_kinds) for question in batch["qa_questions"][row]]
        if batch["has_caption"][row]:
            kinds = [CAPTION_KIND, *kinds]
        if len(kinds) != len(answers):
            raise ValueError(
                f"video {batch['video_id'][row]}: {len(answers)} labelled answers but {len(kinds)} turns"
            )
        for kind, correct in zip(kinds, answers, strict=True):
            value = torch.tensor(float(correct))
            if kind == CAPTION_KIND:
                metrics["caption_accuracy"].update(value)
                continue
            metrics["qa_accuracy"].update(value)
            metrics[f"qa_accuracy/{kind}"].update(value)

    def on_validation_epoch_end(self) -> None:
        self._log_results(VAL)
        self.last_validated_step = self.global_step

    def on_test_epoch_end(self) -> None:
        self._log_results(TEST)

    def _log_results(self, split: str) -> None:
        """Log each accuracy that any rank has a question for (a kind no question asked stays unlogged
        rather than NaN); every rank computes it then, since computing syncs the ranks' states."""
        results = {}
        for name, metric in self.metrics[split].items():
            if self.trainer.strategy.reduce_boolean_decision(bool(metric.weight > 0), all=False):
                results[f"{split}/{name}"] = synced(metric)
            metric.reset()
        self.log_dict(results, sync_dist=True)
        rounded = {name: round(float(value), 4) for name, value in results.items()}
        log.info("%s at step %d: %s", split, self.global_step, rounded)
