"""Whether the database takes the driver's writes: one state for the log, /metrics and the Status page.

Every hot-path write (uplink batches, outbox deletes, downlink changes) goes
through `Database.run_write`, which reports each outcome here. When writes
start failing (connection lost, disk full, read-only database) one ERROR line
says why; when they succeed again one WARNING line says for how long they
failed. A refused uplink is still logged by its own refusal line.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

from sqlalchemy.exc import IntegrityError, SQLAlchemyError

_LOGGER = logging.getLogger("driver_core.storage")


def is_storage_failure(exc: BaseException) -> bool:
    """A failure of the database itself, not of the work (a conflicting row, a refused change)."""
    if isinstance(exc, IntegrityError):
        return False
    return isinstance(exc, SQLAlchemyError | OSError | sqlite3.Error)


def first_line(exc: BaseException) -> str:
    """The first line of an error (SQLAlchemy appends the SQL and a help link), or its type."""
    text = str(exc)
    return text.splitlines()[0] if text else type(exc).__name__


def log_retry(logger: logging.Logger, doing: str, exc: BaseException) -> None:
    """A background task failed and will try again: one line when the database is away
    (the storage health already tells the story), the traceback when it is a bug."""
    if is_storage_failure(exc):
        logger.warning("%s failed, database unavailable (%s); retrying", doing, first_line(exc)[:200])
    else:
        logger.error("%s failed; retrying", doing, exc_info=exc)


@dataclass
class WriteHealth:
    label: str  # the database URL, password masked
    writable: bool = True
    failures: int = 0  # failed write transactions since the start
    last_error: str | None = None  # the reason of the latest failure (kept after recovery)
    failing_since: datetime | None = None  # while not writable
    _streak: int = field(default=0, repr=False)
    _streak_started: float = field(default=0.0, repr=False)

    def failed(self, reason: str) -> None:
        self.failures += 1
        self.last_error = reason
        if self.writable:
            self.writable = False
            self.failing_since = datetime.now(UTC)
            self._streak, self._streak_started = 0, time.monotonic()
            _LOGGER.error(
                "Database %s refuses writes: %s; devices are answered 5.03 (retry later) "
                "until it takes writes again",
                self.label, reason,
            )
        self._streak += 1

    def succeeded(self) -> None:
        if self.writable:
            return
        self.writable = True
        self.failing_since = None
        _LOGGER.warning(
            "Database %s takes writes again, after %d failed writes in %.1f s",
            self.label, self._streak, time.monotonic() - self._streak_started,
        )

    def as_json(self) -> dict[str, object]:
        return {
            "writable": self.writable,
            "failures": self.failures,
            "last_error": self.last_error,
            "failing_since": self.failing_since.isoformat() if self.failing_since else None,
        }
