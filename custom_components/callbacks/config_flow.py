"""Callback settings: one schema for configuration.yaml, the web form and the REST API.

Each field carries its form label and help text as marker `description` (the
web panel builds the form from the schema). Times are seconds and may be
fractions, so tests and impatient users can use small values.
`async_validate` adds the checks that relate two fields.
"""

from __future__ import annotations

import ipaddress
import math
import re
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


def networks(name: str) -> Callable[[Any], list[str]]:
    """CIDRs as a YAML list or as text separated by commas or spaces (the web form): each
    checked, returned in canonical form (a bare address is a /32 or /128)."""

    def validate(value: Any) -> list[str]:
        if value is None:
            return []
        if isinstance(value, str):
            value = [item for item in re.split(r"[\s,]+", value) if item]
        if not isinstance(value, list | tuple):
            raise vol.Invalid(f"{name} must be a list of networks, e.g. [127.0.0.0/8]")
        return [_network(name, item) for item in value]

    return validate


def _network(name: str, item: Any) -> str:
    if not isinstance(item, str):
        raise vol.Invalid(f"{name} entry {item!r} is not a network; write it like 10.0.0.0/8 or fd00::/8")
    try:
        return str(ipaddress.ip_network(item.strip()))
    except ValueError:
        pass
    try:
        suggestion = ipaddress.ip_network(item.strip(), strict=False)
    except ValueError:
        raise vol.Invalid(
            f"{name} entry {item!r} is not a network; write it like 10.0.0.0/8 or fd00::/8"
        ) from None
    raise vol.Invalid(f"{name} entry {item!r} has host bits set; did you mean {suggestion}?")


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
        vol.Optional(
            "allowed_networks",
            default=list,
            description=_form(
                "Allowed networks",
                "CIDRs callbacks may reach although refused by default (loopback 127.0.0.0/8 "
                "and ::1/128, link-local 169.254.0.0/16 and fe80::/10, 0.0.0.0/8, multicast), "
                "separated by commas, e.g. 127.0.0.0/8 for a receiver on this machine. "
                "Private networks are allowed anyway; the driver's own ports never are",
            ),
        ): networks("allowed_networks"),
        vol.Optional(
            "denied_networks",
            default=list,
            description=_form(
                "Denied networks",
                "CIDRs callbacks may never reach, in addition to the default refusals; "
                "wins over Allowed networks (e.g. 10.0.0.0/8 if no receiver is on the LAN)",
            ),
        ): networks("denied_networks"),
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
