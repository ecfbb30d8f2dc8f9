"""Device rows for the pages: one page of the list, one device's summary, its latest data.

Queries never load the whole fleet: the list is one indexed, LIMIT/OFFSET page
(sort columns are indexed, ties broken by id), pending downlinks are counted for
that page's devices only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, or_, select

from driver_core import availability
from driver_core.downlinks import PENDING
from driver_core.storage.models import Device, Downlink, SecurityContext, UplinkRecord
from driver_core.timefmt import utcnow

if TYPE_CHECKING:
    from driver_core.driver import Driver

SORTS = {
    "serial": Device.serial,
    "name": Device.name,
    "hw_type": Device.hw_type,
    "join_date": Device.join_date,
    "last_seen": Device.last_seen,
}
PAGE_SIZES = (25, 50, 100)
STATUS_LABELS = {
    "online": "Online",
    "late": "Late",
    "offline": "Offline",
    "never_seen": "Never seen",
}


@dataclass
class DeviceRow:
    serial: str
    name: str | None
    hw_type: int
    family: str
    model: str
    join_date: datetime | None
    last_seen: datetime | None
    status: str
    expected_next: datetime | None
    pending: int = 0


@dataclass
class DevicePage:
    rows: list[DeviceRow]
    total: int
    page: int
    pages: int
    per: int
    sort: str
    order: str
    q: str


@dataclass
class DataItem:
    name: str
    value: Any
    unit: str | None
    description: str | None


@dataclass
class DeviceSummary:
    row: DeviceRow
    device: Device
    firmware: str | None
    sender_id: str
    created_at: datetime
    context_established: datetime | None
    latest_at: datetime | None
    latest: list[DataItem] = field(default_factory=list)


def _like(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def _grace(driver: Driver) -> timedelta:
    return timedelta(minutes=driver.config.devices["grace_minutes"])


def to_row(driver: Driver, device: Device, now: datetime, pending: int = 0) -> DeviceRow:
    family = driver.families.get(device.hw_type)
    return DeviceRow(
        serial=device.serial,
        name=device.name,
        hw_type=device.hw_type,
        family=family.name if family else "unknown",
        model=family.hw_types.get(device.hw_type, "") if family else "",
        join_date=device.join_date,
        last_seen=device.last_seen,
        status=availability.status(
            now, device.last_seen, device.uplinks_since_join, device.tx_interval, _grace(driver)
        ),
        expected_next=availability.expected_next(
            device.last_seen, device.uplinks_since_join, device.tx_interval
        ),
        pending=pending,
    )


def _int(text: str | None, default: int) -> int:
    try:
        return int(text) if text is not None else default
    except ValueError:
        return default


async def device_page(driver: Driver, query: dict[str, str]) -> DevicePage:
    """The list page the query asks for; unknown sort or page values fall back to defaults."""
    q = query.get("q", "").strip()[:100]
    sort = query.get("sort", "serial")
    if sort not in SORTS:
        sort = "serial"
    order = "desc" if query.get("order") == "desc" else "asc"
    per = _int(query.get("per"), 50)
    if per not in PAGE_SIZES:
        per = 50
    statement = select(Device)
    if q:
        pattern = _like(q)
        statement = statement.where(
            or_(Device.serial.ilike(pattern, escape="\\"), Device.name.ilike(pattern, escape="\\"))
        )
    async with driver.db.session() as session:
        total = int(
            await session.scalar(select(func.count()).select_from(statement.subquery())) or 0
        )
        pages = max(1, -(-total // per))
        page = min(max(1, _int(query.get("page"), 1)), pages)
        column = SORTS[sort]
        keys = [column.desc(), Device.id.desc()] if order == "desc" else [column, Device.id]
        if sort == "serial":
            keys = keys[:1]
        devices = list(
            await session.scalars(statement.order_by(*keys).offset((page - 1) * per).limit(per))
        )
        pending: dict[int, int] = {}
        if devices:
            result = await session.execute(
                select(Downlink.device_id, func.count())
                .where(Downlink.device_id.in_([d.id for d in devices]), Downlink.state == PENDING)
                .group_by(Downlink.device_id)
            )
            pending = {device_id: count for device_id, count in result}
    now = utcnow()
    rows = [to_row(driver, device, now, pending.get(device.id, 0)) for device in devices]
    return DevicePage(rows, total, page, pages, per, sort, order, q)


async def find_device(driver: Driver, serial: str) -> Device | None:
    async with driver.db.session() as session:
        return await session.scalar(select(Device).where(Device.serial == serial))


def field_units(driver: Driver, hw_type: int) -> dict[str, tuple[str | None, str | None]]:
    """(unit, description) of each field the family declares for `hw_type` (fields, then entities)."""
    family = driver.families.get(hw_type)
    units: dict[str, tuple[str | None, str | None]] = {}
    if family is not None:
        for spec in family.fields_for(hw_type):
            units[spec.name] = (spec.unit, spec.description)
        for entity in family.entities_for(hw_type):
            unit, description = units.get(entity.key, (None, None))
            units[entity.key] = (unit or entity.unit, description or entity.name)
    return units


def data_items(driver: Driver, hw_type: int, data: dict[str, Any]) -> list[DataItem]:
    """Decoded values with the unit and description the family declares for each field."""
    units = field_units(driver, hw_type)
    return [
        DataItem(name, value, *units.get(name, (None, None))) for name, value in data.items()
    ]


async def summary(driver: Driver, device: Device) -> DeviceSummary:
    async with driver.db.session() as session:
        context = await session.get(SecurityContext, device.id)
        latest = await session.scalar(
            select(UplinkRecord)
            .where(UplinkRecord.device_id == device.id, UplinkRecord.message_type == "rx")
            .order_by(UplinkRecord.id.desc())
            .limit(1)
        )
        pending = int(
            await session.scalar(
                select(func.count()).where(
                    Downlink.device_id == device.id, Downlink.state == PENDING
                )
            )
            or 0
        )
    return DeviceSummary(
        row=to_row(driver, device, utcnow(), pending),
        device=device,
        firmware=device.firmware,
        sender_id=device.kid.hex(),
        created_at=device.created_at,
        context_established=context.established_at if context is not None else None,
        latest_at=latest.received_at if latest is not None else None,
        latest=data_items(driver, device.hw_type, latest.data) if latest is not None else [],
    )


async def uplink_history(
    driver: Driver, device: Device, page: int, per: int = 50
) -> tuple[list[UplinkRecord], int]:
    async with driver.db.session() as session:
        total = int(
            await session.scalar(
                select(func.count()).where(UplinkRecord.device_id == device.id)
            )
            or 0
        )
        rows = list(
            await session.scalars(
                select(UplinkRecord)
                .where(UplinkRecord.device_id == device.id)
                .order_by(UplinkRecord.id.desc())
                .offset((page - 1) * per)
                .limit(per)
            )
        )
    return rows, total
