"""Group commit: every accepted request is durable before the device gets its answer.

Handlers hand a `WriteJob` to the `UplinkWriter` and await it. The writer
gathers whatever jobs are waiting, writes them in one transaction (uplink
history, MQTT outbox, device row, replay window, new security context), and
only then releases the handlers and fires the uplink events, in arrival order.
One commit per batch instead of one per uplink keeps the database off the
critical path at high rates, while a crash never loses an answered uplink and
never forgets an accepted sequence number.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sqlalchemy import delete, insert, update
from sqlalchemy.orm import Session

from .downlinks import DownlinkStateEvent, StateChange, apply_changes
from .events import EVENT_DOWNLINK_STATE, EVENT_UPLINK, EventBus
from .storage.models import Device, OutboxMessage, SecurityContext, UplinkRecord
from .tasks import cancel_and_wait
from .uplink import Uplink

if TYPE_CHECKING:
    from .security import DeviceContext, DeviceState
    from .storage.db import Database

_LOGGER = logging.getLogger(__name__)
MAX_BATCH = 500


class StorageUnavailable(Exception):
    """The database refused a write; the device is answered 5.03 and will retry."""


@dataclass(slots=True)
class WriteJob:
    state: DeviceState
    context: DeviceContext
    uplink: Uplink | None  # None: only the replay window moves (e.g. a GET)
    payload: bytes = b""
    joined: bool = False  # the context is a new C3 to commit
    downlink_changes: list[StateChange] = field(default_factory=list)
    downlink_events: list[DownlinkStateEvent] = field(default_factory=list)


class UplinkWriter:
    def __init__(self, db: Database, bus: EventBus) -> None:
        self._db = db
        self._bus = bus
        self._queue: list[tuple[WriteJob, asyncio.Future[None]]] = []
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.batches = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="uplink-writer")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        for _, future in self._queue:
            if not future.done():
                future.set_exception(StorageUnavailable("driver stopping"))
        self._queue.clear()

    async def submit(self, job: WriteJob) -> None:
        """Return once `job` is committed; raise StorageUnavailable if it could not be."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((job, future))
        self._wakeup.set()
        await future

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._queue:
                batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
                try:
                    await self._write([job for job, _ in batch])
                except Exception as exc:  # database down, disk full, a conflicting row...
                    if len(batch) == 1:
                        self._fail(batch, exc)
                        continue
                    # Find the culprit: one bad job must not fail the others.
                    for single in batch:
                        try:
                            await self._write([single[0]])
                        except Exception as single_exc:
                            self._fail([single], single_exc)
                        else:
                            self._done([single])
                    continue
                self._done(batch)

    def _fail(self, batch: list[tuple[WriteJob, asyncio.Future[None]]], exc: Exception) -> None:
        _LOGGER.error("Could not store %d uplink(s): %s", len(batch), exc)
        for job, future in batch:
            job.downlink_events.clear()
            if not future.done():
                future.set_exception(StorageUnavailable(str(exc)))

    def _done(self, batch: list[tuple[WriteJob, asyncio.Future[None]]]) -> None:
        self.batches += 1
        for job, future in batch:
            if job.uplink is not None:
                self._bus.fire(EVENT_UPLINK, job.uplink)
            for event in job.downlink_events:
                self._bus.fire(EVENT_DOWNLINK_STATE, event)
            if not future.done():
                future.set_result(None)

    async def _write(self, jobs: list[WriteJob]) -> None:
        await self._db.run_write(lambda session: write_batch(session, jobs))


def write_batch(session: Session, jobs: list[WriteJob]) -> None:
    """One transaction for a batch: contexts, uplinks, outbox rows, devices, downlinks, windows."""
    for job in jobs:
        if job.joined:
            _store_new_context(session, job)
    uplink_jobs = [job for job in jobs if job.uplink is not None]
    if uplink_jobs:
        session.execute(
            insert(UplinkRecord),
            [
                {
                    "device_id": job.state.device_id,
                    "received_at": job.uplink.rx_date,
                    "message_type": job.uplink.message_type,
                    "payload": job.payload,
                    "data": job.uplink.data,
                }
                for job in uplink_jobs
            ],
        )
        for job in uplink_jobs:
            job.uplink.document_json = json.dumps(
                job.uplink.document(), separators=(",", ":"), ensure_ascii=False
            )
        result = session.execute(
            insert(OutboxMessage).returning(OutboxMessage.id, sort_by_parameter_order=True),
            [
                {
                    "serial": job.uplink.serial,
                    "document": job.uplink.document_json,
                    "created_at": job.uplink.rx_date,
                }
                for job in uplink_jobs
            ],
        )
        for job, outbox_id in zip(uplink_jobs, result.scalars(), strict=True):
            job.uplink.outbox_id = outbox_id
        session.execute(
            update(Device),
            [
                {
                    "id": job.state.device_id,
                    "last_seen": job.uplink.rx_date,
                    "join_date": job.state.join_date,
                    "firmware": job.state.firmware,
                    "uplinks_since_join": job.state.uplinks_since_join,
                }
                for job in uplink_jobs
            ],
        )
    for job in jobs:
        if job.downlink_changes:
            job.downlink_events = apply_changes(session, job.downlink_changes)
    windows = [job for job in jobs if not job.joined]
    if windows:
        session.execute(
            update(SecurityContext),
            [
                {
                    "device_id": job.state.device_id,
                    "replay_index": job.context.replay_state()[0],
                    "replay_bitfield": job.context.replay_state()[1],
                    "sender_seq_reserved": job.context.seq_reserved,
                }
                for job in windows
            ],
        )


def _store_new_context(session: Session, job: WriteJob) -> None:
    """The device's only context from now on (RFC 8613 B.2 step 4): replace the old one."""
    index, bitfield = job.context.replay_state()
    session.execute(delete(SecurityContext).where(SecurityContext.device_id == job.state.device_id))
    session.execute(
        insert(SecurityContext).values(
            device_id=job.state.device_id,
            id_context=job.context.id_context,
            r2_issued_ms=job.context.r2_ms,
            sender_seq_reserved=job.context.seq_reserved,
            replay_index=index,
            replay_bitfield=bitfield,
            established_at=job.uplink.rx_date if job.uplink else job.state.join_date,
        )
    )
