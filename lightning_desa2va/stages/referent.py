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
    """[B] bool: every referent word of the row outscores every other word, i.e. its n most likely words
    are exactly its n referent words (a row without words: False). Vectorised: SAM-2 pre-training scores
    every pixel as a row."""
    valid = word_ids != IGNORE_INDEX
    safe_ids = word_ids.clamp(min=0)
    lowest_referent = logits.gather(1, safe_ids).masked_fill(~valid, torch.inf).amin(dim=1)
    rows = torch.arange(len(logits), device=logits.device)[:, None].expand_as(safe_ids)
    is_referent = torch.zeros_like(logits, dtype=torch.bool)
    is_referent[rows[valid], safe_ids[valid]] = True
    highest_other = logits.masked_fill(is_referent, -torch.inf).amax(dim=1)
    return valid.any(dim=1) & (lowest_referent > highest_other)
