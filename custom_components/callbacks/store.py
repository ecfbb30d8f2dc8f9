"""The downlink_events table seen from the callback worker.

The core writes one row per state change in the same transaction as the
change itself; a row with a callback URL and no callback_status is a callback
still owed. The table is the queue, so a restart resumes exactly what is owed.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, NamedTuple

from sqlalchemy import select, update

from driver_core.storage.models import DownlinkEvent

DELIVERED = "delivered"
FAILED = "failed"


class PendingCallback(NamedTuple):
    id: int
    downlink_id: int
    command_id: str
    state: int
    at: datetime
    callback_url: str
    attempts: int


class CallbackStore:
    def __init__(self, db: Any) -> None:
        self._db = db

    async def pending(self, from_id: int, limit: int) -> list[PendingCallback]:
        """Owed callbacks with id >= `from_id`, lowest id first (none unless this
        instance is the cluster's leader: one sender keeps each downlink's order)."""
        if not self._db.leads_downlink_events:
            return []
        query = (
            select(
                DownlinkEvent.id,
                DownlinkEvent.downlink_id,
                DownlinkEvent.command_id,
                DownlinkEvent.state,
                DownlinkEvent.at,
                DownlinkEvent.callback_url,
                DownlinkEvent.callback_attempts,
            )
            .where(
                DownlinkEvent.callback_status.is_(None),
                DownlinkEvent.callback_url.is_not(None),
                DownlinkEvent.id >= from_id,
            )
            .order_by(DownlinkEvent.id)
            .limit(limit)
        )
        async with self._db.session() as session:
            rows = (await session.execute(query)).all()
        return [PendingCallback(*row) for row in rows]

    async def record_attempt(self, event_id: int, attempts: int, error: str) -> None:
        """A failed attempt that will be retried: visible while the callback is still owed."""
        await self._update(event_id, callback_attempts=attempts, callback_error=error)

    async def mark_delivered(self, event_id: int, attempts: int) -> None:
        await self._update(
            event_id, callback_status=DELIVERED, callback_attempts=attempts, callback_error=None
        )

    async def mark_failed(self, event_id: int, attempts: int, error: str) -> None:
        await self._update(
            event_id, callback_status=FAILED, callback_attempts=attempts, callback_error=error
        )

    async def _update(self, event_id: int, **values: Any) -> None:
        # Only an owed row changes: a row settled elsewhere stays as it is.
        statement = (
            update(DownlinkEvent)
            .where(DownlinkEvent.id == event_id, DownlinkEvent.callback_status.is_(None))
            .values(**values)
            .execution_options(synchronize_session=False)
        )
        await self._db.run_write(lambda session: session.execute(statement))
