"""The REST API server: aiohttp application, bearer-token check, input validation, lifecycle.

Every operation is declared once (routes_*.py); this module routes it, validates
its path, query and body with the declared voluptuous schemas before the handler
runs, and serves the OpenAPI document built from the same declarations.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

import voluptuous as vol
from aiohttp import web

from driver_core.errors import RequestRefused
from driver_core.tokens import verify_token

from . import routes_devices, routes_downlinks, routes_firmware
from .access_log import AccessLogger
from .docs_page import OPENAPI_PATH, add_docs_routes, is_public
from .errors import MAX_BODY_BYTES, ApiError, Handler, json_errors
from .openapi import build_document
from .operation import API_PREFIX, DRIVER, Inputs, Operation
from .schemas import validate

if TYPE_CHECKING:
    from driver_core.driver import Driver

_LOGGER = logging.getLogger(__name__)

OPERATIONS: list[Operation] = [
    *routes_downlinks.OPERATIONS, *routes_devices.OPERATIONS, *routes_firmware.OPERATIONS,
]
OPENAPI_JSON: web.AppKey[str] = web.AppKey("openapi_json")
TOKEN_NAME: web.RequestKey[str] = web.RequestKey("token_name", str)  # who made the request
SHUTDOWN_TIMEOUT = 5.0  # seconds given to running requests when the driver stops


def _unauthorized(detail: str, error: str | None = None) -> ApiError:
    challenge = 'Bearer realm="coap-driver"'
    if error:
        challenge += f', error="{error}"'
    return ApiError(401, "unauthorized", detail, headers={"WWW-Authenticate": challenge})


@web.middleware
async def bearer_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every /api/v1/* path needs a valid token, except the OpenAPI document and the docs page."""
    path = request.path
    if path.startswith(f"{API_PREFIX}/") and not is_public(path):
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise _unauthorized("a bearer token is required: send 'Authorization: Bearer <token>'")
        found = await verify_token(request.app[DRIVER].db, token)
        if found is None:
            raise _unauthorized("the bearer token is invalid or revoked", "invalid_token")
        request[TOKEN_NAME] = found.name
    return await handler(request)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


async def read_json(request: web.Request) -> Any:
    """The request body as JSON, or the 415/413/400 saying why not."""
    if request.content_type != "application/json":
        got = request.content_type if request.headers.get("Content-Type") else "no Content-Type"
        raise ApiError(
            415, "unsupported_media_type", f"the body must be application/json (got {got})"
        )
    raw = await request.read()  # 413 beyond client_max_size
    if not raw.strip():
        raise ApiError(400, "invalid_json", "the request body is empty: a JSON object is expected")
    try:
        data = json.loads(raw, parse_constant=_refuse_constant)
        # Lone surrogates parse but cannot be stored or echoed as UTF-8.
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except (ValueError, RecursionError) as exc:
        raise ApiError(400, "invalid_json", f"the request body is not valid JSON: {exc}") from None
    return data


def _endpoint(op: Operation, body_schema: vol.Schema | None) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        inputs = Inputs()
        if op.path_params is not None:
            inputs.path = validate(op.path_params, request.match_info, "path")
        if op.query is not None:
            inputs.query = validate(op.query, request.query, "query")
        if body_schema is not None:
            inputs.body = validate(body_schema, await read_json(request))
        try:
            return await op.handler(request, inputs)
        except RequestRefused as exc:  # downlink, firmware... refusals keep their status
            raise ApiError(exc.status, exc.error, exc.detail, exc.field) from None

    handle.__name__ = op.operation_id
    return handle


async def openapi_document(request: web.Request) -> web.Response:
    return web.Response(text=request.app[OPENAPI_JSON], content_type="application/json")


def build_app(driver: Driver) -> web.Application:
    """The application with every API route; other parts may add routes before it starts."""
    app = web.Application(middlewares=[json_errors, bearer_auth], client_max_size=MAX_BODY_BYTES)
    app[DRIVER] = driver
    for op in OPERATIONS:
        app.router.add_route(op.method, API_PREFIX + op.path, _endpoint(op, op.body_schema(driver)))
    app[OPENAPI_JSON] = json.dumps(build_document(OPERATIONS, driver), indent=1)
    app.router.add_get(OPENAPI_PATH, openapi_document)
    add_docs_routes(app)
    return app


class ApiServer:
    """The HTTP listener of the REST API (and whatever else is added to ``app``)."""

    def __init__(self, driver: Driver) -> None:
        self.driver = driver
        self.app = build_app(driver)
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def start(self, host: str, port: int) -> None:
        """Listen on host:port (port 0 picks a free one, see ``port``); OSError if it cannot."""
        runner = web.AppRunner(
            self.app, shutdown_timeout=SHUTDOWN_TIMEOUT, access_log_class=AccessLogger
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = runner.addresses[0][1]
        _LOGGER.info("REST API listening on http://%s:%s%s", host, self.port, API_PREFIX)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
