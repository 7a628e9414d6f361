"""Deterministic captions of a clip from its annotated objects, the targets of VLM pre-training.

A caption names every object by colour, shape and motion ("the blue square moving left, the red circle
that stays still."), in a canonical order (sorted by colour, shape, motion words) that the frames alone
determine, so the caption is a function of what the model sees, with nothing to guess. The wording comes
from :class:`CaptionTemplates` (config ``data.chat``) and the generator's motion words, so the embedded
tokenizer covers it (its templates include the caption templates).

Real datasets (MeViS, Ref-YouTube-VOS, ...) carry no object attributes: a clip with any object whose
colour, shape or motion is unknown gets no caption (:func:`clip_caption` returns ``None``) rather than a
caption that silently leaves objects out. The encoder then trains on the clip's QA turns alone and marks
the sample ``has_caption=False``; the pre-training stage logs the share of such samples and raises when a
batch has no answer to learn from at all.
"""

from __future__ import annotations

from dataclasses import dataclass

from lightning_desa2va.data.schema import ObjectTrack
from lightning_desa2va.data.synthetic_words import MOTION_WORDS, STILL


@dataclass
class CaptionTemplates:
    """Wording of a caption: one phrase per object, joined, inside the answer."""

    caption_object: str = "the {colour} {shape} {motion}"
    caption_moving: str = "moving {direction}"
    caption_still: str = "that stays still"
    caption_separator: str = ", "
    caption_answer: str = "{objects}."

    def literal_templates(self) -> list[str]:
        """Every template string, for a tokenizer that must cover the caption words."""
        return [
            self.caption_object,
            self.caption_moving,
            self.caption_still,
            self.caption_separator,
            self.caption_answer,
        ]


def describable(track: ObjectTrack) -> bool:
    """Whether an object's colour, shape and motion are all known (synthetic data; not real datasets)."""
    return bool(track.colour and track.shape and track.motion)


def object_phrase(track: ObjectTrack, templates: CaptionTemplates) -> str:
    """'the red circle moving up and left', 'the blue square that stays still' ..."""
    if track.motion == STILL:
        motion = templates.caption_still
    else:
        motion = templates.caption_moving.format(direction=MOTION_WORDS.get(track.motion, track.motion))
    return templates.caption_object.format(colour=track.colour, shape=track.shape, motion=motion)


def clip_caption(objects: list[ObjectTrack], templates: CaptionTemplates) -> str | None:
    """The caption of a clip, or ``None`` when an object lacks attributes (see the module docstring)."""
    if not objects or not all(describable(track) for track in objects):
        return None
    ordered = sorted(objects, key=lambda track: (track.colour, track.shape, track.motion))
    phrases = [object_phrase(track, templates) for track in ordered]
    return templates.caption_answer.format(objects=templates.caption_separator.join(phrases))
