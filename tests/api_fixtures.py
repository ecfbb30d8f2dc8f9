"""Fixtures for the REST API tests: the running driver's API server and an HTTP client with a token."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from driver_core.api import ApiServer
from driver_core.driver import Driver
from driver_core.tokens import create_token
from tests.conftest import write_config


@dataclass
class Reply:
    status: int
    body: Any  # parsed JSON, text for other content types, None when empty
    headers: Any


@dataclass
class ApiClient:
    driver: Driver
    server: ApiServer
    origin: str  # http://127.0.0.1:<port>
    token: str
    http: aiohttp.ClientSession

    @property
    def base(self) -> str:
        return f"{self.origin}/api/v1"

    async def call(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        data: bytes | str | None = None,
        token: str | None = "default",
        headers: dict[str, str] | None = None,
        params: dict[str, str] | None = None,
    ) -> Reply:
        """One request to /api/v1<path> with the fixture's token (token=None: no header)."""
        sent = dict(headers or {})
        if token is not None:
            sent.setdefault("Authorization", f"Bearer {self.token if token == 'default' else token}")
        async with self.http.request(
            method, self.base + path, json=json, data=data, headers=sent, params=params
        ) as response:
            raw = await response.read()
            if response.content_type == "application/json":
                body: Any = await response.json()
            else:
                body = raw.decode("utf-8") if raw else None
            return Reply(response.status, body, response.headers)


async def api_server_for(driver: Driver) -> tuple[ApiServer, bool]:
    """The driver's own API server when Driver.start() runs one, else a new one (True: ours)."""
    server = getattr(driver, "api", None)
    if isinstance(server, ApiServer) and server.port:
        return server, False
    server = ApiServer(driver)
    await server.start("127.0.0.1", 0)
    return server, True


@asynccontextmanager
async def client_for(driver: Driver) -> AsyncIterator[ApiClient]:
    """An HTTP client with a fresh token for the driver's API server."""
    server, ours = await api_server_for(driver)
    token = await create_token(driver.db, "tests")
    try:
        async with aiohttp.ClientSession() as http:
            yield ApiClient(driver, server, f"http://127.0.0.1:{server.port}", token, http)
    finally:
        if ours:
            await server.stop()


@pytest.fixture
async def api(running_driver: Driver) -> AsyncIterator[ApiClient]:
    async with client_for(running_driver) as client:
        yield client


@pytest.fixture
async def api_on_each_database(db_url: str, tmp_path: Path) -> AsyncIterator[ApiClient]:
    """The API of a driver on SQLite, then on PostgreSQL (text rules differ, e.g. NUL)."""
    config_dir = tmp_path / "api-config"
    # schemathesis checks that requests without a token get 401, many of them: no 429 here.
    write_config(config_dir, db_url, http="  auth_failures_per_minute: 0\n")
    driver = Driver(config_dir)
    await driver.start()
    try:
        async with client_for(driver) as client:
            yield client
    finally:
        await driver.stop()
