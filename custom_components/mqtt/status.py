"""Downlink state changes -> the downlink status topic, durable and in order.

The core writes every state change as a `downlink_events` row in the same
transaction as the change. Rows not yet acknowledged by the broker have
`mqtt_sent` false; this publisher sends them oldest first and marks them sent
only after the broker's acknowledgement, so a broker outage or a restart
resends exactly what is missing (at least once, order kept).

It runs beside the uplink publisher on the same connection but in its own
task, with its own small window, so it never holds up uplinks.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any, NamedTuple

from sqlalchemy import func, select, update

from driver_core.downlinks import STATE_NAMES
from driver_core.storage.models import Device, Downlink, DownlinkEvent

from .publisher import DB_RETRY_S, IDLE_POLL_S, first_of
from .topic import DEFAULT_DOWNLINK_STATUS_TOPIC, TopicTemplate

_LOGGER = logging.getLogger(__name__)

BATCH = 50  # state changes published before they are marked sent together
DRAIN_S = 5.0


class StatusRow(NamedTuple):
    id: int
    command_id: str
    serial: str
    state: int
    at: datetime
    command: str
    parameter: Any
    hw_type: int


def status_payload(row: StatusRow) -> bytes:
    """The compact JSON of one state change (documented in docs/mqtt.md)."""
    document = {
        "command_id": row.command_id,
        "status": row.state,
        "timestamp": int(row.at.timestamp()),
        "serial": row.serial,
        "command": row.command,
        "parameter": row.parameter,
        "state_name": STATE_NAMES[row.state],
    }
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()


def error_payload(command_id: str | None, error: str, detail: str, at: datetime) -> bytes:
    """The compact JSON reporting a refused command message."""
    document = {
        "command_id": command_id,
        "status": None,
        "error": error,
        "detail": detail,
        "timestamp": int(at.timestamp()),
    }
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()


class StatusStore:
    """The downlink_events table seen from the MQTT status publisher."""

    def __init__(self, db: Any) -> None:
        self._db = db

    async def unsent(self, limit: int) -> list[StatusRow]:
        """Up to `limit` state changes the broker does not have yet, lowest id first.

        In cluster mode only the leader publishes them (driver_core.cluster): one
        publisher keeps each downlink's states in order.
        """
        if not self._db.leads_downlink_events:
            return []
        query = (
            select(
                DownlinkEvent.id,
                DownlinkEvent.command_id,
                DownlinkEvent.serial,
                DownlinkEvent.state,
                DownlinkEvent.at,
                Downlink.command,
                Downlink.parameter,
                Device.hw_type,
            )
            .join(Downlink, Downlink.id == DownlinkEvent.downlink_id)
            .join(Device, Device.id == Downlink.device_id)
            .where(DownlinkEvent.mqtt_sent.is_(False))
            .order_by(DownlinkEvent.id)
            .limit(limit)
        )
        async with self._db.session() as session:
            return [StatusRow(*row) for row in (await session.execute(query)).all()]

    async def count_unsent(self) -> int:
        query = select(func.count(DownlinkEvent.id)).where(DownlinkEvent.mqtt_sent.is_(False))
        async with self._db.session() as session:
            return int((await session.execute(query)).scalar_one())

    async def mark_sent(self, ids: Iterable[int]) -> None:
        statement = (
            update(DownlinkEvent)
            .where(DownlinkEvent.id.in_(list(ids)))
            .values(mqtt_sent=True)
            .execution_options(synchronize_session=False)
        )
        await self._db.run_write(lambda session: session.execute(statement))

    async def hw_type(self, serial: str) -> int | None:
        async with self._db.session() as session:
            return (
                await session.execute(select(Device.hw_type).where(Device.serial == serial))
            ).scalar_one_or_none()


class StatusPublisher:
    """Publishes unsent state changes; `topic` and `qos` may be swapped at any time (reload)."""

    def __init__(
        self,
        store: StatusStore,
        topic: TopicTemplate,
        qos: int,
        *,
        on_change: Callable[[], None] = lambda: None,
        on_error: Callable[[str | None], None] = lambda message: None,
    ) -> None:
        self.store = store
        self.topic = topic
        self.qos = qos
        self.waiting = 0
        self.published = 0
        self._on_change = on_change
        self._on_error = on_error
        self._wakeup = asyncio.Event()
        self._fallback_topic = TopicTemplate(DEFAULT_DOWNLINK_STATUS_TOPIC)

    async def start(self) -> None:
        self.waiting = await self.store.count_unsent()

    def notify(self) -> None:
        """A state change was committed (EVENT_DOWNLINK_STATE): look at the table now."""
        self.waiting += 1
        self._wakeup.set()

    def topic_for(self, serial: str, hw_type: int | None) -> str:
        try:
            return self.topic.render_for(serial, "" if hw_type is None else str(hw_type))
        except (ValueError, KeyError, TypeError) as exc:
            _LOGGER.error(
                "Downlink status topic template gives no valid topic for %s (%s); using %s",
                serial, exc, DEFAULT_DOWNLINK_STATUS_TOPIC,
            )
            return self._fallback_topic.render_for(serial)

    async def run(self, client: Any, stop: asyncio.Event) -> None:
        """Publish until `stop` is set (the batch on the wire completes) or a publish fails."""
        while not stop.is_set():
            self._wakeup.clear()
            try:
                rows = await self.store.unsent(BATCH)
            except Exception as exc:  # a database hiccup must not drop the connection
                _LOGGER.warning("Cannot read the downlink status changes: %s", exc)
                self._on_error(f"cannot read the downlink status changes: {exc}")
                await first_of(stop, wait_s=DB_RETRY_S)
                continue
            if len(rows) < BATCH and self.waiting != len(rows):
                self.waiting = len(rows)
                self._on_change()
            if not rows:
                await first_of(self._wakeup, stop, wait_s=IDLE_POLL_S)
                continue
            await self._publish_batch(client, rows, stop)

    async def _publish_batch(self, client: Any, rows: list[StatusRow], stop: asyncio.Event) -> None:
        # Tasks start in creation order, so the client puts them on the wire in id order.
        tasks = [
            asyncio.create_task(
                client.publish(
                    self.topic_for(row.serial, row.hw_type), status_payload(row), qos=self.qos
                )
            )
            for row in rows
        ]
        everything = asyncio.gather(*tasks, return_exceptions=True)
        try:
            await first_of(everything, stop, wait_s=None)
            if not everything.done():  # stopping: what is on the wire may still be acked
                await asyncio.wait([everything], timeout=DRAIN_S)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        acked: list[int] = []
        failure: BaseException | None = None
        for row, task in zip(rows, tasks, strict=True):
            # Only the acknowledged prefix is marked: a gap would reorder the resend.
            if task.cancelled() or task.exception() is not None:
                failure = None if task.cancelled() else task.exception()
                break
            acked.append(row.id)
        if acked:
            await self._mark_sent(acked, stop)
        if failure is not None:
            raise failure

    async def _mark_sent(self, ids: list[int], stop: asyncio.Event) -> None:
        while True:
            try:
                await self.store.mark_sent(ids)
            except Exception as exc:
                _LOGGER.warning("Cannot record published downlink status changes: %s", exc)
                self._on_error(f"cannot record published downlink status changes: {exc}")
                if stop.is_set():
                    return  # sent again after the restart: at least once
                await first_of(stop, wait_s=DB_RETRY_S)
                continue
            self.published += len(ids)
            self.waiting = max(0, self.waiting - len(ids))
            self._on_change()
            return
