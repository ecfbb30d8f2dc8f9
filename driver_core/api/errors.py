"""One JSON error shape for every failure of the REST API, and the middleware enforcing it.

Clients (and schemathesis) get ``{"error": <code>, "detail": <text>}`` plus
``"field"`` when one input is at fault, whatever went wrong: a refused value,
an unknown route, a body too large, or a bug. aiohttp's own HTML/plain-text
error pages and tracebacks never reach an API client.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

_LOGGER = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024  # the largest body is a device enrollment of a few hundred bytes

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Error codes for aiohttp's own HTTP exceptions, by status.
_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


class ApiError(Exception):
    """An answer other than success; raised by handlers, rendered by the middleware."""

    def __init__(
        self,
        status: int,
        error: str,
        detail: str,
        field: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.error = error
        self.detail = detail
        self.field = field
        self.headers = headers or {}


def error_body(error: str, detail: str, field: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"error": error, "detail": detail}
    if field is not None:
        body["field"] = field
    return body


def error_response(
    status: int,
    error: str,
    detail: str,
    field: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    return web.json_response(error_body(error, detail, field), status=status, headers=headers)


def not_found(what: str) -> ApiError:
    return ApiError(404, "not_found", what)


def _from_http_exception(request: web.Request, exc: web.HTTPException) -> web.Response:
    status = exc.status
    headers = {}
    if status == 405:
        allowed = sorted(getattr(exc, "allowed_methods", ()) or ())
        headers["Allow"] = ", ".join(allowed)
        detail = f"{request.method} is not allowed here (allowed: {', '.join(allowed)})"
    elif status == 404:
        detail = f"no such resource: {request.path}"
    elif status == 413:
        detail = f"the request body is larger than {MAX_BODY_BYTES} bytes"
    else:
        detail = exc.reason
    code = _HTTP_CODES.get(status, "internal_error" if status >= 500 else "bad_request")
    return error_response(status, code, detail, headers=headers)


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every failure under /api/ into the JSON error shape (other paths are left alone)."""
    if not request.path.startswith("/api/"):
        return await handler(request)
    try:
        response = await handler(request)
    except ApiError as exc:
        return error_response(exc.status, exc.error, exc.detail, exc.field, exc.headers)
    except web.HTTPException as exc:
        if exc.status < 400:  # redirects and the like are answers, not errors
            raise
        return _from_http_exception(request, exc)
    except Exception:
        _LOGGER.exception("REST API: unexpected error on %s %s", request.method, request.path)
        return error_response(
            500, "internal_error", "unexpected error; the driver log has the details"
        )
    if isinstance(response, web.HTTPException) and response.status >= 400:
        return _from_http_exception(request, response)  # returned, not raised (static files)
    return response
