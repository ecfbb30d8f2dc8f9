"""Async engine, sessions and schema migrations for SQLite and PostgreSQL.

The schema is owned by Alembic (driver_core/migrations), never by
``create_all``: every start upgrades the database to the newest revision so an
upgraded driver can open an older database file.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from threading import Thread
from typing import Any, TypeVar

import aiosqlite
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy import create_engine, event
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import Session

from ..permissions import create_private_file
from .health import WriteHealth, is_storage_failure

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"

# Plain driver names a user may write, mapped to the async drivers we ship.
_ASYNC_DRIVERS = {
    "sqlite": "sqlite+aiosqlite",
    "postgresql": "postgresql+asyncpg",
    "postgres": "postgresql+asyncpg",
}
_SUPPORTED = {"sqlite+aiosqlite", "postgresql+asyncpg"}
_PG_CONNECT_TIMEOUT_S = 10
SQLITE_SUFFIXES = ("", "-wal", "-shm", "-journal")
# PostgreSQL's read_only_sql_transaction: a hot standby, or default_transaction_read_only set.
_PG_READ_ONLY = "25006"
T = TypeVar("T")


class DatabaseError(Exception):
    """The database cannot be opened or migrated; the message is one line for the user."""


def mask_url(url: str | URL) -> str:
    """The URL as text with its password replaced by ``***`` (safe for logs and errors)."""
    if isinstance(url, URL):
        return url.render_as_string(hide_password=True)
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # unparsable: mask anything that looks like user:password@
        return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


def normalize_url(url: str) -> URL:
    """Parse ``url`` and pick the async driver (``sqlite://`` -> ``sqlite+aiosqlite://``)."""
    try:
        parsed = make_url(url)
    except Exception as exc:
        raise DatabaseError(f"invalid database URL {mask_url(url)!r}: {_reason(exc)}") from None
    name = _ASYNC_DRIVERS.get(parsed.drivername, parsed.drivername)
    if name not in _SUPPORTED:
        raise DatabaseError(
            f"unsupported database URL {mask_url(parsed)!r}: use sqlite+aiosqlite:///<file> "
            "or postgresql+asyncpg://user:password@host/database"
        )
    return parsed.set(drivername=name)


def alembic_config(url: str | URL | None = None) -> Config:
    """An Alembic Config for our migrations without an alembic.ini file.

    With ``url`` the stock commands (``command.revision(cfg, autogenerate=True)``,
    ``command.upgrade``) work on their own; the driver itself passes a connection.
    """
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url is not None:
        # ConfigParser interpolation: a literal '%' must be doubled.
        text = url.render_as_string(hide_password=False) if isinstance(url, URL) else url
        cfg.set_main_option("sqlalchemy.url", text.replace("%", "%%"))
    return cfg


def head_revision() -> str:
    """The newest migration revision this code knows."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def _upgrade_sync(connection: Connection, revision: str) -> None:
    cfg = alembic_config()
    cfg.attributes["connection"] = connection
    command.upgrade(cfg, revision)


def _current_sync(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


async def run_migrations(engine: AsyncEngine, revision: str = "head") -> None:
    """Upgrade the database behind ``engine`` to ``revision`` (one transaction on PostgreSQL).

    Raises DatabaseError when the database is at a revision this code does not
    know (written by a newer release) or a migration step fails.
    """
    try:
        async with engine.begin() as conn:
            await conn.run_sync(_upgrade_sync, revision)
    except CommandError as exc:
        current = await current_revision(engine)
        raise DatabaseError(
            f"cannot migrate database {mask_url(engine.url)}: it is at schema revision "
            f"{current!r}, which this version of coap-driver does not know "
            f"(newest known: {head_revision()!r}); was it written by a newer release? "
            f"({_reason(exc)})"
        ) from None
    except SQLAlchemyError as exc:
        raise DatabaseError(
            f"cannot migrate database {mask_url(engine.url)}: {_reason(exc)}"
        ) from None


async def current_revision(engine: AsyncEngine) -> str | None:
    """The schema revision stored in the database (None for an empty database)."""
    async with engine.connect() as conn:
        return await conn.run_sync(_current_sync)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets readers (web panel) run while the CoAP side writes; NORMAL is
    # durable in WAL mode except for the last commits on power loss; foreign
    # keys make ON DELETE CASCADE work.
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
    finally:
        cursor.close()


def _sqlite_connect_via_joining_creator(
    _dialect: Any, _record: Any, _cargs: Any, cparams: dict[str, Any]
) -> None:
    """Open SQLite connections through `_connect_aiosqlite` (SQLAlchemy's creator hook)."""
    cparams["async_creator_fn"] = _connect_aiosqlite


async def _connect_aiosqlite(*args: Any, **kwargs: Any) -> aiosqlite.Connection:
    """`aiosqlite.connect`, which on failure returns only once the connection's thread has ended.

    aiosqlite queues the stop of a connection that failed to open without waiting for it: when
    the event loop closes first (the CLI exits right after the one-line error), the thread dies
    with "Event loop is closed" and prints a traceback.
    """
    connection = aiosqlite.connect(*args, **kwargs)
    thread: Thread = connection if isinstance(connection, Thread) else connection._thread
    thread.daemon = True  # as SQLAlchemy sets it: a pooled connection never blocks the exit
    try:
        return await connection
    except BaseException:
        await asyncio.to_thread(thread.join)
        raise


def _read_only_is_a_disconnect(context: Any) -> None:
    """A write refused because the *session* is read-only: drop the pooled connections.

    Read-only mode sticks to a connection for its life (an operator's
    `default_transaction_read_only`, or a standby reached after a failover), so
    without this the driver would keep refusing writes after the database takes
    them again. Treated as a disconnect, the next write opens a fresh connection.
    """
    if getattr(context.original_exception, "sqlstate", None) == _PG_READ_ONLY:
        context.is_disconnect = True


def _reason(exc: BaseException) -> str:
    """One line describing ``exc`` without SQLAlchemy's SQL echo and help links."""
    inner: BaseException = exc
    if isinstance(exc, DBAPIError) and exc.orig is not None:
        inner = exc.orig
    text = str(inner) or type(inner).__name__
    text = text.split("\n(Background on this error", 1)[0]
    return " ".join(text.split())


class Database:
    """The driver's database: one async engine, sessions, migrations at start."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._engine: AsyncEngine | None = None
        self._sessions: async_sessionmaker[AsyncSession] | None = None
        # SQLite only: a synchronous engine used from one writer thread (see run_write).
        self._sync_engine: Engine | None = None
        self._writer_thread: ThreadPoolExecutor | None = None
        # Called with the seconds each run_write took (the metrics' write latency).
        self.write_observer: Callable[[float], None] | None = None
        # Whether run_write succeeds: the log, /metrics and the Status page show it.
        self.health = WriteHealth(mask_url(url))
        # Cluster mode (driver_core.cluster): this instance's id, which owns the outbox
        # rows it writes, and whether it is the one delivering downlink events.
        # Every session carries the id in `session.info["instance_id"]`.
        self.instance_id: int | None = None
        self.leads_downlink_events = True

    @property
    def engine(self) -> AsyncEngine:
        if self._engine is None:
            raise RuntimeError("Database.start() has not been called")
        return self._engine

    @property
    def dialect(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return self.engine.dialect.name

    async def start(self) -> None:
        """Connect, apply the SQLite pragmas and migrate to the newest schema.

        Raises DatabaseError (one line, password masked) when the database
        cannot be reached, created or migrated.
        """
        if self._engine is not None:
            return
        url = normalize_url(self.url)
        shown = mask_url(url)
        kwargs: dict[str, Any] = {}
        if url.get_backend_name() == "sqlite":
            prepare_sqlite_file(url, shown)
        elif "timeout" not in url.query:
            kwargs["connect_args"] = {"timeout": _PG_CONNECT_TIMEOUT_S}
        # Statement parameters carry settings (broker passwords) and device data: never
        # in SQLAlchemy's log lines or error messages.
        engine = create_async_engine(url, hide_parameters=True, **kwargs)
        if engine.dialect.name == "sqlite":
            event.listen(engine.sync_engine, "do_connect", _sqlite_connect_via_joining_creator)
            event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        else:
            event.listen(engine.sync_engine, "handle_error", _read_only_is_a_disconnect)
        try:
            async with engine.connect():
                pass
        except Exception as exc:
            await engine.dispose()
            reason = _reason(exc)
            if url.password:
                reason = reason.replace(str(url.password), "***")
            raise DatabaseError(f"cannot open database {shown}: {reason}") from None
        try:
            await run_migrations(engine)
        except BaseException:
            await engine.dispose()
            raise
        self._engine = engine
        self._sessions = async_sessionmaker(engine, expire_on_commit=False)
        if engine.dialect.name == "sqlite":
            self._sync_engine = create_engine(url.set(drivername="sqlite"), hide_parameters=True)
            event.listen(self._sync_engine, "connect", _sqlite_pragmas)
            self._writer_thread = ThreadPoolExecutor(1, thread_name_prefix="sqlite-writer")

    async def stop(self) -> None:
        if self._writer_thread is not None:
            self._writer_thread.shutdown(wait=True)
            self._writer_thread = None
        if self._sync_engine is not None:
            self._sync_engine.dispose()
            self._sync_engine = None
        if self._engine is not None:
            await self._engine.dispose()
        self._engine = None
        self._sessions = None

    async def run_write(self, work: Callable[[Session], T]) -> T:
        """Run `work(session)` in one transaction on a synchronous Session; commit; return its result.

        This is the hot path's way to write. With SQLite every statement of the
        async driver is a hop to aiosqlite's thread; here the whole transaction
        runs in one dedicated thread, so a batch costs one hop. PostgreSQL's
        driver is natively async: the work runs in the loop through run_sync.
        """
        started = time.perf_counter()
        try:
            if self._sync_engine is not None and self._writer_thread is not None:
                result = await asyncio.get_running_loop().run_in_executor(
                    self._writer_thread, self._run_sync, work
                )
            else:
                async with self.session() as session, session.begin():
                    result = await session.run_sync(work)
        except Exception as exc:
            if is_storage_failure(exc):
                self.health.failed(_reason(exc))
            raise
        finally:
            if self.write_observer is not None:
                self.write_observer(time.perf_counter() - started)
        self.health.succeeded()
        return result

    def _run_sync(self, work: Callable[[Session], T]) -> T:
        assert self._sync_engine is not None
        with Session(self._sync_engine, expire_on_commit=False) as session, session.begin():
            session.info["instance_id"] = self.instance_id
            return work(session)

    def session(self) -> AsyncSession:
        """A new session; use as ``async with db.session() as s:``."""
        if self._sessions is None:
            raise RuntimeError("Database.start() has not been called")
        session = self._sessions()
        session.info["instance_id"] = self.instance_id
        return session


def _check_sqlite_location(url: URL, shown: str) -> None:
    """Say *why* SQLite cannot create the file (it only reports 'unable to open')."""
    database = url.database or ""
    if database in ("", ":memory:") or database.startswith("file:"):
        raise DatabaseError(
            f"unsupported database URL {shown!r}: an in-memory SQLite database would lose "
            "everything at exit; give a file, e.g. sqlite+aiosqlite:///config/coap-driver.db"
        )
    parent = Path(database).expanduser().resolve().parent
    if not parent.is_dir():
        raise DatabaseError(f"cannot open database {shown}: directory {parent} does not exist")


def prepare_sqlite_file(url: URL, shown: str) -> None:
    """Check where the SQLite file goes and create it owner-only if it is new.

    SQLite would create it with 0644 & ~umask, and gives its -wal/-shm files the
    database file's mode: a file we create 0600 first keeps all three private.
    """
    _check_sqlite_location(url, shown)
    try:
        create_private_file(Path(url.database or "").expanduser())
    except OSError as exc:  # e.g. a directory the driver's user may not write
        raise DatabaseError(f"cannot open database {shown}: {exc.strerror or exc}") from None


def sqlite_files(url: str) -> list[Path]:
    """The SQLite database file and its companions (-wal, -shm, -journal); [] for PostgreSQL."""
    try:
        parsed = normalize_url(url)
    except DatabaseError:
        return []  # Database.start() reports it
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database.startswith("file:"):
        return []
    base = Path(parsed.database).expanduser()
    return [Path(f"{base}{suffix}") for suffix in SQLITE_SUFFIXES]
