"""Operator endpoints next to the REST API: ``GET /metrics``, ``GET|PUT /ops/logging``, ``GET /ops/health``.

The first two need an API bearer token (`coap-driver token create NAME`), like the REST
API, even on localhost: the HTTP listener also serves the web panel and may be
reachable from other machines. They are not part of the device API (not in its
OpenAPI document) and sit in front of the web panel's login gate, as a
middleware, so Prometheus and scripts get plain answers instead of a login page.
``/ops/health`` alone needs no token: container health checks and load balancers
call it, and it says nothing but whether this instance can serve (database
reachable, CoAP listener bound).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import text

from . import logs
from .tokens import verify_token

if TYPE_CHECKING:
    from .driver import Driver

_LOGGER = logging.getLogger(__name__)

METRICS_PATH = "/metrics"
LOGGING_PATH = "/ops/logging"
HEALTH_PATH = "/ops/health"
HEALTH_DB_TIMEOUT_S = 2.0
MAX_BODY = 64 * 1024


def _problem(status: int, error: str, detail: str, **headers: str) -> web.Response:
    return web.json_response({"error": error, "detail": detail}, status=status, headers=headers)


async def _authorized(driver: Driver, request: web.Request) -> bool:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    token = token.strip()
    return scheme.lower() == "bearer" and bool(token) and await verify_token(driver.db, token) is not None


async def _metrics(driver: Driver, request: web.Request) -> web.StreamResponse:
    if request.method != "GET":
        return _problem(405, "method_not_allowed", "use GET", Allow="GET")
    assert driver.metrics is not None
    body = await driver.metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def parse_levels(data: Any) -> tuple[str | None, dict[str, str]]:
    """``{"default": "info", "logs": {"driver_core.coap": "debug"}}`` -> checked levels.

    ValueError says what is wrong, in words.
    """
    if not isinstance(data, dict):
        raise ValueError('expected a JSON object like {"logs": {"driver_core.coap": "debug"}}')
    unknown = sorted(set(data) - {"default", "logs"})
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r} (use default and logs)")
    default = data.get("default")
    if default is not None:
        default = logs.check_level(default)
    levels = data.get("logs") or {}
    if not isinstance(levels, dict):
        raise ValueError("logs must be an object: logger name -> level")
    checked = {}
    for name, level in levels.items():
        if not name or not isinstance(name, str) or len(name) > 200 or name != name.strip():
            raise ValueError(f"invalid logger name {name!r}")
        try:
            checked[name] = logs.check_level(level)
        except ValueError as exc:
            raise ValueError(f"logs.{name}: {exc}") from None
    return default, checked


async def _logging(request: web.Request) -> web.StreamResponse:
    if request.method == "GET":
        return web.json_response(logs.current_levels())
    if request.method != "PUT":
        return _problem(405, "method_not_allowed", "use GET or PUT", Allow="GET, PUT")
    raw = await request.content.read(MAX_BODY + 1)
    if len(raw) > MAX_BODY:
        return _problem(413, "too_large", f"the body is larger than {MAX_BODY} bytes")
    try:
        default, levels = parse_levels(json.loads(raw or b"null"))
    except ValueError as exc:  # JSONDecodeError included
        return _problem(400, "invalid_levels", str(exc))
    logs.set_levels(default, levels)
    _LOGGER.info(
        "Log levels changed over HTTP: default=%s %s",
        default or "unchanged",
        " ".join(f"{name}={level}" for name, level in levels.items()),
    )
    return web.json_response(logs.current_levels())


async def _health(driver: Driver, request: web.Request) -> web.StreamResponse:
    """200 ``{"status": "ok"}`` when this instance serves devices, else 503 naming the part."""
    if request.method != "GET":
        return _problem(405, "method_not_allowed", "use GET", Allow="GET")
    if driver.coap_listener is None:
        return web.json_response({"status": "unavailable", "detail": "coap listener not running"}, status=503)
    try:
        async with asyncio.timeout(HEALTH_DB_TIMEOUT_S), driver.db.session() as session:
            await session.execute(text("SELECT 1"))
    except Exception as exc:  # any failure means "not healthy"; the reason goes to the log only
        _LOGGER.warning("Health check: database unreachable (%s)", type(exc).__name__)
        return web.json_response({"status": "unavailable", "detail": "database unreachable"}, status=503)
    if not driver.db.health.writable:  # reachable, but refusing writes (disk full, read-only)
        return web.json_response({"status": "unavailable", "detail": "database refuses writes"}, status=503)
    return web.json_response({"status": "ok"})


def ops_middleware(driver: Driver) -> Any:
    """The middleware serving the operator endpoints; every other path goes on."""

    @web.middleware
    async def serve(request: web.Request, handler: Any) -> web.StreamResponse:
        path = request.path
        if path == HEALTH_PATH:
            return await _health(driver, request)
        if path not in (METRICS_PATH, LOGGING_PATH):
            return await handler(request)
        if not await _authorized(driver, request):
            return _problem(
                401,
                "unauthorized",
                "a valid API token is required: Authorization: Bearer <token> "
                "(create one with: coap-driver token create NAME)",
                **{"WWW-Authenticate": 'Bearer realm="coap-driver"'},
            )
        if path == METRICS_PATH:
            return await _metrics(driver, request)
        return await _logging(request)

    return serve
