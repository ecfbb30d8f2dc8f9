"""The web panel: server-rendered pages on the driver's aiohttp application.

``setup_web(app, driver)`` adds the pages, static files, the session/CSRF gate
and live updates to the REST API's application before it starts. Everything
is served locally (no CDN); JavaScript only enhances (live tables, the
parameter hint of the Commands tab).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

from . import (
    pages_auth,
    pages_charts,
    pages_devices,
    pages_enrollment,
    pages_firmware,
    pages_integrations,
    pages_status,
    pages_tokens,
)
from .context import WEB, WebContext, integration_names
from .live import LiveHub
from .middleware import web_pages
from .render import make_environment
from .session import SessionCodec

if TYPE_CHECKING:
    from driver_core.driver import Driver

STATIC = Path(__file__).resolve().parent / "static"

__all__ = ["setup_web"]


def setup_web(app: web.Application, driver: Driver) -> WebContext:
    """Add the web panel to ``app`` (not started yet); returns its shared context."""
    assert driver.box is not None
    context = WebContext(
        driver=driver,
        env=make_environment(),
        codec=SessionCodec(driver.box.derive_key(b"web-session")),
        hub=LiveHub(driver.bus),
        integration_names=integration_names(driver.integrations.modules),
    )
    app[WEB] = context
    app.middlewares.append(web_pages)
    for module in (
        pages_auth, pages_devices, pages_charts, pages_enrollment, pages_firmware, pages_integrations, pages_tokens,
        pages_status,
    ):
        app.router.add_routes(module.routes)
    app.router.add_static("/static/", STATIC, name="static")
    app.on_shutdown.append(context.hub.shutdown)
    app.on_cleanup.append(context.hub.cleanup)
    return context
