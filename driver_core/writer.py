"""Group commit: every accepted request is durable before the device gets its answer.

Handlers hand a `WriteJob` to the `UplinkWriter` and await it. The writer
gathers whatever jobs are waiting, writes them in one transaction (uplink
history, MQTT outbox while a consumer is registered, device row, replay window,
new security context), and
only then releases the handlers and fires the uplink events, in arrival order.
One commit per batch instead of one per uplink keeps the database off the
critical path at high rates, while a crash never loses an answered uplink and
never forgets an accepted sequence number.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiocoap.oscore import ReplayWindow
from sqlalchemy import bindparam, delete, insert, select, update
from sqlalchemy.orm import Session

from .downlinks import DownlinkStateEvent, StateChange, apply_changes
from .events import EVENT_DOWNLINK_STATE, EVENT_UPLINK, EventBus
from .oscore_context import REPLAY_WINDOW
from .shared_answers import AnswerSeal, Retransmission, stored_answer_query
from .storage.health import first_line
from .storage.models import Device, OutboxMessage, SecurityContext, UplinkRecord
from .tasks import cancel_and_wait
from .uplink import Uplink

if TYPE_CHECKING:
    from .security import DeviceContext, DeviceState
    from .storage.db import Database

_LOGGER = logging.getLogger(__name__)
MAX_BATCH = 500
# A write that starts within BUSY_WITHIN_S of the previous one, with fewer than
# GATHER_BELOW jobs waiting, waits GATHER_S for more (a quiet driver writes at once).
GATHER_BELOW = 32
BUSY_WITHIN_S = 0.005
GATHER_S = 0.004


class StorageUnavailable(Exception):
    """The database refused a write; the device is answered 5.03 and will retry."""


class SharedStateRefused(Exception):
    """Cluster mode: another instance already accepted this sequence number (`replay`)
    or committed a newer context (`superseded`); the device is answered 4.01."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(slots=True)
class WriteJob:
    state: DeviceState
    context: DeviceContext
    uplink: Uplink | None  # None: only the replay window moves (e.g. a GET)
    payload: bytes = b""
    joined: bool = False  # the context is a new C3 to commit
    downlink_changes: list[StateChange] = field(default_factory=list)
    downlink_events: list[DownlinkStateEvent] = field(default_factory=list)
    seqno: int | None = None  # the request's OSCORE sequence number (cluster replay check)
    refused: str | None = None  # set by the cluster check: "replay" or "superseded"
    seal: AnswerSeal | None = None  # cluster mode: the answer, stored with the request
    stored_answer: bytes | None = None  # cluster mode: a retransmission's answer, committed before


class UplinkWriter:
    def __init__(self, db: Database, bus: EventBus) -> None:
        self._db = db
        self._bus = bus
        self._queue: list[tuple[WriteJob, asyncio.Future[None]]] = []
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.batches = 0
        # Who publishes from the outbox table (the MQTT integration today; one named
        # outbox per integration later): without one, no row is written for nobody.
        self._outbox_consumers: set[str] = set()

    def add_outbox_consumer(self, name: str) -> Callable[[], None]:
        """`name` publishes outbox rows from now on; call the returned function when it stops."""
        self._outbox_consumers.add(name)
        return lambda: self._outbox_consumers.discard(name)

    @property
    def outbox_consumed(self) -> bool:
        """Whether uplinks go to the outbox table: only while a consumer is registered."""
        return bool(self._outbox_consumers)

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
        loop = asyncio.get_running_loop()
        last_write = 0.0
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            if len(self._queue) < GATHER_BELOW and loop.time() - last_write < BUSY_WITHIN_S:
                # Under load a commit per few jobs costs more CPU than the wait: gather.
                await asyncio.sleep(GATHER_S)
            while self._queue:
                last_write = loop.time()
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
        reason = first_line(exc)  # not the SQL text
        _LOGGER.error("Could not store %d uplink(s): %s", len(batch), reason)
        for job, future in batch:
            job.downlink_events.clear()
            if not future.done():
                future.set_exception(StorageUnavailable(reason))

    def _done(self, batch: list[tuple[WriteJob, asyncio.Future[None]]]) -> None:
        self.batches += 1
        for job, future in batch:
            if job.refused is not None:
                if not future.done():
                    future.set_exception(
                        Retransmission(job.stored_answer) if job.stored_answer is not None
                        else SharedStateRefused(job.refused)
                    )
                continue
            if job.seal is not None:
                job.seal.committed = True
            if job.uplink is not None:
                self._bus.fire(EVENT_UPLINK, job.uplink)
            for event in job.downlink_events:
                self._bus.fire(EVENT_DOWNLINK_STATE, event)
            if not future.done():
                future.set_result(None)

    async def stored_answer(self, device_id: int, seqno: int, digest: bytes) -> bytes | None:
        """Cluster mode: the answer committed with exactly this request, if it was."""
        async with self._db.session() as session:
            return (await session.execute(stored_answer_query(device_id, seqno, digest))).scalar()

    async def _write(self, jobs: list[WriteJob]) -> None:
        outbox = self.outbox_consumed
        await self._db.run_write(lambda session: write_batch(session, jobs, outbox=outbox))


def write_batch(session: Session, jobs: list[WriteJob], *, outbox: bool = True) -> None:
    """One transaction for a batch: contexts, uplinks, outbox rows (if `outbox`: someone
    publishes them), devices, downlinks, windows."""
    instance_id = session.info.get("instance_id")
    if instance_id is not None:
        jobs = check_shared_state(session, jobs)
    _store_new_contexts(session, [job for job in jobs if job.joined])
    uplink_jobs = [job for job in jobs if job.uplink is not None]
    if uplink_jobs:
        session.execute(
            _UPLINKS.insert(),
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
        if outbox:
            _insert_outbox_rows(session, uplink_jobs, instance_id)
        session.execute(
            _DEVICE_SEEN,
            [
                {
                    "key": job.state.device_id,
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
    if windows and instance_id is None:
        session.execute(_WINDOW_MOVED, [_window(job) for job in windows])
    elif windows:  # cluster mode: the answer goes with the window (driver_core.shared_answers)
        session.execute(_WINDOW_AND_ANSWER, [{**_window(job), **_answer(job)} for job in windows])


def _window(job: WriteJob) -> dict:
    index, bitfield = job.context.replay_state()
    return {
        "key": job.state.device_id,
        "replay_index": index,
        "replay_bitfield": bitfield,
        "sender_seq_reserved": job.context.seq_reserved,
    }


def _answer(job: WriteJob) -> dict:
    """The request's identity and protected answer; None for a request that stores none."""
    seal = job.seal
    if seal is None or seal.encoded is None:
        return {"answered_seqno": None, "answered_request": None, "answer": None}
    return {"answered_seqno": seal.seqno, "answered_request": seal.digest, "answer": seal.encoded}


# Core (table-level) statements run as one executemany each: the ORM's bulk paths
# cost about twice as much CPU per row on the hot path (bench/spy.py).
_UPLINKS = UplinkRecord.__table__
_OUTBOX = OutboxMessage.__table__
_DEVICES = Device.__table__
_CONTEXTS = SecurityContext.__table__
_DEVICE_SEEN = (
    update(_DEVICES)
    .where(_DEVICES.c.id == bindparam("key"))
    .values(
        last_seen=bindparam("last_seen"),
        join_date=bindparam("join_date"),
        firmware=bindparam("firmware"),
        uplinks_since_join=bindparam("uplinks_since_join"),
    )
)
_WINDOW_MOVED = (
    update(_CONTEXTS)
    .where(_CONTEXTS.c.device_id == bindparam("key"))
    .values(
        replay_index=bindparam("replay_index"),
        replay_bitfield=bindparam("replay_bitfield"),
        sender_seq_reserved=bindparam("sender_seq_reserved"),
    )
)


_WINDOW_AND_ANSWER = _WINDOW_MOVED.values(
    answered_seqno=bindparam("answered_seqno"),
    answered_request=bindparam("answered_request"),
    answer=bindparam("answer"),
)


def _insert_outbox_rows(session: Session, jobs: list[WriteJob], instance_id: int | None) -> None:
    """The documents the outbox consumer publishes, each uplink told its row id."""
    for job in jobs:
        job.uplink.document_json = json.dumps(
            job.uplink.document(), separators=(",", ":"), ensure_ascii=False
        )
    result = session.execute(
        _OUTBOX.insert().returning(_OUTBOX.c.id, sort_by_parameter_order=True),
        [
            {
                "serial": job.uplink.serial,
                "document": job.uplink.document_json,
                "created_at": job.uplink.rx_date,
                "instance_id": instance_id,
            }
            for job in jobs
        ],
    )
    for job, outbox_id in zip(jobs, result.scalars(), strict=True):
        job.uplink.outbox_id = outbox_id


def _store_new_contexts(session: Session, jobs: list[WriteJob]) -> None:
    """Each device's only context from now on (RFC 8613 B.2 step 4): replace the old ones.

    Two statements for the whole batch, not two per JOIN; when one device joined
    twice in the batch, the later JOIN wins, as it would one after the other.
    """
    if not jobs:
        return
    latest = {job.state.device_id: job for job in jobs}
    table = SecurityContext.__table__  # Core statements: no ORM bulk machinery per batch
    session.execute(delete(table).where(table.c.device_id.in_(list(latest))))
    rows = []
    for job in latest.values():
        index, bitfield = job.context.replay_state()
        rows.append(
            {
                "device_id": job.state.device_id,
                "id_context": job.context.id_context,
                "r2_issued_ms": job.context.r2_ms,
                "sender_seq_reserved": job.context.seq_reserved,
                "replay_index": index,
                "replay_bitfield": bitfield,
                "established_at": job.uplink.rx_date if job.uplink else job.state.join_date,
            }
        )
    session.execute(insert(table), rows)


def check_shared_state(session: Session, jobs: list[WriteJob]) -> list[WriteJob]:
    """Cluster mode: the jobs another instance has not made stale; the others get `refused`.

    The device rows are locked (in id order, so two instances never deadlock)
    until this transaction commits: what each device row and replay window
    says is the truth for every instance. A sequence number accepted anywhere
    is a replay here; a context superseded by a JOIN elsewhere is refused; the
    counters the uplink document shows come from the database, not from this
    instance's cache.
    """
    device_ids = sorted({job.state.device_id for job in jobs})
    rows = {
        row.id: row
        for row in session.execute(
            select(
                Device.id,
                Device.join_date,
                Device.last_seen,
                Device.uplinks_since_join,
                Device.tx_interval,
                Device.firmware,
                SecurityContext.id_context,
                SecurityContext.r2_issued_ms,
                SecurityContext.replay_index,
                SecurityContext.replay_bitfield,
            )
            .outerjoin(SecurityContext, SecurityContext.device_id == Device.id)
            .where(Device.id.in_(device_ids))
            .order_by(Device.id)
            .with_for_update(of=Device)
        )
    }
    shared = {device_id: dict(row._mapping) for device_id, row in rows.items()}
    accepted = []
    for job in jobs:
        job.refused = job.stored_answer = None
        row = shared.get(job.state.device_id)
        if row is None:
            job.refused = "superseded"  # the device was removed meanwhile
            continue
        if job.joined:
            if row["r2_issued_ms"] is not None and row["r2_issued_ms"] >= job.context.r2_ms:
                job.refused = "superseded"
                continue
            index, bitfield = job.context.replay_state()
            row.update(
                id_context=job.context.id_context, r2_issued_ms=job.context.r2_ms,
                replay_index=index, replay_bitfield=bitfield,
            )
        elif row["id_context"] != job.context.id_context:
            job.refused = "superseded"
            continue
        elif job.seqno is not None:
            window = ReplayWindow(REPLAY_WINDOW, lambda: None)
            window.initialize_from_persisted(
                {"index": row["replay_index"], "bitfield": row["replay_bitfield"]}
            )
            if not window.is_valid(job.seqno):
                job.refused = "replay"
                if job.seal is not None:  # a retransmission another instance answered?
                    job.stored_answer = session.execute(
                        stored_answer_query(job.state.device_id, job.seal.seqno, job.seal.digest)
                    ).scalar()
                continue
            window.strike_out(job.seqno)
            merged = window.persist()
            row.update(replay_index=merged["index"], replay_bitfield=merged["bitfield"])
            job.context.recipient_replay_window.initialize_from_persisted(merged)
        _adopt_shared_counters(job, row)
        accepted.append(job)
    return accepted


def _adopt_shared_counters(job: WriteJob, row: dict) -> None:
    """Make the job's uplink and the cached device state agree with the locked row."""
    state, uplink = job.state, job.uplink
    state.tx_interval = row["tx_interval"]
    if uplink is None:
        return
    uplink.last_seen = row["last_seen"]
    if not job.joined:  # a JOIN's own values (join_date, firmware, counter reset) win
        state.join_date = uplink.join_date = row["join_date"]
        counted = uplink.message_type != "join"
        state.uplinks_since_join = row["uplinks_since_join"] + (1 if counted else 0)
        if counted:
            state.firmware = row["firmware"]
    row.update(last_seen=uplink.rx_date, uplinks_since_join=state.uplinks_since_join)
