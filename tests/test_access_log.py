"""The HTTP access log never holds a credential, whatever the route.

Real requests to the running driver's listener (REST API, web panel, /metrics,
/ops/health, the server-sent events path) with tokens in the query string, in a
bearer header and in a Referer; the access log lines are caught as the driver
writes them (text and JSON formats) and checked word for word.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest
import yarl
from aiohttp import web

from driver_core import logs
from driver_core.api.access_log import AccessLogger
from tests.api_fixtures import ApiClient

SECRET = "SECRET-4f1c"


class Lines(logging.Handler):
    """The access log records, handed to the test as they are written."""

    def __init__(self) -> None:
        super().__init__()
        self.queue: asyncio.Queue[logging.LogRecord] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()

    def emit(self, record: logging.LogRecord) -> None:
        self._loop.call_soon_threadsafe(self.queue.put_nowait, record)

    async def next(self) -> tuple[str, str]:
        """The next line, as the text and as the JSON formatter write it."""
        record = await asyncio.wait_for(self.queue.get(), 10)
        return logs.make_formatter("text").format(record), logs.JsonFormatter().format(record)


@pytest.fixture
def access_log() -> Iterator[None]:
    logger = logging.getLogger("aiohttp.access")
    level = logger.level
    logger.setLevel(logging.INFO)
    yield
    logger.setLevel(level)


@pytest.fixture
async def lines(access_log: None) -> AsyncIterator[Lines]:
    handler = Lines()
    logger = logging.getLogger("aiohttp.access")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


# (request target sent, as logged, status)
REQUESTS = [
    (f"/api/v1/devices?token={SECRET}&access_token={SECRET}&page=2",
     "/api/v1/devices?token=***&access_token=***&page=2", 200),
    (f"/metrics?token={SECRET}", "/metrics?token=***", 200),
    (f"/devices?q=a&access_token={SECRET}", "/devices?q=a&access_token=***", 303),
    (f"/devices/A0000001/events?TOKEN={SECRET}", "/devices/A0000001/events?TOKEN=***", 303),
    (f"/ops/health?tok%65n={SECRET}&x=%26", "/ops/health?tok%65n=***&x=%26", 200),
    (f"/login?next=%2Fdevices&token={SECRET}%26more", "/login?next=%2Fdevices&token=***", 303),
]


async def test_no_credential_reaches_the_access_log(api: ApiClient, lines: Lines) -> None:
    async with aiohttp.ClientSession() as http:
        for sent, logged, status in REQUESTS:
            headers = {"Authorization": f"Bearer {api.token}",
                       "Referer": f"http://panel.example/devices?access_token={SECRET}"}
            url = api.origin + sent
            async with http.get(yarl.URL(url, encoded=True), headers=headers,
                                allow_redirects=False) as response:
                assert response.status == status, sent
            text, as_json = await lines.next()
            assert f'"GET {logged} HTTP/1.1" {status} ' in text, text
            assert '"http://panel.example/devices?access_token=***"' in text, text
            for line in (text, as_json):
                assert SECRET not in line and api.token not in line, line


async def test_credential_headers_are_hidden_in_any_access_log_format(lines: Lines) -> None:
    async def handler(request: web.Request) -> web.Response:
        response = web.Response(text="ok")
        response.set_cookie("session", SECRET)
        return response

    app = web.Application()
    app.router.add_get("/x", handler)
    runner = web.AppRunner(
        app,
        access_log_class=AccessLogger,
        access_log_format='"%r" %{Authorization}i %{Proxy-Authorization}i %{Cookie}i '
        "%{Set-Cookie}o %{Referer}i %{User-Agent}i",
    )
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        headers = {"Authorization": f"Bearer {SECRET}", "Proxy-Authorization": f"Basic {SECRET}",
                   "Cookie": f"session={SECRET}", "Referer": f"http://r.example/?token={SECRET}",
                   "User-Agent": "probe/1"}
        async with aiohttp.ClientSession() as http, http.get(
            f"http://127.0.0.1:{port}/x?access_token={SECRET}", headers=headers
        ) as response:
            assert response.status == 200
        text, as_json = await lines.next()
        assert text.endswith(
            '"GET /x?access_token=*** HTTP/1.1" *** *** *** *** http://r.example/?token=*** probe/1'
        ), text
        assert SECRET not in as_json
    finally:
        await runner.cleanup()
