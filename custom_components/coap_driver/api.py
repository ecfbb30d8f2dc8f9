"""The driver's REST API, as far as Home Assistant needs it (docs/api.md)."""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import quote

import aiohttp

from .const import TIMEOUT_S


class DriverApiError(Exception):
    """The driver refused a request or could not be reached; str() says which and why."""

    def __init__(self, message: str, status: int | None = None, error: str | None = None):
        super().__init__(message)
        self.status = status
        self.error = error


class DriverApi:
    def __init__(self, session: aiohttp.ClientSession, url: str, token: str) -> None:
        self._session = session
        self.url = url.rstrip("/")
        self._token = token

    async def _call(self, method: str, path: str, body: Any = None) -> Any:
        try:
            async with asyncio.timeout(TIMEOUT_S):
                async with self._session.request(
                    method,
                    f"{self.url}/api/v1{path}",
                    json=body,
                    headers={"Authorization": f"Bearer {self._token}"},
                ) as response:
                    try:
                        data = await response.json(content_type=None)
                    except ValueError:
                        data = None
                    if response.status >= 400:
                        detail = data.get("detail") if isinstance(data, dict) else None
                        error = data.get("error") if isinstance(data, dict) else None
                        raise DriverApiError(
                            detail or f"HTTP {response.status} from {self.url}",
                            response.status,
                            error,
                        )
                    return data
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise DriverApiError(
                f"cannot reach the driver at {self.url}: {exc or type(exc).__name__}"
            ) from exc

    async def check(self) -> None:
        """A cheap authenticated request: validates the URL and the token."""
        await self._call("GET", "/devices?limit=1")

    async def schedule(
        self, serial: str, command: str, parameter: Any = None, command_id: str | None = None
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"command": command}
        if parameter is not None:
            body["parameter"] = parameter
        if command_id:
            body["command_id"] = command_id
        return await self._call("POST", f"/devices/{quote(serial, safe='')}/downlinks", body)

    async def cancel(self, command_id: str) -> dict[str, Any]:
        return await self._call("DELETE", f"/downlinks/{quote(command_id, safe='')}")
