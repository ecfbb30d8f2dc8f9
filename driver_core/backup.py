"""`coap-driver backup FILE` / `coap-driver restore FILE`: database, keys and configuration.

A backup is one ``.tar.gz``:

* ``manifest.json``: format, driver version, schema revision, database kind,
  tables with their row counts and column kinds;
* ``config/...``: the configuration directory (configuration.yaml, secrets.yaml,
  custom components, ``.storage/secret.key``, the broker credentials) without
  the SQLite database files;
* ``database/sqlite.db`` (SQLite: a copy made with SQLite's online backup API,
  one consistent snapshot while the driver keeps writing), or
  ``database/<table>.jsonl`` (PostgreSQL: a logical dump of our tables through
  SQLAlchemy, in one REPEATABLE READ, read-only transaction: a consistent snapshot).

Restoring puts the configuration back, rebuilds the database (the backup's
schema revision, its rows, then the migrations up to this release) and then
makes sure no device can reuse an OSCORE context with old sequence numbers
(RFC 8613 B.1): the snapshot's replay windows are older than what devices sent
since, so every security context is dropped, and the key that signs JOIN R2
values gets a new epoch (runstate.py) so a JOIN recorded before the restore
cannot be replayed either. Devices are answered 4.01 "Security context not
found" at their next transmission and re-JOIN on their own (B.2).

The archive holds the secret key: keep it as carefully as the key itself.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import os
import shutil
import sqlite3
import tarfile
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy import (
    JSON,
    DateTime,
    LargeBinary,
    MetaData,
    create_engine,
    delete,
    inspect,
    select,
    text,
)
from sqlalchemy.engine import URL, Connection
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from . import __version__
from .config import CoreConfig
from .runstate import LOCK_FILE, RunLock, renew_join_epoch
from .storage.db import (
    Database,
    DatabaseError,
    alembic_config,
    head_revision,
    mask_url,
    normalize_url,
    run_migrations,
)
from .storage.models import SecurityContext
from .storage.secretbox import STORAGE_DIR

FORMAT = 1
MANIFEST = "manifest.json"
CONFIG_PREFIX = "config"
SQLITE_MEMBER = "database/sqlite.db"
TABLE_PREFIX = "database/"
VERSION_TABLE = "alembic_version"
BATCH = 1000
_SKIP_NAMES = {"__pycache__"}
_WORK_PREFIX = ".coap-driver-backup-"
_SQLITE_SUFFIXES = ("", "-wal", "-shm", "-journal")


class BackupError(Exception):
    """The backup or restore cannot be done; one line for the user."""


@dataclass
class BackupReport:
    path: Path
    database: str
    revision: str
    rows: dict[str, int]
    config_files: list[str]


@dataclass
class RestoreReport:
    path: Path
    created_at: str
    made_by: str
    database: str
    revision_from: str
    revision_to: str
    rows: dict[str, int]
    config_files: list[str]
    contexts_dropped: int
    notes: list[str] = field(default_factory=list)


# ---- column kinds: how a value is written to JSON lines and read back -------------------------


def _kind(column_type: Any) -> str:
    if isinstance(column_type, LargeBinary):
        return "binary"
    if isinstance(column_type, DateTime):
        return "datetime"
    if isinstance(column_type, JSON):
        return "json"
    return "plain"


def _encode(value: Any, kind: str) -> Any:
    if value is None:
        return None
    if kind == "binary":
        return base64.b64encode(bytes(value)).decode("ascii")
    if kind == "datetime":
        return _utc(value).isoformat()
    return value


def _decode(value: Any, kind: str) -> Any:
    if value is None:
        return None
    if kind == "binary":
        return base64.b64decode(value)
    if kind == "datetime":
        return _utc(datetime.fromisoformat(value) if isinstance(value, str) else value)
    return value


def _utc(value: datetime) -> datetime:
    """Stored times are UTC; SQLite hands them back without a zone."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# ---- which tables are ours ---------------------------------------------------------------------


def known_revisions() -> set[str]:
    script = ScriptDirectory.from_config(alembic_config())
    return {rev.revision for rev in script.walk_revisions()}


async def tables_at(revision: str) -> list[str]:
    """The tables our migrations create up to `revision` (found on a scratch SQLite file)."""
    with tempfile.TemporaryDirectory(prefix="coap-driver-schema-") as scratch:
        engine = create_async_engine(f"sqlite+aiosqlite:///{scratch}/schema.db")
        try:
            await run_migrations(engine, revision)
            async with engine.connect() as conn:
                names = await conn.run_sync(lambda c: inspect(c).get_table_names())
        finally:
            await engine.dispose()
    return sorted(name for name in names if name != VERSION_TABLE)


def _reflect(conn: Connection, names: list[str]) -> MetaData:
    metadata = MetaData()
    present = set(inspect(conn).get_table_names())
    metadata.reflect(conn, only=[n for n in names if n in present])
    return metadata


# ---- backup ---------------------------------------------------------------------------------------


def _sqlite_path(url: URL) -> Path:
    return Path(url.database or "").expanduser().resolve()


def _sqlite_snapshot(source: Path, target: Path) -> tuple[str, dict[str, dict[str, Any]]]:
    """Copy `source` with the online backup API; its revision and tables (rows, column kinds)."""
    if not source.is_file():
        raise BackupError(f"database file {source} does not exist (has the driver ever run?)")
    src = sqlite3.connect(f"file:{source}?mode=ro", uri=True, timeout=30)
    dst = sqlite3.connect(target)
    try:
        src.backup(dst)  # one step: a consistent snapshot; WAL writers are not blocked
        dst.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
        dst.commit()
    except sqlite3.Error as exc:
        raise BackupError(f"cannot back up database {source}: {exc}") from None
    finally:
        src.close()
        dst.close()
    engine = create_engine(f"sqlite:///{target}")
    try:
        with engine.connect() as conn:
            revision = _revision(conn)
            names = [n for n in inspect(conn).get_table_names() if n != VERSION_TABLE]
            metadata = _reflect(conn, names)
            tables = {
                table.name: {
                    "rows": int(conn.scalar(select(text("count(*)")).select_from(table)) or 0),
                    "columns": {c.name: _kind(c.type) for c in table.columns},
                }
                for table in metadata.sorted_tables
            }
    finally:
        engine.dispose()
    return revision, tables


def _revision(conn: Connection) -> str:
    try:
        value = conn.scalar(text(f"SELECT version_num FROM {VERSION_TABLE}"))
    except SQLAlchemyError:
        value = None
    if not value:
        raise BackupError("the database has no schema revision (never migrated by coap-driver?)")
    return str(value)


async def _postgres_dump(url: URL, directory: Path) -> tuple[str, dict[str, dict[str, Any]]]:
    """Every row of our tables as JSON lines, read in one snapshot transaction."""
    engine = create_async_engine(url, connect_args={"timeout": 10})
    tables: dict[str, dict[str, Any]] = {}
    try:
        async with engine.connect() as conn:
            conn = await conn.execution_options(
                isolation_level="REPEATABLE READ", postgresql_readonly=True
            )
            async with conn.begin():
                revision = await conn.run_sync(_revision)
                names = await tables_at(revision)
                metadata = await conn.run_sync(_reflect, names)
                for table in metadata.sorted_tables:
                    kinds = {c.name: _kind(c.type) for c in table.columns}
                    count = 0
                    path = directory / f"{table.name}.jsonl"
                    with open(path, "w", encoding="utf-8") as out:  # noqa: ASYNC230 (CLI, local disk)
                        result = await conn.stream(select(table))
                        async for row in result.mappings():
                            encoded = {k: _encode(v, kinds[k]) for k, v in row.items()}
                            out.write(json.dumps(encoded, ensure_ascii=False, separators=(",", ":")))
                            out.write("\n")
                            count += 1
                    tables[table.name] = {"rows": count, "columns": kinds}
    except (SQLAlchemyError, OSError) as exc:
        raise BackupError(f"cannot dump database {mask_url(url)}: {_one_line(exc)}") from None
    finally:
        await engine.dispose()
    return revision, tables


def _one_line(exc: BaseException) -> str:
    inner = getattr(exc, "orig", None) or exc
    return " ".join(str(inner).split("\n(Background on this error", 1)[0].split()) or type(inner).__name__


def _config_files(config_dir: Path, exclude: set[Path]) -> list[Path]:
    """Files of the configuration directory worth restoring (relative paths, sorted)."""
    found = []
    for root, dirs, files in os.walk(config_dir):
        dirs[:] = sorted(
            d for d in dirs
            if d not in _SKIP_NAMES
            and not d.startswith(_WORK_PREFIX)
            and (Path(root) / d).resolve() not in exclude
        )
        for name in sorted(files):
            path = Path(root) / name
            if path.resolve() in exclude or name.endswith((".tmp", ".tar.gz")) or not path.is_file():
                continue  # e.g. earlier backups written into the configuration directory
            if path.is_symlink():
                continue
            found.append(path.relative_to(config_dir))
    return found


async def create_backup(config: CoreConfig, target: Path) -> BackupReport:
    """Write a backup of the driver configured by `config` to `target` (replaced atomically)."""
    target = Path(target).expanduser().resolve()  # noqa: ASYNC240 (a one-shot command)
    if target.is_dir():
        raise BackupError(f"{target} is a directory; give a file name, e.g. {target}/coap-driver.tar.gz")
    if not target.parent.is_dir():
        raise BackupError(f"directory {target.parent} does not exist")
    config_dir = config.config_dir.resolve()
    url = normalize_url(config.database["url"])
    dialect = url.get_backend_name()
    exclude = {target, config_dir / STORAGE_DIR / LOCK_FILE}
    if dialect == "sqlite":
        base = _sqlite_path(url)
        exclude |= {Path(f"{base}{suffix}") for suffix in _SQLITE_SUFFIXES}
    with tempfile.TemporaryDirectory(prefix=_WORK_PREFIX, dir=target.parent) as work:
        workdir = Path(work)
        if dialect == "sqlite":
            revision, tables = await asyncio.to_thread(
                _sqlite_snapshot, _sqlite_path(url), workdir / "sqlite.db"
            )
            database_members = [(workdir / "sqlite.db", SQLITE_MEMBER)]
        else:
            (workdir / "tables").mkdir()
            revision, tables = await _postgres_dump(url, workdir / "tables")
            database_members = [
                (workdir / "tables" / f"{name}.jsonl", f"{TABLE_PREFIX}{name}.jsonl") for name in tables
            ]
        files = await asyncio.to_thread(_config_files, config_dir, exclude | {workdir.resolve()})  # noqa: ASYNC240
        manifest = {
            "format": FORMAT,
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "coap_driver_version": __version__,
            "schema_revision": revision,
            "database": dialect,
            "tables": tables,
            "config_files": [str(PurePosixPath(*f.parts)) for f in files],
        }
        partial = workdir / "backup.tar.gz"
        await asyncio.to_thread(
            _write_archive, partial, manifest, config_dir, files, database_members
        )
        os.replace(partial, target)
    return BackupReport(
        target, dialect, revision, {name: t["rows"] for name, t in tables.items()},
        manifest["config_files"],
    )


def _private(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.mode = 0o600
    return info


def _write_archive(
    path: Path,
    manifest: dict[str, Any],
    config_dir: Path,
    files: list[Path],
    database_members: list[tuple[Path, str]],
) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it holds the secret key
    with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w:gz") as archive:
        data = json.dumps(manifest, indent=1).encode()
        info = tarfile.TarInfo(MANIFEST)
        info.size, info.mode, info.mtime = len(data), 0o600, int(datetime.now(UTC).timestamp())
        archive.addfile(info, io.BytesIO(data))
        for relative in files:
            try:
                archive.add(
                    config_dir / relative,
                    arcname=str(PurePosixPath(CONFIG_PREFIX, *relative.parts)),
                    recursive=False,
                )
            except FileNotFoundError:  # removed while we were copying: nothing to keep
                continue
        for source, member in database_members:
            archive.add(source, arcname=member, recursive=False, filter=_private)
        raw.flush()
        os.fsync(raw.fileno())


# ---- restore --------------------------------------------------------------------------------------


def read_manifest(archive: tarfile.TarFile, path: Path) -> dict[str, Any]:
    try:
        member = archive.getmember(MANIFEST)
        handle = archive.extractfile(member)
        assert handle is not None
        manifest = json.loads(handle.read())
    except (KeyError, AssertionError):
        raise BackupError(f"{path} is not a coap-driver backup (no {MANIFEST})") from None
    except ValueError as exc:
        raise BackupError(f"{path}: damaged {MANIFEST}: {exc}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("format"), int):
        raise BackupError(f"{path}: damaged {MANIFEST}: no format number")
    if manifest["format"] > FORMAT:
        raise BackupError(
            f"{path} was written in backup format {manifest['format']} by coap-driver "
            f"{manifest.get('coap_driver_version', '?')}; this release reads format {FORMAT}: "
            "restore it with that release or a newer one"
        )
    revision = manifest.get("schema_revision")
    if revision not in known_revisions():
        raise BackupError(
            f"{path} holds database schema revision {revision!r}, which this release "
            f"({__version__}, newest schema {head_revision()!r}) does not know: restore it with "
            f"coap-driver {manifest.get('coap_driver_version', '?')} or newer"
        )
    if manifest.get("database") not in ("sqlite", "postgresql"):
        raise BackupError(f"{path}: unknown database kind {manifest.get('database')!r}")
    return manifest


def _open_archive(path: Path) -> tarfile.TarFile:
    try:
        return tarfile.open(path, mode="r:gz")
    except FileNotFoundError:
        raise BackupError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise BackupError(f"{path} is a directory, not a backup file") from None
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise BackupError(f"{path} is not a coap-driver backup (not a .tar.gz: {exc})") from None


def _safe_config_members(archive: tarfile.TarFile, path: Path) -> list[tuple[tarfile.TarInfo, PurePosixPath]]:
    """Regular files under config/, with paths that stay inside the configuration directory."""
    members = []
    for member in archive.getmembers():
        name = PurePosixPath(member.name)
        if not name.parts or name.parts[0] != CONFIG_PREFIX:
            continue
        relative = PurePosixPath(*name.parts[1:])
        if (
            not member.isfile()
            or name.is_absolute()
            or ".." in name.parts
            or not relative.parts
        ):
            raise BackupError(f"{path}: refusing unsafe member {member.name!r}")
        members.append((member, relative))
    return members


def _extract_config(
    archive: tarfile.TarFile, members: list[tuple[tarfile.TarInfo, PurePosixPath]], config_dir: Path
) -> list[str]:
    written = []
    for member, relative in members:
        target = config_dir.joinpath(*relative.parts)
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        source = archive.extractfile(member)
        assert source is not None
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, member.mode & 0o777 or 0o600)
        with os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(source, out)
        os.replace(tmp, target)
        written.append(str(relative))
    return written


async def _drop_ours(engine: AsyncEngine, names: set[str]) -> None:
    """Drop our tables (and the revision table) from a database that may hold others' too."""

    def drop(conn: Connection) -> None:
        metadata = _reflect(conn, sorted(names | {VERSION_TABLE}))
        metadata.drop_all(conn)

    async with engine.begin() as conn:
        await conn.run_sync(drop)


def _rows_from_sqlite(path: Path, table: str) -> Iterator[dict[str, Any]]:
    engine = create_engine(f"sqlite:///{path}")
    try:
        with engine.connect() as conn:
            reflected = _reflect(conn, [table]).tables[table]
            yield from (dict(row) for row in conn.execute(select(reflected)).mappings())
    finally:
        engine.dispose()


def _rows_from_jsonl(archive: tarfile.TarFile, table: str) -> Iterator[dict[str, Any]]:
    try:
        handle = archive.extractfile(f"{TABLE_PREFIX}{table}.jsonl")
    except KeyError:
        raise BackupError(f"the backup lacks {TABLE_PREFIX}{table}.jsonl") from None
    assert handle is not None
    for line in io.TextIOWrapper(handle, encoding="utf-8"):
        if line.strip():
            yield json.loads(line)


async def _load_rows(
    engine: AsyncEngine,
    tables: dict[str, dict[str, Any]],
    rows_of: Any,
) -> dict[str, int]:
    """Insert every table's rows (parents first), then move PostgreSQL sequences past them."""
    counts: dict[str, int] = {}

    def load(conn: Connection) -> None:
        metadata = _reflect(conn, list(tables))
        for table in metadata.sorted_tables:
            kinds = tables[table.name]["columns"]
            columns = set(table.columns.keys())
            batch: list[dict[str, Any]] = []
            count = 0
            for raw in rows_of(table.name):
                batch.append({k: _decode(v, kinds.get(k, "plain")) for k, v in raw.items() if k in columns})
                if len(batch) >= BATCH:
                    conn.execute(table.insert(), batch)
                    count += len(batch)
                    batch = []
            if batch:
                conn.execute(table.insert(), batch)
                count += len(batch)
            counts[table.name] = count
            if conn.dialect.name == "postgresql":
                _advance_sequences(conn, table)

    async with engine.begin() as conn:
        await conn.run_sync(load)
    return counts


def _advance_sequences(conn: Connection, table: Any) -> None:
    for column in table.primary_key.columns:
        sequence = conn.scalar(
            text("SELECT pg_get_serial_sequence(:table, :column)"),
            {"table": f'"{table.name}"', "column": column.name},
        )
        if sequence:
            conn.execute(
                text(
                    f'SELECT setval(:sequence, COALESCE((SELECT max("{column.name}") FROM '
                    f'"{table.name}"), 1), (SELECT count(*) > 0 FROM "{table.name}"))'
                ),
                {"sequence": sequence},
            )


@contextlib.asynccontextmanager
async def _engine(url: URL) -> AsyncIterator[AsyncEngine]:
    kwargs: dict[str, Any] = {}
    if url.get_backend_name() == "postgresql":
        kwargs["connect_args"] = {"timeout": 10}
    engine = create_async_engine(url, **kwargs)
    try:
        yield engine
    finally:
        await engine.dispose()


async def restore_backup(
    config_dir: Path, source: Path, database_url: str | None = None
) -> RestoreReport:
    """Restore `source` into `config_dir` and its database; the driver must not be running.

    `database_url` restores into another database than the restored configuration's
    (e.g. an SQLite backup into PostgreSQL); set database.url to it afterwards.
    """
    source = Path(source).expanduser().resolve()  # noqa: ASYNC240 (a one-shot command)
    config_dir = Path(config_dir).resolve()  # noqa: ASYNC240
    lock = RunLock(config_dir)
    lock.acquire_exclusive()
    try:
        with _open_archive(source) as archive:
            manifest = read_manifest(archive, source)
            members = _safe_config_members(archive, source)
            written = await asyncio.to_thread(_extract_config, archive, members, config_dir)
            from .driver import Driver  # the restored configuration names the database

            config = Driver(config_dir).load()
            url = normalize_url(database_url or config.database["url"])
            tables: dict[str, dict[str, Any]] = manifest.get("tables") or {}
            revision = manifest["schema_revision"]
            with tempfile.TemporaryDirectory(prefix="coap-driver-restore-") as work:
                sqlite_copy: Path | None = None
                if manifest["database"] == "sqlite":
                    sqlite_copy = Path(work) / "sqlite.db"
                    try:
                        member = archive.getmember(SQLITE_MEMBER)
                    except KeyError:
                        raise BackupError(f"{source}: the backup lacks {SQLITE_MEMBER}") from None
                    await asyncio.to_thread(_extract_to, archive, member, sqlite_copy)
                counts = await _restore_database(url, archive, revision, tables, sqlite_copy)
        dropped = await _drop_contexts(url)
        renew_join_epoch(config_dir)
    except DatabaseError as exc:
        raise BackupError(str(exc)) from None
    finally:
        lock.release()
    return RestoreReport(
        source,
        manifest.get("created_at", "?"),
        manifest.get("coap_driver_version", "?"),
        url.get_backend_name(),
        revision,
        head_revision(),
        counts,
        written,
        dropped,
    )


def _extract_to(archive: tarfile.TarFile, member: tarfile.TarInfo, target: Path) -> None:
    handle = archive.extractfile(member)
    assert handle is not None
    with open(target, "wb") as out:
        shutil.copyfileobj(handle, out)


async def _restore_database(
    url: URL,
    archive: tarfile.TarFile,
    revision: str,
    tables: dict[str, dict[str, Any]],
    sqlite_copy: Path | None,
) -> dict[str, int]:
    if url.get_backend_name() == "sqlite":
        target = _sqlite_path(url)
        if not target.parent.is_dir():
            raise BackupError(f"cannot restore the database: directory {target.parent} does not exist")
        for suffix in _SQLITE_SUFFIXES:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{target}{suffix}")
        if sqlite_copy is not None:  # the snapshot itself becomes the database
            shutil.copyfile(sqlite_copy, target)
            os.chmod(target, 0o600)
            await _migrate(url)
            return {name: int(t.get("rows", 0)) for name, t in tables.items()}
    async with _engine(url) as engine:
        try:
            if url.get_backend_name() != "sqlite":
                await _drop_ours(engine, set(await tables_at("head")) | set(tables))
            await run_migrations(engine, revision)
            if sqlite_copy is not None:
                copy = sqlite_copy
                counts = await _load_rows(engine, tables, lambda name: _rows_from_sqlite(copy, name))
            else:
                counts = await _load_rows(
                    engine, tables, lambda name: _rows_from_jsonl(archive, name)
                )
            await run_migrations(engine, "head")
        except (SQLAlchemyError, CommandError) as exc:
            raise BackupError(f"cannot restore into {mask_url(url)}: {_one_line(exc)}") from None
        except OSError as exc:
            raise BackupError(f"cannot restore into {mask_url(url)}: {exc}") from None
    return counts


async def _migrate(url: URL) -> None:
    db = Database(url.render_as_string(hide_password=False))
    await db.start()  # upgrades to this release's schema
    await db.stop()


async def _drop_contexts(url: URL) -> int:
    """Every OSCORE context of the snapshot is older than what the devices used since."""
    async with _engine(url) as engine, engine.begin() as conn:
        result = await conn.execute(delete(SecurityContext))
        return int(result.rowcount or 0)
