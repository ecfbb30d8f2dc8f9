"""Several driver instances on one PostgreSQL database and one broker (`cluster: true`).

A UDP load balancer may send any datagram to any instance, so nothing a
device depends on may live in one instance's memory only:

* replay windows and device counters are checked and merged inside the write
  transaction, under a row lock (`driver_core.writer`); the last request of
  each device and its protected answer are stored with them, so a
  retransmission that reaches another instance gets the same answer
  (`driver_core.shared_answers`);
* uplink outbox rows belong to the instance that wrote them (it publishes them
  from memory, at once); an instance whose heartbeat stopped has its rows
  adopted by a live one;
* downlink events (callbacks, MQTT status) are delivered by one leader at a
  time, chosen with a PostgreSQL advisory lock held on a connection of its own,
  so their per-downlink order is kept. Writers NOTIFY the leader, whose
  listening connection turns that into a local wake-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from typing import TYPE_CHECKING, Any

import asyncpg
from sqlalchemy import delete, func, insert, or_, select, text, update

from .events import EventBus
from .storage.db import normalize_url
from .storage.models import Instance, OutboxMessage
from .tasks import cancel_and_wait

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession
    from sqlalchemy.orm import Session
    from sqlalchemy.sql import Executable

    from .storage.db import Database

_LOGGER = logging.getLogger(__name__)

LEADER_LOCK_KEY = 0x636F6170  # "coap": the advisory lock of the downlink-event leader
NOTIFY_CHANNEL = "coap_driver_downlink_events"
EVENT_DOWNLINK_ROWS = "downlink_rows"  # payload: lowest new downlink_events id, or None
EVENT_OUTBOX_ADOPTED = "outbox_adopted"  # payload: number of rows adopted


def downlink_events_notice(session: Session | AsyncSession, first_event_id: int) -> Executable | None:
    """In cluster mode, the statement that wakes the leader when the transaction commits."""
    if session.info.get("instance_id") is None:
        return None
    return select(func.pg_notify(NOTIFY_CHANNEL, str(first_event_id)))


class Cluster:
    """This instance's membership: registration, heartbeat, adoption, leadership."""

    def __init__(self, db: Database, bus: EventBus, settings: dict[str, Any]) -> None:
        self._db = db
        self._bus = bus
        self.name = settings["name"] or f"{socket.gethostname()}-{os.getpid()}"
        self.heartbeat_s = float(settings["heartbeat_seconds"])
        self.dead_after_s = float(settings["dead_after_seconds"])
        self.instance_id: int | None = None
        self.leader = False
        self._healthy_since: float | None = None
        self._listener: asyncpg.Connection | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._register()
        await self._tick()
        self._task = asyncio.create_task(self._run(), name="cluster-heartbeat")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        await self._drop_listener()
        if self.instance_id is not None:
            with contextlib.suppress(Exception):  # a dead database: the others adopt later
                async with self._db.session() as session, session.begin():
                    await session.execute(delete(Instance).where(Instance.id == self.instance_id))
        self._db.instance_id = None
        self._db.leads_downlink_events = True

    # -- registration and heartbeat ------------------------------------------------
    async def _register(self) -> None:
        async with self._db.session() as session, session.begin():
            self.instance_id = (
                await session.execute(
                    insert(Instance)
                    .values(name=self.name, started_at=func.now(), heartbeat_at=func.now())
                    .returning(Instance.id)
                )
            ).scalar_one()
        self._db.instance_id = self.instance_id
        self._db.leads_downlink_events = False
        _LOGGER.info("Cluster instance %s registered as #%d", self.name, self.instance_id)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            try:
                await self._tick()
            except Exception as exc:  # database away: try again next beat
                self._healthy_since = None
                _LOGGER.warning("Cluster heartbeat failed: %s", exc)

    async def _tick(self) -> None:
        await self._heartbeat()
        await self._lead()
        now = time.monotonic()
        # Adopt only after a full dead period of own heartbeats: after an outage every
        # instance looks dead until it has beaten again.
        if self._healthy_since is not None and now - self._healthy_since >= self.dead_after_s:
            await self._adopt()

    async def _heartbeat(self) -> None:
        async with self._db.session() as session, session.begin():
            result = await session.execute(
                update(Instance)
                .where(Instance.id == self.instance_id)
                .values(heartbeat_at=func.now())
            )
        if result.rowcount != 1:
            _LOGGER.warning(
                "Cluster instance #%s was declared dead by another instance; registering again",
                self.instance_id,
            )
            await self._register()
            self._healthy_since = None
        if self._healthy_since is None:
            self._healthy_since = time.monotonic()

    async def _adopt(self) -> None:
        """Take over outbox rows of instances that stopped beating (or had none)."""
        dead_before = func.now() - text(f"interval '{int(self.dead_after_s)} seconds'")
        live = select(Instance.id).where(Instance.heartbeat_at >= dead_before)
        async with self._db.session() as session, session.begin():
            result = await session.execute(
                update(OutboxMessage)
                .where(or_(OutboxMessage.instance_id.is_(None), OutboxMessage.instance_id.not_in(live)))
                .values(instance_id=self.instance_id)
                .execution_options(synchronize_session=False)
            )
            await session.execute(delete(Instance).where(Instance.heartbeat_at < dead_before))
        adopted = result.rowcount or 0
        if adopted:
            _LOGGER.warning("Adopted %d unpublished uplink(s) of stopped instances", adopted)
            self._bus.fire(EVENT_OUTBOX_ADOPTED, adopted)

    # -- leadership of downlink events -------------------------------------------
    async def _lead(self) -> None:
        """Hold the advisory lock on a connection of our own; lose it with that connection."""
        if self._listener is not None and self._listener.is_closed():
            await self._drop_listener()
        if self._listener is None:
            url = normalize_url(self._db.url).set(drivername="postgresql")
            self._listener = await asyncpg.connect(url.render_as_string(hide_password=False))
        if self.leader:
            return
        if await self._listener.fetchval("SELECT pg_try_advisory_lock($1)", LEADER_LOCK_KEY):
            await self._listener.add_listener(NOTIFY_CHANNEL, self._on_notify)
            self.leader = True
            self._db.leads_downlink_events = True
            _LOGGER.info("Cluster instance #%s delivers downlink events", self.instance_id)
            self._bus.fire(EVENT_DOWNLINK_ROWS, 0)  # owed rows: read them all, from id 0

    def _on_notify(self, _connection: Any, _pid: int, _channel: str, payload: str) -> None:
        self._bus.fire(EVENT_DOWNLINK_ROWS, int(payload) if payload.isdigit() else None)

    async def _drop_listener(self) -> None:
        if self.leader:
            _LOGGER.warning("Cluster instance #%s no longer delivers downlink events", self.instance_id)
        self.leader = False
        self._db.leads_downlink_events = self.instance_id is None
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(Exception):
                await listener.close(timeout=2)
