"""Log output (text or JSON lines) and log levels per component, changeable while running.

Structured fields travel in a record's ``extra`` (e.g. the refusal log line's
``reason``, ``serial``, ``kid``): the text format shows the message as always,
the JSON format adds every extra field as a key, so a log pipeline can filter
on them without parsing messages. Nothing here knows about secrets: callers
never put keys, passwords or tokens in log records (tests check the whole log
of a run for them).
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LEVELS = ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG", "NOTSET")
# Loggers of the driver and its components; listed by GET /ops/logging with their level.
NAMESPACES = ("driver_core", "custom_components", "aiocoap", "amqtt", "sqlalchemy", "alembic")
# Libraries that narrate at INFO: quiet unless the operator asks for them.
QUIET = ("amqtt", "transitions", "aiosqlite", "sqlalchemy.engine", "alembic")

_RECORD_FIELDS = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the extras, the traceback."""

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RECORD_FIELDS and not key.startswith("_"):
                document[key] = value
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            document["stack"] = self.formatStack(record.stack_info)
        return json.dumps(document, default=str, ensure_ascii=False)


def make_formatter(kind: str) -> logging.Formatter:
    if kind == "json":
        return JsonFormatter()
    return logging.Formatter(TEXT_FORMAT)


def configure(logger_config: dict[str, Any], stream: Any = None) -> None:
    """Apply the `logger:` section: output format on the root handlers, then the levels."""
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.StreamHandler(stream or sys.stderr))
    formatter = make_formatter(logger_config.get("format", "text"))
    for handler in root.handlers:
        handler.setFormatter(formatter)
    for name in QUIET:
        logging.getLogger(name).setLevel(logging.WARNING)
    set_levels(logger_config.get("default", "INFO"), logger_config.get("logs") or {})


def check_level(value: Any) -> str:
    """A level name (any case) as logging spells it; ValueError names the choices."""
    if isinstance(value, str) and value.upper() in LEVELS:
        return value.upper()
    raise ValueError(
        f"invalid log level {value!r} (use one of: {', '.join(level.lower() for level in LEVELS)})"
    )


def set_levels(default: str | None = None, logs: dict[str, str] | None = None) -> None:
    """The root level and per-logger levels ("notset": follow the parent logger again)."""
    if default is not None:
        logging.getLogger().setLevel(check_level(default))
    for name, level in (logs or {}).items():
        logging.getLogger(name).setLevel(check_level(level))


def current_levels() -> dict[str, Any]:
    """The root level and every logger of ours (or a library's) with a level of its own."""
    manager = logging.getLogger().manager
    logs = {}
    for name, logger in sorted(manager.loggerDict.items()):
        if not isinstance(logger, logging.Logger) or logger.level == logging.NOTSET:
            continue
        if name.split(".", 1)[0] in NAMESPACES or name in QUIET:
            logs[name] = logging.getLevelName(logger.level)
    return {"default": logging.getLevelName(logging.getLogger().level), "logs": logs}


class _Redact(logging.Filter):
    """Third-party DEBUG lines that carry data the driver treats as secret.

    * aiocoap logs the OSCORE master salt (RFC 8613 does not call it secret; the
      driver stores it encrypted like the master secret);
    * aiosqlite logs every statement with its parameters, SQLAlchemy every row it
      reads: saved integration settings hold broker passwords, device rows hold
      (encrypted) keys. The statements stay visible; the values do not.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.DEBUG:
            return True
        if record.name == "aiocoap.cryptography" and record.msg == "* salt = %s":
            record.args = ("[redacted]",)
        elif record.name == "aiosqlite":
            return False  # "executing <call with parameters>" / "operation ... completed"
        elif record.name.startswith("sqlalchemy.engine") and str(record.msg).startswith("Row "):
            record.args = ("[values hidden]",)
        return True


_FILTER = _Redact()
REDACTED_LOGGERS = ("aiocoap.cryptography", "aiosqlite", "sqlalchemy.engine.Engine")


def install_redactions() -> None:
    """Idempotent; done on import so every driver process has it."""
    for name in REDACTED_LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)


install_redactions()
