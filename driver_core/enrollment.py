"""Device enrollment: validate, store (secrets encrypted), list, delete, CSV import/export.

Shared by the CLI (``coap-driver device add/import/list``), the REST API and
the device simulator (which reads the same CSV format). The rules are those of
PROTOCOL.md "Security": serial 1-16 of [A-Z0-9], hw_type from the supported
table, sender_id (the OSCORE kid) 1-7 bytes, master_secret 16 bytes,
master_salt empty or 8 bytes. Serial and sender_id are unique.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import delete, insert, select
from sqlalchemy.exc import IntegrityError

from driver_core.storage.db import Database
from driver_core.storage.models import Device
from driver_core.storage.secretbox import SecretBox

REQUIRED_COLUMNS = ("serial", "hw_type", "sender_id", "master_secret")
OPTIONAL_COLUMNS = ("master_salt", "name")
CSV_COLUMNS = REQUIRED_COLUMNS + OPTIONAL_COLUMNS

_SERIAL = re.compile(r"[A-Z0-9]{1,16}")
_HEX = re.compile(r"(?:[0-9a-fA-F]{2})*")
_NAME_MAX = 100
_LOOKUP_CHUNK = 500  # keeps IN (...) lists well below every driver's parameter limit
BULK_CHUNK = 5000  # devices per multi-row INSERT when enrolling many


class EnrollmentError(Exception):
    """A device cannot be enrolled; ``field`` names the offending input (or is None)."""

    def __init__(self, field: str | None, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}" if field else message)


@dataclass
class DeviceInput:
    serial: str
    hw_type: int
    sender_id: bytes
    master_secret: bytes
    master_salt: bytes = b""
    name: str | None = None


@dataclass
class ImportReport:
    added: list[str] = field(default_factory=list)
    errors: list[tuple[int, str]] = field(default_factory=list)  # (line number, message)


# --- validation -------------------------------------------------------------------------------


def _hex_field(name: str, value: str, sizes: str, allowed: Collection[int]) -> bytes:
    text = value.strip()
    if text[:2].lower() == "0x":
        text = text[2:]
    if not _HEX.fullmatch(text):
        raise EnrollmentError(
            name, f"{value.strip()!r} is not hex (pairs of digits 0-9, a-f expected)"
        )
    data = bytes.fromhex(text)
    if len(data) not in allowed:
        raise EnrollmentError(name, f"must be {sizes}, got {len(data)}")
    return data


def parse_device(raw: Mapping[str, str | None], supported_hw_types: Collection[int]) -> DeviceInput:
    """Validate one device given as text (CSV row, CLI options, JSON body).

    Byte fields are hex (an ``0x`` prefix is accepted); ``master_salt`` and
    ``name`` may be absent or empty. Raises EnrollmentError naming the first
    bad field, in column order.
    """
    unknown = sorted(set(raw) - set(CSV_COLUMNS))
    if unknown:
        raise EnrollmentError(unknown[0], f"unknown field (expected: {', '.join(CSV_COLUMNS)})")
    values = {key: (raw.get(key) or "").strip() for key in CSV_COLUMNS}
    for key in REQUIRED_COLUMNS:
        if not values[key]:
            raise EnrollmentError(key, "required")

    serial = values["serial"]
    if not _SERIAL.fullmatch(serial):
        raise EnrollmentError("serial", f"{serial!r} must be 1 to 16 characters, each A-Z or 0-9")

    supported = sorted(supported_hw_types)
    if not values["hw_type"].isascii() or not values["hw_type"].isdigit():
        raise EnrollmentError("hw_type", f"{values['hw_type']!r} is not an integer")
    hw_type = int(values["hw_type"])
    if hw_type not in supported:
        raise EnrollmentError(
            "hw_type",
            f"{hw_type} is not a supported device type "
            f"(supported: {', '.join(str(t) for t in supported)})",
        )

    sender_id = _hex_field("sender_id", values["sender_id"], "1 to 7 bytes", range(1, 8))
    secret = _hex_field(
        "master_secret", values["master_secret"], "exactly 16 bytes (32 hex digits)", (16,)
    )
    salt = _hex_field(
        "master_salt", values["master_salt"], "empty or 8 bytes (16 hex digits)", (0, 8)
    )
    name = values["name"] or None
    if name is not None and len(name) > _NAME_MAX:
        raise EnrollmentError("name", f"must be at most {_NAME_MAX} characters, got {len(name)}")
    return DeviceInput(serial, hw_type, sender_id, secret, salt, name)


# --- storage ----------------------------------------------------------------------------------


def _row_values(box: SecretBox, device: DeviceInput, now: datetime) -> dict[str, Any]:
    """The columns of a new device row, secrets encrypted."""
    return {
        "serial": device.serial,
        "hw_type": device.hw_type,
        "kid": device.sender_id,
        "master_secret_enc": box.encrypt(device.master_secret),
        "master_salt_enc": box.encrypt(device.master_salt),
        "name": device.name,
        "created_at": now,
        "tx_interval": 60,
        "uplinks_since_join": 0,
    }


def _new_row(box: SecretBox, device: DeviceInput, now: datetime) -> Device:
    return Device(**_row_values(box, device, now))


async def _conflicts(
    db: Database, serials: Iterable[str], kids: Iterable[bytes]
) -> tuple[set[str], dict[bytes, str]]:
    """Which of ``serials`` are enrolled, and which of ``kids`` are taken (kid -> serial)."""
    serials, kids = list(serials), list(kids)
    taken_serials: set[str] = set()
    taken_kids: dict[bytes, str] = {}
    async with db.session() as session:
        for i in range(0, len(serials), _LOOKUP_CHUNK):
            chunk = serials[i : i + _LOOKUP_CHUNK]
            rows = await session.scalars(select(Device.serial).where(Device.serial.in_(chunk)))
            taken_serials.update(rows)
        for i in range(0, len(kids), _LOOKUP_CHUNK):
            chunk = kids[i : i + _LOOKUP_CHUNK]
            result = await session.execute(
                select(Device.kid, Device.serial).where(Device.kid.in_(chunk))
            )
            taken_kids.update((bytes(kid), serial) for kid, serial in result)
    return taken_serials, taken_kids


def _duplicate_error(
    device: DeviceInput, serials: set[str], kids: dict[bytes, str]
) -> EnrollmentError | None:
    if device.serial in serials:
        return EnrollmentError("serial", f"{device.serial} is already enrolled")
    owner = kids.get(device.sender_id)
    if owner is not None:
        return EnrollmentError(
            "sender_id", f"{device.sender_id.hex()} is already used by device {owner}"
        )
    return None


async def add_device(db: Database, box: SecretBox, device: DeviceInput) -> Device:
    """Enroll one validated device; a taken serial or sender_id raises EnrollmentError."""

    async def check() -> None:
        serials, kids = await _conflicts(db, [device.serial], [device.sender_id])
        problem = _duplicate_error(device, serials, kids)
        if problem is not None:
            raise problem

    await check()
    row = _new_row(box, device, datetime.now(UTC))
    try:
        async with db.session() as session, session.begin():
            session.add(row)
    except IntegrityError:
        await check()  # enrolled concurrently: report which field collided
        raise
    return row


def _parse_csv(
    text: str, supported_hw_types: Collection[int]
) -> tuple[list[tuple[int, DeviceInput]], list[tuple[int, str]]]:
    """Valid rows and errors of a device CSV (see import_csv), without the database."""
    good: list[tuple[int, DeviceInput]] = []
    errors: list[tuple[int, str]] = []
    reader = csv.reader(io.StringIO(text.removeprefix("\ufeff")))
    header = next(reader, None)
    while header is not None and not any(cell.strip() for cell in header):
        header = next(reader, None)
    if header is None:
        errors.append((1, f"empty file: a header line is required ({','.join(CSV_COLUMNS)})"))
        return good, errors
    columns = [cell.strip().lower() for cell in header]
    header_error = _check_header(columns)
    if header_error is not None:
        errors.append((reader.line_num, header_error))
        return good, errors

    first_serial: dict[str, int] = {}
    first_kid: dict[bytes, int] = {}
    for row in reader:
        line = reader.line_num
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(columns):
            errors.append((line, f"expected {len(columns)} fields like the header, got {len(row)}"))
            continue
        try:
            device = parse_device(dict(zip(columns, row, strict=True)), supported_hw_types)
        except EnrollmentError as exc:
            errors.append((line, str(exc)))
            continue
        if device.serial in first_serial:
            errors.append(
                (line, f"serial: {device.serial} repeats line {first_serial[device.serial]}")
            )
            continue
        if device.sender_id in first_kid:
            errors.append(
                (
                    line,
                    f"sender_id: {device.sender_id.hex()} repeats line "
                    f"{first_kid[device.sender_id]}",
                )
            )
            continue
        first_serial[device.serial] = line
        first_kid[device.sender_id] = line
        good.append((line, device))
    return good, errors


async def import_csv(
    db: Database, box: SecretBox, text: str, supported_hw_types: Collection[int]
) -> ImportReport:
    """Enroll the devices of a CSV file; the good rows are added even if others are bad.

    Like ChirpStack's bulk import, a file with some bad rows still enrolls
    every good row, and the report lists each bad row with its line number and
    reason, so the user fixes and re-imports only those (re-importing a row
    that made it in is reported as "already enrolled", never added twice).

    The first line is the header: ``serial,hw_type,sender_id,master_secret``
    are required, ``master_salt`` and ``name`` optional, in any order. A bad
    header adds nothing and is reported with its line number. Blank lines are
    skipped. A row repeating a serial or sender_id of an earlier row in the
    file, or of an enrolled device, is an error.
    """
    candidates, errors = _parse_csv(text, supported_hw_types)
    report = ImportReport(errors=errors)
    await enroll_devices(db, box, candidates, report)
    return report


async def enroll_devices(
    db: Database,
    box: SecretBox,
    candidates: Sequence[tuple[int, DeviceInput]],
    report: ImportReport | None = None,
) -> ImportReport:
    """Enroll validated devices given with their line numbers, in chunks of BULK_CHUNK.

    The rows of a chunk are inserted with one multi-row statement. Only when
    it collides with an enrolled device (or a row of an earlier chunk) are its
    serials and sender_ids looked up, to report each bad row and add the
    others. A large fleet (`bench.fleet_bench` enrolls a million devices this
    way) costs one statement per chunk, not one query per 500 devices plus an
    ORM object per device. Errors are sorted by line number.
    """
    report = report if report is not None else ImportReport()
    for start in range(0, len(candidates), BULK_CHUNK):
        chunk = list(candidates[start : start + BULK_CHUNK])
        now = datetime.now(UTC)
        rows = [_row_values(box, device, now) for _, device in chunk]
        try:
            async with db.session() as session, session.begin():
                await session.execute(insert(Device.__table__), rows)
        except IntegrityError:
            await _enroll_checked(db, box, chunk, report)
        else:
            report.added.extend(device.serial for _, device in chunk)
    report.errors.sort(key=lambda item: item[0])
    return report


async def _enroll_checked(
    db: Database, box: SecretBox, chunk: list[tuple[int, DeviceInput]], report: ImportReport
) -> None:
    """A chunk that collided: report the taken serials and sender_ids, add the rest."""
    serials, kids = await _conflicts(
        db, (d.serial for _, d in chunk), (d.sender_id for _, d in chunk)
    )
    accepted: list[tuple[int, DeviceInput]] = []
    for line, device in chunk:
        problem = _duplicate_error(device, serials, kids)
        if problem is not None:
            report.errors.append((line, str(problem)))
        else:
            accepted.append((line, device))
    now = datetime.now(UTC)
    try:
        async with db.session() as session, session.begin():
            session.add_all(_new_row(box, device, now) for _, device in accepted)
        report.added.extend(device.serial for _, device in accepted)
    except IntegrityError:
        # Someone enrolled one of these meanwhile: fall back to one by one.
        for line, device in accepted:
            try:
                await add_device(db, box, device)
                report.added.append(device.serial)
            except EnrollmentError as exc:
                report.errors.append((line, str(exc)))


def _check_header(columns: list[str]) -> str | None:
    seen: set[str] = set()
    for column in columns:
        if column not in CSV_COLUMNS:
            return (
                f"header: unknown column {column!r} "
                f"(expected: {','.join(CSV_COLUMNS)}; master_salt and name are optional)"
            )
        if column in seen:
            return f"header: column {column!r} appears twice"
        seen.add(column)
    missing = [c for c in REQUIRED_COLUMNS if c not in seen]
    if missing:
        return f"header: missing column {', '.join(repr(c) for c in missing)}"
    return None


async def get_device(db: Database, serial: str) -> Device | None:
    async with db.session() as session:
        return await session.scalar(select(Device).where(Device.serial == serial))


async def list_devices(db: Database, offset: int = 0, limit: int = 100) -> list[Device]:
    """Enrolled devices ordered by serial, one page at a time."""
    async with db.session() as session:
        rows = await session.scalars(
            select(Device).order_by(Device.serial).offset(offset).limit(limit)
        )
        return list(rows)


async def delete_device(db: Database, serial: str) -> bool:
    """Remove a device with its security context and uplink history; False if unknown."""
    async with db.session() as session, session.begin():
        result = await session.execute(delete(Device).where(Device.serial == serial))
    return bool(result.rowcount)


def device_secrets(box: SecretBox, device: Device) -> tuple[bytes, bytes]:
    """(master_secret, master_salt) in clear, for deriving OSCORE contexts only."""
    return box.decrypt(device.master_secret_enc), box.decrypt(device.master_salt_enc)


def write_devices_csv(devices: Iterable[DeviceInput]) -> str:
    """The CSV that import_csv reads (and the simulator uses); bytes as lowercase hex."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for device in devices:
        writer.writerow(
            [
                device.serial,
                device.hw_type,
                device.sender_id.hex(),
                device.master_secret.hex(),
                device.master_salt.hex(),
                device.name or "",
            ]
        )
    return out.getvalue()


def read_devices_csv(text: str, supported_hw_types: Collection[int]) -> list[DeviceInput]:
    """Parse a device CSV without a database (the simulator's view); any bad row raises."""
    devices, errors = _parse_csv(text, supported_hw_types)
    if errors:
        line, message = errors[0]
        raise EnrollmentError(None, f"line {line}: {message}")
    return [device for _, device in devices]
