"""A restore that fails changes nothing: the archive is validated whole, staged, then swapped.

Real backups of real drivers (SQLite files and PostgreSQL databases), damaged the ways a
backup gets damaged (truncated copy, lost member, foreign key file, newer release, a crafted
archive), restored through the real code and the real CLI. After each failure every file of
the configuration directory (the database and its -wal/-shm included) is byte-identical and,
on PostgreSQL, every row is too.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sqlite3
import tarfile
from collections.abc import Iterator
from pathlib import Path

import cbor2
import pytest
from aiocoap.numbers.codes import Code
from cryptography.fernet import Fernet
from sqlalchemy import MetaData, select
from sqlalchemy.ext.asyncio import create_async_engine

from driver_core.backup import BackupError, create_backup, restore_backup
from driver_core.driver import Driver
from driver_core.enrollment import add_device
from tests.conftest import make_device, session_for, write_config
from tests.test_cli import run_cli

DEVICE = make_device("F0000001", 17, 61)


def fingerprint(config_dir: Path) -> dict[str, str | None]:
    """Every path under `config_dir`: sha256 of each file, None for each directory."""
    found: dict[str, str | None] = {}
    for root, dirs, files in os.walk(config_dir):
        for name in dirs:
            found[str((Path(root) / name).relative_to(config_dir))] = None
        for name in files:
            path = Path(root) / name
            found[str(path.relative_to(config_dir))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


async def pg_rows(url: str) -> str:
    """Every row of every table of the database at `url`, as one digest."""
    engine = create_async_engine(url)
    digest = hashlib.sha256()
    try:
        async with engine.connect() as conn:
            metadata = MetaData()
            await conn.run_sync(metadata.reflect)
            for table in metadata.sorted_tables:
                rows = sorted(repr(row) for row in (await conn.execute(select(table))).all())
                digest.update(repr((table.name, rows)).encode())
    finally:
        await engine.dispose()
    return digest.hexdigest()


def members(path: Path) -> dict[str, tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(path) as archive:
        return {
            info.name: (info, archive.extractfile(info).read() if info.isfile() else b"")
            for info in archive.getmembers()
        }


def rewrite(
    source: Path, target: Path, changes: dict[str, bytes | None], checksums: bool = True,
    extra: list[tarfile.TarInfo] = (),
) -> Path:
    """`source` with members replaced (bytes) or removed (None), consistent in itself:
    the manifest's checksums follow the changes (without `checksums`: no checksums, as
    an older release wrote)."""
    content = members(source)
    manifest = json.loads(content["manifest.json"][1])
    for name, data in changes.items():
        if name == "manifest.json":
            continue
        if data is None:
            del content[name]
        else:
            info = content[name][0] if name in content else tarfile.TarInfo(name)
            content[name] = (info, data)
    if "manifest.json" in changes:
        manifest = json.loads(changes["manifest.json"])
    if checksums:
        manifest["sha256"] = {
            name: hashlib.sha256(data).hexdigest()
            for name, (info, data) in content.items() if name != "manifest.json" and info.isfile()
        }
    else:
        manifest.pop("sha256", None)
    content["manifest.json"] = (content["manifest.json"][0], json.dumps(manifest).encode())
    with tarfile.open(target, "w:gz") as archive:
        for info, data in content.values():
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        for info in extra:
            archive.addfile(info, io.BytesIO(b"x" * info.size) if info.isfile() else None)
    return target


def newer_schema(database: bytes, tmp_path: Path) -> bytes:
    """The SQLite snapshot as a newer release would have written it (unknown revision)."""
    path = tmp_path / "newer.db"
    path.write_bytes(database)
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE alembic_version SET version_num = '0999'")
    conn.close()
    return path.read_bytes()


def traversal(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = 1
    return info


def symlink(name: str, to: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, to
    return info


@pytest.fixture
def held_wal(tmp_path: Path) -> Iterator[None]:
    """Leave -wal and -shm next to the SQLite database (an open connection with unmerged pages)."""
    connections = []

    def hold(database: Path) -> None:
        conn = sqlite3.connect(database, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA wal_autocheckpoint=0")
        conn.execute("UPDATE devices SET serial = serial")
        connections.append(conn)

    yield hold
    for conn in connections:
        conn.close()


async def installation(tmp_path: Path, database_url: str | None) -> tuple[Path, Path]:
    """A configuration directory with one JOINed device and a good backup of it."""
    config_dir = tmp_path / "config"
    write_config(config_dir, database_url)
    (config_dir / "devices.csv").write_text("serial,hw_type\nF0000001,17\n", encoding="utf-8")
    driver = Driver(config_dir)
    await driver.start()
    try:
        await add_device(driver.db, driver.box, DEVICE)
        session = session_for(driver, DEVICE)
        assert (await session.join("1.0.0", 17)).code == Code.CHANGED
        assert (await session.post("rx", cbor2.dumps({1: 1}))).code == Code.CHANGED
        good = tmp_path / "good.tar.gz"
        await create_backup(driver.config, good)
    finally:
        await driver.stop()
    # The installation moved on since: a restore that gave up half-way would show.
    (config_dir / "devices.csv").write_text("serial,hw_type\nF0000002,17\n", encoding="utf-8")
    config_file = config_dir / "configuration.yaml"
    config_file.write_text(config_file.read_text() + "# edited after the backup\n", encoding="utf-8")
    return config_dir, good


def sqlite_cases(good: Path, tmp_path: Path) -> list[tuple[Path, str]]:
    database = members(good)["database/sqlite.db"][1]
    random = os.urandom(8192)
    half = tmp_path / "truncated.tar.gz"
    half.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    plain = rewrite(good, tmp_path / "swapped.tar.gz", {}, checksums=False)
    swapped = members(plain)  # a member replaced after the manifest recorded its checksum
    with tarfile.open(tmp_path / "tampered.tar.gz", "w:gz") as archive:
        manifest = json.loads(members(good)["manifest.json"][1])
        for name, (info, data) in swapped.items():
            data = json.dumps(manifest).encode() if name == "manifest.json" else data
            data = random if name == "database/sqlite.db" else data
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return [
        (rewrite(good, tmp_path / "nodb.tar.gz", {"database/sqlite.db": None}),
         f"{tmp_path}/nodb.tar.gz: the backup lacks database/sqlite.db"),
        (rewrite(good, tmp_path / "random.tar.gz", {"database/sqlite.db": random}),
         f"{tmp_path}/random.tar.gz: database/sqlite.db is not a usable SQLite database "
         "(file is not a database)"),
        (rewrite(good, tmp_path / "random-old.tar.gz", {"database/sqlite.db": random}, checksums=False),
         f"{tmp_path}/random-old.tar.gz: database/sqlite.db is not a usable SQLite database "
         "(file is not a database)"),
        (tmp_path / "tampered.tar.gz",
         f"{tmp_path}/tampered.tar.gz: database/sqlite.db is damaged (its sha256 differs from "
         "the one the backup recorded)"),
        (half, f"{half} is truncated or damaged (unexpected end of data)"),
        (rewrite(good, tmp_path / "foreign.tar.gz", {"config/.storage/secret.key": Fernet.generate_key()}),
         f"{tmp_path}/foreign.tar.gz: its secret key does not decrypt the device secrets stored in "
         "its database (a key file from another installation?)"),
        (rewrite(good, tmp_path / "newer.tar.gz", {"database/sqlite.db": newer_schema(database, tmp_path)}),
         f"{tmp_path}/newer.tar.gz: its database is at schema revision '0999', which this release "
         "does not know (written by a newer coap-driver?)"),
        (rewrite(good, tmp_path / "nokey.tar.gz", {"config/.storage/secret.key": None}),
         f"{tmp_path}/nokey.tar.gz: the backup lacks config/.storage/secret.key"),
    ]


def unsafe_cases(good: Path, tmp_path: Path) -> list[tuple[Path, str]]:
    cases = []
    for index, (info, shown) in enumerate([
        (traversal("../x"), "'../x'"),
        (traversal(f"{tmp_path}/abs-x"), repr(f"{tmp_path}/abs-x")),
        (traversal("config/../../x"), "'config/../../x'"),
        (symlink("config/link", "/etc/passwd"), "'config/link' (a symbolic link)"),
        (traversal("stray"), "'stray'"),
    ]):
        path = rewrite(good, tmp_path / f"unsafe{index}.tar.gz", {}, extra=[info])
        cases.append((path, f"{path}: refusing unsafe member {shown}"))
    return cases


def postgres_cases(good: Path, tmp_path: Path) -> list[tuple[Path, str]]:
    half = tmp_path / "truncated.tar.gz"
    half.write_bytes(good.read_bytes()[: good.stat().st_size * 2 // 3])
    return [
        (rewrite(good, tmp_path / "nodevices.tar.gz", {"database/devices.jsonl": None}),
         f"{tmp_path}/nodevices.tar.gz: the backup lacks database/devices.jsonl"),
        (rewrite(good, tmp_path / "random.tar.gz", {"database/uplinks.jsonl": b"\x00\xffnot json\n"}),
         f"{tmp_path}/random.tar.gz: database/uplinks.jsonl line 1 is not a JSON row"),
        (rewrite(good, tmp_path / "short.tar.gz", {"database/uplinks.jsonl": b""}),
         f"{tmp_path}/short.tar.gz: database/uplinks.jsonl holds 0 rows, its manifest.json says 2"),
        (half, f"{half} is truncated or damaged (unexpected end of data)"),
        (rewrite(good, tmp_path / "foreign.tar.gz", {"config/.storage/secret.key": Fernet.generate_key()}),
         f"{tmp_path}/foreign.tar.gz: its secret key does not decrypt the device secrets stored in "
         "its database (a key file from another installation?)"),
    ]


async def _refused_and_untouched(
    config_dir: Path, cases: list[tuple[Path, str]], database_url: str | None
) -> None:
    before = fingerprint(config_dir)
    rows = await pg_rows(database_url) if database_url else None
    for path, message in cases:
        with pytest.raises(BackupError) as info:
            await restore_backup(config_dir, path)
        assert str(info.value) == message, path
        assert fingerprint(config_dir) == before, path
        if database_url:
            assert await pg_rows(database_url) == rows, path
    assert not (config_dir.parent / "x").exists()


async def _still_works(config_dir: Path) -> None:
    driver = Driver(config_dir)
    await driver.start()
    try:
        session = session_for(driver, DEVICE)
        assert (await session.join("1.0.1", 17)).code == Code.CHANGED  # secrets still decrypt
    finally:
        await driver.stop()


async def test_failed_sqlite_restores_leave_the_installation_byte_identical(
    tmp_path: Path, held_wal
) -> None:
    config_dir, good = await installation(tmp_path, None)
    cases = sqlite_cases(good, tmp_path) + unsafe_cases(good, tmp_path)
    held_wal(config_dir / "coap-driver.db")
    assert (config_dir / "coap-driver.db-wal").stat().st_size > 0
    assert (config_dir / "coap-driver.db-shm").exists()
    await _refused_and_untouched(config_dir, cases, None)


async def test_failed_postgresql_restores_leave_the_installation_identical(
    tmp_path: Path, postgres_url: str
) -> None:
    config_dir, good = await installation(tmp_path, postgres_url)
    cases = postgres_cases(good, tmp_path) + unsafe_cases(good, tmp_path)
    await _refused_and_untouched(config_dir, cases, postgres_url)
    await _still_works(config_dir)


async def test_a_failed_restore_into_a_stopped_sqlite_driver_keeps_it_working(tmp_path: Path) -> None:
    config_dir, good = await installation(tmp_path, None)
    await _refused_and_untouched(config_dir, sqlite_cases(good, tmp_path), None)
    await _still_works(config_dir)


async def test_backup_records_a_sha256_of_every_member(tmp_path: Path) -> None:
    _, good = await installation(tmp_path, None)
    content = members(good)
    manifest = json.loads(content.pop("manifest.json")[1])
    assert manifest["sha256"] == {
        name: hashlib.sha256(data).hexdigest() for name, (_, data) in content.items()
    }
    assert sorted(manifest["sha256"]) == [
        "config/.storage/secret.key", "config/configuration.yaml", "config/devices.csv",
        "database/sqlite.db",
    ]


async def test_older_backups_without_checksums_still_restore(tmp_path: Path) -> None:
    config_dir, good = await installation(tmp_path, None)
    old = rewrite(good, tmp_path / "old.tar.gz", {}, checksums=False)
    report = await restore_backup(config_dir, old)
    assert (report.rows["devices"], report.contexts_dropped) == (1, 1)
    assert (config_dir / "devices.csv").read_text() == "serial,hw_type\nF0000001,17\n"
    assert sorted(p.name for p in config_dir.iterdir() if p.name.startswith(".coap")) == []
    await _still_works(config_dir)


async def test_a_row_that_cannot_be_loaded_rolls_the_postgresql_restore_back(
    tmp_path: Path, postgres_url: str
) -> None:
    """A row that cannot be loaded (crafted archive) rolls the whole PostgreSQL restore back."""
    config_dir, good = await installation(tmp_path, postgres_url)
    content = members(good)
    uplinks = content["database/uplinks.jsonl"][1].splitlines()
    duplicated = b"\n".join([uplinks[0], uplinks[0]]) + b"\n"  # the same primary key twice
    bad = rewrite(good, tmp_path / "dup.tar.gz", {"database/uplinks.jsonl": duplicated})
    before, rows = fingerprint(config_dir), await pg_rows(postgres_url)
    with pytest.raises(BackupError) as info:
        await restore_backup(config_dir, bad)
    assert str(info.value).startswith(f"cannot restore into {postgres_url}: ")
    assert "duplicate key value violates unique constraint" in str(info.value)
    assert (fingerprint(config_dir), await pg_rows(postgres_url)) == (before, rows)
    await _still_works(config_dir)


def test_cli_restore_of_a_truncated_backup_is_one_line(tmp_path: Path) -> None:
    config = tmp_path / "config"
    write_config(config)
    added = run_cli(
        "--config", str(config), "device", "add", "--serial", "F0000009", "--hw-type", "17",
        "--sender-id", "f009", "--master-secret", "000102030405060708090a0b0c0d0e0f", cwd=tmp_path,
    )
    assert added.returncode == 0, added.stderr
    made = run_cli("--config", str(config), "backup", str(tmp_path / "b.tar.gz"), cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    data = (tmp_path / "b.tar.gz").read_bytes()
    (tmp_path / "half.tar.gz").write_bytes(data[: len(data) // 2])
    before = fingerprint(config)
    result = run_cli("--config", str(config), "restore", str(tmp_path / "half.tar.gz"), cwd=tmp_path)
    assert (result.returncode, result.stdout, result.stderr) == (
        2, "", f"coap-driver: {tmp_path}/half.tar.gz is truncated or damaged (unexpected end of data)\n"
    )
    # The one new file: the (empty) lock by which restore makes sure no driver runs; it is kept,
    # since removing a lock file another process may be opening would defeat the lock.
    assert fingerprint(config) == {**before, ".storage/driver.lock": hashlib.sha256(b"").hexdigest()}
