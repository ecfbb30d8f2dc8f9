"""Callback settings: one schema for configuration.yaml, the web form and the REST API.

Each field carries its form label and help text as marker `description` (the
web panel builds the form from the schema). Times are seconds and may be
fractions, so tests and impatient users can use small values.
`async_validate` adds the checks that relate two fields.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import voluptuous as vol

from driver_core.integration_base import (
    form_field,
    schema_errors,
    validated_settings,
)

JITTER_FULL = "full"
JITTER_NONE = "none"

MAX_TIMEOUT_S = 600
MAX_RETRY_FOR_S = 30 * 86400  # a month; also keeps the deadline arithmetic finite
MAX_BACKOFF_S = 86400
MAX_CONCURRENCY = 1000


DOMAIN = "callbacks"
_form = form_field


def _number(value: Any) -> float | None:
    """`value` as a finite number, or None (booleans are not numbers here)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return None
    if not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return value


def seconds(name: str, *, allow_zero: bool, maximum: float) -> Callable[[Any], float]:
    """A duration in seconds: a number, > 0 (or >= 0), at most `maximum`."""
    lower = "0 or more" if allow_zero else "more than 0"

    def validate(value: Any) -> float:
        number = _number(value)
        if number is None:
            raise vol.Invalid(f"{name} must be a number of seconds")
        if number < 0 or (number == 0 and not allow_zero):
            raise vol.Invalid(f"{name} must be {lower} seconds")
        if number > maximum:
            raise vol.Invalid(f"{name} must be at most {maximum:g} seconds")
        return float(number)

    return validate


def concurrency(value: Any) -> int:
    number = _number(value)
    if number is None or number != int(number) or not 1 <= number <= MAX_CONCURRENCY:
        raise vol.Invalid(f"max_concurrency must be a whole number from 1 to {MAX_CONCURRENCY}")
    return int(number)


def secret(value: Any) -> str:
    """Kept byte for byte (no stripping): the receiver signs with the same text."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise vol.Invalid("the HMAC secret must be text")
    return value


SETTINGS_SCHEMA = vol.Schema(
    {
        vol.Optional(
            "timeout",
            default=5.0,
            description=_form("Timeout", "Seconds to wait for the callback endpoint to answer"),
        ): seconds("timeout", allow_zero=False, maximum=MAX_TIMEOUT_S),
        vol.Optional(
            "retry_for",
            default=3600.0,
            description=_form(
                "Retry for",
                "Seconds after the state change during which a failed callback is retried; "
                "then it is recorded as failed (0 = a single attempt)",
            ),
        ): seconds("retry_for", allow_zero=True, maximum=MAX_RETRY_FOR_S),
        vol.Optional(
            "backoff_initial",
            default=1.0,
            description=_form(
                "First retry delay", "Seconds before the first retry; doubles each time"
            ),
        ): seconds("backoff_initial", allow_zero=False, maximum=MAX_BACKOFF_S),
        vol.Optional(
            "backoff_max",
            default=300.0,
            description=_form("Longest retry delay", "The doubling delay never exceeds this"),
        ): seconds("backoff_max", allow_zero=False, maximum=MAX_BACKOFF_S),
        vol.Optional(
            "jitter",
            default=JITTER_FULL,
            description=_form(
                "Jitter",
                "full: each delay is random between 0 and its value, so many clients retrying "
                "do not hit the endpoint together; none: exact delays",
                options={JITTER_FULL: "Full jitter", JITTER_NONE: "No jitter"},
            ),
        ): vol.In((JITTER_FULL, JITTER_NONE), msg="jitter must be full or none"),
        vol.Optional(
            "max_concurrency",
            default=50,
            description=_form(
                "Parallel requests", "Callback requests in flight at once, across all downlinks"
            ),
        ): concurrency,
        vol.Optional(
            "hmac_secret",
            default="",
            description=_form(
                "HMAC secret",
                "When set, every request carries X-Coap-Driver-Signature: "
                "sha256=<HMAC-SHA256 of the body>; empty = unsigned",
                secret=True,
            ),
        ): secret,
        vol.Optional(
            "verify_tls",
            default=True,
            description=_form(
                "Verify TLS certificates",
                "Refuse https:// endpoints whose certificate is not valid",
            ),
        ): vol.Boolean(msg="expected true or false"),
    }
)


async def async_validate(settings: dict[str, Any] | None) -> dict[str, str]:
    """Every problem with `settings` (raw or already validated) as field -> message."""
    try:
        data = SETTINGS_SCHEMA(dict(settings or {}))
    except vol.MultipleInvalid as exc:
        return schema_errors(exc)
    errors: dict[str, str] = {}
    if data["backoff_max"] < data["backoff_initial"]:
        errors["backoff_max"] = (
            f"backoff_max ({data['backoff_max']:g} s) must be at least "
            f"backoff_initial ({data['backoff_initial']:g} s)"
        )
    return errors


async def async_validated(settings: dict[str, Any] | None) -> dict[str, Any]:
    """`settings` with defaults applied, or SettingsError listing every problem."""
    return await validated_settings(settings, SETTINGS_SCHEMA, async_validate, DOMAIN)
