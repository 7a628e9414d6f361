"""Chat prompts in the InternVL layout, tokenized with ``[SEG]`` and the image tokens.

Stage 2 asks ``<image>``×T + "Please segment {expression}." and trains the answer "Sure, [SEG]."
(plus QA turns about the clip, whose answers also carry the LM loss). Stage 1 asks the same question
about the ground-truth label without any image. VLM pre-training asks for a caption of the frames, then
the clip's questions. Only assistant tokens are labelled; the rest is -100.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from lightning_desa2va.data.captions import CaptionTemplates
from lightning_desa2va.data.schema import ObjectTrack, QAPair
from lightning_desa2va.models.tokenizer import (
    ASSISTANT_ROLE,
    IMAGE_CONTEXT_TOKEN,
    IMAGE_END_TOKEN,
    IMAGE_START_TOKEN,
    TURN_END_TOKEN,
    TURN_START_TOKEN,
    USER_ROLE,
)

IGNORE_INDEX = -100
ASSISTANT_TURN = f"{TURN_START_TOKEN} {ASSISTANT_ROLE}"
TOKEN_CACHE_SIZE = 65536
"""Texts whose token ids an encoder remembers (it forgets them all when full): a sample tokenizes ~25
texts, most of them repeats (turn markers, labels, object words, QA), and the loader's time went mostly to
the tokenizer's per-call overhead."""


@dataclass
class ChatTemplates(CaptionTemplates):
    """The wording of the prompts (config ``data.chat``), the caption's wording included."""

    segment_question: str = "Please segment {expression}."
    segment_answer: str = "Sure, [SEG]."
    max_qa_turns: int = 1
    caption_question: str = "Which shapes are there?"
    caption_qa_turns: int | None = None
    """QA turns after the caption in VLM pre-training; ``None`` keeps all of the clip's pairs."""
    image_start: str = IMAGE_START_TOKEN
    image_context: str = IMAGE_CONTEXT_TOKEN
    image_end: str = IMAGE_END_TOKEN
    """How a frame is spelled: start, ``image_tokens`` context tokens, end (InternVL's; Qwen-VL's differ)."""


@dataclass
class EncodedChat:
    """Token ids and LM labels (answer tokens only) of one conversation."""

    input_ids: Tensor
    labels: Tensor


class ChatEncoder:
    """Turns an expression (and QA pairs) into InternVL-style token ids with ``[SEG]`` in the answer."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, templates: ChatTemplates, image_tokens: int):
        self.tokenizer = tokenizer
        self.templates = templates
        self.image_tokens = image_tokens
        self._token_cache: dict[str, tuple[int, ...]] = {}

    def segmentation(self, expression: str, num_frames: int, qa: list[QAPair]) -> EncodedChat:
        """Frames, the segmentation request and its ``[SEG]`` answer, then up to ``max_qa_turns`` QA turns."""
        turns: list[tuple[str, str | None]] = [
            (
                self._images(num_frames) + self.templates.segment_question.format(expression=expression),
                self.templates.segment_answer,
            )
        ]
        turns += [(pair.question, pair.answer) for pair in qa[: self.templates.max_qa_turns]]
        return self._encode(turns)

    def caption_qa(self, caption: str | None, num_frames: int, qa: list[QAPair]) -> EncodedChat:
        """Frames, the caption request and its answer, then the clip's QA turns (VLM pre-training).

        Without a caption (objects without attributes) the frames go before the first question; with
        neither caption nor QA the frames and the caption request come back with no labelled token.
        """
        turns = [(self.templates.caption_question, caption)] if caption is not None else []
        turns += [(pair.question, pair.answer) for pair in qa[: self.templates.caption_qa_turns]]
        if not turns:
            turns = [(self.templates.caption_question, None)]
        first_question, first_answer = turns[0]
        turns[0] = (self._images(num_frames) + first_question, first_answer)
        return self._encode(turns)

    def label_prompt(self, label: str) -> EncodedChat:
        """Stage 1: the segmentation request about a ground-truth label, text only."""
        return self._encode(
            [(self.templates.segment_question.format(expression=label), self.templates.segment_answer)]
        )

    def referent_words(self, objects: list[ObjectTrack], object_ids: list[int]) -> Tensor:
        """Token ids of the colour and shape words of the referred objects (VLM pre-training's referent
        objective), each once; empty when any of them lacks those attributes (real datasets)."""
        targets = [track for track in objects if track.id in object_ids]
        if not targets or not all(track.colour and track.shape for track in targets):
            return torch.zeros(0, dtype=torch.long)
        words = " ".join(f"{track.colour} {track.shape}" for track in targets)
        return torch.tensor(sorted(set(self._ids(words))), dtype=torch.long)

    def object_looks(self, objects: list[ObjectTrack]) -> Tensor:
        """[max id + 1, 2] token ids of each object's colour and shape word, row = object id (SAM-2
        pre-training's look objective); ``IGNORE_INDEX`` for row 0 (background), ids no object has and
        objects without both attributes (real datasets) or whose words are not one token each."""
        looks = torch.full((max((track.id for track in objects), default=0) + 1, 2), IGNORE_INDEX)
        for track in objects:
            if track.colour and track.shape:
                words = self._ids(f"{track.colour} {track.shape}")
                if len(words) == looks.shape[1]:
                    looks[track.id] = torch.tensor(words)
        return looks

    def referent_motions(self, objects: list[ObjectTrack], object_ids: list[int]) -> Tensor:
        """Token ids of the direction words of the referred objects ("up-left" → up, left; "still"), each
        once (VLM pre-training's motion referent objective); empty when any of them has no motion."""
        targets = [track for track in objects if track.id in object_ids]
        if not targets or not all(track.motion for track in targets):
            return torch.zeros(0, dtype=torch.long)
        words = " ".join(direction_words(track) for track in targets)
        return torch.tensor(sorted(set(self._ids(words))), dtype=torch.long)

    def object_motions(self, objects: list[ObjectTrack]) -> Tensor:
        """[max id + 1, 2] token ids of each object's direction words ("up-left" → up, left; "still" →
        still, then ``IGNORE_INDEX``), row = object id (the segmentation stages' motion objective);
        ``IGNORE_INDEX`` rows for the background, ids no object has and objects without a motion."""
        motions = torch.full((max((track.id for track in objects), default=0) + 1, 2), IGNORE_INDEX)
        for track in objects:
            words = self._ids(direction_words(track)) if track.motion else []
            if 0 < len(words) <= motions.shape[1]:
                motions[track.id, : len(words)] = torch.tensor(words)
        return motions

    def _images(self, num_frames: int) -> str:
        templates = self.templates
        image = templates.image_start + templates.image_context * self.image_tokens + templates.image_end
        return image * num_frames

    def _encode(self, turns: list[tuple[str, str | None]]) -> EncodedChat:
        """Token ids of the turns; an answer of ``None`` leaves the assistant turn open and unlabelled.

        A tokenizer with a chat template (a real checkpoint's) lays the turns out by it; the embedded
        default's word-level tokenizer has none and uses the InternVL layout spelled out here.
        """
        if self.tokenizer.chat_template is not None:
            return self._encode_by_template(turns)
        ids: list[int] = []
        labels: list[int] = []
        for question, answer in turns:
            user = self._ids(f"{TURN_START_TOKEN} {USER_ROLE} {question} {TURN_END_TOKEN} {ASSISTANT_TURN}")
            if answer is None:
                ids += user
                labels += [IGNORE_INDEX] * len(user)
                continue
            reply = self._ids(f"{answer} {TURN_END_TOKEN}")
            ids += user + reply
            labels += [IGNORE_INDEX] * len(user) + reply
        return EncodedChat(input_ids=torch.tensor(ids), labels=torch.tensor(labels))

    def _encode_by_template(self, turns: list[tuple[str, str | None]]) -> EncodedChat:
        """The turns rendered by the tokenizer's chat template; each answer's tokens are what its message
        adds to the rendered conversation (so the template's end-of-turn text is labelled with it)."""
        messages: list[dict[str, str]] = []
        ids: list[int] = []
        labels: list[int] = []
        rendered = ""
        for question, answer in turns:
            messages.append({"role": USER_ROLE, "content": question})
            prompt = self._render(messages, rendered, add_generation_prompt=True)
            user = self._ids(prompt[len(rendered) :])
            ids += user
            labels += [IGNORE_INDEX] * len(user)
            if answer is None:
                continue
            messages.append({"role": ASSISTANT_ROLE, "content": answer})
            rendered = self._render(messages, prompt)
            reply = self._ids(rendered[len(prompt) :])
            ids += reply
            labels += reply
        return EncodedChat(input_ids=torch.tensor(ids), labels=torch.tensor(labels))

    def _render(
        self, messages: list[dict[str, str]], before: str, add_generation_prompt: bool = False
    ) -> str:
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        if not text.startswith(before):
            raise ValueError("the tokenizer's chat template rewrites earlier turns; it cannot label answers")
        return text

    def _ids(self, text: str) -> list[int]:
        ids = self._token_cache.get(text)
        if ids is None:
            if len(self._token_cache) >= TOKEN_CACHE_SIZE:
                self._token_cache.clear()
            ids = self._token_cache[text] = tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return list(ids)


def direction_words(track: ObjectTrack) -> str:
    """How the motion objectives spell an object's motion: "up-left" → "up left", "still" → "still"."""
    return track.motion.replace("-", " ")
