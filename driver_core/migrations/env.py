"""Alembic environment for coap-driver.

Normally driver_core.storage.db hands us an open connection through
``config.attributes["connection"]`` (so migrations run inside the app's async
engine). Without one, ``sqlalchemy.url`` is used, which lets the stock
``alembic`` commands (e.g. ``revision --autogenerate``) work with a Config
built by ``driver_core.storage.db.alembic_config(url)``.
"""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from driver_core.storage.models import Base

config = context.config
target_metadata = Base.metadata


def _configure_kwargs(dialect_name: str) -> dict[str, object]:
    # SQLite cannot ALTER most things: batch mode makes future migrations
    # (and autogenerate) rebuild tables instead.
    return {
        "target_metadata": target_metadata,
        "render_as_batch": dialect_name == "sqlite",
        "compare_type": True,
    }


def _run_with_connection(connection: Connection) -> None:
    context.configure(connection=connection, **_configure_kwargs(connection.dialect.name))
    with context.begin_transaction():
        context.run_migrations()


async def _run_with_url(url: str) -> None:
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(_run_with_connection)
    finally:
        await engine.dispose()


def run_offline() -> None:
    url = config.get_main_option("sqlalchemy.url")
    dialect = url.split(":", 1)[0].split("+", 1)[0] if url else ""
    context.configure(url=url, literal_binds=True, **_configure_kwargs(dialect))
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run_with_connection(connection)
        return
    asyncio.run(_run_with_url(config.get_main_option("sqlalchemy.url") or ""))


if context.is_offline_mode():
    run_offline()
else:
    run_online()
