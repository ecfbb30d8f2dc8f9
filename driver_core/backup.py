"""`coap-driver backup FILE` / `coap-driver restore FILE`: database, keys and configuration.

A backup is one ``.tar.gz``:

* ``manifest.json``: format, driver version, schema revision, database kind,
  tables with their row counts and column kinds, the sha256 of every other member;
* ``config/...``: the configuration directory (configuration.yaml, secrets.yaml,
  custom components, ``.storage/secret.key``, the broker credentials) without
  the SQLite database files;
* ``database/sqlite.db`` (SQLite: a copy made with SQLite's online backup API,
  one consistent snapshot while the driver keeps writing), or
  ``database/<table>.jsonl`` (PostgreSQL: a logical dump of our tables through
  SQLAlchemy, in one REPEATABLE READ, read-only transaction: a consistent snapshot).

Restoring validates the whole archive first, in a staging directory (see the
restore section below), so a failed restore changes nothing. It puts the
configuration back, rebuilds the database (the backup's schema revision, its
rows, then the migrations up to this release) and
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
import binascii
import contextlib
import hashlib
import io
import json
import os
import shutil
import sqlite3
import tarfile
import tempfile
import zlib
from collections.abc import AsyncIterator, Callable, Iterator
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
from .permissions import create_private_file, private_dir, private_output
from .runstate import LOCK_FILE, RunLock, renew_join_epoch
from .storage.db import (
    SQLITE_SUFFIXES,
    DatabaseError,
    _upgrade_sync,
    alembic_config,
    head_revision,
    mask_url,
    normalize_url,
    run_migrations,
)
from .storage.models import SecurityContext
from .storage.secretbox import KEY_FILE, STORAGE_DIR, SecretBox, SecretBoxError

FORMAT = 1
MANIFEST = "manifest.json"
CHECKSUMS = "sha256"  # in the manifest: member name -> sha256 of its bytes (absent before 0.1.1)
CONFIG_PREFIX = "config"
DATABASE_DIR = "database"
SQLITE_MEMBER = f"{DATABASE_DIR}/sqlite.db"
TABLE_PREFIX = f"{DATABASE_DIR}/"
REQUIRED_CONFIG = (f"{CONFIG_PREFIX}/configuration.yaml", f"{CONFIG_PREFIX}/{STORAGE_DIR}/{KEY_FILE}")
VERSION_TABLE = "alembic_version"
BATCH = 1000
_SKIP_NAMES = {"__pycache__"}
_WORK_PREFIX = ".coap-driver-backup-"
_RESTORE_PREFIX = ".coap-driver-restore-"


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
            and not d.startswith((_WORK_PREFIX, _RESTORE_PREFIX))
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
        exclude |= {Path(f"{base}{suffix}") for suffix in SQLITE_SUFFIXES}
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


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _write_archive(
    path: Path,
    manifest: dict[str, Any],
    config_dir: Path,
    files: list[Path],
    database_members: list[tuple[Path, str]],
) -> None:
    """The manifest (with the sha256 of every member), the configuration files, the database.

    Configuration files are read once into memory (they are small), so the bytes archived
    are the bytes hashed even if a file changes meanwhile.
    """
    config: list[tuple[tarfile.TarInfo, bytes]] = []
    checksums: dict[str, str] = {}
    for relative in files:
        name = str(PurePosixPath(CONFIG_PREFIX, *relative.parts))
        try:
            with open(config_dir / relative, "rb") as handle:
                info = tarfile.TarInfo(name)
                status = os.fstat(handle.fileno())
                data = handle.read()
        except FileNotFoundError:  # removed while we were copying: nothing to keep
            continue
        info.size, info.mode, info.mtime = len(data), 0o600, int(status.st_mtime)
        config.append((info, data))
        checksums[name] = hashlib.sha256(data).hexdigest()
    for source, member in database_members:
        checksums[member] = _sha256_file(source)
    manifest["config_files"] = [info.name.split("/", 1)[1] for info, _ in config]
    manifest[CHECKSUMS] = checksums
    # Owner-only (it holds the secret key), and on disk once the archive is closed.
    with private_output(path, exclusive=False) as raw, tarfile.open(fileobj=raw, mode="w:gz") as archive:
        data = json.dumps(manifest, indent=1).encode()
        info = tarfile.TarInfo(MANIFEST)
        info.size, info.mode, info.mtime = len(data), 0o600, int(datetime.now(UTC).timestamp())
        archive.addfile(info, io.BytesIO(data))
        for info, data in config:
            archive.addfile(info, io.BytesIO(data))
        for source, member in database_members:
            archive.add(source, arcname=member, recursive=False, filter=_private)


# ---- restore: validate the whole archive in a staging area, then swap -----------------------------
#
# Nothing of the live installation changes until every check passed: the archive is read to
# its end (a truncated copy fails here), every member is extracted into a staging directory
# inside the configuration directory (same filesystem: os.replace is atomic), its checksum
# compared with the manifest's, the database opened and its revision read, the secret key
# tried on the stored device secrets, the configuration loaded. Only then are the staged
# files moved into place one by one, the files they replace kept until all have moved.


@dataclass
class _Staged:
    """An archive extracted and checked: where its parts are and what they hold."""

    root: Path
    manifest: dict[str, Any]
    config: list[PurePosixPath]

    @property
    def config_dir(self) -> Path:
        return self.root / CONFIG_PREFIX

    @property
    def database_dir(self) -> Path:
        return self.root / DATABASE_DIR


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
    if not isinstance(manifest.get("tables", {}), dict) or not isinstance(
        manifest.get(CHECKSUMS, {}), dict
    ):
        raise BackupError(f"{path}: damaged {MANIFEST}: tables and {CHECKSUMS} must be objects")
    return manifest


def _open_archive(path: Path) -> tarfile.TarFile:
    try:
        return tarfile.open(path, mode="r:gz")
    except FileNotFoundError:
        raise BackupError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise BackupError(f"{path} is a directory, not a backup file") from None
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise BackupError(f"{path} is not a coap-driver backup (not a .tar.gz: {exc})") from None


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    """A truncated or corrupted archive is found while reading it: say so in one line."""
    try:
        yield
    except EOFError:
        raise BackupError(f"{path} is truncated or damaged (unexpected end of data)") from None
    except (tarfile.TarError, zlib.error, OSError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise BackupError(f"{path} is truncated or damaged ({reason or type(exc).__name__})") from None


_KINDS = {
    tarfile.SYMTYPE: "a symbolic link", tarfile.LNKTYPE: "a hard link", tarfile.DIRTYPE: "a directory",
    tarfile.CHRTYPE: "a device", tarfile.BLKTYPE: "a device", tarfile.FIFOTYPE: "a pipe",
}


def _check_names(members: list[tarfile.TarInfo], path: Path) -> None:
    """Only regular files, each once, named manifest.json, config/<path> or database/<file>."""
    seen: set[str] = set()
    for member in members:
        name = PurePosixPath(member.name)
        unsafe = f"{path}: refusing unsafe member {member.name!r}"
        if not member.isfile():
            raise BackupError(f"{unsafe} ({_KINDS.get(member.type, 'not a regular file')})")
        expected = (
            member.name == MANIFEST
            or (len(name.parts) > 1 and name.parts[0] == CONFIG_PREFIX)
            or (len(name.parts) == 2 and name.parts[0] == DATABASE_DIR)
        )
        if name.is_absolute() or ".." in name.parts or not expected:
            raise BackupError(unsafe)
        if str(name) in seen:
            raise BackupError(f"{path}: member {member.name!r} appears twice")
        seen.add(str(name))


def _extract_verified(archive: tarfile.TarFile, member: tarfile.TarInfo, target: Path) -> str:
    """Copy one member to `target` (owner-only); its sha256."""
    handle = archive.extractfile(member)
    assert handle is not None
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with private_output(target, mode=(member.mode & 0o700) | 0o600) as out:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest()


def _stage_archive(source: Path, root: Path) -> _Staged:
    """Extract `source` into `root` and check everything that can be checked without a database."""
    with _open_archive(source) as archive, _reading(source):
        members = archive.getmembers()  # reads to the end: a truncated archive fails here
        manifest = read_manifest(archive, source)
        _check_names(members, source)
        digests = {
            m.name: _extract_verified(archive, m, root.joinpath(*PurePosixPath(m.name).parts))
            for m in members if m.name != MANIFEST
        }
    present = {PurePosixPath(name) for name in digests}
    if manifest["database"] == "sqlite":
        needed = [SQLITE_MEMBER]
    else:
        needed = [f"{TABLE_PREFIX}{table}.jsonl" for table in manifest.get("tables", {})]
    listed = [f"{CONFIG_PREFIX}/{name}" for name in manifest.get("config_files") or []]
    for name in [*needed, *REQUIRED_CONFIG, *listed]:
        if PurePosixPath(name) not in present:
            raise BackupError(f"{source}: the backup lacks {name}")
    recorded: dict[str, str] = manifest.get(CHECKSUMS) or {}
    if recorded:  # older backups have none: the checks below still apply
        for name, digest in digests.items():
            if name not in recorded:
                raise BackupError(f"{source}: {name} is not listed in its {MANIFEST}")
            if recorded[name] != digest:
                raise BackupError(
                    f"{source}: {name} is damaged (its sha256 differs from the one the backup recorded)"
                )
        for name in recorded.keys() - digests.keys():
            raise BackupError(f"{source}: the backup lacks {name}")
    config = sorted(
        PurePosixPath(*PurePosixPath(name).parts[1:])
        for name in digests if PurePosixPath(name).parts[0] == CONFIG_PREFIX
    )
    return _Staged(root, manifest, config)


def _check_sqlite_snapshot(staged: _Staged, source: Path) -> list[bytes]:
    """The snapshot opens, is intact, is at the manifest's revision; its device secrets."""
    path = staged.root / SQLITE_MEMBER
    revision = staged.manifest["schema_revision"]
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            check = conn.execute("PRAGMA quick_check").fetchone()[0]
            found = conn.execute(f"SELECT version_num FROM {VERSION_TABLE}").fetchone()
            tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            secrets = []
            if "devices" in tables:
                for secret, salt in conn.execute("SELECT master_secret_enc, master_salt_enc FROM devices"):
                    secrets += [secret, salt]
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise BackupError(f"{source}: {SQLITE_MEMBER} is not a usable SQLite database ({exc})") from None
    if check != "ok":
        raise BackupError(f"{source}: {SQLITE_MEMBER} is damaged (SQLite integrity check: {check})")
    _check_revision(found[0] if found else None, revision, source)
    missing = sorted(set(staged.manifest.get("tables", {})) - tables)
    if missing:
        raise BackupError(f"{source}: its database lacks the tables {', '.join(missing)}")
    return [bytes(value) for value in secrets]


def _check_revision(found: str | None, expected: str, source: Path) -> None:
    if found is None:
        raise BackupError(f"{source}: its database has no schema revision")
    if found not in known_revisions():
        raise BackupError(
            f"{source}: its database is at schema revision {found!r}, which this release does "
            "not know (written by a newer coap-driver?)"
        )
    if found != expected:
        raise BackupError(
            f"{source}: its database is at schema revision {found!r}, its {MANIFEST} says {expected!r}"
        )


def _check_table_dumps(staged: _Staged, source: Path) -> list[bytes]:
    """Every line of every table dump is a JSON row, as many as the manifest counted; device secrets."""
    secrets: list[bytes] = []
    for table, info in staged.manifest.get("tables", {}).items():
        name = f"{TABLE_PREFIX}{table}.jsonl"
        rows = 0
        with open(staged.root / name, "rb") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    if not isinstance(row, dict):
                        raise ValueError("not an object")
                    if table == "devices":
                        secrets += [_decode(row[k], "binary") for k in ("master_secret_enc", "master_salt_enc")]
                except (ValueError, KeyError, TypeError, binascii.Error):
                    raise BackupError(f"{source}: {name} line {number} is not a JSON row") from None
                rows += 1
        expected = info.get("rows") if isinstance(info, dict) else None
        if rows != expected:
            raise BackupError(f"{source}: {name} holds {rows} rows, its {MANIFEST} says {expected}")
    return secrets


def _check_key(staged: _Staged, secrets: list[bytes], source: Path) -> None:
    """The backup's key must decrypt its database's device secrets, or no device could JOIN."""
    key_file = staged.config_dir / STORAGE_DIR / KEY_FILE
    try:
        box = SecretBox(key_file.read_bytes().strip())
    except SecretBoxError:
        raise BackupError(f"{source}: its {REQUIRED_CONFIG[1]} is not a valid key file") from None
    for token in secrets:
        try:
            box.decrypt(token)
        except SecretBoxError:
            raise BackupError(
                f"{source}: its secret key does not decrypt the device secrets stored in its "
                "database (a key file from another installation?)"
            ) from None


def _staged_database_url(staged: _Staged, config_dir: Path, source: Path) -> URL:
    """The database the restored configuration names (paths as they will be once swapped)."""
    from .driver import Driver

    try:
        config = Driver(staged.config_dir).load()
        url = normalize_url(config.database["url"])
    except Exception as exc:  # any reason the configuration does not load: one line
        reason = str(exc).replace(str(staged.config_dir), str(config_dir))
        raise BackupError(f"{source}: its configuration does not load: {reason}") from None
    if url.get_backend_name() == "sqlite":
        path = Path(url.database or "")
        if path.is_relative_to(staged.config_dir):
            url = url.set(database=str(config_dir / path.relative_to(staged.config_dir)))
    return url


class _Swap:
    """Moves staged files into place; keeps what they replace until commit(), so rollback() can undo."""

    def __init__(self, keep_dir: Path) -> None:
        self._keep_dir = keep_dir
        self._undo: list[Callable[[], None]] = []

    def put(self, staged: Path, live: Path, keep_dir: Path | None = None) -> None:
        """Move `staged` to `live`; `keep_dir` (default: the swap's) is on `live`'s filesystem."""
        self._make_dirs(live.parent)
        self.set_aside(live, keep_dir)
        os.replace(staged, live)
        self._undo.append(lambda: os.unlink(live))

    def set_aside(self, live: Path, keep_dir: Path | None = None) -> None:
        if not (live.exists() or live.is_symlink()):
            return
        kept = (keep_dir or self._keep_dir) / f"kept-{len(self._undo)}"
        os.replace(live, kept)
        self._undo.append(lambda: os.replace(kept, live))

    def _make_dirs(self, directory: Path) -> None:
        missing = []
        while not directory.exists():
            missing.append(directory)
            directory = directory.parent
        for created in reversed(missing):
            created.mkdir(mode=0o700)
            self._undo.append(created.rmdir)

    def rollback(self) -> None:
        """Put every live file back; raise BackupError naming where a file is left if one cannot be."""
        while self._undo:
            try:
                self._undo.pop()()
            except OSError as exc:
                raise BackupError(
                    f"the restore failed and undoing it failed too ({exc}); the previous files "
                    f"are kept in {self._keep_dir}"
                ) from None

    def commit(self) -> None:
        self._undo.clear()


async def restore_backup(
    config_dir: Path, source: Path, database_url: str | None = None
) -> RestoreReport:
    """Restore `source` into `config_dir` and its database; the driver must not be running.

    Either everything is restored or nothing of the installation changes.
    `database_url` restores into another database than the restored configuration's
    (e.g. an SQLite backup into PostgreSQL); set database.url to it afterwards.
    """
    source = Path(source).expanduser().resolve()  # noqa: ASYNC240 (a one-shot command)
    config_dir = Path(config_dir).resolve()  # noqa: ASYNC240
    private_dir(config_dir)  # a fresh installation restored from its backup
    lock = RunLock(config_dir)
    lock.acquire_exclusive()
    try:
        return await _restore(config_dir, source, database_url)
    except DatabaseError as exc:
        raise BackupError(str(exc)) from None
    finally:
        lock.release()


async def _restore(config_dir: Path, source: Path, database_url: str | None) -> RestoreReport:
    roots: list[Path] = []
    keep = False
    try:
        roots.append(Path(tempfile.mkdtemp(prefix=_RESTORE_PREFIX, dir=config_dir)))
        staged = await asyncio.to_thread(_stage_archive, source, roots[0] / "archive")
        check = _check_sqlite_snapshot if staged.manifest["database"] == "sqlite" else _check_table_dumps
        secrets = await asyncio.to_thread(check, staged, source)
        await asyncio.to_thread(_check_key, staged, secrets, source)
        url = _staged_database_url(staged, config_dir, source)  # the configuration loads
        url = normalize_url(database_url) if database_url else url
        (roots[0] / "kept").mkdir(mode=0o700)
        swap = _Swap(roots[0] / "kept")
        try:
            if url.get_backend_name() == "sqlite":
                counts, dropped = await _restore_sqlite(staged, url, swap, roots)
                _swap_config(staged, config_dir, swap)
            else:
                _swap_config(staged, config_dir, swap)
                counts, dropped = await _fill(url, mask_url(url), staged)
        except BaseException:
            try:
                swap.rollback()
            except BackupError:
                keep = True
                raise
            raise
        swap.commit()
        renew_join_epoch(config_dir)
    except OSError as exc:
        raise BackupError(f"cannot restore {source}: {exc}") from None
    finally:
        if not keep:
            for root in roots:
                shutil.rmtree(root, ignore_errors=True)
    manifest = staged.manifest
    return RestoreReport(
        source,
        manifest.get("created_at", "?"),
        manifest.get("coap_driver_version", "?"),
        url.get_backend_name(),
        manifest["schema_revision"],
        head_revision(),
        counts,
        [str(name) for name in staged.config],
        dropped,
    )


def _swap_config(staged: _Staged, config_dir: Path, swap: _Swap) -> None:
    for relative in staged.config:
        swap.put(staged.config_dir.joinpath(*relative.parts), config_dir.joinpath(*relative.parts))


async def _restore_sqlite(
    staged: _Staged, url: URL, swap: _Swap, roots: list[Path]
) -> tuple[dict[str, int], int]:
    """Build the database next to the live one, then swap it (and its -wal/-shm) in."""
    target = _sqlite_path(url)
    if not target.parent.is_dir():
        raise BackupError(f"cannot restore the database: directory {target.parent} does not exist")
    roots.append(Path(tempfile.mkdtemp(prefix=_RESTORE_PREFIX, dir=target.parent)))
    built = roots[-1] / target.name
    if staged.manifest["database"] == "sqlite":
        await asyncio.to_thread(_copy_private, staged.root / SQLITE_MEMBER, built)
    else:
        create_private_file(built)
    counts, dropped = await _fill(url.set(database=str(built)), mask_url(url), staged)
    for suffix in SQLITE_SUFFIXES[1:]:  # a -wal of the old database must not meet the new one
        swap.set_aside(Path(f"{target}{suffix}"), roots[-1])
    swap.put(built, target, roots[-1])
    return counts, dropped


def _copy_private(source: Path, target: Path) -> None:
    with private_output(target) as out, open(source, "rb") as src:
        shutil.copyfileobj(src, out)


def _drop_ours_sync(conn: Connection, names: set[str]) -> None:
    """Drop our tables (and the revision table) from a database that may hold others' too."""
    _reflect(conn, sorted(names | {VERSION_TABLE})).drop_all(conn)


def _rows_from_sqlite(path: Path, table: str) -> Iterator[dict[str, Any]]:
    engine = create_engine(f"sqlite:///{path}")
    try:
        with engine.connect() as conn:
            reflected = _reflect(conn, [table]).tables[table]
            yield from (dict(row) for row in conn.execute(select(reflected)).mappings())
    finally:
        engine.dispose()


def _rows_from_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                yield json.loads(line)


def _load_sync(
    conn: Connection, tables: dict[str, dict[str, Any]], rows_of: Callable[[str], Iterator[dict[str, Any]]]
) -> dict[str, int]:
    """Insert every table's rows (parents first), then move PostgreSQL sequences past them."""
    counts: dict[str, int] = {}
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


async def _fill(url: URL, shown: str, staged: _Staged) -> tuple[dict[str, int], int]:
    """Bring the database at `url` to the backup's rows at this release's schema, in ONE transaction.

    A snapshot copied as the SQLite file itself only needs the migrations; any other
    database is emptied of our tables, built at the backup's revision, loaded, migrated.
    Every OSCORE context is dropped (older than what the devices used since). On
    PostgreSQL an error rolls everything back: the live database is as it was.
    """
    manifest = staged.manifest
    tables: dict[str, dict[str, Any]] = manifest.get("tables") or {}
    revision = manifest["schema_revision"]
    copied = url.get_backend_name() == "sqlite" and manifest["database"] == "sqlite"
    rows_of: Callable[[str], Iterator[dict[str, Any]]]
    if manifest["database"] == "sqlite":
        snapshot = staged.root / SQLITE_MEMBER
        rows_of = lambda name: _rows_from_sqlite(snapshot, name)  # noqa: E731
    else:
        rows_of = lambda name: _rows_from_jsonl(staged.root / f"{TABLE_PREFIX}{name}.jsonl")  # noqa: E731
    ours = set() if copied else set(await tables_at("head")) | set(tables)
    try:
        async with _engine(url) as engine, engine.begin() as conn:
            if copied:
                counts = {name: int(t.get("rows", 0)) for name, t in tables.items()}
            else:
                await conn.run_sync(_drop_ours_sync, ours)
                await conn.run_sync(_upgrade_sync, revision)
                counts = await conn.run_sync(_load_sync, tables, rows_of)
            await conn.run_sync(_upgrade_sync, "head")
            dropped = (await conn.execute(delete(SecurityContext))).rowcount
    except (SQLAlchemyError, CommandError) as exc:
        raise BackupError(f"cannot restore into {shown}: {_one_line(exc)}") from None
    except (OSError, ValueError) as exc:
        raise BackupError(f"cannot restore into {shown}: {exc}") from None
    return counts, int(dropped or 0)
