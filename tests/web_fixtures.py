"""Helpers for the web panel tests: a logged-in HTTP client and a headless Chromium.

Fixtures live in tests/test_web.py; these are the plain parts they use.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from driver_core.driver import Driver

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
DESKTOP = {"width": 1280, "height": 860}
PHONE = {"width": 390, "height": 844}
SCREENSHOTS = Path(__file__).resolve().parent.parent / "artifacts" / "screenshots"

ADMIN = "admin"
PASSWORD = "correct horse battery"

_CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


def csrf_of(page: str) -> str:
    found = _CSRF.search(page)
    assert found is not None, "no CSRF token on the page"
    return found.group(1)


def field_error(page: str, field: str) -> str | None:
    """The message shown next to form field ``field`` (None when there is none)."""
    found = re.search(rf'<p class="error" id="f-{re.escape(field)}-error">(.*?)</p>', page, re.S)
    return html.unescape(found.group(1)) if found else None


def alerts(page: str) -> list[str]:
    return [html.unescape(m) for m in re.findall(r'<p class="error" role="alert"[^>]*>(.*?)</p>', page, re.S)]


@dataclass
class Page:
    status: int
    url: str
    text: str


@dataclass
class WebClient:
    """A browser-like HTTP client (cookies kept, redirects followed) for form-level tests."""

    base: str
    http: aiohttp.ClientSession
    csrf: str = ""

    async def get(self, path: str, **kwargs: Any) -> Page:
        async with self.http.get(self.base + path, **kwargs) as response:
            text = await response.text()
            if 'name="csrf_token"' in text:
                self.csrf = csrf_of(text)
            return Page(response.status, str(response.url), text)

    async def post(self, path: str, data: Any, *, csrf: bool = True, **kwargs: Any) -> Page:
        if csrf and isinstance(data, dict):
            data = {"csrf_token": self.csrf, **data}
        async with self.http.post(self.base + path, data=data, **kwargs) as response:
            text = await response.text()
            if 'name="csrf_token"' in text:
                self.csrf = csrf_of(text)
            return Page(response.status, str(response.url), text)

    async def login(self, username: str = ADMIN, password: str = PASSWORD) -> Page:
        await self.get("/login")
        return await self.post("/login", {"username": username, "password": password})


def new_http() -> aiohttp.ClientSession:
    # unsafe=True: keep cookies for an IP address host (127.0.0.1), as browsers do.
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))


def origin(driver: Driver) -> str:
    assert driver.api is not None
    return f"http://127.0.0.1:{driver.api.port}"


async def shoot(page: Any, name: str) -> None:
    """Desktop and phone screenshots of the current page (full length)."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    await page.set_viewport_size(DESKTOP)
    await page.screenshot(path=str(SCREENSHOTS / f"{name}-desktop.png"), full_page=True)
    await page.set_viewport_size(PHONE)
    await page.screenshot(path=str(SCREENSHOTS / f"{name}-phone.png"), full_page=True)
    await page.set_viewport_size(DESKTOP)
