"""Errors that are the user's input's fault, importable without the model stack (the CLI lists them in
``USER_ERRORS`` and prints their message alone)."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A file that is not a Lightning checkpoint of the configured model (another stage's, a foundation's
    weights, not a checkpoint at all)."""


class VideoError(ValueError):
    """A video that cannot be read: no frames, not an image, not a video file."""


class ExpressionError(ValueError):
    """An expression that cannot be segmented (empty)."""


class WeightsFormatError(ValueError):
    """A checkpoint or model folder that exists but cannot be loaded as configured (the message names it
    and says what is wrong, on one line)."""
