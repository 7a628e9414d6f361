"""Stopping on SIGTERM (a scheduler's stop, ``kill``) or SIGINT (Ctrl-C) without losing work.

While a stage trains, :data:`STOP` listens: the first signal is only recorded, and the checkpoint callback
(:class:`~lightning_desa2va.callbacks.ResumableCheckpoint`) finishes the step in progress, saves ``last.ckpt``
and raises :class:`~lightning_desa2va.errors.RunInterrupted`; a second signal stops at once, without saving.
Outside training a command stops at once (:func:`stop_at_once`). Either way the command exits with
``128 + signum`` (143, 130).
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

from lightning_desa2va.errors import RunInterrupted

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class StopRequests:
    """The stop signal received while listening (``signum``), for the training callbacks to act on at the next
    point where the run can be saved whole."""

    def __init__(self) -> None:
        self.signum: int | None = None

    @contextmanager
    def listening(self) -> Iterator[None]:
        """Record stop signals in the block (the main thread's handlers; other threads cannot set them)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        self.signum = None
        previous = {signum: signal.signal(signum, self._receive) for signum in STOP_SIGNALS}
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _receive(self, signum: int, frame: FrameType | None) -> None:
        name = signal_name(signum)
        if self.signum is not None:
            raise RunInterrupted(signum, f"{name} again: stopped at once, without saving")
        self.signum = signum
        log.warning(
            "%s: finishing the current step, saving last.ckpt, then stopping (again: stop at once)", name
        )


STOP = StopRequests()
"""The process's stop requests (signals are process-wide)."""


def stop_at_once(signum: int, frame: FrameType | None) -> None:
    """A handler for the parts of a command that are not training: stop now (cleanup still runs)."""
    raise RunInterrupted(signum, f"{signal_name(signum)}: stopped")
