"""Scoring answers under teacher forcing: every answer token argmax-correct is an exact match.

With the right answer fed back at every position (teacher forcing), an answer whose every token is the
argmax is exactly what greedy decoding would say, end-of-turn token included, so exact match needs no
generation loop. VLM pre-training scores its captions and QA answers with it, stage 2 the QA turn that
follows the ``[SEG]`` answer.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor
from torch.nn import functional as F

from lightning_desa2va.data.chat import IGNORE_INDEX


@dataclass
class AnswerScores:
    """Teacher-forced argmax scores of a batch's answers."""

    token_hits: Tensor  # [N] bool, one per labelled answer token of the batch
    answers: list[list[bool]]  # per sequence, per answer (labelled run) in order: all its tokens right?


def answer_spans(valid: Tensor) -> list[list[tuple[int, int]]]:
    """Per row of a [B, L] bool mask, the ``[start, end)`` of each run of True (one run per answer)."""
    spans: list[list[tuple[int, int]]] = []
    padded = F.pad(valid.int(), (1, 1))
    edges = padded[:, 1:] - padded[:, :-1]
    for row in edges:
        starts = (row == 1).nonzero().flatten().tolist()
        ends = (row == -1).nonzero().flatten().tolist()
        spans.append(list(zip(starts, ends, strict=True)))
    return spans


def score_answers(logits: Tensor, labels: Tensor) -> AnswerScores:
    """Argmax of the logits at each position against the next label, over the labelled tokens only."""
    return score_predictions(logits[:, :-1].argmax(dim=-1), labels)


def score_predictions(predicted: Tensor, labels: Tensor) -> AnswerScores:
    """Predicted next tokens [B, L - 1] (read where the next token is labelled) against the labels [B, L]."""
    target = labels[:, 1:]
    valid = target != IGNORE_INDEX
    hits = (predicted == target) & valid
    answers = [
        [bool(hits[row, start:end].all()) for start, end in spans]
        for row, spans in enumerate(answer_spans(valid))
    ]
    return AnswerScores(token_hits=hits[valid], answers=answers)
