"""Database fixtures: real SQLite files and real PostgreSQL databases, one per test.

Import with ``pytest_plugins = ["tests.storage_fixtures"]`` (or from tests/conftest.py).
PostgreSQL runs on 127.0.0.1:5432 with trust auth; each test gets its own
uniquely named database, dropped afterwards, so parallel runs never collide.
A missing PostgreSQL server fails the test (it is not skipped).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from driver_core.storage.db import Database
from driver_core.storage.secretbox import SecretBox

PG_HOST = "127.0.0.1"
PG_PORT = 5432
PG_USERS = ("root", "postgres")
PG_ADMIN_DB = "test"


async def _admin_connection() -> tuple[asyncpg.Connection, str]:
    last: Exception | None = None
    for user in PG_USERS:
        try:
            conn = await asyncpg.connect(
                host=PG_HOST, port=PG_PORT, user=user, database=PG_ADMIN_DB, timeout=10
            )
        except (OSError, asyncpg.PostgresError) as exc:
            last = exc
            continue
        return conn, user
    raise RuntimeError(f"PostgreSQL on {PG_HOST}:{PG_PORT} is not usable: {last}")


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'coap-driver.db'}"


@pytest.fixture
async def postgres_url() -> AsyncIterator[str]:
    name = f"coapdrv_{os.getpid()}_{uuid.uuid4().hex[:12]}"
    conn, user = await _admin_connection()
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    try:
        yield f"postgresql+asyncpg://{user}@{PG_HOST}:{PG_PORT}/{name}"
    finally:
        conn, _ = await _admin_connection()
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()


@pytest.fixture(params=["sqlite_url", "postgres_url"], ids=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest) -> str:
    """Each test using it runs once on SQLite and once on PostgreSQL."""
    return request.getfixturevalue(request.param)


@pytest.fixture
async def database(db_url: str) -> AsyncIterator[Database]:
    db = Database(db_url)
    await db.start()
    try:
        yield db
    finally:
        await db.stop()


@pytest.fixture
def secret_box(tmp_path: Path) -> SecretBox:
    return SecretBox.load_or_create(tmp_path / "config")
