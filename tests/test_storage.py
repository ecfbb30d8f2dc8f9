"""Database start-up, migrations, schema equality and the secret box, on real databases."""

from __future__ import annotations

import asyncio
import logging
import socket
import stat
import threading
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text

from driver_core.storage.db import (
    Database,
    DatabaseError,
    current_revision,
    head_revision,
    mask_url,
)
from driver_core.storage.models import Base
from driver_core.storage.secretbox import SecretBox, SecretBoxError

TABLES = {
    "devices", "security_contexts", "uplinks", "mqtt_outbox", "integration_settings",
    "downlinks", "downlink_events", "api_tokens", "users",
    "firmware_images", "firmware_targets", "firmware_updates", "instances",
}


def _schema_diff(database: Database):
    async def run():
        async with database.engine.connect() as conn:
            return await conn.run_sync(
                lambda sync: compare_metadata(
                    MigrationContext.configure(sync, opts={"compare_type": True}), Base.metadata
                )
            )

    return run()


async def _open_error(url: str) -> str:
    db = Database(url)
    with pytest.raises(DatabaseError) as info:
        await db.start()
    # No chained traceback for the user to wade through.
    assert info.value.__cause__ is None
    assert info.value.__context__ is None or info.value.__suppress_context__
    message = str(info.value)
    assert "\n" not in message
    return message


def _free_tcp_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- migrations -------------------------------------------------------------------------------


async def test_migrates_empty_database_to_head(database: Database) -> None:
    assert head_revision() == "0007"
    assert await current_revision(database.engine) == head_revision()
    async with database.engine.connect() as conn:
        tables = await conn.run_sync(lambda sync: set(inspect(sync).get_table_names()))
    assert tables == TABLES | {"alembic_version"}


async def test_migrated_schema_equals_models(database: Database) -> None:
    assert await _schema_diff(database) == []


async def test_schema_comparison_sees_a_missing_index(database: Database) -> None:
    """Guards the test above: the comparison really looks at the database."""
    async with database.engine.begin() as conn:
        await conn.execute(text("DROP INDEX ix_uplinks_received_at"))
    diff = await _schema_diff(database)
    assert [(op, index.name) for op, index in diff] == [("add_index", "ix_uplinks_received_at")]


async def test_restart_keeps_data_and_revision(db_url: str) -> None:
    db = Database(db_url)
    await db.start()
    async with db.session() as session, session.begin():
        await session.execute(
            text(
                "INSERT INTO mqtt_outbox (serial, document, created_at) "
                "VALUES ('A1', '{}', CURRENT_TIMESTAMP)"
            )
        )
    await db.stop()
    await db.start()
    try:
        assert await current_revision(db.engine) == "0007"
        async with db.session() as session:
            assert (await session.execute(text("SELECT serial FROM mqtt_outbox"))).all() == [
                ("A1",)
            ]
    finally:
        await db.stop()


async def test_sqlite_pragmas(sqlite_url: str) -> None:
    db = Database(sqlite_url)
    await db.start()
    try:
        async with db.session() as session:
            values = [
                (await session.execute(text(f"PRAGMA {name}"))).scalar_one()
                for name in ("journal_mode", "foreign_keys", "synchronous")
            ]
        assert values == ["wal", 1, 1]  # synchronous 1 = NORMAL
    finally:
        await db.stop()


async def test_plain_driver_names_select_async_drivers(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'plain.db'}")
    await db.start()
    try:
        assert db.engine.url.drivername == "sqlite+aiosqlite"
        assert db.dialect == "sqlite"
    finally:
        await db.stop()


async def test_session_before_start_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match=r"^Database\.start\(\) has not been called$"):
        Database("sqlite+aiosqlite:///x.db").session()


# --- clear errors -----------------------------------------------------------------------------


async def test_unreachable_postgres_is_one_line_with_password_masked() -> None:
    port = _free_tcp_port()
    message = await _open_error(f"postgresql+asyncpg://root:s3cret@127.0.0.1:{port}/coap")
    assert message == (
        f"cannot open database postgresql+asyncpg://root:***@127.0.0.1:{port}/coap: "
        f"[Errno 111] Connect call failed ('127.0.0.1', {port})"
    )


async def test_missing_postgres_database(postgres_url: str) -> None:
    url = postgres_url + "_missing"
    name = url.rsplit("/", 1)[1]
    assert await _open_error(url) == f'cannot open database {url}: database "{name}" does not exist'


async def test_sqlite_directory_missing(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/nope/driver.db"
    assert await _open_error(url) == (
        f"cannot open database {url}: directory {tmp_path}/nope does not exist"
    )


async def test_sqlite_file_cannot_be_created(tmp_path: Path) -> None:
    (tmp_path / "adir").mkdir()
    url = f"sqlite+aiosqlite:///{tmp_path}/adir"
    assert await _open_error(url) == f"cannot open database {url}: unable to open database file"


def _aiosqlite_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.endswith("(_connection_worker_thread)")}


def test_a_failed_sqlite_open_leaves_no_thread_to_outlive_the_loop(tmp_path: Path) -> None:
    """The CLI closes its event loop right after the one-line error; a connection thread still
    finishing then dies with "Event loop is closed" and prints a traceback. Each attempt here
    closes its loop as soon as start() has failed."""
    (tmp_path / "adir").mkdir()
    url = f"sqlite+aiosqlite:///{tmp_path}/adir"
    died: list[str] = []
    previous = threading.excepthook
    threading.excepthook = lambda args: died.append(repr(args.exc_value))
    try:
        for _ in range(20):
            before = _aiosqlite_threads()
            with pytest.raises(DatabaseError, match="unable to open database file$"):
                asyncio.run(Database(url).start())
            for thread in _aiosqlite_threads() - before:
                thread.join(timeout=10)
    finally:
        threading.excepthook = previous
    assert died == []


async def test_sqlite_file_is_not_a_database(tmp_path: Path) -> None:
    path = tmp_path / "junk.db"
    path.write_bytes(b"this is not sqlite" * 100)
    url = f"sqlite+aiosqlite:///{path}"
    assert await _open_error(url) == f"cannot open database {url}: file is not a database"


async def test_database_from_a_newer_release(db_url: str) -> None:
    db = Database(db_url)
    await db.start()
    async with db.session() as session, session.begin():
        await session.execute(text("UPDATE alembic_version SET version_num = '0099'"))
    await db.stop()
    message = await _open_error(db_url)
    assert message.startswith(
        f"cannot migrate database {mask_url(db_url)}: it is at schema revision '0099', which "
        f"this version of coap-driver does not know (newest known: '{head_revision()}'); was it written by a "
        "newer release? ("
    )


@pytest.mark.parametrize(
    ("url", "message"),
    [
        (
            "mysql://u:pw@host/db",
            "unsupported database URL 'mysql://u:***@host/db': use sqlite+aiosqlite:///<file> "
            "or postgresql+asyncpg://user:password@host/database",
        ),
        (
            "not a url",
            "invalid database URL 'not a url': Could not parse SQLAlchemy URL from given URL "
            "string",
        ),
        (
            "sqlite+aiosqlite://",
            "unsupported database URL 'sqlite+aiosqlite://': an in-memory SQLite database would "
            "lose everything at exit; give a file, e.g. sqlite+aiosqlite:///config/coap-driver.db",
        ),
    ],
)
async def test_bad_urls(url: str, message: str) -> None:
    assert await _open_error(url) == message


# --- secret box -------------------------------------------------------------------------------


def test_key_file_created_private_and_reused(tmp_path: Path) -> None:
    box = SecretBox.load_or_create(tmp_path)
    key_file = tmp_path / ".storage" / "secret.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(key_file.parent.stat().st_mode) == 0o700
    token = box.encrypt(b"\x01" * 16)
    assert b"\x01" * 16 not in token
    again = SecretBox.load_or_create(tmp_path)
    assert again.decrypt(token) == b"\x01" * 16
    assert key_file.read_bytes() == (tmp_path / ".storage" / "secret.key").read_bytes()


def test_key_never_logged_or_shown(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    box = SecretBox.load_or_create(tmp_path)
    key = (tmp_path / ".storage" / "secret.key").read_text().strip()
    assert key not in caplog.text
    assert key not in repr(box)
    assert f"Created secret key file {tmp_path}/.storage/secret.key" in caplog.text


def test_derive_key(tmp_path: Path) -> None:
    box = SecretBox.load_or_create(tmp_path / "a")
    k1 = box.derive_key(b"join-r2")
    assert len(k1) == 32
    assert SecretBox.load_or_create(tmp_path / "a").derive_key(b"join-r2") == k1
    assert box.derive_key(b"other") != k1
    assert SecretBox.load_or_create(tmp_path / "b").derive_key(b"join-r2") != k1


@pytest.mark.parametrize("content", [b"", b"garbage\n", b"A" * 44 + b"\n", b"\xff\xfe" * 22])
def test_corrupt_key_file_names_the_file(tmp_path: Path, content: bytes) -> None:
    key_file = tmp_path / ".storage" / "secret.key"
    key_file.parent.mkdir(mode=0o700)
    key_file.write_bytes(content)
    key_file.chmod(0o600)
    with pytest.raises(SecretBoxError) as info:
        SecretBox.load_or_create(tmp_path)
    assert str(info.value) == (
        f"secret key file {key_file} is corrupt: expected a Fernet key (32 bytes, url-safe "
        "base64); restore it from a backup, without it the stored device secrets cannot be "
        "decrypted"
    )


def test_key_path_unusable(tmp_path: Path) -> None:
    (tmp_path / ".storage").write_text("a file where the directory should be")
    with pytest.raises(SecretBoxError) as info:
        SecretBox.load_or_create(tmp_path)
    assert str(info.value) == (
        f"cannot use secret key file {tmp_path}/.storage/secret.key: File exists"
    )


def test_decrypt_with_another_key(tmp_path: Path) -> None:
    token = SecretBox.load_or_create(tmp_path / "a").encrypt(b"secret")
    other = SecretBox.load_or_create(tmp_path / "b")
    with pytest.raises(SecretBoxError) as info:
        other.decrypt(token)
    assert str(info.value) == (
        f"cannot decrypt a stored secret with the key in {tmp_path}/b/.storage/secret.key: "
        "the key file was replaced or the data is damaged"
    )


def test_loose_key_permissions_warn(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    SecretBox.load_or_create(tmp_path)
    key_file = tmp_path / ".storage" / "secret.key"
    key_file.chmod(0o644)
    caplog.set_level(logging.WARNING)
    SecretBox.load_or_create(tmp_path)
    assert caplog.messages == [
        f"Secret key file {key_file} is readable by other users (mode 644); run chmod 600 on it"
    ]


async def test_outbox_ids_are_never_reused_even_when_the_table_empties(database: Database) -> None:
    """The MQTT publisher orders by id and skips ids it has handed out already."""
    from sqlalchemy import delete, insert

    from driver_core.storage.models import OutboxMessage
    from driver_core.timefmt import utcnow

    async with database.session() as session, session.begin():
        first = (
            await session.execute(
                insert(OutboxMessage)
                .values(serial="A1", document="{}", created_at=utcnow())
                .returning(OutboxMessage.id)
            )
        ).scalar_one()
        await session.execute(delete(OutboxMessage))
        second = (
            await session.execute(
                insert(OutboxMessage)
                .values(serial="A1", document="{}", created_at=utcnow())
                .returning(OutboxMessage.id)
            )
        ).scalar_one()
    assert second == first + 1
