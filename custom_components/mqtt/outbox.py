"""The durable outbox table seen from the publisher: read in id order, delete once acked.

The table itself is the queue: a row exists until the broker has acknowledged
it, so a restart or a broker outage resends exactly what is missing.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple

from sqlalchemy import Select, delete, func, select
from sqlalchemy.orm import Session

from driver_core.storage.models import OutboxMessage

_DELETE_CHUNK = 500  # stays under SQLite's bound-parameter limit


class OutboxRow(NamedTuple):
    id: int
    serial: str
    document: str


class Outbox:
    def __init__(self, db: Any) -> None:
        self._db = db

    def _mine(self, query: Select) -> Select:
        """Cluster mode: only the rows this instance owns (the others publish theirs)."""
        if self._db.instance_id is None:
            return query
        return query.where(OutboxMessage.instance_id == self._db.instance_id)

    async def oldest(self, limit: int) -> list[OutboxRow]:
        """Up to `limit` waiting rows, lowest id first."""
        query = self._mine(
            select(OutboxMessage.id, OutboxMessage.serial, OutboxMessage.document)
            .order_by(OutboxMessage.id)
            .limit(limit)
        )
        async with self._db.session() as session:
            result = await session.execute(query)
            return [OutboxRow(*row) for row in result.all()]

    async def count(self) -> int:
        async with self._db.session() as session:
            query = self._mine(select(func.count(OutboxMessage.id)))
            return int((await session.execute(query)).scalar_one())

    async def delete(self, ids: Iterable[int]) -> int:
        """Remove delivered rows; returns how many were removed.

        Runs through the database's writer (`run_write`): on SQLite one thread
        owns all hot-path writes, so they never wait on each other's locks.
        """
        ids = list(ids)

        def remove(session: Session) -> int:
            removed = 0
            for start in range(0, len(ids), _DELETE_CHUNK):
                chunk = ids[start : start + _DELETE_CHUNK]
                result = session.execute(
                    delete(OutboxMessage)
                    .where(OutboxMessage.id.in_(chunk))
                    .execution_options(synchronize_session=False)
                )
                removed += result.rowcount or 0
            return removed

        return await self._db.run_write(remove)
