"""The downlink queue: per-device FIFO, the six documented states, delivery in CoAP answers.

A downlink rides in the answer to the device's next request. Choosing it and
recording the state change happen under a per-device lock, and the change is
committed in the same transaction as the request's uplink (see writer.py), so
the device is never answered with a downlink that is not durably in state 2:
nothing is delivered twice, also across a restart.

States (docs/mqtt.md, "Downlink states"): 0 pending, 1 canceled by the user,
2 sent waiting for acknowledgement, 3 sent and acknowledged, 4 not accepted by
the device, 5 sent but not acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from .callback_policy import CallbackPolicy
from .cluster import downlink_events_notice
from .errors import RequestRefused
from .events import EVENT_DOWNLINK_STATE, EventBus
from .family import ParameterError
from .storage.health import log_retry
from .storage.models import Device, Downlink, DownlinkEvent
from .tasks import cancel_and_wait
from .timefmt import utcnow, zulu_millis

if TYPE_CHECKING:
    from .family import Family
    from .security import DeviceState
    from .storage.db import Database

_LOGGER = logging.getLogger(__name__)

PENDING, CANCELED, SENT, ACKNOWLEDGED, REJECTED, UNACKNOWLEDGED = range(6)
STATE_NAMES = {
    PENDING: "Pending, waiting for the device to come online",
    CANCELED: "Canceled by the user",
    SENT: "Sent, waiting for acknowledgement",
    ACKNOWLEDGED: "Sent and acknowledged",
    REJECTED: "The command was not accepted by the device",
    UNACKNOWLEDGED: "Sent but not acknowledged",
}
FINAL_STATES = (CANCELED, ACKNOWLEDGED, REJECTED, UNACKNOWLEDGED)
OPEN_STATES = (PENDING, SENT)
COMMAND_ID_MAX = 128
# The configuration whose acknowledged value is the device's tx_interval (JOIN answer key 1).
TX_INTERVAL_COMMAND = "tx_interval"
SWEEP_SECONDS = 2.0


def wire_id(row_id: int) -> int:
    """The downlink id sent to the device (1..65535), unique among the last 65535 downlinks."""
    return (row_id - 1) % 65535 + 1


class DownlinkError(RequestRefused):
    """A request on the queue that cannot be honoured."""


@dataclass(slots=True)
class DownlinkView:
    """A downlink as the API, the web panel and MQTT show it."""

    command_id: str
    serial: str
    command: str
    code: int
    parameter: Any
    state: int
    callback_url: str | None
    result: int | None
    downlink_id: int
    inserted_at: datetime
    dispatched_at: datetime | None
    acknowledged_at: datetime | None
    canceled_at: datetime | None
    unacknowledged_at: datetime | None

    @classmethod
    def from_row(cls, row: Downlink, serial: str) -> DownlinkView:
        return cls(
            command_id=row.command_id,
            serial=serial,
            command=row.command,
            code=row.code,
            parameter=row.parameter,
            state=row.state,
            callback_url=row.callback_url,
            result=row.result,
            downlink_id=wire_id(row.id),
            inserted_at=row.inserted_at,
            dispatched_at=row.dispatched_at,
            acknowledged_at=row.acknowledged_at,
            canceled_at=row.canceled_at,
            unacknowledged_at=row.unacknowledged_at,
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "command_id": self.command_id,
            "serial": self.serial,
            "command": self.command,
            "code": self.code,
            "parameter": self.parameter,
            "state": self.state,
            "state_name": STATE_NAMES[self.state],
            "downlink_id": self.downlink_id,
            "callback_url": self.callback_url,
            "result": self.result,
            "inserted_at": zulu_millis(self.inserted_at),
            "dispatched_at": zulu_millis(self.dispatched_at),
            "acknowledged_at": zulu_millis(self.acknowledged_at),
            "canceled_at": zulu_millis(self.canceled_at),
            "unacknowledged_at": zulu_millis(self.unacknowledged_at),
        }


@dataclass(slots=True)
class DownlinkStateEvent:
    """Fired on the bus after a state change is committed."""

    event_id: int
    command_id: str
    serial: str
    state: int
    at: datetime
    callback_url: str | None
    downlink: DownlinkView
    downlink_row_id: int | None = None  # the downlink's row (callbacks queue per downlink)


@dataclass(slots=True)
class StateChange:
    """One transition to commit: `row` moves from `expected` to `state` at `at`."""

    row: Downlink
    serial: str
    expected: int
    state: int
    at: datetime
    result: int | None = None

    def values(self) -> dict[str, Any]:
        values: dict[str, Any] = {"state": self.state, "updated_at": self.at}
        column = {
            SENT: "dispatched_at",
            ACKNOWLEDGED: "acknowledged_at",
            REJECTED: "acknowledged_at",
            CANCELED: "canceled_at",
            UNACKNOWLEDGED: "unacknowledged_at",
        }.get(self.state)
        if column is not None:
            values[column] = self.at
        if self.result is not None:
            values["result"] = self.result
        return values

    @property
    def new_tx_interval(self) -> int | None:
        """The device's new transmission interval, when this change acknowledges one."""
        if self.state == ACKNOWLEDGED and self.row.command == TX_INTERVAL_COMMAND:
            return int(self.row.parameter)
        return None


class ConcurrentChange(Exception):
    """A row was not in the expected state any more (changed by another instance)."""


def apply_changes(session: Session, changes: list[StateChange]) -> list[DownlinkStateEvent]:
    """Write `changes` and their events in the caller's transaction; return the events to fire."""
    events: list[DownlinkStateEvent] = []
    for change in changes:
        values = change.values()
        result = session.execute(
            update(Downlink)
            .where(Downlink.id == change.row.id, Downlink.state == change.expected)
            .values(**values)
        )
        if result.rowcount != 1:
            raise ConcurrentChange(change.row.command_id)
        if change.new_tx_interval is not None:
            session.execute(
                update(Device)
                .where(Device.id == change.row.device_id)
                .values(tx_interval=change.new_tx_interval)
            )
        for key, value in values.items():
            setattr(change.row, key, value)
        event_id = (
            session.execute(
                insert(DownlinkEvent)
                .values(
                    downlink_id=change.row.id,
                    command_id=change.row.command_id,
                    serial=change.serial,
                    state=change.state,
                    at=change.at,
                    callback_url=change.row.callback_url,
                    callback_attempts=0,
                )
                .returning(DownlinkEvent.id)
            )
        ).scalar_one()
        events.append(
            DownlinkStateEvent(
                event_id=event_id,
                command_id=change.row.command_id,
                serial=change.serial,
                state=change.state,
                at=change.at,
                callback_url=change.row.callback_url,
                downlink=DownlinkView.from_row(change.row, change.serial),
                downlink_row_id=change.row.id,
            )
        )
    if events and (notice := downlink_events_notice(session, events[0].event_id)) is not None:
        session.execute(notice)
    return events


@dataclass(slots=True)
class AnswerPlan:
    """What the answer to one device request carries, and the transitions it implies."""

    changes: list[StateChange] = field(default_factory=list)
    body: dict[int, Any] = field(default_factory=dict)
    acked: Downlink | None = None  # the downlink an /ack referred to
    still_open: bool = False  # something stays in state 0 or 2 after this answer


class _DeviceLocks:
    """One asyncio.Lock per device with something in flight; freed when nobody holds it."""

    def __init__(self) -> None:
        self._locks: dict[int, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, device_id: int) -> AsyncIterator[None]:
        lock, users = self._locks.get(device_id, (None, 0))
        if lock is None:
            lock = asyncio.Lock()
        self._locks[device_id] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[device_id]
            if users <= 1:
                del self._locks[device_id]
            else:
                self._locks[device_id] = (lock, users - 1)


class DownlinkQueue:
    def __init__(
        self,
        db: Database,
        bus: EventBus,
        families: dict[int, Family],
        ack_timeout: float = 300,
        max_pending: int = 100,
    ) -> None:
        self._db = db
        self._bus = bus
        self._families = families
        self.ack_timeout = ack_timeout
        self.max_pending = max_pending
        self.locks = _DeviceLocks()
        # Devices with a downlink in state 0 or 2: only they cost a query on the CoAP path.
        self.open_devices: set[int] = set()
        self._last_seen_row = 0
        self._task: asyncio.Task[None] | None = None
        # Where callback URLs may point; the driver adds its listeners, the callbacks
        # integration its allowed/denied networks (driver_core/callback_policy.py).
        self.callback_policy = CallbackPolicy()

    # -- life cycle ----------------------------------------------------------------
    async def start(self) -> None:
        async with self._db.session() as session:
            rows = await session.execute(
                select(Downlink.device_id).where(Downlink.state.in_(OPEN_STATES)).distinct()
            )
            self.open_devices = set(rows.scalars())
            self._last_seen_row = (await session.execute(select(func.max(Downlink.id)))).scalar() or 0
        self._task = asyncio.create_task(self._sweep_forever(), name="downlink-sweeper")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    def fire(self, events: list[DownlinkStateEvent]) -> None:
        for event in events:
            self._bus.fire(EVENT_DOWNLINK_STATE, event)

    # -- scheduling, cancel, queries -------------------------------------------------
    async def _device(self, session, serial: str) -> Device:
        device = (await session.execute(select(Device).where(Device.serial == serial))).scalar_one_or_none()
        if device is None:
            raise DownlinkError(404, "not_found", f"no device with serial {serial!r}")
        return device

    def _validate(self, device: Device, command: str, parameter: Any) -> tuple[int, Any]:
        family = self._families.get(device.hw_type)
        if family is None:
            raise DownlinkError(400, "invalid_command", f"hw_type {device.hw_type} has no device family", "command")
        available = sorted(spec.name for spec in family.commands_for(device.hw_type))
        spec = family.commands.get(command) if isinstance(command, str) else None
        if spec is None or spec.name not in available:
            raise DownlinkError(
                400,
                "invalid_command",
                f"unknown command {command!r} for hw_type {device.hw_type}; "
                f"allowed: {', '.join(available)}",
                "command",
            )
        try:
            value = spec.validate_parameter(parameter)
        except ParameterError as exc:
            raise DownlinkError(400, "invalid_parameter", str(exc), "parameter") from None
        if isinstance(value, bytes):
            value = value.hex()
        return spec.code, value

    async def schedule(
        self,
        serial: str,
        command: str,
        parameter: Any = None,
        command_id: str | None = None,
        callback_url: str | None = None,
    ) -> tuple[DownlinkView, bool]:
        """Queue a downlink; returns (view, created). A repeat with the same id and body is a no-op."""
        if command_id is None:
            command_id = str(uuid.uuid4())
        if not isinstance(command_id, str) or not 1 <= len(command_id) <= COMMAND_ID_MAX:
            raise DownlinkError(
                400, "invalid_command_id", f"command_id must be 1 to {COMMAND_ID_MAX} characters", "command_id"
            )
        if callback_url is not None and (refusal := self.callback_policy.url_refusal(callback_url)):
            raise DownlinkError(400, "callback_refused", refusal, "callback_url")
        try:
            async with self._db.session() as session, session.begin():
                device = await self._device(session, serial)
                code, value = self._validate(device, command, parameter)
                existing = await self._by_command_id(session, command_id)
                if existing is not None:
                    return self._repeat(existing, serial, command, value, callback_url), False
                pending = (
                    await session.execute(
                        select(func.count()).where(
                            Downlink.device_id == device.id, Downlink.state == PENDING
                        )
                    )
                ).scalar_one()
                if pending >= self.max_pending:
                    raise DownlinkError(
                        409, "queue_full", f"device {serial} already has {pending} pending downlinks"
                    )
                now = utcnow()
                row = Downlink(
                    command_id=command_id, device_id=device.id, command=command, code=code,
                    parameter=value, state=PENDING, callback_url=callback_url,
                    inserted_at=now, updated_at=now,
                )
                session.add(row)
                await session.flush()
                event_id = (
                    await session.execute(
                        insert(DownlinkEvent)
                        .values(
                            downlink_id=row.id, command_id=command_id, serial=serial,
                            state=PENDING, at=now, callback_url=callback_url, callback_attempts=0,
                        )
                        .returning(DownlinkEvent.id)
                    )
                ).scalar_one()
                if (notice := downlink_events_notice(session, event_id)) is not None:
                    await session.execute(notice)
        except IntegrityError:  # the same command_id inserted concurrently
            async with self._db.session() as again:
                existing = await self._by_command_id(again, command_id)
            if existing is None:
                raise
            return self._repeat(existing, serial, command, value, callback_url), False
        self.open_devices.add(device.id)
        view = DownlinkView.from_row(row, serial)
        self.fire([DownlinkStateEvent(event_id, command_id, serial, PENDING, now, callback_url, view, row.id)])
        return view, True

    async def _by_command_id(self, session, command_id: str) -> tuple[Downlink, str] | None:
        found = (
            await session.execute(
                select(Downlink, Device.serial)
                .join(Device, Device.id == Downlink.device_id)
                .where(Downlink.command_id == command_id)
            )
        ).first()
        return (found[0], found[1]) if found is not None else None

    @staticmethod
    def _repeat(existing: tuple[Downlink, str], serial: str, command: str, value: Any, callback_url: str | None) -> DownlinkView:
        row, row_serial = existing
        if (row_serial, row.command, row.parameter, row.callback_url) != (serial, command, value, callback_url):
            raise DownlinkError(
                409, "conflict",
                f"command_id {row.command_id!r} is already used by a different downlink",
                "command_id",
            )
        return DownlinkView.from_row(row, row_serial)

    async def get(self, command_id: str) -> DownlinkView:
        async with self._db.session() as session:
            found = await self._by_command_id(session, command_id)
        if found is None:
            raise DownlinkError(404, "not_found", f"no downlink with command_id {command_id!r}")
        return DownlinkView.from_row(*found)

    async def cancel(self, command_id: str) -> DownlinkView:
        """Pending -> canceled; anything else is a 409 (it may already be on its way)."""
        async with self._db.session() as session:
            found = await self._by_command_id(session, command_id)
        if found is None:
            raise DownlinkError(404, "not_found", f"no downlink with command_id {command_id!r}")
        row, serial = found

        def cancel_pending(session: Session) -> list[DownlinkStateEvent]:
            current = session.get(Downlink, row.id)
            if current is None or current.state != PENDING:
                state = current.state if current is not None else row.state
                raise DownlinkError(
                    409, "not_pending",
                    f"only pending downlinks can be canceled; this one is in state {state} "
                    f"({STATE_NAMES[state]})",
                )
            return apply_changes(session, [StateChange(current, serial, PENDING, CANCELED, utcnow())])

        async with self.locks.hold(row.device_id):
            events = await self._db.run_write(cancel_pending)
        self.fire(events)
        return events[0].downlink

    async def history(self, serial: str, offset: int = 0, limit: int = 50) -> tuple[list[DownlinkView], int]:
        """A device's downlinks, newest first, and how many there are in all."""
        async with self._db.session() as session:
            device = await self._device(session, serial)
            total = (
                await session.execute(select(func.count()).where(Downlink.device_id == device.id))
            ).scalar_one()
            rows = (
                await session.execute(
                    select(Downlink)
                    .where(Downlink.device_id == device.id)
                    .order_by(Downlink.id.desc())
                    .offset(offset)
                    .limit(limit)
                )
            ).scalars()
            return [DownlinkView.from_row(row, serial) for row in rows], total

    # -- the CoAP path -------------------------------------------------------------
    async def plan(
        self, state: DeviceState, message_type: str, data: dict[str, Any], dispatch: bool = True
    ) -> AnswerPlan:
        """Decide the transitions and the answer keys 3/4 for one accepted device request.

        `dispatch` is False for requests answered with an error (no 2.xx answer
        to carry a downlink). Call with `locks.hold(device_id)` held until the
        plan is committed.
        """
        plan = AnswerPlan()
        if state.device_id not in self.open_devices:
            return plan
        async with self._db.session() as session:
            rows = (
                await session.execute(
                    select(Downlink)
                    .where(Downlink.device_id == state.device_id, Downlink.state.in_(OPEN_STATES))
                    .order_by(Downlink.id)
                )
            ).scalars().all()
        now = utcnow()
        waiting = False
        for row in rows:
            if row.state != SENT:
                continue
            if message_type == "ack" and data.get("downlink_id") == wire_id(row.id):
                result = data["result"]
                new = ACKNOWLEDGED if result == 0 else REJECTED
                plan.changes.append(StateChange(row, state.serial, SENT, new, now, result))
                plan.acked = row
            elif message_type == "rx":
                plan.changes.append(StateChange(row, state.serial, SENT, UNACKNOWLEDGED, now))
            else:
                waiting = True
        pending = [row for row in rows if row.state == PENDING]
        if pending and not waiting and dispatch:
            first = pending.pop(0)
            plan.changes.append(StateChange(first, state.serial, PENDING, SENT, now))
            plan.body[4] = [wire_id(first.id), first.code, first.parameter]
        if dispatch and (pending or 4 in plan.body):
            plan.body[3] = len(pending)
        plan.still_open = waiting or bool(pending) or 4 in plan.body
        return plan

    def committed(self, state: DeviceState, plan: AnswerPlan) -> None:
        """After the plan's transaction: stop querying for a device with nothing open.

        A downlink queued meanwhile by this process is picked up again by the
        sweeper's scan of new rows within seconds.
        """
        if not plan.still_open:
            self.open_devices.discard(state.device_id)
        for change in plan.changes:
            if change.new_tx_interval is not None:
                state.tx_interval = change.new_tx_interval

    # -- time-driven transitions ---------------------------------------------------
    async def expire_unacknowledged(self) -> int:
        """State 2 older than the ack timeout -> 5."""
        limit = utcnow() - timedelta(seconds=self.ack_timeout)
        async with self._db.session() as session:
            rows = (
                await session.execute(
                    select(Downlink, Device.serial)
                    .join(Device, Device.id == Downlink.device_id)
                    .where(Downlink.state == SENT, Downlink.dispatched_at < limit)
                )
            ).all()
        expired = 0
        for row, serial in rows:
            change = StateChange(row, serial, SENT, UNACKNOWLEDGED, utcnow())
            async with self.locks.hold(row.device_id):
                try:
                    events = await self._db.run_write(
                        lambda session, change=change: apply_changes(session, [change])
                    )
                except ConcurrentChange:
                    continue  # acknowledged meanwhile
            self.fire(events)
            expired += 1
        return expired

    async def notice_new_rows(self) -> None:
        """Pick up downlinks queued by another process (CLI, another driver instance)."""
        if self._db.instance_id is not None:
            # Cluster mode: ids of concurrent writers commit out of order, and other
            # instances dispatch too; read the whole (indexed) set of open devices.
            async with self._db.session() as session:
                rows = await session.execute(
                    select(Downlink.device_id).where(Downlink.state.in_(OPEN_STATES)).distinct()
                )
                self.open_devices = set(rows.scalars())
            return
        async with self._db.session() as session:
            rows = (
                await session.execute(
                    select(Downlink.id, Downlink.device_id).where(
                        Downlink.id > self._last_seen_row, Downlink.state == PENDING
                    )
                )
            ).all()
        for row_id, device_id in rows:
            self.open_devices.add(device_id)
            self._last_seen_row = max(self._last_seen_row, row_id)

    def track(self, device_id: int) -> None:
        """A downlink for `device_id` was queued in this process."""
        self.open_devices.add(device_id)

    async def purge(self, days: int) -> int:
        """Delete final downlinks older than the retention; pending and sent ones are kept."""
        limit = utcnow() - timedelta(days=days)
        async with self._db.session() as session, session.begin():
            result = await session.execute(
                delete(Downlink).where(Downlink.state.in_(FINAL_STATES), Downlink.updated_at < limit)
            )
        return result.rowcount or 0

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_SECONDS)
            try:
                await self.notice_new_rows()
                await self.expire_unacknowledged()
            except Exception as exc:
                log_retry(_LOGGER, "Downlink sweep", exc)
