"""Backup and restore: database, keys and configuration; consistent while running; OSCORE safe.

Real drivers (UDP, SQLite files, PostgreSQL databases), real archives, the real CLI.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import stat
import tarfile
from pathlib import Path
from types import SimpleNamespace

import cbor2
import pytest
from aiocoap.numbers.codes import Code
from sqlalchemy import func, select

from driver_core import device_client
from driver_core.backup import BackupError, create_backup, restore_backup
from driver_core.broker_access import APPLICATION_USER, CredentialStore
from driver_core.driver import Driver
from driver_core.enrollment import add_device
from driver_core.runstate import RunLockError
from driver_core.storage.db import Database, head_revision
from driver_core.storage.models import (
    ApiToken,
    Device,
    Downlink,
    OutboxMessage,
    SecurityContext,
    UplinkRecord,
)
from driver_core.tokens import create_token, verify_token
from tests.conftest import make_device, session_for, write_config
from tests.mqtt_helpers import free_port, wait_until
from tests.test_cli import run_cli


async def count(driver: Driver, model) -> int:
    async with driver.db.session() as session:
        return int(await session.scalar(select(func.count()).select_from(model)))


async def started(config_dir: Path, database_url: str | None = None) -> Driver:
    if not (config_dir / "configuration.yaml").exists():
        write_config(config_dir, database_url)
    driver = Driver(config_dir)
    await driver.start()
    return driver


class Recorder:
    """Records every request a DeviceSession sends (an attacker on the path would)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.requests = []
        real = device_client.exchange
        self.real = real

        async def recording(host, port, request, *args, **kwargs):
            self.requests.append(request)
            return await real(host, port, request, *args, **kwargs)

        monkeypatch.setattr(device_client, "exchange", recording)

    async def replay(self, driver: Driver, request):
        return await self.real("127.0.0.1", driver.coap_port, request)


# ---- the scenario -------------------------------------------------------------------------


async def test_restore_drops_contexts_old_messages_are_refused_and_devices_rejoin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config_dir = tmp_path / "config"
    driver = await started(config_dir)
    device = make_device("B0000001", 17, 71)
    try:
        await add_device(driver.db, driver.box, device)
        session = session_for(driver, device)
        await session.join("1.0.0", 17)
        assert (await session.post("rx", cbor2.dumps({1: 1}))).code == Code.CHANGED
        token = await create_token(driver.db, "ops")
        await driver.downlinks.schedule("B0000001", "tx_interval", 30)
        report = await create_backup(driver.config, tmp_path / "backup.tar.gz")  # while running
        assert report.rows["devices"] == 1 and report.rows["uplinks"] == 2
        # After the backup: a new JOIN and a data message, both recorded on the way.
        recorder = Recorder(monkeypatch)
        await session.join("1.0.1", 17)
        join_step3 = recorder.requests[-1]
        outer, request_id = session.protect("rx", cbor2.dumps({1: 2}))
        assert (await session.send_raw(outer, request_id)).code == Code.CHANGED
        assert await count(driver, UplinkRecord) == 4
    finally:
        await driver.stop()

    restored = await restore_backup(config_dir, tmp_path / "backup.tar.gz")
    assert (restored.contexts_dropped, restored.revision_to) == (1, head_revision())

    driver = await started(config_dir)
    try:
        assert await count(driver, UplinkRecord) == 2  # the snapshot's history
        assert await count(driver, SecurityContext) == 0
        assert await verify_token(driver.db, token) is not None  # same keys, same tokens
        # The message recorded after the backup: its sequence number is fresh for the
        # snapshot's replay window, yet it is refused, because the context is gone.
        answer = await recorder.replay(driver, outer)
        assert (answer.code, answer.payload) == (Code.UNAUTHORIZED, b"Security context not found")
        # The JOIN recorded after the backup cannot bring a context back either (new epoch).
        answer = await recorder.replay(driver, join_step3)
        assert (answer.code, answer.payload) == (Code.UNAUTHORIZED, b"Security context not found")
        assert await count(driver, SecurityContext) == 0
        assert driver.refusals.counts["no_security_context"] == 2
        assert await count(driver, UplinkRecord) == 2  # nothing of the replays was accepted
        # The device itself: its next transmission fails the same way, it re-JOINs, all is well.
        session.port = driver.coap_port  # the restarted driver listens on a new port
        stale = await session.post("rx", cbor2.dumps({1: 3}))
        assert (stale.code, stale.protected) == (Code.UNAUTHORIZED, False)
        joined = await session.join("1.0.2", 17)
        assert joined.code == Code.CHANGED
        # The downlink scheduled before the backup was still pending: it rides in this answer.
        assert (joined.body[3], joined.body[4][2]) == (0, 30)
        assert (await session.post("rx", cbor2.dumps({1: 4}))).code == Code.CHANGED
        assert await count(driver, UplinkRecord) == 4
    finally:
        await driver.stop()


# ---- consistency while running --------------------------------------------------------------------


async def _traffic(driver: Driver, serial: str, index: int, stop: asyncio.Event) -> int:
    device = make_device(serial, 16, index)
    await add_device(driver.db, driver.box, device)
    session = session_for(driver, device)
    await session.join("1.0.0", 16)
    sent = 0
    while not stop.is_set():
        assert (await session.post("rx", cbor2.dumps({1: sent % 100}))).code == Code.CHANGED
        sent += 1
    return sent


async def _invariants(driver: Driver) -> tuple[int, int]:
    """Uplinks and outbox rows are written in one transaction: equal in any consistent copy."""
    uplinks, outbox = await count(driver, UplinkRecord), await count(driver, OutboxMessage)
    assert uplinks == outbox
    async with driver.db.session() as session:
        rows = await session.execute(
            select(Device.serial, Device.last_seen, func.max(UplinkRecord.received_at))
            .join(UplinkRecord, UplinkRecord.device_id == Device.id)
            .group_by(Device.serial, Device.last_seen)
        )
        for serial, last_seen, newest in rows:
            assert last_seen == newest, serial
    return uplinks, outbox


async def _at_least(driver: Driver, rows: int) -> bool:
    return await count(driver, UplinkRecord) >= rows


async def _consistent_while_running(tmp_path: Path, database_url: str | None) -> None:
    config_dir = tmp_path / "config"
    driver = await started(config_dir, database_url)
    # A consumer that never deletes: every uplink keeps its outbox row (none without one).
    driver.writer.add_outbox_consumer("test")
    stop = asyncio.Event()
    try:
        senders = [
            asyncio.create_task(_traffic(driver, f"C000000{i}", 80 + i, stop)) for i in range(4)
        ]
        await wait_until(lambda: _at_least(driver, 40), what="40 uplinks")
        report = await create_backup(driver.config, tmp_path / "live.tar.gz")
        stop.set()
        sent = sum(await asyncio.gather(*senders))
        assert sent + 4 > report.rows["uplinks"] >= 40
    finally:
        await driver.stop()
    await restore_backup(config_dir, tmp_path / "live.tar.gz")
    # The database alone: a driver without MQTT would purge the outbox rows at start.
    restored = SimpleNamespace(db=Database(driver.config.database["url"]))
    await restored.db.start()
    try:
        uplinks, _ = await _invariants(restored)
        assert uplinks == report.rows["uplinks"]
    finally:
        await restored.db.stop()


async def test_sqlite_backup_is_consistent_while_running(tmp_path: Path) -> None:
    await _consistent_while_running(tmp_path, None)


async def test_postgresql_backup_is_consistent_while_running(tmp_path: Path, postgres_url: str) -> None:
    await _consistent_while_running(tmp_path, postgres_url)


# ---- PostgreSQL: logical dump, every row back, sequences moved on ---------------------------------


async def _snapshot(driver: Driver) -> dict[str, list]:
    async with driver.db.session() as session:
        devices = (await session.execute(
            select(Device.serial, Device.kid, Device.master_secret_enc, Device.join_date, Device.last_seen)
            .order_by(Device.id)
        )).all()
        uplinks = (await session.execute(
            select(UplinkRecord.id, UplinkRecord.received_at, UplinkRecord.payload, UplinkRecord.data)
            .order_by(UplinkRecord.id)
        )).all()
        downlinks = (await session.execute(
            select(Downlink.command_id, Downlink.state, Downlink.parameter).order_by(Downlink.id)
        )).all()
        tokens = (await session.execute(select(ApiToken.name, ApiToken.token_hash))).all()
    return {"devices": devices, "uplinks": uplinks, "downlinks": downlinks, "tokens": tokens}


@pytest.mark.parametrize("target", ["postgresql", "sqlite"])
async def test_postgresql_backup_restores_every_row(
    tmp_path: Path, postgres_url: str, target: str, request: pytest.FixtureRequest
) -> None:
    config_dir = tmp_path / "config"
    driver = await started(config_dir, postgres_url)
    try:
        for index, serial in enumerate(["D0000001", "D0000002"]):
            device = make_device(serial, 24, 90 + index)
            await add_device(driver.db, driver.box, device)
            session = session_for(driver, device)
            await session.join("2.0.0", 24)
            await session.post("rx", cbor2.dumps({1: index}))
        await driver.downlinks.schedule("D0000001", "tx_interval", 15)
        await create_token(driver.db, "prometheus")
        before = await _snapshot(driver)
        await create_backup(driver.config, tmp_path / "pg.tar.gz")
    finally:
        await driver.stop()
    with tarfile.open(tmp_path / "pg.tar.gz") as archive:
        names = archive.getnames()
        manifest = json.load(archive.extractfile("manifest.json"))
    assert manifest["database"] == "postgresql" and manifest["schema_revision"] == head_revision()
    assert "database/uplinks.jsonl" in names and "database/sqlite.db" not in names
    assert manifest["tables"]["uplinks"]["columns"]["payload"] == "binary"

    # PostgreSQL: the same database, emptied by the restore; SQLite: moving to another database.
    url = None if target == "postgresql" else f"sqlite+aiosqlite:///{tmp_path / 'moved.db'}"
    await restore_backup(config_dir, tmp_path / "pg.tar.gz", url)
    if url is not None:
        write_config(config_dir, url)
    driver = await started(config_dir)
    try:
        after = await _snapshot(driver)
        assert after["devices"] == before["devices"]
        assert after["uplinks"] == before["uplinks"]
        assert after["downlinks"] == before["downlinks"]
        assert after["tokens"] == before["tokens"]
        # New rows get new ids (PostgreSQL sequences were moved past the restored rows).
        await add_device(driver.db, driver.box, make_device("D0000003", 24, 95))
        session = session_for(driver, make_device("D0000003", 24, 95))
        await session.join("2.0.0", 24)
        assert await count(driver, Device) == 3 and await count(driver, UplinkRecord) == 5
    finally:
        await driver.stop()


# ---- what the archive holds and what restore checks -----------------------------------------------


async def test_archive_holds_configuration_keys_and_no_database_file_twice(tmp_path: Path) -> None:
    port = free_port()
    config_dir = tmp_path / "config"
    write_config(config_dir, extra=f"mqtt:\n  builtin_port: {port}\n")
    (config_dir / "secrets.yaml").write_text("hmac: s3cret\n")
    (config_dir / "old-backup.tar.gz").write_bytes(b"not again")
    driver = await started(config_dir)
    try:
        store = CredentialStore(config_dir, driver.box)
        password = store.password(APPLICATION_USER)
        target = config_dir / "backup.tar.gz"  # even inside the configuration directory
        await create_backup(driver.config, target)
    finally:
        await driver.stop()
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    with tarfile.open(target) as archive:
        names = sorted(archive.getnames())
    assert names == [
        "config/.storage/mqtt_credentials.json",
        "config/.storage/secret.key",
        "config/configuration.yaml",
        "config/secrets.yaml",
        "database/sqlite.db",
        "manifest.json",
    ]
    # Lose everything, restore: same broker password, same secrets.
    for path in [config_dir / "secrets.yaml", config_dir / ".storage" / "mqtt_credentials.json"]:
        path.unlink()
    await restore_backup(config_dir, target)
    assert (config_dir / "secrets.yaml").read_text() == "hmac: s3cret\n"
    driver = await started(config_dir)
    try:
        assert CredentialStore(config_dir, driver.box).password(APPLICATION_USER) == password
    finally:
        await driver.stop()


async def test_restore_refuses_while_a_driver_runs(tmp_path: Path) -> None:
    config_dir = tmp_path / "config"
    driver = await started(config_dir)
    try:
        await create_backup(driver.config, tmp_path / "b.tar.gz")
        with pytest.raises(RunLockError) as info:
            await restore_backup(config_dir, tmp_path / "b.tar.gz")
        assert str(info.value) == (
            f"a driver is running on {config_dir} (it holds {config_dir}/.storage/driver.lock); "
            "stop it before restoring"
        )
    finally:
        await driver.stop()


def _archive(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def _manifest(**changes) -> bytes:
    manifest = {"format": 1, "schema_revision": "0001", "database": "sqlite", "tables": {}}
    manifest.update(changes)
    return json.dumps(manifest).encode()


async def test_bad_archives_are_refused_with_a_clear_message(tmp_path: Path) -> None:
    config_dir = tmp_path / "config"
    write_config(config_dir)
    cases = [
        (tmp_path / "missing.tar.gz", f"{tmp_path}/missing.tar.gz: file not found"),
        (tmp_path, f"{tmp_path} is a directory, not a backup file"),
    ]
    (tmp_path / "text.tar.gz").write_text("hello")
    cases.append((tmp_path / "text.tar.gz", "is not a coap-driver backup (not a .tar.gz:"))
    cases.append((
        _archive(tmp_path / "nomanifest.tar.gz", {"x": b"1"}),
        "nomanifest.tar.gz is not a coap-driver backup (no manifest.json)",
    ))
    cases.append((
        _archive(tmp_path / "future.tar.gz", {"manifest.json": _manifest(format=2, coap_driver_version="9.0")}),
        "was written in backup format 2 by coap-driver 9.0; this release reads format 1",
    ))
    cases.append((
        _archive(tmp_path / "newer.tar.gz", {"manifest.json": _manifest(schema_revision="0999")}),
        f"holds database schema revision '0999', which this release (0.1.0, newest schema "
        f"'{head_revision()}') does not know",
    ))
    cases.append((
        _archive(tmp_path / "evil.tar.gz", {"manifest.json": _manifest(), "config/../../x": b"1"}),
        "refusing unsafe member 'config/../../x'",
    ))
    cases.append((
        _archive(tmp_path / "nodb.tar.gz", {"manifest.json": _manifest()}),
        "the backup lacks database/sqlite.db",
    ))
    for path, message in cases:
        with pytest.raises(BackupError) as info:
            await restore_backup(config_dir, path)
        assert message in str(info.value), (path, str(info.value))
    assert not (tmp_path / "x").exists()


async def test_backup_target_errors(tmp_path: Path) -> None:
    config_dir = tmp_path / "config"
    driver = await started(config_dir)
    try:
        with pytest.raises(BackupError, match=f"^{tmp_path} is a directory; give a file name"):
            await create_backup(driver.config, tmp_path)
        with pytest.raises(BackupError, match=f"^directory {tmp_path}/nowhere does not exist$"):
            await create_backup(driver.config, tmp_path / "nowhere" / "b.tar.gz")
    finally:
        await driver.stop()


# ---- the command line -----------------------------------------------------------------------------


def test_cli_backup_and_restore(tmp_path: Path) -> None:
    config = tmp_path / "config"
    write_config(config)
    added = run_cli(
        "--config", str(config), "device", "add", "--serial", "E0000001", "--hw-type", "17",
        "--sender-id", "e001", "--master-secret", "000102030405060708090a0b0c0d0e0f", cwd=tmp_path,
    )
    assert added.returncode == 0, added.stderr
    backup = run_cli("--config", str(config), "backup", str(tmp_path / "b.tar.gz"), cwd=tmp_path)
    assert backup.returncode == 0, backup.stderr
    assert backup.stdout.startswith(f"backup written to {tmp_path}/b.tar.gz: sqlite database at schema ")
    run_cli("--config", str(config), "device", "remove", "E0000001", cwd=tmp_path)
    restore = run_cli("--config", str(config), "restore", str(tmp_path / "b.tar.gz"), cwd=tmp_path)
    assert restore.returncode == 0, restore.stderr
    lines = restore.stdout.splitlines()
    assert lines[1] == "devices: 1, uplinks: 0, downlinks: 0"
    assert lines[2].startswith("0 OSCORE security contexts dropped")
    listed = run_cli("--config", str(config), "device", "list", cwd=tmp_path)
    assert listed.stdout.splitlines()[1].split()[0] == "E0000001"
    bad = run_cli("--config", str(config), "restore", str(tmp_path / "none.tar.gz"), cwd=tmp_path)
    assert (bad.returncode, bad.stderr) == (2, f"coap-driver: {tmp_path}/none.tar.gz: file not found\n")
    assert os.stat(tmp_path / "b.tar.gz").st_mode & 0o077 == 0
