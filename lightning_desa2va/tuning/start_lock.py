"""One worker at a time decides to start a trial and creates it.

Workers on several machines share a study. Each checks that the study still needs a trial (finished and
running short of ``n_trials``, or a retry waiting) and then starts one; two workers checking at once would
both start one, and a grid would run a point twice. The lock spans the check and the trial's creation: it is
taken before the check and released by the objective as the trial begins (by then the trial is in the
storage, RUNNING, for the next worker's count). PostgreSQL serves it as an advisory lock (machines share it),
a study in a file (SQLite, a journal) as a lock file beside it; other databases go without one.
"""

from __future__ import annotations

import hashlib
import logging

import sqlalchemy
from filelock import FileLock

log = logging.getLogger(__name__)

SQLITE_PREFIX = "sqlite:///"
POSTGRES_SCHEMES = ("postgresql",)
LOCK_SUFFIX = ".start.lock"
KEY_BYTES = 8


class TrialStartLock:
    """A lock held from a worker's decision to start a trial until that trial exists (module docstring)."""

    def __init__(self, storage_url: str, study_name: str) -> None:
        self.storage_url = storage_url
        self.key = int.from_bytes(hashlib.blake2b(study_name.encode(), digest_size=KEY_BYTES).digest(), "big")
        self.key -= 1 << (8 * KEY_BYTES - 1)  # PostgreSQL's advisory keys are signed 64-bit integers
        self._file: FileLock | None = None
        self._connection: sqlalchemy.Connection | None = None
        scheme = storage_url.split(":", 1)[0].split("+")[0]
        if scheme in POSTGRES_SCHEMES:
            pool = sqlalchemy.pool.NullPool  # one connection, held while the lock is
            self._engine: sqlalchemy.Engine | None = sqlalchemy.create_engine(storage_url, poolclass=pool)
        else:
            self._engine = None
            path = storage_url.removeprefix(SQLITE_PREFIX)
            if storage_url.startswith(SQLITE_PREFIX) or "://" not in storage_url:
                self._file = FileLock(f"{path}{LOCK_SUFFIX}")
            else:
                log.warning("no trial-start lock on %s: workers checking at once may each start one", scheme)

    def acquire(self) -> None:
        if self._file is not None:
            self._file.acquire()
        elif self._engine is not None and self._connection is None:
            self._connection = self._engine.connect()
            self._connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": self.key})

    def release(self) -> None:
        """Release (again: nothing happens), so the objective and the loop may both call it."""
        if self._file is not None and self._file.is_locked:
            self._file.release()
        elif self._connection is not None:
            self._connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": self.key})
            self._connection.close()
            self._connection = None
