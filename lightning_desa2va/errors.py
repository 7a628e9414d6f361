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


class ResumeError(ValueError):
    """A run that cannot be continued as asked (composed differently, another tracking URI, still running)."""


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss: stopping beats training on garbage (the message names the
    step, the loss term, the batch's videos and the last good checkpoint)."""


class ServiceError(RuntimeError):
    """A local service (PostgreSQL, the MLflow server) that cannot be installed, started or reached."""


class RunInterrupted(BaseException):
    """SIGTERM or SIGINT stopped a run after it saved what it had (its ``last.ckpt``); commands exit with
    ``128 + signum`` (143 for SIGTERM, 130 for SIGINT), as a shell reports a process ended by that signal.

    A ``BaseException``, like ``KeyboardInterrupt``: handlers of ordinary errors (a sweep that fails a trial
    and goes on, cleanup that records a failure) must not swallow a request to stop.
    """

    def __init__(self, signum: int, detail: str) -> None:
        super().__init__(detail)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum
