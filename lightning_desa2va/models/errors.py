"""The error a weights file or model folder raises when it is not what the config asks for."""

from __future__ import annotations


class WeightsFormatError(ValueError):
    """A checkpoint or model folder that exists but cannot be loaded as configured (the message names it
    and says what is wrong, on one line)."""
