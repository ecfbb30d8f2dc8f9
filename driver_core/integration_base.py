"""What every integration component shares: settings errors, form metadata, a status to await."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import voluptuous as vol


class SettingsError(Exception):
    """Settings that cannot be applied; `errors` maps field -> message (shown next to the field)."""

    def __init__(self, errors: dict[str, str], domain: str | None = None) -> None:
        self.errors = errors
        prefix = f"{domain}." if domain else ""
        super().__init__("; ".join(f"{prefix}{field}: {msg}" for field, msg in errors.items()))


def schema_errors(exc: vol.Invalid) -> dict[str, str]:
    """voluptuous errors as field -> message (the first message per top-level field)."""
    errors: dict[str, str] = {}
    for error in exc.errors if isinstance(exc, vol.MultipleInvalid) else [exc]:
        field = str(error.path[0]) if error.path else "base"
        errors.setdefault(field, error.msg)
    return errors


async def validated_settings(
    settings: dict[str, Any] | None,
    schema: vol.Schema,
    validate: Callable[[dict[str, Any] | None], Awaitable[dict[str, str]]],
    domain: str,
) -> dict[str, Any]:
    """`settings` with defaults applied, or SettingsError listing every problem `validate` finds."""
    errors = await validate(settings)
    if errors:
        raise SettingsError(errors, domain)
    return schema(dict(settings or {}))


def text_setting(value: Any) -> str:
    """A text setting, trimmed; an empty YAML value (None) means "not set" (empty string)."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise vol.Invalid("expected text")
    return value.strip()


def form_field(label: str, help_text: str, **extra: Any) -> dict[str, Any]:
    """Form metadata carried as a voluptuous marker `description` (label, help, options...).

    ``secret=True`` marks a password or key: the web form draws a password input and
    never shows the value, and the saved value is encrypted in the database.
    """
    return {"label": label, "help": help_text, **extra}


def is_secret(marker: Any) -> bool:
    """Whether a schema key was declared with ``form_field(..., secret=True)``."""
    meta = getattr(marker, "description", None)
    return isinstance(meta, dict) and bool(meta.get("secret"))


def secret_fields(schema: vol.Schema) -> frozenset[str]:
    """Names of the secret fields of a settings schema (the one place they are declared)."""
    return frozenset(
        str(marker.schema)
        for marker in schema.schema
        if isinstance(marker, vol.Marker) and is_secret(marker)
    )


class WatchableStatus:
    """Mixin: `status` changes are announced with `_changed()` and can be awaited."""

    _change: asyncio.Event | None = None

    @property
    def status(self) -> dict[str, Any]:  # pragma: no cover - defined by each integration
        raise NotImplementedError

    def _changed(self) -> None:
        change, self._change = self._change, asyncio.Event()
        if change is not None:
            change.set()

    async def async_wait_status(
        self, predicate: Callable[[dict[str, Any]], bool], within: float = 10.0
    ) -> dict[str, Any]:
        """Wait until `predicate(status)` holds (for the web panel, the CLI and tests)."""
        async with asyncio.timeout(within):
            while not predicate(status := self.status):
                if self._change is None:
                    self._change = asyncio.Event()
                await self._change.wait()
        return status
