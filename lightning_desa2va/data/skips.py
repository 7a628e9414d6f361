"""Bad data in a shard: the one error a user sees (``on_error="raise"``, naming shard and sample) or a
logged skip counted by reason across DataLoader workers (``on_error="skip"``), as webdataset handlers."""

from __future__ import annotations

import logging
import tarfile
from collections.abc import Callable, Iterable

import torch
from webdataset.handlers import reraise_exception

from lightning_desa2va.data.errors import SKIP_REASONS, SchemaVersionError, ShardFormatError

log = logging.getLogger(__name__)

ON_ERROR_CHOICES = ("raise", "skip")
TAR_ERRORS = (tarfile.TarError, OSError, EOFError)


def _reason(exn: BaseException) -> str:
    """Short description of an exception (webdataset appends stream objects to its args)."""
    detail = exn.args[0] if exn.args else ""
    return f"{type(exn).__name__}: {detail}" if detail else type(exn).__name__


def _shard_of(exn: BaseException, urls: Iterable[str]) -> str | None:
    """The shard an exception came from (webdataset appends the url to ``exn.args``), if it says."""
    known = set(urls)
    for arg in reversed(exn.args):
        if isinstance(arg, str) and (arg in known or arg.endswith(".tar")):
            return arg
    text = str(exn)
    return next((u for u in sorted(known) if u in text), None)


def data_error(exn: Exception, urls: Iterable[str]) -> ShardFormatError | None:
    """The data error an exception reports (a tar error becomes ``truncated_tar``), or ``None`` when it
    is not about the data (a bug must surface, not be skipped)."""
    if isinstance(exn, ShardFormatError):
        return exn
    if isinstance(exn, TAR_ERRORS):
        shard = _shard_of(exn, urls) or "<unknown shard>"
        return ShardFormatError(f"cannot read shard {shard}: {_reason(exn)}", "truncated_tar", shard=shard)
    return None


class SkipCounter:
    """A webdataset handler that skips bad data, logging it and counting it by reason.

    The counts live in a shared-memory tensor, one row per DataLoader worker (each worker writes its own
    row, so no increment is lost), so what a worker skips reaches the main process (:meth:`totals`).
    """

    def __init__(self, num_workers: int = 0, urls: Iterable[str] = ()) -> None:
        self.counts = torch.zeros(max(1, num_workers), len(SKIP_REASONS), dtype=torch.int64).share_memory_()
        self.urls: list[str] = list(urls)
        self.messages: list[str] = []
        """This process's skip messages (a worker's stay in the worker; its log shows them)."""
        self.counting = True
        """False while a resumed stream passes over what was read before the interruption (counted then)."""
        self._incomplete: set[str] = set()

    def __call__(self, exn: Exception) -> bool:
        """Handler protocol of :mod:`webdataset.handlers`: True means continue with the next item."""
        error = data_error(exn, self.urls)
        if error is None or isinstance(error, SchemaVersionError):
            raise exn
        if error.reason == "truncated_tar" and error.shard is not None:
            if error.shard in self._incomplete and error is not exn:  # reading it fails as the check said
                log.debug("already counted: %s", error)
                return True
            self._incomplete.add(error.shard)
        if not self.counting:
            return True
        info = torch.utils.data.get_worker_info()
        row = 0 if info is None else info.id % self.counts.shape[0]
        self.counts[row, SKIP_REASONS.index(error.reason)] += 1
        self.messages.append(str(error))
        log.warning("skipping %s (%d so far): %s", error.reason, self.count, error)
        return True

    @property
    def count(self) -> int:
        """Skips of every reason, in every worker."""
        return int(self.counts.sum())

    def totals(self) -> dict[str, int]:
        """Skips per reason (every reason, zeros included), summed over the workers."""
        return dict(zip(SKIP_REASONS, self.counts.sum(dim=0).tolist(), strict=True))


def error_handler(
    on_error: str, urls: Iterable[str], skips: SkipCounter | None = None
) -> Callable[[Exception], bool]:
    """A webdataset handler: ``raise`` raises the first data error naming shard (and key); ``skip`` counts
    into ``skips``. A reader of another schema version always raises."""
    urls = list(urls)
    if on_error == "skip":
        counter = skips if skips is not None else SkipCounter()
        counter.urls.extend(u for u in urls if u not in counter.urls)  # one counter may serve several splits
        return counter
    if on_error != "raise":
        raise ValueError(f"on_error must be one of {ON_ERROR_CHOICES}, got {on_error!r}")

    def raise_naming_shard(exn: Exception) -> bool:
        error = data_error(exn, urls)
        if error is None or error is exn:  # already named, or not about the data: leave it as it is
            return reraise_exception(exn)
        raise error from exn

    return raise_naming_shard
