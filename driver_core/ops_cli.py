"""Operator commands of `coap-driver`: backup, restore, db, broker, logging.

Registered by cli.build_parser(); each command prints its result, and every
expected failure is an exception listed in ERRORS, which the CLI prints as one
line (exit status 2).
"""

from __future__ import annotations

import argparse
import json
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from .backup import BackupError, create_backup, restore_backup
from .broker_access import ROLE_APPLICATION, ROLES, CredentialsError, CredentialStore
from .logs import check_level
from .runstate import RunLockError
from .storage.db import (
    current_revision,
    head_revision,
    mask_url,
    normalize_url,
    run_migrations,
)
from .storage.secretbox import SecretBox

TOKEN_ENV = "COAP_DRIVER_TOKEN"


class OpsError(Exception):
    """A request to a running driver failed; one line for the user."""


ERRORS: tuple[type[Exception], ...] = (BackupError, CredentialsError, RunLockError, OpsError)


def _load(config_dir: Path) -> Any:
    from .driver import Driver

    driver = Driver(config_dir)
    return driver.load()


# ---- backup / restore ---------------------------------------------------------------------------


async def cmd_backup(args: argparse.Namespace) -> int:
    config = _load(args.config)
    report = await create_backup(config, Path(args.file))
    total = sum(report.rows.values())
    print(
        f"backup written to {report.path}: {report.database} database at schema "
        f"{report.revision} ({total} rows in {len(report.rows)} tables), "
        f"{len(report.config_files)} configuration files including the secret key"
    )
    print("keep it safe: it holds the key that decrypts the device secrets")
    return 0


async def cmd_restore(args: argparse.Namespace) -> int:
    report = await restore_backup(Path(args.config), Path(args.file), args.database)
    print(
        f"restored {report.path} (made {report.created_at} by coap-driver {report.made_by}) "
        f"into the {report.database} database: schema {report.revision_from} -> "
        f"{report.revision_to}, {sum(report.rows.values())} rows, "
        f"{len(report.config_files)} configuration files"
    )
    rows = report.rows
    print(
        f"devices: {rows.get('devices', 0)}, uplinks: {rows.get('uplinks', 0)}, "
        f"downlinks: {rows.get('downlinks', 0)}"
    )
    print(
        f"{report.contexts_dropped} OSCORE security contexts dropped: each device is answered "
        "4.01 at its next transmission and re-JOINs by itself (RFC 8613 B.2)"
    )
    if args.database:
        print(f"set database.url to {mask_url(args.database)} in configuration.yaml before starting")
    return 0


# ---- database -------------------------------------------------------------------------------------


def revisions_in_order() -> list[str]:
    """Every schema revision this release knows, oldest first."""
    from alembic.script import ScriptDirectory

    from .storage.db import alembic_config

    script = ScriptDirectory.from_config(alembic_config())
    return [rev.revision for rev in reversed(list(script.walk_revisions()))]


async def _current(url: Any) -> str | None:
    from sqlalchemy.ext.asyncio import create_async_engine

    from .storage.db import DatabaseError, _reason, prepare_sqlite_file

    if url.get_backend_name() == "sqlite":
        prepare_sqlite_file(url, mask_url(url))
    engine = create_async_engine(url)
    try:
        return await current_revision(engine)
    except Exception as exc:
        raise DatabaseError(f"cannot open database {mask_url(url)}: {_reason(exc)}") from None
    finally:
        await engine.dispose()


async def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from sqlalchemy.ext.asyncio import create_async_engine

    from .storage.db import DatabaseError

    config = _load(args.config)
    url = normalize_url(config.database["url"])
    order = revisions_in_order()
    target = order[-1] if args.revision == "head" else args.revision
    if target not in order:
        raise DatabaseError(
            f"unknown schema revision {args.revision!r} (known: {', '.join(order)})"
        )
    before = await _current(url)
    if before is not None and before in order and order.index(target) < order.index(before):
        raise DatabaseError(
            f"the database is at schema {before}, newer than {target}: downgrades are not "
            "supported (restore a backup made before the upgrade instead)"
        )
    engine = create_async_engine(url)
    try:
        await run_migrations(engine, target)  # DatabaseError names an unknown (newer) schema
    finally:
        await engine.dispose()
    if before == target:
        print(f"database {mask_url(url)} is at schema {target}: nothing to do")
    else:
        print(f"database {mask_url(url)} upgraded from schema {before or '(empty)'} to {target}")
    return 0


async def cmd_db_status(args: argparse.Namespace) -> int:
    config = _load(args.config)
    url = normalize_url(config.database["url"])
    current = await _current(url)
    head = head_revision()
    state = "up to date" if current == head else "run `coap-driver db upgrade` (or start the driver)"
    print(f"database {mask_url(url)}: schema {current or '(empty)'}, newest {head}: {state}")
    return 0


# ---- built-in broker users ------------------------------------------------------------------------


def _store(config_dir: Path) -> CredentialStore:
    config = _load(config_dir)
    store = CredentialStore(config.config_dir, SecretBox.load_or_create(config.config_dir))
    store.ensure()
    return store


def _print_users(users: list[Any]) -> None:
    print(f"{'username':<20} {'role':<12} password")
    for user in users:
        print(f"{user.name:<20} {user.role:<12} {user.password}")


async def cmd_broker_credentials(args: argparse.Namespace) -> int:
    store = _store(args.config)
    print("built-in MQTT broker users (driver: publishes; application: reads, sends commands):")
    _print_users(store.shown())
    return 0


async def cmd_broker_rotate(args: argparse.Namespace) -> int:
    store = _store(args.config)
    rotated = store.rotate(args.users or None)
    print("new passwords (a running driver applies them within seconds; old sessions are closed):")
    _print_users(rotated)
    return 0


async def cmd_broker_add_user(args: argparse.Namespace) -> int:
    user = _store(args.config).add(args.username, args.role)
    print(f"broker user {user.name!r} ({user.role}) created; password: {user.password}")
    return 0


async def cmd_broker_remove_user(args: argparse.Namespace) -> int:
    _store(args.config).remove(args.username)
    print(f"broker user {args.username!r} removed")
    return 0


# ---- log levels of a running driver ---------------------------------------------------------------


def _driver_url(args: argparse.Namespace) -> str:
    if args.url:
        return args.url.rstrip("/")
    config = _load(args.config)
    host = config.http["host"]
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{config.http['port']}"


def _request(args: argparse.Namespace, method: str, body: Any = None) -> Any:
    token = args.token or os.environ.get(TOKEN_ENV)
    if not token:
        raise OpsError(f"an API token is needed: --token TOKEN or the {TOKEN_ENV} variable")
    url = _driver_url(args) + "/ops/logging"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            detail = json.loads(exc.read()).get("detail", exc.reason)
        except ValueError:
            detail = exc.reason
        raise OpsError(f"{url}: {exc.code} {detail}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise OpsError(f"cannot reach the driver at {url}: {reason} (is it running?)") from None


def _print_levels(levels: dict[str, Any]) -> None:
    print(f"default: {levels['default']}")
    for name, level in levels["logs"].items():
        print(f"{name}: {level}")


async def cmd_logging_show(args: argparse.Namespace) -> int:
    _print_levels(_request(args, "GET"))
    return 0


async def cmd_logging_set(args: argparse.Namespace) -> int:
    logs: dict[str, str] = {}
    default = None
    for item in args.levels:
        name, sep, level = item.partition("=")
        if not sep or not name:
            raise OpsError(f"{item!r}: expected logger=level, e.g. driver_core.coap=debug")
        try:
            level = check_level(level)
        except ValueError as exc:
            raise OpsError(f"{name}: {exc}") from None
        if name == "default":
            default = level
        else:
            logs[name] = level
    body: dict[str, Any] = {"logs": logs}
    if default is not None:
        body["default"] = default
    _print_levels(_request(args, "PUT", body))
    return 0


# ---- parser ---------------------------------------------------------------------------------------


def register(commands: Any) -> None:
    """Add the operator commands to the `coap-driver` sub-command parser."""
    backup = commands.add_parser(
        "backup", help="write database, keys and configuration to FILE (safe while running)"
    )
    backup.add_argument("file", help="e.g. coap-driver-2025-09-04.tar.gz")
    backup.set_defaults(func=cmd_backup)

    restore = commands.add_parser(
        "restore", help="restore a backup (stop the driver first); devices re-JOIN"
    )
    restore.add_argument("file")
    restore.add_argument(
        "--database", help="restore into this database URL instead of the configuration's"
    )
    restore.set_defaults(func=cmd_restore)

    db = commands.add_parser("db", help="database schema")
    db_commands = db.add_subparsers(dest="db_command", required=True)
    upgrade = db_commands.add_parser("upgrade", help="migrate the database to this release's schema")
    upgrade.add_argument("--revision", default="head", help="a revision (default: head)")
    upgrade.set_defaults(func=cmd_db_upgrade)
    db_commands.add_parser("status", help="show the schema revision").set_defaults(func=cmd_db_status)

    broker = commands.add_parser("broker", help="users of the built-in MQTT broker")
    broker_commands = broker.add_subparsers(dest="broker_command", required=True)
    broker_commands.add_parser(
        "credentials", help="show the broker users and their passwords"
    ).set_defaults(func=cmd_broker_credentials)
    rotate = broker_commands.add_parser("rotate", help="new passwords (all users, or those named)")
    rotate.add_argument("users", nargs="*", metavar="USER")
    rotate.set_defaults(func=cmd_broker_rotate)
    add = broker_commands.add_parser("add-user", help="another application user")
    add.add_argument("username")
    add.add_argument("--role", default=ROLE_APPLICATION, choices=ROLES)
    add.set_defaults(func=cmd_broker_add_user)
    remove = broker_commands.add_parser("remove-user", help="remove a broker user")
    remove.add_argument("username")
    remove.set_defaults(func=cmd_broker_remove_user)

    logging_ = commands.add_parser("logging", help="log levels of a running driver")
    logging_.add_argument("--url", help="the driver's HTTP address (default: from configuration)")
    logging_.add_argument("--token", help=f"an API token (or the {TOKEN_ENV} variable)")
    logging_commands = logging_.add_subparsers(dest="logging_command", required=True)
    logging_commands.add_parser("show", help="current levels").set_defaults(func=cmd_logging_show)
    setp = logging_commands.add_parser("set", help="e.g. set driver_core.coap=debug default=info")
    setp.add_argument("levels", nargs="+", metavar="logger=level")
    setp.set_defaults(func=cmd_logging_set)

