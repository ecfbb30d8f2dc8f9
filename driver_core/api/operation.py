"""An API operation declared once: the server routes and validates it, openapi.py documents it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import voluptuous as vol
from aiohttp import web

if TYPE_CHECKING:
    from driver_core.driver import Driver

API_PREFIX = "/api/v1"
DRIVER: web.AppKey[Driver] = web.AppKey("driver")


@dataclass(slots=True)
class Inputs:
    """The validated inputs of one request (defaults applied)."""

    path: dict[str, Any] = field(default_factory=dict)
    query: dict[str, Any] = field(default_factory=dict)
    body: dict[str, Any] = field(default_factory=dict)


Handler = Callable[[web.Request, Inputs], Awaitable[web.StreamResponse]]
BodySchema = vol.Schema | Callable[["Driver"], vol.Schema]


@dataclass(frozen=True, slots=True)
class Link:
    """An OpenAPI link: where a value of this response can be used next."""

    operation_id: str
    parameters: dict[str, str]  # parameter -> runtime expression, e.g. $response.body#/serial


@dataclass(frozen=True, slots=True)
class Response:
    description: str
    schema: str | None = None  # name of a component schema; None: no body
    links: dict[str, Link] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Operation:
    """One method on one path (relative to /api/v1, aiohttp placeholder syntax)."""

    operation_id: str
    method: str
    path: str
    handler: Handler
    summary: str
    tag: str
    responses: dict[int, Response]
    description: str = ""
    path_params: vol.Schema | None = None
    query: vol.Schema | None = None
    body: BodySchema | None = None  # a callable builds it from the driver (e.g. its hw_types)
    body_example: dict[str, Any] | None = None
    # An OpenAPI requestBody for a body that is not JSON (e.g. a firmware upload): the
    # handler reads the body itself; the server does not parse it.
    raw_body: dict[str, Any] | None = None

    def body_schema(self, driver: Driver) -> vol.Schema | None:
        if self.body is None or isinstance(self.body, vol.Schema):
            return self.body
        return self.body(driver)
