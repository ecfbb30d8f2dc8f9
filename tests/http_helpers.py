"""A real local HTTP endpoint for tests that receive callbacks or webhooks."""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web


@contextlib.asynccontextmanager
async def http_endpoint(
    path: str,
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    *,
    ssl_context: ssl.SSLContext | None = None,
    shutdown_timeout: float = 60.0,
) -> AsyncIterator[int]:
    """Serve POST `path` (an aiohttp route, e.g. "/{kind}") with `handler` on a free loopback
    port; yields the port. HTTPS with `ssl_context`. On exit, handlers still running get
    `shutdown_timeout` seconds before they are cancelled (short for deliberately slow ones)."""
    app = web.Application()
    app.router.add_post(path, handler)
    runner = web.AppRunner(app, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context).start()
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()
