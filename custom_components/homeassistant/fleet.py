"""Reading the fleet for discovery: devices page by page, their latest values and downlinks.

Every query works on one page of devices (PAGE rows), so a fleet of 100,000
devices is published without ever holding it in memory or in one result set.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select

from driver_core.downlinks import ACKNOWLEDGED
from driver_core.storage.models import Device, Downlink, DownlinkEvent, UplinkRecord
from driver_core.timefmt import zulu_millis

from .discovery import DOWNLINK_STATUSES, DeviceRecord

PAGE = 500
MERGE_DEPTH = 5  # the state merges the values of this many latest data uplinks


def record(device: Device) -> DeviceRecord:
    return DeviceRecord(
        device_id=device.id,
        serial=device.serial,
        hw_type=device.hw_type,
        name=device.name,
        firmware=device.firmware,
        join_date=device.join_date,
        last_seen=device.last_seen,
        tx_interval=device.tx_interval,
        uplinks_since_join=device.uplinks_since_join,
    )


async def pages(db: Any, page: int = PAGE) -> AsyncIterator[list[DeviceRecord]]:
    """Every enrolled device, in id order, `page` at a time (keyset pagination)."""
    after = 0
    while True:
        async with db.session() as session:
            rows = (
                await session.execute(
                    select(Device).where(Device.id > after).order_by(Device.id).limit(page)
                )
            ).scalars().all()
        if not rows:
            return
        yield [record(row) for row in rows]
        after = rows[-1].id


async def by_serial(db: Any, serial: str) -> DeviceRecord | None:
    async with db.session() as session:
        row = (
            await session.execute(select(Device).where(Device.serial == serial))
        ).scalar_one_or_none()
    return record(row) if row is not None else None


async def fleet_stamp(db: Any) -> tuple[int, int | None]:
    """(count, highest id): changes whenever a device is enrolled or removed."""
    async with db.session() as session:
        count, highest = (await session.execute(select(func.count(), func.max(Device.id)))).one()
    return int(count), highest


async def enrolled_ids(db: Any, page: int = 5000) -> dict[int, tuple[str, int]]:
    """id -> (serial, hw_type) of every enrolled device (small rows, paged)."""
    found: dict[int, tuple[str, int]] = {}
    after = 0
    while True:
        async with db.session() as session:
            rows = (
                await session.execute(
                    select(Device.id, Device.serial, Device.hw_type)
                    .where(Device.id > after)
                    .order_by(Device.id)
                    .limit(page)
                )
            ).all()
        if not rows:
            return found
        for device_id, serial, hw_type in rows:
            found[device_id] = (serial, hw_type)
        after = rows[-1][0]


def merge(documents: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Later values win; `unknown` keys are not entity values and are left out."""
    merged: dict[str, Any] = {}
    for data in documents:
        for key, value in data.items():
            if key != "unknown":
                merged[key] = value
    return merged


async def latest_data(
    db: Any, device_ids: list[int], depth: int = MERGE_DEPTH
) -> dict[int, dict[str, Any]]:
    """device id -> merged values of its `depth` latest data uplinks (/rx)."""
    if not device_ids:
        return {}
    ranked = (
        select(
            UplinkRecord.device_id,
            UplinkRecord.id,
            UplinkRecord.data,
            func.row_number()
            .over(partition_by=UplinkRecord.device_id, order_by=UplinkRecord.id.desc())
            .label("rank"),
        )
        .where(UplinkRecord.device_id.in_(device_ids), UplinkRecord.message_type == "rx")
        .subquery()
    )
    async with db.session() as session:
        rows = (
            await session.execute(
                select(ranked.c.device_id, ranked.c.data)
                .where(ranked.c.rank <= depth)
                .order_by(ranked.c.device_id, ranked.c.id)
            )
        ).all()
    by_device: dict[int, list[dict[str, Any]]] = {}
    for device_id, data in rows:
        by_device.setdefault(device_id, []).append(data or {})
    return {device_id: merge(docs) for device_id, docs in by_device.items()}


@dataclass(frozen=True, slots=True)
class Confirmed:
    """A configuration value the device acknowledged."""

    parameter: Any
    at: datetime | None


async def confirmed_settings(
    db: Any, device_ids: list[int]
) -> dict[int, dict[str, Confirmed]]:
    """device id -> command name -> the last acknowledged parameter (oldest first, newest wins)."""
    if not device_ids:
        return {}
    async with db.session() as session:
        rows = (
            await session.execute(
                select(
                    Downlink.device_id, Downlink.command, Downlink.parameter,
                    Downlink.acknowledged_at,
                )
                .where(Downlink.device_id.in_(device_ids), Downlink.state == ACKNOWLEDGED)
                .order_by(Downlink.id)
            )
        ).all()
    found: dict[int, dict[str, Confirmed]] = {}
    for device_id, command, parameter, at in rows:
        found.setdefault(device_id, {})[command] = Confirmed(parameter, at)
    return found


async def latest_downlinks(db: Any, device_ids: list[int]) -> dict[int, dict[str, Any]]:
    """device id -> its newest downlink's current state (for the downlink sensor)."""
    if not device_ids:
        return {}
    newest = (
        select(func.max(Downlink.id))
        .where(Downlink.device_id.in_(device_ids))
        .group_by(Downlink.device_id)
    )
    async with db.session() as session:
        rows = (
            await session.execute(select(Downlink).where(Downlink.id.in_(newest)))
        ).scalars().all()
        changed = {}
        if rows:
            stamps = await session.execute(
                select(DownlinkEvent.downlink_id, func.max(DownlinkEvent.at))
                .where(DownlinkEvent.downlink_id.in_([row.id for row in rows]))
                .group_by(DownlinkEvent.downlink_id)
            )
            changed = dict(stamps.all())
    return {
        row.device_id: downlink_summary(
            row.command_id, row.command, row.parameter, row.state, changed.get(row.id, row.updated_at)
        )
        for row in rows
    }


def downlink_summary(
    command_id: str, command: str, parameter: Any, state: int, at: datetime | None
) -> dict[str, Any]:
    return {
        "command_id": command_id,
        "command": command,
        "parameter": parameter,
        "state": state,
        "status": DOWNLINK_STATUSES.get(state, str(state)),
        "at": zulu_millis(at),
    }
