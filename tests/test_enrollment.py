"""Enrollment rules, encrypted storage, CSV import/export, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy import func, select, text

from driver_core.enrollment import (
    DeviceInput,
    EnrollmentError,
    ImportReport,
    add_device,
    delete_device,
    device_secrets,
    enroll_devices,
    get_device,
    import_csv,
    list_devices,
    parse_device,
    read_devices_csv,
    write_devices_csv,
)
from driver_core.storage.db import Database
from driver_core.storage.models import Device, SecurityContext, UplinkRecord
from driver_core.storage.secretbox import SecretBox

HW = (14, 16, 17, 18, 23, 24, 28, 29, 31)
SECRET = bytes(range(16))
SALT = bytes(range(100, 108))
GOOD = {
    "serial": "A0000001",
    "hw_type": "17",
    "sender_id": "01",
    "master_secret": SECRET.hex(),
    "master_salt": SALT.hex(),
}


def device(serial: str, kid: bytes, **kw: object) -> DeviceInput:
    return DeviceInput(serial=serial, hw_type=17, sender_id=kid, master_secret=SECRET, **kw)


# --- parse_device -----------------------------------------------------------------------------


def test_parse_good_device() -> None:
    assert parse_device({**GOOD, "name": " Kitchen "}, HW) == DeviceInput(
        "A0000001", 17, b"\x01", SECRET, SALT, "Kitchen"
    )


def test_parse_defaults_and_hex_forms() -> None:
    raw = {
        "serial": "Z9",
        "hw_type": "31",
        "sender_id": "0xA1B2C3D4E5F607",
        "master_secret": " " + SECRET.hex().upper() + " ",
    }
    assert parse_device(raw, HW) == DeviceInput(
        "Z9", 31, bytes.fromhex("a1b2c3d4e5f607"), SECRET, b"", None
    )
    assert parse_device({**raw, "master_salt": "", "name": ""}, HW).master_salt == b""


@pytest.mark.parametrize(
    ("changes", "field", "message"),
    [
        ({"serial": ""}, "serial", "required"),
        (
            {"serial": "a0000001"},
            "serial",
            "'a0000001' must be 1 to 16 characters, each A-Z or 0-9",
        ),
        (
            {"serial": "A" * 17},
            "serial",
            f"'{'A' * 17}' must be 1 to 16 characters, each A-Z or 0-9",
        ),
        ({"serial": "A-1"}, "serial", "'A-1' must be 1 to 16 characters, each A-Z or 0-9"),
        ({"hw_type": ""}, "hw_type", "required"),
        ({"hw_type": "x7"}, "hw_type", "'x7' is not an integer"),
        ({"hw_type": "-17"}, "hw_type", "'-17' is not an integer"),
        (
            {"hw_type": "15"},
            "hw_type",
            "15 is not a supported device type (supported: 14, 16, 17, 18, 23, 24, 28, 29, 31)",
        ),
        ({"sender_id": ""}, "sender_id", "required"),
        ({"sender_id": "0x"}, "sender_id", "must be 1 to 7 bytes, got 0"),
        ({"sender_id": "0102030405060708"}, "sender_id", "must be 1 to 7 bytes, got 8"),
        ({"sender_id": "abc"}, "sender_id", "'abc' is not hex (pairs of digits 0-9, a-f expected)"),
        ({"sender_id": "zz"}, "sender_id", "'zz' is not hex (pairs of digits 0-9, a-f expected)"),
        ({"master_secret": ""}, "master_secret", "required"),
        (
            {"master_secret": "00" * 15},
            "master_secret",
            "must be exactly 16 bytes (32 hex digits), got 15",
        ),
        (
            {"master_secret": "00" * 17},
            "master_secret",
            "must be exactly 16 bytes (32 hex digits), got 17",
        ),
        (
            {"master_secret": "g" * 32},
            "master_secret",
            f"'{'g' * 32}' is not hex (pairs of digits 0-9, a-f expected)",
        ),
        ({"master_salt": "0011"}, "master_salt", "must be empty or 8 bytes (16 hex digits), got 2"),
        (
            {"master_salt": "00 11"},
            "master_salt",
            "'00 11' is not hex (pairs of digits 0-9, a-f expected)",
        ),
        ({"name": "n" * 101}, "name", "must be at most 100 characters, got 101"),
        (
            {"colour": "red"},
            "colour",
            "unknown field (expected: serial, hw_type, sender_id, master_secret, master_salt, name)",
        ),
    ],
)
def test_parse_bad_field(changes: dict[str, str], field: str, message: str) -> None:
    with pytest.raises(EnrollmentError) as info:
        parse_device({**GOOD, **changes}, HW)
    assert (info.value.field, info.value.message) == (field, message)
    assert str(info.value) == f"{field}: {message}"


def test_hw_types_come_from_the_caller() -> None:
    assert parse_device({**GOOD, "hw_type": "99"}, {99}).hw_type == 99


# --- database ---------------------------------------------------------------------------------


async def test_add_list_delete(database: Database, secret_box: SecretBox) -> None:
    before = datetime.now(UTC)
    row = await add_device(database, secret_box, device("B2", b"\x02", master_salt=SALT, name="x"))
    await add_device(database, secret_box, device("A1", b"\x01"))
    await add_device(database, secret_box, device("C3", b"\x03\x04"))

    assert (row.serial, row.hw_type, row.kid, row.name) == ("B2", 17, b"\x02", "x")
    assert (row.tx_interval, row.uplinks_since_join, row.join_date) == (60, 0, None)
    assert before <= row.created_at <= datetime.now(UTC)

    assert [d.serial for d in await list_devices(database)] == ["A1", "B2", "C3"]
    assert [d.serial for d in await list_devices(database, offset=1, limit=1)] == ["B2"]
    stored = await get_device(database, "B2")
    assert stored is not None and stored.created_at.tzinfo is not None
    assert device_secrets(secret_box, stored) == (SECRET, SALT)

    assert await delete_device(database, "B2") is True
    assert await delete_device(database, "B2") is False
    assert [d.serial for d in await list_devices(database)] == ["A1", "C3"]
    assert await get_device(database, "B2") is None


async def test_secrets_are_encrypted_at_rest(database: Database, secret_box: SecretBox) -> None:
    await add_device(database, secret_box, device("A1", b"\x01", master_salt=SALT))
    async with database.session() as session:
        secret_enc, salt_enc = (
            await session.execute(
                text("SELECT master_secret_enc, master_salt_enc FROM devices WHERE serial = 'A1'")
            )
        ).one()
    for column in (bytes(secret_enc), bytes(salt_enc)):
        assert SECRET not in column and SALT not in column
        assert SECRET.hex().encode() not in column and SALT.hex().encode() not in column
    assert secret_box.decrypt(bytes(secret_enc)) == SECRET
    assert secret_box.decrypt(bytes(salt_enc)) == SALT


async def test_empty_salt_round_trips(database: Database, secret_box: SecretBox) -> None:
    row = await add_device(database, secret_box, device("A1", b"\x01"))
    assert device_secrets(secret_box, row) == (SECRET, b"")


async def test_duplicates_rejected(database: Database, secret_box: SecretBox) -> None:
    await add_device(database, secret_box, device("A1", b"\x0a\x0b"))
    with pytest.raises(EnrollmentError) as info:
        await add_device(database, secret_box, device("A1", b"\x09"))
    assert (info.value.field, info.value.message) == ("serial", "A1 is already enrolled")
    with pytest.raises(EnrollmentError) as info:
        await add_device(database, secret_box, device("A2", b"\x0a\x0b"))
    assert (info.value.field, info.value.message) == (
        "sender_id",
        "0a0b is already used by device A1",
    )
    assert [d.serial for d in await list_devices(database)] == ["A1"]


async def test_delete_cascades_to_context_and_uplinks(
    database: Database, secret_box: SecretBox
) -> None:
    row = await add_device(database, secret_box, device("A1", b"\x01"))
    now = datetime.now(UTC)
    async with database.session() as session, session.begin():
        session.add(
            SecurityContext(
                device_id=row.id, id_context=b"r" * 16, r2_issued_ms=1, established_at=now
            )
        )
        session.add(
            UplinkRecord(device_id=row.id, received_at=now, message_type="rx", payload=b"", data={})
        )
    assert await delete_device(database, "A1") is True
    async with database.session() as session:
        counts = [
            await session.scalar(select(func.count()).select_from(table))
            for table in (Device, SecurityContext, UplinkRecord)
        ]
    assert counts == [0, 0, 0]


# --- CSV --------------------------------------------------------------------------------------


async def test_import_adds_good_rows_and_reports_bad_ones(
    database: Database, secret_box: SecretBox
) -> None:
    await add_device(database, secret_box, device("OLD1", b"\xee"))
    csv_text = (
        "serial,hw_type,sender_id,master_secret,master_salt,name\n"  # line 1
        f"A1,17,01,{SECRET.hex()},{SALT.hex()},Kitchen\n"  # 2 good
        f"A2,99,02,{SECRET.hex()},,\n"  # 3 bad hw_type
        "\n"  # 4 blank, skipped
        f"A3,16,03,{SECRET.hex()},,\n"  # 5 good, empty salt
        f"A1,16,04,{SECRET.hex()},,\n"  # 6 serial repeats line 2
        f"A4,16,01,{SECRET.hex()},,\n"  # 7 kid repeats line 2
        f"OLD1,16,05,{SECRET.hex()},,\n"  # 8 already enrolled
        f"A5,16,ee,{SECRET.hex()},,\n"  # 9 kid taken by OLD1
        f"A6,16,06,{SECRET.hex()}\n"  # 10 too few fields
        f"a7,16,07,{SECRET.hex()},,\n"  # 11 bad serial
        f'"A8",14,08,{SECRET.hex()},,"Hall, upstairs"\n'  # 12 good, quoted
    )
    report = await import_csv(database, secret_box, csv_text, HW)
    assert report == ImportReport(
        added=["A1", "A3", "A8"],
        errors=[
            (
                3,
                "hw_type: 99 is not a supported device type "
                "(supported: 14, 16, 17, 18, 23, 24, 28, 29, 31)",
            ),
            (6, "serial: A1 repeats line 2"),
            (7, "sender_id: 01 repeats line 2"),
            (8, "serial: OLD1 is already enrolled"),
            (9, "sender_id: ee is already used by device OLD1"),
            (10, "expected 6 fields like the header, got 4"),
            (11, "serial: 'a7' must be 1 to 16 characters, each A-Z or 0-9"),
        ],
    )
    devices = {d.serial: d for d in await list_devices(database)}
    assert sorted(devices) == ["A1", "A3", "A8", "OLD1"]
    assert devices["A1"].name == "Kitchen" and devices["A8"].name == "Hall, upstairs"
    assert device_secrets(secret_box, devices["A1"]) == (SECRET, SALT)
    assert device_secrets(secret_box, devices["A3"]) == (SECRET, b"")

    # Re-importing the same file adds nothing twice.
    again = await import_csv(database, secret_box, csv_text, HW)
    assert again.added == []
    assert (2, "serial: A1 is already enrolled") in again.errors


async def test_import_minimal_header_any_order(database: Database, secret_box: SecretBox) -> None:
    csv_text = f"\ufeffSender_ID, serial ,master_secret,hw_type\r\n0a,Z1,{SECRET.hex()},29\r\n"
    report = await import_csv(database, secret_box, csv_text, HW)
    assert report == ImportReport(added=["Z1"], errors=[])
    stored = await get_device(database, "Z1")
    assert stored is not None and (stored.kid, stored.hw_type) == (b"\x0a", 29)


@pytest.mark.parametrize(
    ("csv_text", "error"),
    [
        (
            "",
            (
                1,
                "empty file: a header line is required "
                "(serial,hw_type,sender_id,master_secret,master_salt,name)",
            ),
        ),
        (
            "serial,hw_type,sender_id,master_secret,colour\nA1,17,01,00,red\n",
            (
                1,
                "header: unknown column 'colour' (expected: serial,hw_type,sender_id,"
                "master_secret,master_salt,name; master_salt and name are optional)",
            ),
        ),
        ("serial,hw_type,master_secret\n", (1, "header: missing column 'sender_id'")),
        (
            "\nserial,serial,hw_type,sender_id,master_secret\n",
            (2, "header: column 'serial' appears twice"),
        ),
    ],
)
async def test_import_bad_header_adds_nothing(
    database: Database, secret_box: SecretBox, csv_text: str, error: tuple[int, str]
) -> None:
    assert await import_csv(database, secret_box, csv_text, HW) == ImportReport([], [error])
    assert await list_devices(database) == []


async def test_csv_writer_round_trip(database: Database, secret_box: SecretBox) -> None:
    devices = [
        DeviceInput("A0000001", 17, b"\x01", SECRET, SALT, "Kitchen, sink"),
        DeviceInput("A0000002", 24, bytes(range(7)), SECRET[::-1]),
    ]
    csv_text = write_devices_csv(devices)
    assert csv_text == (
        "serial,hw_type,sender_id,master_secret,master_salt,name\n"
        f'A0000001,17,01,{SECRET.hex()},{SALT.hex()},"Kitchen, sink"\n'
        f"A0000002,24,00010203040506,{SECRET[::-1].hex()},,\n"
    )
    assert read_devices_csv(csv_text, HW) == devices
    assert await import_csv(database, secret_box, csv_text, HW) == ImportReport(
        added=["A0000001", "A0000002"], errors=[]
    )


def test_read_devices_csv_reports_first_error() -> None:
    with pytest.raises(EnrollmentError) as info:
        read_devices_csv(
            f"serial,hw_type,sender_id,master_secret\nA1,17,01,{SECRET.hex()}\nA2,17,,00\n", HW
        )
    assert str(info.value) == "line 3: sender_id: required"


async def test_enroll_in_chunks_reports_collisions_of_a_later_chunk(
    database: Database, secret_box: SecretBox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunks go in with one INSERT each; a chunk that collides is checked row by row."""
    monkeypatch.setattr("driver_core.enrollment.BULK_CHUNK", 2)
    await add_device(database, secret_box, device("OLD1", b"\xee"))
    candidates = [
        (2, device("C1", b"\x01")),
        (3, device("C2", b"\x02")),  # chunk 1: clean
        (4, device("OLD1", b"\x03")),  # chunk 2: serial taken
        (5, device("C4", b"\x04")),
        (6, device("C5", b"\xee")),  # chunk 3: kid taken
    ]
    report = await enroll_devices(database, secret_box, candidates)
    assert report == ImportReport(
        added=["C1", "C2", "C4"],
        errors=[
            (4, "serial: OLD1 is already enrolled"),
            (6, "sender_id: ee is already used by device OLD1"),
        ],
    )
    stored = {d.serial: d for d in await list_devices(database)}
    assert sorted(stored) == ["C1", "C2", "C4", "OLD1"]
    assert device_secrets(secret_box, stored["C4"]) == (SECRET, b"")
    assert stored["C4"].tx_interval == 60 and stored["C4"].uplinks_since_join == 0
