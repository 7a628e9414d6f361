"""The referent objective of VLM pre-training: the ``[SEG]`` state names the object it asks for.

Captions and QA train the VLM's answers, not its ``[SEG]`` state: after them the state barely differs
between the expressions of a clip (README, "foundations"), and what the segmentation stages read from it
depends on whether the frames are there (stage 1 asks about the label alone, stage 2 about the expression
with the frames). A linear head from the ``[SEG]`` state to logits over the vocabulary, trained to put its
probability on the colour and shape words of the referred object(s) from both prompts, makes the state
carry the referent the same way in both. The head (an ``nn.Linear`` the pre-training stage holds) is a
probe: it is not part of the model or its exported weights.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_desa2va.data.chat import IGNORE_INDEX


def referent_rows(word_ids: Tensor) -> Tensor:
    """[B] bool: rows that have referent words (objects without attributes, e.g. real data, have none)."""
    return (word_ids != IGNORE_INDEX).any(dim=1)


def referent_loss(logits: Tensor, word_ids: Tensor) -> Tensor | None:
    """Cross-entropy against the uniform distribution over each row's referent words ([B, L] ids padded
    with ``IGNORE_INDEX``), averaged over the rows that have words; ``None`` when no row has any."""
    valid = word_ids != IGNORE_INDEX
    rows = referent_rows(word_ids)
    if not rows.any():
        return None
    log_probs = logits.log_softmax(dim=-1).gather(1, word_ids.clamp(min=0))
    per_row = -(log_probs * valid).sum(dim=1) / valid.sum(dim=1).clamp(min=1)
    return per_row[rows].mean()


def referent_hits(logits: Tensor, word_ids: Tensor) -> Tensor:
    """[B] bool: the row's n most likely words are exactly its n referent words (no words: False)."""
    hits = []
    for row_logits, row_ids in zip(logits, word_ids, strict=True):
        target = row_ids[row_ids != IGNORE_INDEX]
        predicted = row_logits.topk(len(target)).indices if len(target) else target
        hits.append(len(target) > 0 and set(predicted.tolist()) == set(target.tolist()))
    return torch.tensor(hits, dtype=torch.bool)
