"""The HTTP access log without credentials, whatever the route.

aiohttp writes one line per request from what the client sent; a token in the
query string (``?token=``, ``?access_token=``), a bearer header or a cookie would
land in the log in full. The runner of the HTTP listener (api/server.py) uses
``AccessLogger``, so no handler has to remember it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any
from urllib.parse import unquote_plus

from aiohttp import web_log
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import StreamResponse

# Query keys and headers whose values are credentials (compared in lower case).
SECRET_QUERY_KEYS = frozenset(
    {"token", "access_token", "refresh_token", "id_token", "api_key", "apikey", "password", "secret"}
)
SECRET_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "set-cookie"})
HIDDEN = "***"

_Key = str | tuple[str, str]


def redact_query(target: str) -> str:
    """``path?query`` (as sent, still percent-encoded) with credential values as ``***``."""
    path, mark, query = target.partition("?")
    if not mark:
        return target
    items = []
    for item in query.split("&"):
        key, equals, _ = item.partition("=")
        if equals and unquote_plus(key).lower() in SECRET_QUERY_KEYS:
            item = f"{key}={HIDDEN}"
        items.append(item)
    return f"{path}?{'&'.join(items)}"


class AccessLogger(web_log.AccessLogger):
    """aiohttp's access log, in any format, with credentials shown as ``***``.

    The request line shows the target as sent (percent-encoded, so a value cannot
    pose as a second parameter) with credential query values hidden, the Referer
    likewise; Authorization, Proxy-Authorization, Cookie and Set-Cookie are
    hidden whole. The JSON log format's extra fields come from the same values.
    """

    def _format_line(
        self, request: BaseRequest, response: StreamResponse, time: float
    ) -> Iterable[tuple[_Key, Any]]:
        line = super()._format_line(request, response, time)
        return [(key, _redact(key, value, request)) for key, value in line]


def _redact(key: _Key, value: Any, request: BaseRequest | None) -> Any:
    if key == "first_request_line" and request is not None:
        version = f"HTTP/{request.version.major}.{request.version.minor}"
        return f"{request.method} {redact_query(request.raw_path)} {version}"
    if isinstance(key, tuple) and key[0] in ("request_header", "response_header"):
        name = key[1].lower()
        if name in SECRET_HEADERS and value != "-":
            return HIDDEN
        if name == "referer":
            return redact_query(value)
    return value
