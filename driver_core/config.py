"""The configuration directory: `configuration.yaml`, its sections and their defaults.

Every problem a user can make in the file ends as one ConfigError whose text
is a single line pointing at the file, the line and the key to fix; the CLI
prints it without a traceback.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import voluptuous as vol
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from .permissions import open_private, private_dir
from .yaml_loader import YamlError, format_location, load_yaml, locate, to_plain

CONFIG_FILE = "configuration.yaml"
DEFAULT_DB_FILE = "coap-driver.db"
CONFIG_DIR_PLACEHOLDER = "{config_dir}"
DB_SCHEMES = ("sqlite+aiosqlite", "postgresql+asyncpg")
# Plain names are accepted and given the async driver, as driver_core.storage.db does.
_DB_ALIASES = {
    "sqlite": "sqlite+aiosqlite",
    "postgresql": "postgresql+asyncpg",
    "postgres": "postgresql+asyncpg",
}


class ConfigError(Exception):
    """One clear line: `<file>:<line>: <key.path>: <what is wrong>`."""

    def __init__(
        self,
        problem: str,
        file: str | Path | None = None,
        line: int | None = None,
        key_path: str | None = None,
    ) -> None:
        self.problem = problem
        self.file = str(file) if file is not None else None
        self.line = line
        self.key_path = key_path
        parts = [key_path, problem] if key_path else [problem]
        super().__init__(format_location(self.file, line, *parts))


DRAIN_SECONDS = 5  # default of shutdown.drain_seconds


@dataclass
class CoreConfig:
    """The validated configuration; every section is filled with its defaults."""

    config_dir: Path
    coap: dict[str, Any]
    database: dict[str, Any]
    logger: dict[str, Any]
    http: dict[str, Any]
    retention: dict[str, Any]
    devices: dict[str, Any]
    downlinks: dict[str, Any]
    fota: dict[str, Any]
    cluster: dict[str, Any]
    integrations: dict[str, dict[str, Any]]
    shutdown: dict[str, Any] = field(default_factory=lambda: {"drain_seconds": DRAIN_SECONDS})

    @property
    def config_file(self) -> Path:
        return self.config_dir / CONFIG_FILE


# --- value validators: each raises vol.Invalid with a message a user understands ---


def _integer(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise vol.Invalid("expected an integer")
    return value


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise vol.Invalid("expected a string")
    return value


def _ip_address(value: Any) -> str:
    _string(value)
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise vol.Invalid(
            f"'{value}' is not an IP address (use e.g. '::', '0.0.0.0' or '127.0.0.1')"
        ) from None


def _port(value: Any) -> int:
    return vol.Range(min=0, max=65535)(_integer(value))


def _int_range(low: int, high: int) -> Callable[[Any], int]:
    def validate(value: Any) -> int:
        return vol.Range(min=low, max=high)(_integer(value))

    return validate


_LEVELS = {
    "critical": "CRITICAL",
    "fatal": "CRITICAL",
    "error": "ERROR",
    "warning": "WARNING",
    "warn": "WARNING",
    "info": "INFO",
    "debug": "DEBUG",
    "notset": "NOTSET",
}


def _log_level(value: Any) -> str:
    if isinstance(value, str) and value.lower() in _LEVELS:
        return _LEVELS[value.lower()]
    raise vol.Invalid(
        f"invalid log level '{value}' (use one of: critical, error, warning, info, debug, notset)"
    )


def _database_url(config_dir: Path) -> Callable[[Any], str]:
    """Normalise `database.url`; SQLite paths become absolute, relative to the config dir."""

    def validate(value: Any) -> str:
        if value is None:
            return f"sqlite+aiosqlite:///{config_dir / DEFAULT_DB_FILE}"
        text = _string(value).replace(CONFIG_DIR_PLACEHOLDER, str(config_dir))
        try:
            url = make_url(text)
        except ArgumentError:
            raise vol.Invalid(
                "not a database URL (use e.g. sqlite+aiosqlite:///coap-driver.db or "
                "postgresql+asyncpg://user:password@host/dbname)"
            ) from None
        drivername = _DB_ALIASES.get(url.drivername, url.drivername)
        if drivername not in DB_SCHEMES:
            raise vol.Invalid(
                f"unsupported database scheme '{url.drivername}' "
                f"(use one of: {', '.join(DB_SCHEMES)})"
            )
        if drivername != url.drivername:
            url = url.set(drivername=drivername)
            text = url.render_as_string(hide_password=False)
        if url.drivername == "sqlite+aiosqlite":
            if not url.database or url.database == ":memory:" or url.database.startswith("file:"):
                raise vol.Invalid(
                    "an SQLite database needs a file path, e.g. sqlite+aiosqlite:///coap-driver.db"
                )
            path = Path(url.database).expanduser()
            if not path.is_absolute():
                path = config_dir / path
            return url.set(database=str(path)).render_as_string(hide_password=False)
        return text

    return validate


def _section(fields: dict[Any, Any]) -> vol.Schema:
    """A section schema; a section written with no body (`coap:`) means all defaults."""
    return vol.Schema(vol.All(lambda v: {} if v is None else v, vol.Schema(fields)))


def core_schemas(config_dir: Path) -> dict[str, vol.Schema]:
    """Schemas of the core sections; the database default depends on the config dir."""
    return {
        "coap": _section(
            {
                vol.Optional("host", default="::"): _ip_address,
                vol.Optional("port", default=5683): _port,
                vol.Optional("max_payload", default=1024): _int_range(16, 1024),
                vol.Optional("context_cache_size", default=100_000): _int_range(0, 100_000_000),
                # Refusals one source address may cause per second (and in a burst) before its
                # further would-be-refused datagrams are dropped unanswered; 0 turns it off.
                vol.Optional("refusals_per_second", default=20): _int_range(0, 1_000_000),
                vol.Optional("refusal_burst", default=100): _int_range(1, 1_000_000),
            }
        ),
        "database": _section({vol.Optional("url", default=None): _database_url(config_dir)}),
        "logger": _section(
            {
                vol.Optional("default", default="info"): _log_level,
                # text: one human line per record; json: one JSON object per line (extras as keys)
                vol.Optional("format", default="text"): vol.In(
                    ("text", "json"), msg="expected text or json"
                ),
                vol.Optional("logs", default=dict): vol.All(
                    lambda v: {} if v is None else v, {_string: _log_level}
                ),
            }
        ),
        "http": _section(
            {
                vol.Optional("host", default="127.0.0.1"): _ip_address,
                vol.Optional("port", default=8080): _port,
                # Failed authentications (bad API token, failed login) one client address may
                # make per minute (and in a burst) before it gets 429; 0 turns it off.
                vol.Optional("auth_failures_per_minute", default=10): _int_range(0, 1_000_000),
                vol.Optional("auth_failure_burst", default=20): _int_range(1, 1_000_000),
            }
        ),
        "retention": _section(
            {
                vol.Optional("uplinks_days", default=30): _int_range(1, 36500),
                vol.Optional("downlinks_days", default=30): _int_range(1, 36500),
            }
        ),
        "devices": _section(
            {
                vol.Optional("tx_interval", default=60): _int_range(1, 44640),
                vol.Optional("grace_minutes", default=15): _int_range(0, 44640),
            }
        ),
        "fota": _section(
            {
                # A download with no block for this long is marked failed (stalled).
                vol.Optional("stall_minutes", default=30): _int_range(1, 7 * 24 * 60),
            }
        ),
        "cluster": vol.Schema(
            vol.All(
                # `cluster: true` is short for `cluster: {enabled: true}`.
                lambda v: {"enabled": v} if isinstance(v, bool) else v,
                _section(
                    {
                        # Several instances share one PostgreSQL database and one broker.
                        vol.Optional("enabled", default=False): vol.Boolean(),
                        # Shown in the instances table and the logs; default host name and pid.
                        vol.Optional("name", default=None): vol.Any(None, _string),
                        vol.Optional("heartbeat_seconds", default=5): _int_range(1, 60),
                        # An instance silent this long is dead: its unpublished rows are adopted.
                        vol.Optional("dead_after_seconds", default=30): _int_range(3, 3600),
                    }
                ),
            )
        ),
        "shutdown": _section(
            {
                # On SIGTERM/SIGINT: how long the integrations may still publish their outboxes.
                vol.Optional("drain_seconds", default=DRAIN_SECONDS): _int_range(0, 300),
            }
        ),
        "downlinks": _section(
            {
                # Seconds a dispatched downlink waits for its /ack before it becomes state 5.
                vol.Optional("ack_timeout", default=300): _int_range(1, 7 * 86400),
                # Pending downlinks one device may hold; more are refused with 409.
                vol.Optional("max_pending", default=100): _int_range(1, 10_000),
            }
        ),
    }


# --- turning voluptuous errors into one line ---

_VOL_MESSAGES = {
    "extra keys not allowed": "unknown key",
    "required key not provided": "required key is missing",
    "expected int": "expected an integer",
    "expected str": "expected a string",
    "expected bool": "expected true or false",
    "expected float": "expected a number",
    "expected a dictionary": "expected a mapping (key: value lines)",
    "expected a list": "expected a list",
}


def _flatten(err: vol.Invalid) -> list[vol.Invalid]:
    if isinstance(err, vol.MultipleInvalid):
        return [leaf for sub in err.errors for leaf in _flatten(sub)]
    return [err]


def _path_key(part: Any) -> Any:
    return part.schema if isinstance(part, vol.Marker) else part


def _dotted(path: Sequence[Any]) -> str:
    text = ""
    for part in path:
        if isinstance(part, int) and not isinstance(part, bool):
            text += f"[{part}]"
        else:
            text += ("." if text else "") + str(part)
    return text


def _schema_keys(schema: Any, path: Sequence[Any]) -> list[str] | None:
    """Literal keys the schema accepts at `path` (to list them after an unknown key)."""
    node = schema
    for part in [*path, None]:
        while True:
            if isinstance(node, vol.Schema):
                node = node.schema
            elif isinstance(node, vol.All):
                mapping = [v for v in node.validators if isinstance(v, dict | vol.Schema)]
                if not mapping:
                    return None
                node = mapping[-1]
            else:
                break
        if not isinstance(node, dict):
            return None
        if part is None:
            keys = [_path_key(k) for k in node]
            return sorted(str(k) for k in keys if isinstance(k, str))
        node = next((v for k, v in node.items() if _path_key(k) == part), None)
        if node is None:
            return None
    return None


def invalid_details(
    err: vol.Invalid, raw: Any, schema: Any, prefix: Sequence[Any] = ()
) -> tuple[str | None, int | None, str, str]:
    """(file, line, dotted key path, problem) of the first problem in `err`.

    `raw` is the LineDict the schema validated; `prefix` is the path of `raw`
    inside the whole file (e.g. the section name).
    """
    located = []
    for leaf in _flatten(err):
        path = [_path_key(p) for p in leaf.path]
        file, line = locate(raw, path)
        located.append((line or 0, file, path, leaf))
    located.sort(key=lambda item: item[0])
    line, file, path, leaf = located[0]
    problem = _VOL_MESSAGES.get(leaf.msg, leaf.msg)
    if leaf.msg == "extra keys not allowed":
        keys = _schema_keys(schema, path[:-1])
        if keys:
            problem += f" (valid keys: {', '.join(keys)})"
    return file, line or None, _dotted([*prefix, *path]), problem


# --- the configuration directory ---


def default_configuration() -> str:
    """Text of the configuration.yaml written on first run."""
    return resources.files("driver_core").joinpath("defaults", CONFIG_FILE).read_text("utf-8")


def ensure_config_dir(config_dir: Path) -> bool:
    """Create the directory and a default configuration.yaml if missing; True if created."""
    config_dir = Path(config_dir).expanduser()
    config_file = config_dir / CONFIG_FILE
    if config_file.exists():
        return False
    if config_dir.exists() and not config_dir.is_dir():
        raise ConfigError("exists but is not a directory", config_dir)
    try:
        private_dir(config_dir)  # it will hold the database and the secret key
        with os.fdopen(open_private(config_file), "w", encoding="utf-8") as handle:
            handle.write(default_configuration())
    except OSError as err:
        problem = f"cannot create the default configuration: {err.strerror or err}"
        raise ConfigError(problem, config_file) from err
    logging.getLogger(__name__).info("Created default configuration %s", config_file)
    return True


def load_configuration(
    config_dir: Path, integration_schemas: Mapping[str, vol.Schema]
) -> CoreConfig:
    """Read, validate and fill in defaults for `<config_dir>/configuration.yaml`.

    Each top-level key is a core section or the domain of an integration
    whose settings schema is in `integration_schemas`; anything else is an
    error. Raises ConfigError (one line) on any problem.
    """
    config_dir = Path(config_dir).expanduser().resolve()
    config_file = config_dir / CONFIG_FILE
    if not config_file.is_file():
        raise ConfigError("file not found (run once to create the default)", config_file)
    try:
        raw = load_yaml(config_file, config_dir)
    except YamlError as err:
        raise ConfigError(err.problem, err.file, err.line) from err
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(
            "the top level must be a mapping of sections (coap:, database: ...)",
            config_file,
            getattr(raw, "line", 1),
        )

    core = core_schemas(config_dir)
    schemas: dict[str, vol.Schema] = {**core}
    for domain, schema in integration_schemas.items():
        if domain in core:
            raise ConfigError(f"integration domain '{domain}' clashes with a core section")
        schemas[domain] = _section(schema)

    for key in raw:
        if key not in schemas:
            file, line = locate(raw, [key])
            raise ConfigError(
                f"unknown section (valid sections: {', '.join(sorted(schemas))})",
                file,
                line,
                str(key),
            )

    validated: dict[str, dict[str, Any]] = {}
    for name, schema in schemas.items():
        if name not in core and name not in raw:
            continue
        value = raw.get(name)
        try:
            validated[name] = to_plain(schema(value))
        except vol.Invalid as err:
            file, line, key_path, problem = invalid_details(err, value, schema, [name])
            if file is None:
                file, line = locate(raw, [name])
            raise ConfigError(problem, file, line, key_path) from None

    if validated["cluster"]["enabled"] and validated["database"]["url"].startswith("sqlite"):
        file, line = locate(raw, ["cluster"])
        raise ConfigError(
            "several instances need a shared PostgreSQL database: set database.url to "
            "postgresql+asyncpg://user:password@host/dbname, or remove cluster",
            file,
            line,
            "cluster.enabled",
        )
    return CoreConfig(
        config_dir=config_dir,
        integrations={name: validated[name] for name in sorted(validated) if name not in core},
        **{name: validated[name] for name in core},
    )
