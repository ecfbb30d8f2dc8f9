"""429 for clients that keep failing to authenticate: bad or missing bearer tokens, failed logins.

A middleware in front of every other one (the operator endpoints included).
Each 401 on a token-protected path (/api/..., /metrics, /ops/logging) and
each failed web login (POST /login answered 401) costs the client address one
token of its bucket (driver_core/rate_limit.py). With no token left:

* a request without a bearer token, and every POST /login, gets 429 with
  Retry-After at once: no token lookup, no password hashing;
* a request with a bearer token is still checked; a valid token is served as
  usual (an authenticated client is never throttled), an invalid one gets 429
  instead of 401.

The address is the TCP peer's: behind a reverse proxy every client shares the
proxy's budget (forwarded headers are not trusted, anyone can write them).

A request with the driver's own callback User-Agent is a callback that found
its way back to the driver (through a proxy or a port forward: direct ones are
refused before they connect, driver_core/callback_policy.py). It gets 403 at
once and costs nothing, so callbacks can never lock the admin out. Anyone can
send that User-Agent, but it only earns a 403: no token or password is checked.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from driver_core.rate_limit import TokenBuckets, source_key

from .docs_page import is_public
from .errors import Handler, error_response

LOGIN_PATH = "/login"
CALLBACK_AGENT = "coap-driver-callbacks/"  # custom_components/callbacks/sender.py USER_AGENT
TOKEN_PATHS = ("/metrics", "/ops/logging")  # operator endpoints, outside /api/


def _guarded(request: web.Request) -> str | None:
    """'token' for token-protected paths, 'login' for a login attempt, None otherwise."""
    path = request.path
    if path.startswith("/api/"):
        return None if is_public(path) else "token"
    if path in TOKEN_PATHS:
        return "token"
    if path == LOGIN_PATH and request.method == "POST":
        return "login"
    return None


def _has_bearer(request: web.Request) -> bool:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return scheme.lower() == "bearer" and bool(token.strip())


def too_many(kind: str, retry_after: int) -> web.Response:
    """The 429: JSON for token paths (the API's error shape), plain text for the login form."""
    headers = {"Retry-After": str(retry_after), "Cache-Control": "no-store"}
    if kind == "token":
        return error_response(
            429,
            "too_many_requests",
            f"too many failed authentications from this address; retry in {retry_after} s",
            headers=headers,
        )
    return web.Response(
        status=429,
        text=f"Too many failed logins from this address. Try again in {retry_after} seconds.\n",
        headers={**headers, "X-Content-Type-Options": "nosniff"},
    )


def own_callback() -> web.Response:
    """The 403 for the driver's own callback: never authenticated, never counted."""
    return error_response(
        403,
        "own_callback",
        "this is the coap-driver's own callback: the driver does not post callbacks to itself; "
        "point callback_url at the receiving application",
    )


def auth_throttle(buckets: TokenBuckets) -> Any:
    """The middleware; `buckets` counts failed authentications per client address."""

    @web.middleware
    async def throttle(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.headers.get("User-Agent", "").startswith(CALLBACK_AGENT):
            return own_callback()
        kind = _guarded(request) if buckets.enabled else None
        if kind is None:
            return await handler(request)
        key = source_key(request.remote or "")
        limited = buckets.exhausted(key)
        if limited and (kind == "login" or not _has_bearer(request)):
            return too_many(kind, buckets.retry_after(key))
        response = await handler(request)
        if response.status == 401:
            buckets.charge(key)
            if limited:
                return too_many(kind, buckets.retry_after(key))
        return response

    return throttle
