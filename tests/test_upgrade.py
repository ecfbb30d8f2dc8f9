"""Upgrades: a database of the first released schema (0001), with data, migrated to this release.

Rows are written with plain SQL against the 0001 tables (as that release wrote
them), the database is upgraded (on driver start and by `coap-driver db
upgrade`), and the data is read back and used, on SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import cbor2
from aiocoap.numbers.codes import Code
from sqlalchemy import JSON, DateTime, LargeBinary, Text, bindparam, inspect, select, text
from sqlalchemy.ext.asyncio import create_async_engine

from driver_core.driver import Driver
from driver_core.storage.db import current_revision, head_revision, normalize_url, run_migrations
from driver_core.storage.models import (
    Device,
    IntegrationSettings,
    SecurityContext,
    UplinkRecord,
)
from driver_core.storage.secretbox import SecretBox
from tests.conftest import make_device, session_for, write_config
from tests.mqtt_helpers import Collector
from tests.test_cli import run_cli

# Recent enough for the retention purge (30 days) that runs at start.
T0 = (datetime.now(UTC) - timedelta(days=2)).replace(microsecond=123000)
T1 = (datetime.now(UTC) - timedelta(hours=1)).replace(microsecond=0)
DEVICE = make_device("A0000001", 17, 7)
PREFIX = f"upgrade-{uuid.uuid4().hex[:8]}"

INSERTS = [
    (
        "INSERT INTO devices (serial, hw_type, kid, master_secret_enc, master_salt_enc, name, "
        "created_at, join_date, last_seen, firmware, tx_interval, uplinks_since_join) VALUES "
        "('A0000001', 17, :kid, :secret, :salt, 'Pump house', :t0, :t0, :t1, '1.2.3', 60, 5)",
        {},
    ),
    (
        "INSERT INTO security_contexts (device_id, id_context, r2_issued_ms, sender_seq_reserved, "
        "replay_index, replay_bitfield, established_at) VALUES ((SELECT id FROM devices), :idc, 1754061624123, 256, 9, 3, :t0)",
        {},
    ),
    (
        "INSERT INTO uplinks (device_id, received_at, message_type, payload, data) VALUES "
        "((SELECT id FROM devices), :t0, 'join', :p1, :d1), ((SELECT id FROM devices), :t1, 'rx', :p2, :d2)",
        {},
    ),
    (
        "INSERT INTO mqtt_outbox (serial, document, created_at) VALUES ('A0000001', :doc, :t1)",
        {},
    ),
    (
        "INSERT INTO integration_settings (domain, data, updated_at) VALUES "
        "('mqtt', :settings, :t1)",
        {},
    ),
]


def _params(box: SecretBox) -> dict:
    return {
        "kid": DEVICE.sender_id,
        "secret": box.encrypt(DEVICE.master_secret),
        "salt": box.encrypt(DEVICE.master_salt),
        "t0": T0,
        "t1": T1,
        "idc": bytes(range(24)),
        "p1": cbor2.dumps({1: "1.2.3", 2: 17}),
        "p2": cbor2.dumps({1: 81, 2: 1234}),
        "d1": {"firmware": "1.2.3", "hw_type": 17},
        "d2": {"battery": 81, "pressure": 12.34},
        "settings": {
            "broker": "external", "url": "mqtt://127.0.0.1:1883", "uplink_topic": PREFIX + "/{{serial}}/up",
        },
        "doc": '{"protocol":2,"serial":"A0000001"}',
    }


_TYPES = {
    "kid": LargeBinary, "secret": LargeBinary, "salt": LargeBinary, "idc": LargeBinary,
    "p1": LargeBinary, "p2": LargeBinary, "t0": DateTime(timezone=True),
    "t1": DateTime(timezone=True), "d1": JSON, "d2": JSON, "settings": JSON, "doc": Text,
}


async def _database_at_0001_with_data(url: str, box: SecretBox) -> None:
    engine = create_async_engine(normalize_url(url))
    try:
        await run_migrations(engine, "0001")
        assert await current_revision(engine) == "0001"
        params = _params(box)
        async with engine.begin() as conn:
            for sql, _ in INSERTS:
                statement = text(sql)
                names = [n for n in _TYPES if f":{n}" in sql]
                statement = statement.bindparams(*[bindparam(n, type_=_TYPES[n]) for n in names])
                await conn.execute(statement, {n: params[n] for n in names})
    finally:
        await engine.dispose()


async def _tables(url: str) -> set[str]:
    engine = create_async_engine(normalize_url(url))
    try:
        async with engine.connect() as conn:
            return set(await conn.run_sync(lambda c: inspect(c).get_table_names()))
    finally:
        await engine.dispose()


async def test_first_schema_with_data_upgrades_on_start_and_the_data_works(
    tmp_path: Path, db_url: str
) -> None:
    config_dir = tmp_path / "config"
    write_config(config_dir, db_url)
    box = SecretBox.load_or_create(config_dir)
    await _database_at_0001_with_data(db_url, box)
    assert "downlinks" not in await _tables(db_url)

    collector = await Collector(1883, f"{PREFIX}/#").start()  # the machine's Mosquitto
    driver = Driver(config_dir)
    await driver.start()  # migrations run on start
    try:
        assert {"downlinks", "downlink_events", "api_tokens", "users"} <= await _tables(db_url)
        async with driver.db.session() as session:
            device = await session.scalar(select(Device))
            context = await session.scalar(select(SecurityContext))
            uplinks = (await session.scalars(select(UplinkRecord).order_by(UplinkRecord.id))).all()
            settings = await session.scalar(select(IntegrationSettings))
        assert (device.serial, device.name, device.firmware, device.uplinks_since_join) == (
            "A0000001", "Pump house", "1.2.3", 5,
        )
        assert (device.join_date, device.last_seen) == (T0, T1)
        assert (context.replay_index, context.replay_bitfield, context.sender_seq_reserved) == (9, 3, 256)
        assert [(u.message_type, u.received_at, u.payload, u.data) for u in uplinks] == [
            ("join", T0, cbor2.dumps({1: "1.2.3", 2: 17}), {"firmware": "1.2.3", "hw_type": 17}),
            ("rx", T1, cbor2.dumps({1: 81, 2: 1234}), {"battery": 81, "pressure": 12.34}),
        ]
        assert settings.data["uplink_topic"] == PREFIX + "/{{serial}}/up"
        # The migrated device works: its secrets decrypt, it joins and sends; the outbox
        # row written by the old release goes out first, under the saved topic.
        session_ = session_for(driver, DEVICE)
        assert (await session_.join("1.2.4", 17)).code == Code.CHANGED
        assert (await session_.post("rx", cbor2.dumps({1: 80}))).code == Code.CHANGED
        received = await collector.wait_for(3)
        assert [m.topic for m in received] == [f"{PREFIX}/A0000001/up"] * 3
        assert received[0].payload == b'{"protocol":2,"serial":"A0000001"}'
        assert [json.loads(m.payload)["message_type"] for m in received[1:]] == ["join", "rx"]
        async with driver.db.session() as session:
            ids = (await session.scalars(select(UplinkRecord.id).order_by(UplinkRecord.id))).all()
        assert ids[:2] == [u.id for u in uplinks] and len(ids) == 4
    finally:
        await driver.stop()
        await collector.stop()


def test_cli_db_upgrade_and_status(tmp_path: Path) -> None:
    config = tmp_path / "config"
    url = f"sqlite+aiosqlite:///{tmp_path / 'old.db'}"
    write_config(config, url)
    import asyncio

    asyncio.run(_database_at_0001_with_data(url, SecretBox.load_or_create(config)))
    status = run_cli("--config", str(config), "db", "status", cwd=tmp_path)
    shown = f"sqlite+aiosqlite:///{tmp_path / 'old.db'}"
    assert status.stdout == (
        f"database {shown}: schema 0001, newest {head_revision()}: "
        "run `coap-driver db upgrade` (or start the driver)\n"
    )
    step = run_cli("--config", str(config), "db", "upgrade", "--revision", "0002", cwd=tmp_path)
    assert step.stdout == f"database {shown} upgraded from schema 0001 to 0002\n", step.stderr
    upgrade = run_cli("--config", str(config), "db", "upgrade", cwd=tmp_path)
    assert upgrade.stdout == f"database {shown} upgraded from schema 0002 to {head_revision()}\n"
    again = run_cli("--config", str(config), "db", "upgrade", cwd=tmp_path)
    assert again.stdout == f"database {shown} is at schema {head_revision()}: nothing to do\n"
    down = run_cli("--config", str(config), "db", "upgrade", "--revision", "0001", cwd=tmp_path)
    assert (down.returncode, down.stderr) == (
        2,
        f"coap-driver: the database is at schema {head_revision()}, newer than 0001: downgrades "
        "are not supported (restore a backup made before the upgrade instead)\n",
    )
    unknown = run_cli("--config", str(config), "db", "upgrade", "--revision", "9999", cwd=tmp_path)
    assert unknown.returncode == 2 and unknown.stderr.startswith(
        "coap-driver: unknown schema revision '9999' (known: 0001, 0002"
    )


def test_cli_db_status_of_an_unreachable_database(tmp_path: Path) -> None:
    config = tmp_path / "config"
    write_config(config, "postgresql+asyncpg://nobody:secret@127.0.0.1:1/none")
    result = run_cli("--config", str(config), "db", "status", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith(
        "coap-driver: cannot open database postgresql+asyncpg://nobody:***@127.0.0.1:1/none: "
    )
    assert "secret" not in result.stderr and "Traceback" not in result.stderr


def test_version_and_changelog() -> None:
    from driver_core import __version__

    changelog = (Path(__file__).resolve().parent.parent / "CHANGELOG.md").read_text()
    assert f"## [{__version__}]" in changelog
