"""REST API of the driver (aiohttp): downlinks, devices, OpenAPI document and docs page."""

from __future__ import annotations

from .server import ApiServer, build_app

__all__ = ["ApiServer", "build_app"]
