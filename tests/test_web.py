"""The web panel end to end: a real driver (UDP, built-in MQTT broker, SQLite), real HTTP, and
headless Chromium (Playwright) for the seed's web-interface steps. Screenshots of every page,
desktop and phone, go to artifacts/screenshots (the path is printed once per run).
"""

from __future__ import annotations

import asyncio
import html
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import cbor2
import pytest
import voluptuous as vol
import yarl
from playwright.async_api import Browser, async_playwright, expect
from sqlalchemy import func, insert, select

from driver_core.driver import Driver
from driver_core.enrollment import DeviceInput, add_device
from driver_core.integration_base import form_field
from driver_core.storage.models import Device, Downlink, IntegrationSettings, User
from driver_core.tokens import create_token
from driver_core.web import forms, middleware, users_cli
from driver_core.web.passwords import hash_password, verify_password
from driver_core.web.session import Session, SessionCodec
from tests.conftest import make_device, session_for, write_config
from tests.mqtt_helpers import Collector, free_port
from tests.web_fixtures import (
    ADMIN,
    CHROMIUM,
    CHROMIUM_ARGS,
    DESKTOP,
    PASSWORD,
    SCREENSHOTS,
    WebClient,
    alerts,
    field_error,
    new_http,
    origin,
    shoot,
)

DEVICES = [("A0000001", 17), ("A0000002", 16), ("B0000003", 24)]


@dataclass
class Panel:
    driver: Driver
    base: str
    mqtt_port: int
    devices: dict[str, DeviceInput]


@pytest.fixture(scope="session")
def screenshots(request: pytest.FixtureRequest) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    line = f"\nweb panel screenshots: {SCREENSHOTS}"
    if capture is not None:
        with capture.global_and_fixture_disabled():
            print(line)
    else:
        print(line)
    return SCREENSHOTS


@pytest.fixture
async def panel(tmp_path: Path) -> AsyncIterator[Panel]:
    port = free_port()
    config_dir = tmp_path / "config"
    write_config(config_dir, extra=f"mqtt:\n  builtin_port: {port}\n")
    driver = Driver(config_dir)
    await driver.start()
    try:
        await users_cli.create_user(driver.db, ADMIN, PASSWORD)
        devices = {}
        for index, (serial, hw_type) in enumerate(DEVICES, start=1):
            device = make_device(serial, hw_type, index)
            await add_device(driver.db, driver.box, device)
            devices[serial] = device
        yield Panel(driver, origin(driver), port, devices)
    finally:
        await driver.stop()


@pytest.fixture
async def client(panel: Panel) -> AsyncIterator[WebClient]:
    async with new_http() as http:
        web = WebClient(panel.base, http)
        page = await web.login()
        assert page.status == 200 and page.url == panel.base + "/devices"
        yield web


@pytest.fixture
async def browser(screenshots: Path) -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            await chromium.close()


@pytest.fixture
async def page(browser: Browser, panel: Panel):
    context = await browser.new_context(viewport=DESKTOP, base_url=panel.base)
    context.set_default_timeout(10_000)
    tab = await context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda error: errors.append(str(error)))
    try:
        yield tab
    finally:
        await context.close()
    assert errors == []  # no script error on any page


async def count(driver: Driver, model) -> int:
    async with driver.db.session() as session:
        return int(await session.scalar(select(func.count()).select_from(model)))


async def browser_login(tab, username: str = ADMIN, password: str = PASSWORD) -> None:
    await tab.goto("/devices")
    await expect(tab).to_have_url(f"{tab.url.split('/login')[0]}/login?next=%2Fdevices")
    await tab.get_by_label("Username").fill(username)
    await tab.get_by_label("Password").fill(password)
    await tab.get_by_role("button", name="Log in").click()


async def menu(tab, name: str) -> None:
    """Follow an entry of the main menu."""
    await tab.get_by_role("navigation", name="Main menu").get_by_role("link", name=name).click()


async def live(tab) -> None:
    """Wait until the page's server-sent event stream is open."""
    await expect(tab.locator('body[data-live="open"]')).to_have_count(1)


# --- login, session, CSRF ---------------------------------------------------------------------


async def test_nothing_but_login_and_static_without_a_session(panel: Panel) -> None:
    async with new_http() as http:
        for path in ("/devices", "/devices/A0000001/commands", "/integrations/mqtt", "/tokens",
                     "/status", "/enrollment", "/nope"):
            async with http.get(panel.base + path, allow_redirects=False) as response:
                assert response.status == 303, path
                assert response.headers["Location"].startswith("/login?next=%2F"), path
        async with http.get(panel.base + "/static/app.css") as response:
            assert response.status == 200
        async with http.post(panel.base + "/tokens", data={"name": "x"}, allow_redirects=False) as response:
            assert response.status == 303 and response.headers["Location"] == "/login"
        async with http.get(panel.base + "/api/v1/devices") as response:  # the API keeps its tokens
            assert response.status == 401 and (await response.json())["error"] == "unauthorized"
        async with http.get(panel.base + "/api/v1/docs") as response:
            assert response.status == 200
    assert await count(panel.driver, IntegrationSettings) == 0


async def test_session_cookie_flags_and_security_headers(panel: Panel) -> None:
    async with new_http() as http, http.get(panel.base + "/login") as response:
        cookie = response.headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Path=/" in cookie
        assert response.headers["X-Frame-Options"] == "DENY"
        assert "script-src 'self'" in response.headers["Content-Security-Policy"]


async def test_wrong_login_is_refused_with_a_message(panel: Panel) -> None:
    async with new_http() as http:
        web = WebClient(panel.base, http)
        for username, password in ((ADMIN, "wrong password"), ("nobody", PASSWORD)):
            page = await web.login(username, password)
            assert page.status == 401
            assert "Wrong username or password." in page.text
        page = await web.login("", "")
        assert page.status == 401 and "Enter your username and password." in page.text
        page = await web.get("/devices")
        assert page.url.startswith(panel.base + "/login")


async def test_login_goes_back_to_the_page_asked_for_but_never_off_site(panel: Panel) -> None:
    async with new_http() as http:
        web = WebClient(panel.base, http)
        page = await web.get("/devices/A0000001/commands")
        assert page.url == panel.base + "/login?next=/devices/A0000001/commands"  # decoded by yarl
        page = await web.post("/login", {"username": ADMIN, "password": PASSWORD,
                                         "next": "/devices/A0000001/commands"})
        assert page.url == panel.base + "/devices/A0000001/commands"
        await web.post("/logout", {})
        await web.get("/login")
        page = await web.post("/login", {"username": ADMIN, "password": PASSWORD,
                                         "next": "//evil.example/x"})
        assert page.url == panel.base + "/devices"


# What the server sees in the form field ``next`` (aiohttp encodes the form), each an
# attempt to leave the site once a browser or urljoin has normalised it (WHATWG URL parser:
# tab/CR/LF dropped anywhere, C0 and spaces trimmed, "\\" read as "/", "//host" scheme-relative).
HOSTILE_NEXT = [
    "/\t/evil.com", "/%09/evil.com", "//evil.com", "/\\evil.com", "\\/evil.com", "/\\/evil.com",
    "/\r\n/evil.com", "/%0d%0a/evil.com", "/x\r\nSet-Cookie: a=b", "/%0D%0ASet-Cookie:%20a=b",
    " /x", "\t//evil.com", "\x00//evil.com", "/\x00/evil.com", "/x ", "/%2F/evil.com",
    "/%5C/evil.com", "%2F%2Fevil.com", "https://evil.com", "http:evil.com", "javascript:alert(1)",
    "/\uff0fevil.com", "\u2215\u2215evil.com", "/\u202e/moc.live", "/%E2%80%AE/x", "/\u3000/x",
    "", "devices",
]
LEGITIMATE_NEXT = ["/devices?page=2", "/devices/A0000001#commands", "/devices?q=a%26b&sort=serial",
                   "/"]


async def _login_location(base: str, target: str) -> str:
    """Location of the answer to a successful POST /login with next=target (not followed)."""
    async with new_http() as http:
        web = WebClient(base, http)
        await web.get("/login")
        form = {"csrf_token": web.csrf, "username": ADMIN, "password": PASSWORD, "next": target}
        async with http.post(base + "/login", data=form, allow_redirects=False) as response:
            assert response.status == 303, (target, response.status, await response.text())
            return response.headers["Location"]


async def test_login_redirects_only_to_a_local_path(panel: Panel) -> None:
    for target in HOSTILE_NEXT:
        assert await _login_location(panel.base, target) == "/", repr(target)
    for target in LEGITIMATE_NEXT:
        assert await _login_location(panel.base, target) == target, repr(target)


async def test_next_survives_the_way_to_login_exactly_and_login_page_drops_hostile_ones(
    panel: Panel,
) -> None:
    async with new_http() as http:
        wanted = "/devices?q=a%26b&sort=serial"  # a search for "a&b"
        async with http.get(panel.base + wanted, allow_redirects=False) as response:
            assert response.headers["Location"] == "/login?next=%2Fdevices%3Fq%3Da%2526b%26sort%3Dserial"
        web = WebClient(panel.base, http)
        await web.login()
        for raw, location in (("/%0d%0a/evil.com", "/"), ("/%09/evil.com", "/"),
                              ("%2Fdevices%3Fpage%3D2", "/devices?page=2")):
            url = yarl.URL(panel.base + "/login?next=" + raw, encoded=True)
            async with http.get(url, allow_redirects=False) as response:
                assert (response.status, response.headers["Location"]) == (303, location), raw


async def test_post_without_or_with_a_wrong_csrf_token_is_refused(panel: Panel, client: WebClient) -> None:
    body = {"serial": "C0000001", "hw_type": "17", "sender_id": "c1",
            "master_secret": "00" * 16}
    page = await client.post("/enrollment/add", body, csrf=False)
    assert page.status == 403 and "CSRF" in page.text
    page = await client.post("/enrollment/add", {**body, "csrf_token": "forged"}, csrf=False)
    assert page.status == 403
    page = await client.post("/tokens", {"name": "x"}, csrf=False)
    assert page.status == 403
    page = await client.post("/integrations/mqtt", {"uplink_topic": "x/{{serial}}"}, csrf=False)
    assert page.status == 403
    assert await count(panel.driver, Device) == len(DEVICES)
    assert await count(panel.driver, IntegrationSettings) == 0
    login = {"username": ADMIN, "password": PASSWORD}
    async with new_http() as http, http.post(panel.base + "/login", data=login) as response:
        assert response.status == 403  # the login form is protected too


async def test_logout_ends_the_session(client: WebClient, panel: Panel) -> None:
    page = await client.post("/logout", {})
    assert page.url == panel.base + "/login?notice=logged_out"
    assert "You are logged out." in page.text
    page = await client.get("/devices")
    assert page.url.startswith(panel.base + "/login")


async def test_deleting_a_user_ends_their_sessions(client: WebClient, panel: Panel) -> None:
    assert (await client.get("/tokens")).status == 200
    assert await users_cli.delete_user(panel.driver.db, ADMIN) is True
    page = await client.get("/tokens")
    assert page.url == panel.base + "/setup"  # no user left: the first-admin form


async def test_first_admin_form_only_while_there_is_no_user(panel: Panel) -> None:
    async with new_http() as http:
        web = WebClient(panel.base, http)
        page = await web.get("/setup")
        assert page.url == panel.base + "/login"  # there is a user already
        page = await web.post("/setup", {"username": "mallory", "password": "password123",
                                         "password_confirm": "password123"})
        assert page.url == panel.base + "/login"
    assert [line.split()[0] for line in await users_cli.list_users(panel.driver.db)] == [ADMIN]

    await users_cli.delete_user(panel.driver.db, ADMIN)
    async with new_http() as http:
        web = WebClient(panel.base, http)
        page = await web.get("/devices")
        assert page.url == panel.base + "/setup"
        cases = [
            ({"username": "bad name!", "password": "password123", "password_confirm": "password123"},
             "username", "1 to 64 characters: letters, digits and _ . @ -, starting with a letter or digit"),
            ({"username": "root", "password": "short", "password_confirm": "short"},
             "password", "at least 8 characters"),
            ({"username": "root", "password": "password123", "password_confirm": "password124"},
             "password_confirm", "the two passwords differ"),
        ]
        for body, field, message in cases:
            page = await web.post("/setup", body)
            assert page.status == 400
            assert field_error(page.text, field) == message
        assert await count(panel.driver, User) == 0
        page = await web.post("/setup", {"username": "root", "password": "password123",
                                         "password_confirm": "password123"})
        assert page.url == panel.base + "/devices?notice=welcome"
        assert "Welcome!" in page.text
        page = await web.get("/setup")
        assert page.url == panel.base + "/login" or page.url == panel.base + "/devices"
    assert [line.split()[0] for line in await users_cli.list_users(panel.driver.db)] == ["root"]


async def test_users_cli_functions(panel: Panel) -> None:
    db = panel.driver.db
    assert await users_cli.create_user(db, "ops", "password123") == (
        "user 'ops' created; log in at the web panel"
    )
    with pytest.raises(users_cli.UserError, match="a user named 'ops' already exists"):
        await users_cli.create_user(db, "ops", "password123")
    with pytest.raises(users_cli.UserError, match="at least 8 characters"):
        await users_cli.create_user(db, "ops2", "short")
    assert [line.split()[0] for line in await users_cli.list_users(db)] == [ADMIN, "ops"]
    assert await users_cli.delete_user(db, "ops") is True
    assert await users_cli.delete_user(db, "ops") is False


def test_password_hashes_and_session_cookies() -> None:
    stored = hash_password("s3cret-pass")
    assert stored.startswith("scrypt$16384$8$1$")
    assert verify_password("s3cret-pass", stored) and not verify_password("s3cret-pasS", stored)
    assert not verify_password("x", "garbage") and not verify_password("x", "scrypt$1$2$3$!$!")
    codec = SessionCodec(b"k" * 32)
    cookie = codec.dump(Session(user_id=7, fingerprint="f"), now=1000)
    loaded = codec.load(cookie, now=1001)
    assert (loaded.user_id, loaded.fingerprint, loaded.dirty) == (7, "f", False)
    assert codec.load(cookie[:-2] + "xx", now=1001).user_id is None  # forged
    assert codec.load(cookie, now=1000 + 12 * 3600).user_id is None  # expired
    assert SessionCodec(b"j" * 32).load(cookie, now=1001).user_id is None  # other key


# --- forms built from config-flow schemas -----------------------------------------------------


def test_any_integration_schema_becomes_a_form() -> None:
    schema = vol.Schema({
        vol.Required("mode", default="a", description=form_field("Mode", "pick", options={"a": "A", "b": "B"})): str,
        vol.Optional("token", default="", description=form_field("Token", "secret", secret=True)): str,
        vol.Optional("enabled", default=True): bool,
        vol.Optional("level", default=3, description=form_field("Level", "1-5", options=[1, 3, 5])): int,
        vol.Optional("host", default="h"): str,
    })
    fields = forms.fill(forms.describe(schema), {"mode": "b", "token": "t", "enabled": False, "level": 5})
    assert [(f.name, f.kind, f.label) for f in fields] == [
        ("mode", "select", "Mode"), ("token", "password", "Token"), ("enabled", "checkbox", "Enabled"),
        ("level", "select", "Level"), ("host", "text", "Host"),
    ]
    assert fields[0].value == "b" and fields[0].options == [("a", "A"), ("b", "B")]
    assert fields[1].value == "" and fields[1].has_secret  # a secret is never sent back
    assert fields[2].checked is False and fields[3].value == "5" and fields[4].value == "h"
    changes = forms.changes_from(fields, {"mode": "a", "token": "", "level": "1", "host": "x"})
    assert changes == {"mode": "a", "enabled": False, "level": "1", "host": "x"}  # empty secret kept
    assert forms.changes_from(fields, {"token__clear": "on"})["token"] == ""


# --- devices list: 100,000 devices ------------------------------------------------------------


async def test_devices_list_pages_100000_devices(panel: Panel, client: WebClient) -> None:
    base = datetime(2025, 1, 1, tzinfo=UTC)
    rows = [
        {
            "serial": f"S{i:07d}", "hw_type": (17, 16, 24)[i % 3], "kid": b"\x5a" + i.to_bytes(4, "big"),
            "master_secret_enc": b"x", "master_salt_enc": b"x", "name": f"meter {i}",
            "created_at": base, "last_seen": base + timedelta(seconds=i), "tx_interval": 60,
            "uplinks_since_join": 5,
        }
        for i in range(100_000)
    ]
    async with panel.driver.db.session() as session, session.begin():
        for start in range(0, len(rows), 10_000):
            await session.execute(insert(Device), rows[start : start + 10_000])
    started = time.monotonic()
    page = await client.get("/devices?sort=last_seen&order=desc&per=100")
    first = time.monotonic() - started
    assert page.status == 200
    assert "100003 devices" in page.text
    serials = [line.split('">')[1].split("<")[0] for line in page.text.split('<td data-label="Serial"><a href="/devices/')[1:]]
    assert serials[:3] == ["S0099999", "S0099998", "S0099997"] and len(serials) == 100
    started = time.monotonic()
    page = await client.get("/devices?sort=name&order=asc&per=50&page=1500")
    deep = time.monotonic() - started
    assert "Page 1500 of 2001" in page.text
    page = await client.get("/devices?q=S004242")
    assert "10 devices matching “S004242”" in page.text
    assert first < 2.0 and deep < 2.0, (first, deep)


async def test_devices_list_tolerates_any_query(client: WebClient) -> None:
    page = await client.get("/devices?page=abc&sort=%27;drop&per=7&order=sideways&q=%25_%5C")
    assert page.status == 200 and "No device matches “%_\\”." in page.text
    page = await client.get("/devices?page=999")
    assert page.status == 200 and "A0000001" in page.text  # the last page instead


# --- enrollment -------------------------------------------------------------------------------


GOOD = {"serial": "C0000001", "hw_type": "17", "sender_id": "c1", "master_secret": "00" * 16,
        "master_salt": "", "name": "north well"}


@pytest.mark.parametrize(
    ("changes", "field", "message"),
    [
        ({"serial": "c-1"}, "serial", "'c-1' must be 1 to 16 characters, each A-Z or 0-9"),
        ({"serial": ""}, "serial", "required"),
        ({"hw_type": "99"}, "hw_type", "99 is not a supported device type (supported: 14, 16, 17, 18, 23, 24, 28, 29, 31)"),
        ({"sender_id": "zz"}, "sender_id", "'zz' is not hex (pairs of digits 0-9, a-f expected)"),
        ({"sender_id": "0102030405060708"}, "sender_id", "must be 1 to 7 bytes, got 8"),
        ({"master_secret": "00"}, "master_secret", "must be exactly 16 bytes (32 hex digits), got 1"),
        ({"master_salt": "0011"}, "master_salt", "must be empty or 8 bytes (16 hex digits), got 2"),
        ({"name": "n" * 101}, "name", "must be at most 100 characters, got 101"),
        ({"serial": "A0000001"}, "serial", "A0000001 is already enrolled"),
        ({"sender_id": "a001"}, "sender_id", "a001 is already used by device A0000001"),
    ],
)
async def test_enrollment_bad_input_is_shown_next_to_the_field(
    client: WebClient, panel: Panel, changes: dict, field: str, message: str
) -> None:
    await client.get("/enrollment")
    page = await client.post("/enrollment/add", {**GOOD, **changes})
    assert page.status == 400
    assert field_error(page.text, field) == message
    assert f'value="{changes.get("serial", GOOD["serial"])}"' in page.text  # the input is kept
    assert await count(panel.driver, Device) == len(DEVICES)


async def test_enrollment_adds_one_device(client: WebClient, panel: Panel) -> None:
    await client.get("/enrollment")
    page = await client.post("/enrollment/add", GOOD)
    assert page.url == panel.base + "/devices/C0000001?notice=added&serial=C0000001"
    assert "Device C0000001 enrolled." in page.text and "north well" in page.text


async def test_csv_import_reports_each_bad_row(client: WebClient, panel: Panel) -> None:
    await client.get("/enrollment")
    csv_text = (
        "serial,hw_type,sender_id,master_secret\n"
        f"D0000001,17,d1,{'11' * 16}\n"
        f"D0000002,99,d2,{'11' * 16}\n"
        f"A0000001,17,d3,{'11' * 16}\n"
        f"D0000004,18,d4,{'11' * 16}\n"
    )
    form = aiohttp.FormData()
    form.add_field("csrf_token", client.csrf)
    form.add_field("file", csv_text.encode(), filename="fleet.csv", content_type="text/csv")
    form.add_field("csv_text", "")
    page = await client.post("/enrollment/import", form, csrf=False)
    assert page.status == 400
    assert "<strong>2</strong> added, <strong>2</strong> refused." in page.text
    assert "Import report — fleet.csv" in page.text
    assert '<td data-label="Line">3</td><td data-label="Problem">hw_type: 99 is not a supported' in page.text
    assert '<td data-label="Line">4</td><td data-label="Problem">serial: A0000001 is already enrolled</td>' in page.text
    assert await count(panel.driver, Device) == len(DEVICES) + 2


async def test_csv_import_bad_files(client: WebClient, panel: Panel, monkeypatch) -> None:
    await client.get("/enrollment")
    page = await client.post("/enrollment/import", {"csv_text": "  "})
    assert page.status == 400 and field_error(page.text, "file") == "choose a CSV file or paste its lines"
    form = aiohttp.FormData()
    form.add_field("csrf_token", client.csrf)
    form.add_field("file", b"serial,hw_type\n\xff\xfe", filename="x.csv", content_type="text/csv")
    page = await client.post("/enrollment/import", form, csrf=False)
    assert field_error(page.text, "file") == "the file is not UTF-8 text (save the CSV as UTF-8)"
    monkeypatch.setattr(middleware, "MAX_UPLOAD_BYTES", 1024)
    form = aiohttp.FormData()
    form.add_field("csrf_token", client.csrf)
    form.add_field("file", b"x" * 5000, filename="big.csv", content_type="text/csv")
    page = await client.post("/enrollment/import", form, csrf=False)
    assert field_error(page.text, "file") == "the file is larger than 0 MB; split it"
    page = await client.post("/enrollment/import", {"csv_text": "serial,color\nA,1\n"})
    assert "header: unknown column 'color'" in html.unescape(page.text)
    assert await count(panel.driver, Device) == len(DEVICES)


async def test_delete_needs_the_serial_typed(client: WebClient, panel: Panel) -> None:
    page = await client.get("/devices/A0000002/delete")
    assert "Delete device A0000002?" in page.text
    page = await client.post("/devices/A0000002/delete", {"confirm_serial": "A0000001"})
    assert page.status == 400 and field_error(page.text, "confirm_serial") == "type A0000002 to confirm"
    assert await count(panel.driver, Device) == len(DEVICES)
    page = await client.post("/devices/A0000002/delete", {"confirm_serial": "A0000002"})
    assert page.url == panel.base + "/devices?notice=deleted&serial=A0000002"
    assert await count(panel.driver, Device) == len(DEVICES) - 1
    assert (await client.get("/devices/A0000002")).status == 404


# --- commands ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        ({"command": "", "parameter": "1"}, "command", "choose a command or configuration"),
        ({"command": "reboot", "parameter": ""}, "parameter", "enter a value (for commands: 1)"),
        ({"command": "reboot", "parameter": "2"}, "parameter", "reboot is a command: its parameter must be 1, got '2'"),
        ({"command": "tx_interval", "parameter": "2"}, "parameter", "tx_interval must be between 5 and 1440 min, got 2"),
        ({"command": "tx_interval", "parameter": "7.5"}, "parameter", "tx_interval must be an integer, got '7.5'"),
        ({"command": "alarm_transmission", "parameter": "4"}, "parameter",
         "alarm_transmission must be one of 0 (next_interval), 1 (immediate), got '4'"),
        ({"command": "apn", "parameter": "iot\u202e.net"}, "parameter",
         "apn: character 4 (U+202E) is not allowed; apn accepts printable ASCII"),
        ({"command": "open_valve", "parameter": "1"}, "command",
         "unknown command 'open_valve' for hw_type 17; allowed: alarm_transmission, apn, clear_alarms, "
         "firmware_check, pressure_alarm_high, pressure_alarm_low, reboot, sampling_interval, tx_interval"),
    ],
)
async def test_schedule_bad_input_is_shown_next_to_the_field(
    client: WebClient, panel: Panel, body: dict, field: str, message: str
) -> None:
    await client.get("/devices/A0000001/commands")
    page = await client.post("/devices/A0000001/commands", body)
    assert page.status == 400
    assert field_error(page.text, field) == message
    assert await count(panel.driver, Downlink) == 0


async def test_an_odd_stored_parameter_is_shown_escaped(client: WebClient, panel: Panel) -> None:
    """A value queued by an older release, before text parameters had a charset."""
    odd = "iot\x00\u202eten.\x07x\ty\u200b\U000e0001"
    async with panel.driver.db.session() as session, session.begin():
        query = select(Device.id).where(Device.serial == "A0000001")
        device_id = (await session.execute(query)).scalar_one()
        now = datetime.now(UTC)
        session.add(Downlink(
            command_id="old-apn", device_id=device_id, command="apn", code=30, parameter=odd,
            state=3, result=0, inserted_at=now, acknowledged_at=now, updated_at=now,
        ))
    page = await client.get("/devices/A0000001/commands")
    assert page.status == 200
    assert '<code>iot\\u0000\\u202eten.\\u0007x\\u0009y\\u200b\\U000e0001</code>' in page.text
    for char in "\x00\u202e\x07\t\u200b\U000e0001":
        assert char not in page.text.split("<tbody", 1)[1], repr(char)
    token = await create_token(panel.driver.db, "odd")
    api = await client.http.get(panel.base + "/api/v1/downlinks/old-apn",
                                headers={"Authorization": f"Bearer {token}"})
    assert (await api.json())["parameter"] == odd  # JSON escapes it itself


async def test_commands_tab_lists_the_family_commands_with_their_ranges(client: WebClient) -> None:
    page = await client.get("/devices/A0000001/commands")
    assert ">reboot — command: parameter 1</option>" in page.text
    assert ">tx_interval — 5 to 1440 min</option>" in page.text
    assert ">alarm_transmission — one of 0 (next_interval), 1 (immediate)</option>" in page.text
    assert ">apn — text, 1 to 63 characters, printable ASCII</option>" in page.text
    assert 'id="f-parameter" name="parameter" value="1"' in page.text
    assert "<button type=\"submit\" class=\"primary\">Schedule command</button>" in page.text


async def test_text_configuration_and_cancel_of_a_sent_downlink(client: WebClient, panel: Panel) -> None:
    device = panel.devices["A0000001"]
    session = session_for(panel.driver, device)
    await session.join("1.0.0", 17)
    await client.get("/devices/A0000001/commands")
    page = await client.post("/devices/A0000001/commands", {"command": "apn", "parameter": "12345"})
    assert "Command apn scheduled" in page.text
    view = (await panel.driver.downlinks.history("A0000001"))[0][0]
    assert (view.command, view.parameter, view.state) == ("apn", "12345", 0)
    answer = await session.post("rx", cbor2.dumps({1: 90}))
    assert answer.body[4][2] == "12345"
    page = await client.post("/devices/A0000001/cancel", {"command_id": view.command_id})
    assert page.status == 409
    assert alerts(page.text) == [
        "only pending downlinks can be canceled; this one is in state 2 (Sent, waiting for acknowledgement)"
    ]
    page = await client.post("/devices/A0000002/cancel", {"command_id": view.command_id})
    assert page.status == 404  # not this device's downlink
    page = await client.post("/devices/A0000001/cancel", {"command_id": "nope"})
    assert alerts(page.text) == ["no downlink with command_id 'nope'"]


# --- integrations -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("domain", "body", "field", "message"),
    [
        ("mqtt", {"broker": "external", "url": "http://broker:1883"}, "url",
         "unsupported URL scheme 'http': use mqtt:// or mqtts:// (TLS)"),
        ("mqtt", {"broker": "external", "url": ""}, "url",
         "a broker URL is required when the external broker is used"),
        ("mqtt", {"qos": "7"}, "qos", "QoS must be 0, 1 or 2"),
        ("mqtt", {"uplink_topic": "a/#/{{serial}}"}, "uplink_topic", None),
        ("mqtt", {"username": "", "password": "pw"}, "username", "a password is set but the username is empty"),
        ("mqtt", {"builtin_port": "70000"}, "builtin_port", "the port must be between 1 and 65535"),
        ("callbacks", {"timeout": "soon"}, "timeout", "timeout must be a number of seconds"),
        ("callbacks", {"backoff_initial": "10", "backoff_max": "5"}, "backoff_max",
         "backoff_max (5 s) must be at least backoff_initial (10 s)"),
    ],
)
async def test_integration_bad_input_is_shown_next_to_the_field_and_nothing_is_saved(
    client: WebClient, panel: Panel, domain: str, body: dict, field: str, message: str | None
) -> None:
    page = await client.get(f"/integrations/{domain}")
    form = _form_values(page.text)
    page = await client.post(f"/integrations/{domain}", {**form, **body})
    assert page.status == 400
    shown = field_error(page.text, field)
    assert shown is not None
    if message is not None:
        assert shown == message
    for key, value in body.items():
        if key != "password":
            assert f'name="{key}"' in page.text and (value == "" or value in page.text)
    assert await count(panel.driver, IntegrationSettings) == 0


def _form_values(text: str) -> dict[str, str]:
    """What a browser would submit for the integration form as rendered (text, selects, checked)."""
    import re

    values: dict[str, str] = {}
    for name, value in re.findall(r'<input type="text" id="f-[^"]+" name="([^"]+)" value="([^"]*)"', text):
        values[name] = html.unescape(value)
    for name, body in re.findall(r'<select id="f-[^"]+" name="([^"]+)"[^>]*>(.*?)</select>', text, re.S):
        selected = re.search(r'<option value="([^"]*)" selected>', body)
        values[name] = selected.group(1) if selected else re.search(r'<option value="([^"]*)"', body).group(1)
    for name in re.findall(r'<input type="checkbox" id="f-[^"]+" name="([^"]+)" value="on" checked', text):
        values[name] = "on"
    return values


async def test_integration_save_keeps_the_secret_unless_cleared(client: WebClient, panel: Panel) -> None:
    page = await client.get("/integrations/mqtt")
    form = _form_values(page.text)
    page = await client.post("/integrations/mqtt", {**form, "username": "bob", "password": "pw1"})
    assert page.url == panel.base + "/integrations/mqtt?notice=saved"
    assert "Settings saved and applied." in page.text
    assert panel.driver.integrations.settings("mqtt")["password"] == "pw1"
    assert "pw1" not in page.text and "unchanged (a value is stored)" in page.text
    await client.post("/integrations/mqtt", {**_form_values(page.text), "password": ""})
    assert panel.driver.integrations.settings("mqtt")["password"] == "pw1"
    page = await client.get("/integrations/mqtt")
    await client.post("/integrations/mqtt", {**_form_values(page.text), "username": "", "password__clear": "on"})
    assert panel.driver.integrations.settings("mqtt")["password"] == ""
    async with panel.driver.db.session() as session:
        saved = await session.get(IntegrationSettings, "mqtt")
    assert saved.data == {"username": "", "password": ""}  # only what the form changed


async def test_unknown_integration_is_a_404_page(client: WebClient) -> None:
    page = await client.get("/integrations/nope")
    assert page.status == 404 and "There is no page at /integrations/nope." in page.text


# --- tokens -----------------------------------------------------------------------------------


async def test_tokens_bad_input(client: WebClient) -> None:
    await client.get("/tokens")
    page = await client.post("/tokens", {"name": " "})
    assert page.status == 400
    assert field_error(page.text, "name") == (
        "invalid token name '': 1 to 64 characters, letters, digits, space and _ . @ -, "
        "starting with a letter or digit"
    )
    page = await client.post("/tokens", {"name": "erp"})
    assert page.status == 201 and 'id="token-value" class="token" readonly value="cdt_' in page.text
    page = await client.post("/tokens", {"name": "erp"})
    assert field_error(page.text, "name") == "a token named 'erp' already exists (revoke it first)"
    page = await client.post("/tokens/revoke", {"name": "nope"})
    assert page.status == 404 and alerts(page.text) == ["no token named 'nope'"]


# --- live stream ------------------------------------------------------------------------------


async def test_live_stream_carries_state_changes_and_ends_on_shutdown(client: WebClient, panel: Panel) -> None:
    async with client.http.get(panel.base + "/devices/A0000001/events") as response:
        assert response.headers["Content-Type"] == "text/event-stream"
        assert (await response.content.readuntil(b"\n\n")).startswith(b"retry: 2000\n")
        await panel.driver.downlinks.schedule("A0000001", "reboot", 1, command_id="live-1")
        event = await asyncio.wait_for(response.content.readuntil(b"\n\n"), 5)
        kind, data = event.decode().strip().split("\n")
        assert kind == "event: downlink"
        body = json.loads(data.removeprefix("data: "))
        assert body["command_id"] == "live-1" and 'data-state="0"' in body["row"]
        assert ">Cancel</button>" in body["row"]
        started = time.monotonic()
        await panel.driver.stop()  # an open stream does not hold the shutdown
        assert time.monotonic() - started < 4


# --- in the browser ---------------------------------------------------------------------------


async def test_browser_first_admin_login_and_wrong_login(page, panel: Panel) -> None:
    await users_cli.delete_user(panel.driver.db, ADMIN)
    await page.goto("/devices")
    await expect(page).to_have_url(panel.base + "/setup")
    await shoot(page, "setup")
    await page.get_by_label("Username").fill("admin2")
    await page.get_by_label("Password", exact=True).fill("abc")
    await page.get_by_label("Repeat the password").fill("abc")
    await page.get_by_role("button", name="Create the administrator").click()
    await expect(page.locator("#f-password-error")).to_have_text("at least 8 characters")
    await page.get_by_label("Password", exact=True).fill(PASSWORD)
    await page.get_by_label("Repeat the password").fill(PASSWORD)
    await page.get_by_role("button", name="Create the administrator").click()
    await expect(page.get_by_role("status")).to_have_text("Welcome! Your administrator account is ready.")
    await page.get_by_role("button", name="Log out").click()
    await expect(page).to_have_url(panel.base + "/login?notice=logged_out")
    await page.get_by_label("Username").fill("admin2")
    await page.get_by_label("Password").fill("not the password")
    await page.get_by_role("button", name="Log in").click()
    await expect(page.get_by_role("alert")).to_have_text("Wrong username or password.")
    await shoot(page, "login")
    await page.get_by_label("Password").fill(PASSWORD)
    await page.get_by_role("button", name="Log in").click()
    await expect(page).to_have_url(panel.base + "/devices")


async def test_browser_schedule_command_follows_states_live_and_cancel(page, panel: Panel) -> None:
    device = panel.devices["A0000001"]
    session = session_for(panel.driver, device)
    await session.join("1.0.0", 17)
    family = panel.driver.families[17]
    await session.post("rx", family.encode(17, {"battery": 80, "pressure": 2.5}))

    await browser_login(page)
    await shoot(page, "devices")
    await page.get_by_label("Search serial or name").fill("A0000001")
    await page.get_by_role("button", name="Search").click()
    await expect(page.locator("#device-count")).to_have_text("1 device matching “A0000001”")
    await page.get_by_role("link", name="A0000001").click()
    await expect(page.locator("#latest-data")).to_contain_text("battery")
    await expect(page.locator("#latest-data")).to_contain_text("80 %")
    await expect(page.locator("#latest-data")).to_contain_text("2.5 bar")
    await shoot(page, "device-overview")

    await page.get_by_role("link", name="Commands").click()
    await expect(page).to_have_url(panel.base + "/devices/A0000001/commands")
    await live(page)
    await page.get_by_label("Command or configuration").select_option("reboot")
    await expect(page.get_by_label("Parameter")).to_have_value("1")
    await page.get_by_role("button", name="Schedule command").click()
    await expect(page.get_by_role("status")).to_contain_text("Command reboot scheduled")
    row = page.locator("#downlinks tbody tr").first
    await expect(row).to_have_attribute("data-state", "0")
    command_id = await row.get_attribute("data-command-id")
    await expect(row.get_by_role("button", name="Cancel")).to_be_visible()
    await live(page)
    row = page.locator(f'#downlinks tr[data-command-id="{command_id}"]')

    answer = await session.post("rx", family.encode(17, {"battery": 79}))  # carries the downlink
    assert answer.body[4][1] == 1
    await expect(row).to_have_attribute("data-state", "2")
    await expect(row.locator("td.state")).to_have_text("2 Sent, waiting for acknowledgement")
    await expect(row.get_by_role("button", name="Cancel")).to_have_count(0)
    await session.post("ack", cbor2.dumps([answer.body[4][0], 0]))
    await expect(row).to_have_attribute("data-state", "3")
    await expect(row.locator("td.state")).to_have_text("3 Sent and acknowledged")
    await expect(row.locator('td[data-label="Acknowledged"] time')).to_have_count(1)

    await page.get_by_label("Command or configuration").select_option("tx_interval")
    await expect(page.get_by_label("Parameter")).to_have_value("60")
    await page.get_by_label("Parameter").fill("2")
    await page.get_by_role("button", name="Schedule command").click()
    await expect(page.locator("#f-parameter-error")).to_have_text(
        "tx_interval must be between 5 and 1440 min, got 2"
    )
    await page.get_by_label("Parameter").fill("30")
    await page.get_by_role("button", name="Schedule command").click()
    pending = page.locator("#downlinks tbody tr").first
    await expect(pending).to_have_attribute("data-state", "0")
    await shoot(page, "device-commands")
    await pending.get_by_role("button", name="Cancel").click()
    await expect(page.get_by_role("status")).to_contain_text("canceled")
    await expect(page.locator("#downlinks tbody tr").first).to_have_attribute("data-state", "1")

    await page.get_by_role("link", name="Uplinks").click()
    await expect(page).to_have_url(panel.base + "/devices/A0000001/uplinks")
    await live(page)
    before = await page.locator("#uplinks tbody tr").count()
    await session.post("rx", family.encode(17, {"battery": 77}))
    await expect(page.locator("#uplinks tbody tr")).to_have_count(before + 1)
    await expect(page.locator("#uplinks tbody tr").first).to_contain_text('"battery": 77')
    await shoot(page, "device-uplinks")


async def test_browser_mqtt_topic_change_applies_to_the_next_uplink(page, panel: Panel) -> None:
    device = panel.devices["A0000002"]
    session = session_for(panel.driver, device)
    await session.join("1.0.0", 16)
    collector = await Collector(panel.mqtt_port, "webtest/#").start()
    try:
        await browser_login(page)
        await menu(page, "Integrations")
        await page.get_by_role("link", name="MQTT", exact=True).click()
        await expect(page.locator("#connection")).to_contain_text("Connected")
        await shoot(page, "integration-mqtt")
        await page.get_by_label("Use external broker").select_option("external")
        await page.get_by_label("Broker URL").fill("http://broker.example")
        await page.get_by_role("button", name="Save").click()
        await expect(page.locator("#f-url-error")).to_have_text(
            "unsupported URL scheme 'http': use mqtt:// or mqtts:// (TLS)"
        )
        await shoot(page, "integration-mqtt-error")
        assert await count(panel.driver, IntegrationSettings) == 0
        await page.get_by_label("Use external broker").select_option("builtin")
        await page.get_by_label("Broker URL").fill("")
        await page.get_by_label("Uplink topic").fill("webtest/{{serial}}/up")
        await page.get_by_role("button", name="Save").click()
        await expect(page.get_by_role("status")).to_have_text("Settings saved and applied.")
        await expect(page.get_by_label("Uplink topic")).to_have_value("webtest/{{serial}}/up")
        await session.post("rx", cbor2.dumps({1: 42}))
        received = await collector.wait_for(1)
        assert received[0].topic == "webtest/A0000002/up"
        assert json.loads(received[0].payload)["data"]["battery"] == 42
    finally:
        await collector.stop()
    await menu(page, "Integrations")
    await shoot(page, "integrations")
    await page.get_by_role("link", name="Downlink callbacks").click()
    await shoot(page, "integration-callbacks")


async def test_browser_enrollment_csv_import_and_delete(page, panel: Panel) -> None:
    await browser_login(page)
    await menu(page, "Enrollment")
    await page.get_by_label("Serial").fill("E0000001")
    await page.get_by_label("Device type (hw_type)").select_option("18")
    await page.get_by_label("Sender ID (OSCORE kid)").fill("zz")
    await page.get_by_label("Master secret").fill("22" * 16)
    await page.get_by_role("button", name="Add device").click()
    await expect(page.locator("#f-sender_id-error")).to_have_text(
        "'zz' is not hex (pairs of digits 0-9, a-f expected)"
    )
    await expect(page.get_by_label("Serial")).to_have_value("E0000001")
    await page.get_by_label("Sender ID (OSCORE kid)").fill("e1")
    await page.get_by_label("Master secret").fill("22" * 16)
    await page.get_by_role("button", name="Add device").click()
    await expect(page.get_by_role("status")).to_have_text("Device E0000001 enrolled.")

    await menu(page, "Enrollment")
    csv_text = (
        "serial,hw_type,sender_id,master_secret,name\n"
        f"F0000001,17,f1,{'33' * 16},pump 1\n"
        f"F0000002,17,f2,{'33' * 16}\n"
        f"F0000003,31,f3,{'33' * 16},leak\n"
    )
    await page.get_by_label("CSV file").set_input_files(
        files=[{"name": "fleet.csv", "mimeType": "text/csv", "buffer": csv_text.encode()}]
    )
    await page.get_by_role("button", name="Import").click()
    report = page.locator("#import-report")
    await expect(report).to_contain_text("2 added, 1 refused.")
    await expect(page.locator("#import-errors tbody tr")).to_have_text(
        ["3expected 5 fields like the header, got 4"]
    )
    await shoot(page, "enrollment")

    await page.goto("/devices/F0000001")
    await page.get_by_role("link", name="Delete device…").click()
    await page.get_by_label("Type the serial to confirm").fill("F0000001")
    await shoot(page, "device-delete")
    await page.get_by_role("button", name="Delete F0000001").click()
    await expect(page.get_by_role("status")).to_have_text("Device F0000001 deleted.")
    assert await count(panel.driver, Device) == len(DEVICES) + 2


async def test_browser_tokens_status_and_api_docs(page, panel: Panel) -> None:
    await browser_login(page)
    await menu(page, "API tokens")
    await page.get_by_label("Name").fill("erp-prod")
    await page.get_by_role("button", name="Create token").click()
    token = await page.get_by_label("Token").input_value()
    assert token.startswith("cdt_")
    await shoot(page, "tokens")
    async with new_http() as http:
        headers = {"Authorization": f"Bearer {token}"}
        async with http.get(panel.base + "/api/v1/devices", headers=headers) as response:
            assert response.status == 200
        await page.goto("/tokens")
        await expect(page.locator("#new-token")).to_have_count(0)  # shown only once
        page.once("dialog", lambda dialog: asyncio.ensure_future(dialog.accept()))
        await page.get_by_role("button", name="Revoke erp-prod").click()
        await expect(page.get_by_role("status")).to_have_text("Token erp-prod revoked.")
        async with http.get(panel.base + "/api/v1/devices", headers=headers) as response:
            assert response.status == 401

    await menu(page, "Status")
    await expect(page.get_by_text("Listening")).to_be_visible()
    await expect(page.get_by_text("Broker connected")).to_be_visible()
    await shoot(page, "status")

    await menu(page, "API Docs")
    await expect(page).to_have_url(panel.base + "/api/v1/docs")
    await expect(page.locator(".swagger-ui .info .title")).to_contain_text("coap-driver")
    await shoot(page, "api-docs")


async def test_first_user_is_created_once_on_both_databases(database) -> None:
    from driver_core.web.users import authenticate, count_users, create_first_user

    first, second = await asyncio.gather(
        create_first_user(database, "alice", "password123"),
        create_first_user(database, "bob", "password123"),
    )
    assert [user is not None for user in (first, second)].count(True) == 1
    assert await count_users(database) == 1
    winner = (first or second).username
    assert (await authenticate(database, winner, "password123")).username == winner
    assert await authenticate(database, winner, "password124") is None
