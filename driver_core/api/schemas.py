"""Voluptuous schemas of every REST API input; the OpenAPI document is generated from them.

Each input (request body, query string, path parameter) is validated by one
schema here, and openapi.py converts the very same objects with
voluptuous-openapi, so the published contract cannot drift from what the
server accepts. The validators are therefore written in the subset that
converts faithfully: ``str``/typed callables, ``Length``, ``Range``, ``In``
and anchored patterns (FullMatch, the same regex in Python and ECMAScript).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from typing import Any

import voluptuous as vol
from yarl import URL

from .errors import ApiError

PAGE_LIMIT_MAX = 500
OFFSET_MAX = 1_000_000_000
COMMAND_ID_MAX = 128
CALLBACK_URL_MAX = 2048
# Printable text only: control characters have no business in ids and names, and
# PostgreSQL refuses NUL in text columns.
_TEXT = r"[^\u0000-\u001f\u007f]"


class FullMatch(vol.Match):
    """vol.Match on the whole string (vol.Match only anchors the start, and `$` allows a '\\n')."""

    def __call__(self, v: Any) -> Any:
        if not isinstance(v, str) or not self.pattern.fullmatch(v):
            raise vol.MatchInvalid(self.msg or f"does not match {self.pattern.pattern}")
        return v


def _integer(value: int) -> int:
    """A JSON integer; true/false and 1.0 are refused (Python counts bool as int)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise vol.Invalid(f"must be an integer, got {value!r}")
    return value


def _text(value: str) -> str:
    if not isinstance(value, str):
        raise vol.Invalid(f"must be a string, got {value!r}")
    return value


def _query_integer(value: int) -> int:
    """An integer written in a query string (the hint says what it means, not what arrives)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and re.fullmatch(r"-?[0-9]{1,12}", value):
        return int(value)
    raise vol.Invalid(f"must be an integer, got {value!r}")


def _http_url(value: str) -> str:
    """An absolute http(s) URL the driver can POST callbacks to."""
    try:
        url = URL(value)
    except (ValueError, TypeError):
        raise vol.Invalid("must be an http:// or https:// URL") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise vol.Invalid("must be an http:// or https:// URL with a host")
    return value


def _range_message(name: str, low: int, high: int) -> str:
    return f"{name} must be an integer from {low} to {high}"


# --- path parameters ---------------------------------------------------------------------------

SERIAL_PATTERN = r"^[A-Z0-9]{1,16}$"
SERIAL = vol.All(
    _text,
    FullMatch(SERIAL_PATTERN),
    msg="must be 1 to 16 characters, each A-Z or 0-9",
)
COMMAND_ID = vol.All(
    _text,
    FullMatch(rf"^{_TEXT}{{1,{COMMAND_ID_MAX}}}$"),
    msg=f"must be 1 to {COMMAND_ID_MAX} printable characters",
)
SERIAL_PATH = vol.Schema({vol.Required("serial", description="Device serial number"): SERIAL})
COMMAND_ID_PATH = vol.Schema(
    {vol.Required("command_id", description="Client-defined downlink identifier"): COMMAND_ID}
)

# --- query strings -----------------------------------------------------------------------------


def page_query(default_limit: int = 50, search: bool = False) -> vol.Schema:
    """offset/limit (and optionally search) as they come in a query string."""
    fields: dict[Any, Any] = {
        vol.Optional("offset", default=0, description="Items to skip"): vol.All(
            _query_integer,
            vol.Range(min=0, max=OFFSET_MAX),
            msg=_range_message("offset", 0, OFFSET_MAX),
        ),
        vol.Optional(
            "limit", default=default_limit, description="Items per page"
        ): vol.All(
            _query_integer,
            vol.Range(min=1, max=PAGE_LIMIT_MAX),
            msg=_range_message("limit", 1, PAGE_LIMIT_MAX),
        ),
    }
    if search:
        fields[
            vol.Optional(
                "search",
                description="Case-insensitive part of the serial number or of the name",
            )
        ] = vol.All(
            _text,
            FullMatch(rf"^{_TEXT}{{0,100}}$"),
            msg="must be at most 100 printable characters",
        )
    return vol.Schema(fields, extra=vol.REMOVE_EXTRA)


DEVICES_QUERY = page_query(default_limit=100, search=True)
DOWNLINKS_QUERY = page_query(default_limit=50)

# --- request bodies ----------------------------------------------------------------------------

DOWNLINK_BODY = vol.Schema(
    {
        vol.Required(
            "command",
            description="Name of a command or configuration of the device family "
            "(GET /device-families lists them)",
        ): vol.All(
            _text,
            FullMatch(r"^[a-z0-9_]{1,64}$"),
            msg="must be the name of a command or configuration, e.g. reboot or tx_interval",
        ),
        vol.Optional(
            "parameter",
            description="The new value of a configuration (integer, option label or text); "
            "1 or absent for a command",
        ): vol.Any(None, _integer, _text, msg="must be an integer, a string or null"),
        vol.Optional(
            "command_id",
            description=f"Client-defined unique identifier (1 to {COMMAND_ID_MAX} characters, "
            "e.g. a UUID); generated when absent. Repeating a request with the same "
            "command_id and body is answered 200 with the existing downlink",
        ): COMMAND_ID,
        vol.Optional(
            "callback_url",
            description="http(s) URL that receives a POST on every state change. Loopback, "
            "link-local (169.254.0.0/16, fe80::/10), 0.0.0.0/8, multicast and the driver's "
            "own ports are refused with 400 callback_refused unless the callbacks "
            "integration's allowed_networks lists them; private networks are accepted",
        ): vol.Any(
            None,
            vol.All(
                _text,
                vol.Length(max=CALLBACK_URL_MAX),
                FullMatch(r"^https?://[^\s/?#@]+([/?#]\S*)?$"),
                _http_url,
            ),
            msg=f"must be an http:// or https:// URL of at most {CALLBACK_URL_MAX} characters",
        ),
    }
)

HEX_HINT = "hex digits, an 0x prefix is accepted"


def device_body(hw_types: Collection[int]) -> vol.Schema:
    """Enrollment body; hw_type is limited to the families loaded by this driver."""
    supported = sorted(hw_types)
    listed = ", ".join(str(code) for code in supported)
    return vol.Schema(
        {
            vol.Required("serial", description="Serial number, 1 to 16 of A-Z 0-9"): SERIAL,
            vol.Required("hw_type", description="Device type code"): vol.All(
                _integer, vol.In(supported), msg=f"must be one of the supported types: {listed}"
            ),
            vol.Required(
                "sender_id", description=f"OSCORE Sender ID of the device, 1 to 7 bytes ({HEX_HINT})"
            ): vol.All(
                _text,
                FullMatch(r"^(0x)?([0-9a-fA-F]{2}){1,7}$"),
                msg="must be 1 to 7 bytes written as hex (2 to 14 hex digits)",
            ),
            vol.Required(
                "master_secret", description=f"OSCORE Master Secret, 16 bytes ({HEX_HINT})"
            ): vol.All(
                _text,
                FullMatch(r"^(0x)?[0-9a-fA-F]{32}$"),
                msg="must be exactly 16 bytes written as hex (32 hex digits)",
            ),
            vol.Optional(
                "master_salt", description=f"OSCORE Master Salt, empty or 8 bytes ({HEX_HINT})"
            ): vol.Any(
                None,
                vol.All(_text, FullMatch(r"^((0x)?[0-9a-fA-F]{16})?$")),
                msg="must be empty or 8 bytes written as hex (16 hex digits)",
            ),
            vol.Optional("name", description="Display name"): vol.Any(
                None,
                vol.All(_text, FullMatch(rf"^{_TEXT}{{0,100}}$")),
                msg="must be at most 100 printable characters",
            ),
        }
    )


# --- applying a schema -------------------------------------------------------------------------


def _leaves(exc: vol.Invalid) -> list[vol.Invalid]:
    if isinstance(exc, vol.MultipleInvalid):
        return [leaf for sub in exc.errors for leaf in _leaves(sub)]
    return [exc]


def _key_name(key: Any) -> str:
    return str(key.schema if isinstance(key, vol.Marker) else key)


def _first_error(schema: vol.Schema, exc: vol.Invalid) -> vol.Invalid:
    """The error to report: an unknown field first, then in the schema's declaration order."""
    order = {_key_name(key): index for index, key in enumerate(schema.schema)}
    return min(
        _leaves(exc),
        key=lambda err: order.get(_key_name(err.path[0]), -1) if err.path else -1,
    )


def validate(schema: vol.Schema, data: Any, where: str = "body") -> dict[str, Any]:
    """``schema(data)``, or ApiError 400 naming the first refused field."""
    if not isinstance(data, Mapping):
        raise ApiError(400, "invalid_body", "the request body must be a JSON object")
    try:
        return schema(dict(data))
    except vol.Invalid as exc:
        error = _first_error(schema, exc)
        field = _key_name(error.path[0]) if error.path else None
        message = error.error_message
        if message == "extra keys not allowed":
            known = sorted(_key_name(key) for key in schema.schema)
            message = f"unknown field (expected: {', '.join(known)})"
        elif message == "required key not provided":
            message = "required"
        where_text = {"body": "", "query": "query parameter ", "path": ""}[where]
        raise ApiError(
            400, "invalid_field", f"{where_text}{field}: {message}" if field else message, field
        ) from None
