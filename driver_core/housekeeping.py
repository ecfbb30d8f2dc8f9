"""Periodic chores of a running driver: notice fleet changes, expire old history, drop
outbox rows nobody publishes."""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import timedelta
from typing import TYPE_CHECKING

from sqlalchemy import delete

from .storage.health import log_retry
from .storage.models import OutboxMessage, UplinkRecord
from .tasks import cancel_and_wait
from .timefmt import utcnow

if TYPE_CHECKING:
    from .driver import Driver

_LOGGER = logging.getLogger(__name__)
FLEET_CHECK_SECONDS = 5.0
PURGE_EVERY_SECONDS = 3600.0


async def purge_uplinks(driver: Driver, days: int) -> int:
    limit = utcnow() - timedelta(days=days)
    async with driver.db.session() as session, session.begin():
        result = await session.execute(delete(UplinkRecord).where(UplinkRecord.received_at < limit))
    return result.rowcount or 0


async def purge_unconsumed_outbox(driver: Driver) -> int:
    """Delete outbox rows no integration will publish (MQTT was configured once, no longer).

    Only this instance's rows: in cluster mode another instance publishes its own.
    """
    if driver.writer is None or driver.writer.outbox_consumed:
        return 0
    query = delete(OutboxMessage)
    if driver.db.instance_id is not None:
        query = query.where(OutboxMessage.instance_id == driver.db.instance_id)
    async with driver.db.session() as session, session.begin():
        result = await session.execute(query.execution_options(synchronize_session=False))
    deleted = result.rowcount or 0
    if deleted:
        _LOGGER.info(
            "No MQTT integration is configured: deleted %d uplink document(s) left in the MQTT outbox",
            deleted,
        )
    return deleted


async def purge_history(driver: Driver) -> None:
    """Apply the retention settings: old uplinks and finished downlinks go; pending ones stay."""
    retention = driver.config.retention
    uplinks = await purge_uplinks(driver, retention["uplinks_days"])
    downlinks = await driver.downlinks.purge(retention["downlinks_days"])
    await purge_unconsumed_outbox(driver)
    if uplinks or downlinks:
        _LOGGER.info("Retention: deleted %d uplinks and %d downlinks", uplinks, downlinks)


class Housekeeping:
    def __init__(self, driver: Driver) -> None:
        self._driver = driver
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="housekeeping")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def _run(self) -> None:
        next_purge = time.monotonic()
        while True:
            try:
                await self._driver.credentials.reconcile()
                if time.monotonic() >= next_purge:
                    next_purge = time.monotonic() + PURGE_EVERY_SECONDS
                    await purge_history(self._driver)
            except Exception as exc:
                log_retry(_LOGGER, "Housekeeping", exc)
            await asyncio.sleep(FLEET_CHECK_SECONDS)

