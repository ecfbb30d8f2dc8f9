"""Secrets in saved integration settings are encrypted at rest, and no secret reaches the log.

Real parts: a private Mosquitto that refuses wrong passwords, the driver on SQLite and
PostgreSQL, its real HTTP listener (web panel and REST API), a real HTTP callback receiver,
a real device over UDP, and the `coap-driver` command line in a subprocess.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import aiomqtt
import cbor2
import pytest
import voluptuous as vol
from aiohttp import web
from sqlalchemy import select, text

from driver_core import logs
from driver_core.driver import Driver
from driver_core.integration_base import form_field, is_secret, secret_fields
from driver_core.integrations import SEALED, seal, unseal
from driver_core.storage.db import Database
from driver_core.storage.models import IntegrationSettings
from driver_core.storage.secretbox import SecretBox
from driver_core.tokens import create_token
from driver_core.web import users_cli
from tests.conftest import enrolled_session, make_device, started_driver, write_config
from tests.http_helpers import http_endpoint
from tests.mqtt_helpers import MOSQUITTO, Mosquitto
from tests.web_fixtures import ADMIN, PASSWORD, WebClient, new_http, origin

BROKER_USER = "driver"
BROKER_PASSWORD = "Br0ker-pässword-7f3a"  # non-ASCII: the round trip keeps UTF-8
HMAC_SECRET = "hmac sëcret 91c2 "  # trailing space: kept byte for byte
T_LEGACY = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


class PasswordMosquitto(Mosquitto):
    """A private Mosquitto that only lets `BROKER_USER` in with `BROKER_PASSWORD`."""

    def _config(self) -> str:
        passwords = self.directory / "passwords"
        return super()._config().replace(
            "allow_anonymous true", f"allow_anonymous false\npassword_file {passwords}"
        )

    async def start(self, timeout: float = 10.0) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        tool = str(Path(MOSQUITTO).with_name("mosquitto_passwd"))
        if not Path(tool).exists():
            tool = "/usr/bin/mosquitto_passwd"
        process = await asyncio.create_subprocess_exec(
            tool, "-b", "-c", str(self.directory / "passwords"), BROKER_USER, BROKER_PASSWORD,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )
        _, err = await process.communicate()
        assert process.returncode == 0, err.decode()
        await super().start(timeout)


@pytest.fixture
async def broker(tmp_path: Path) -> AsyncIterator[PasswordMosquitto]:
    async with PasswordMosquitto(tmp_path / "mosquitto") as mosquitto:
        yield mosquitto


def broker_config(broker: Mosquitto) -> str:
    """The external broker with its user but no password: the password is saved later."""
    return (
        f"mqtt:\n  broker: external\n  url: {broker.url}\n  username: {BROKER_USER}\n"
        "callbacks:\n  retry_for: 0\n  allowed_networks: [127.0.0.0/8]\n"  # hook on loopback
    )


async def connected(driver: Driver) -> dict:
    return await driver.integrations.running["mqtt"].async_wait_status(lambda s: s["connected"])


async def stored_row(driver: Driver, domain: str) -> str:
    """The `data` column of a saved settings row, as the database holds it."""
    async with driver.db.session() as session:
        row = await session.execute(
            text("SELECT CAST(data AS TEXT) FROM integration_settings WHERE domain = :d"), {"d": domain}
        )
        return row.scalar_one()


# ---- the marker: one declaration per field ----------------------------------------------------


def test_secret_fields_come_from_the_form_marker() -> None:
    from custom_components.callbacks.config_flow import SETTINGS_SCHEMA as CALLBACKS
    from custom_components.homeassistant.config_flow import SETTINGS_SCHEMA as HOMEASSISTANT
    from custom_components.mqtt.config_flow import SETTINGS_SCHEMA as MQTT

    assert secret_fields(MQTT) == {"password"}
    assert secret_fields(CALLBACKS) == {"hmac_secret"}
    assert secret_fields(HOMEASSISTANT) == frozenset()
    marker = vol.Optional("key", description=form_field("Key", "help", secret=True))
    assert is_secret(marker) and not is_secret(vol.Optional("key", description="text"))


def test_seal_and_unseal(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    box = SecretBox.load_or_create(tmp_path)
    fields = frozenset({"password", "other"})
    stored = seal({"password": "pw", "other": "", "url": "mqtt://h"}, fields, box)
    assert stored["other"] == "" and stored["url"] == "mqtt://h"  # an empty secret stays empty
    assert set(stored["password"]) == {SEALED} and "pw" not in json.dumps(stored)
    assert unseal(stored, fields, box, "mqtt") == {"password": "pw", "other": "", "url": "mqtt://h"}
    assert unseal({"password": "legacy"}, fields, box, "mqtt") == {"password": "legacy"}
    other_box = SecretBox.load_or_create(tmp_path / "elsewhere")
    with caplog.at_level(logging.ERROR, logger="driver_core.integrations"):
        assert unseal(stored, fields, other_box, "mqtt") == {"other": "", "url": "mqtt://h"}
        assert unseal({"password": {"nope": 1}}, fields, box, "mqtt") == {}
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == [
        "The saved mqtt.password cannot be decrypted",
        "The saved mqtt.password cannot be decrypted",
    ]
    assert caplog.records[1].getMessage().endswith("(malformed value); it is ignored until saved again")


# ---- stored encrypted, used after a restart ----------------------------------------------------


async def test_saved_secrets_are_encrypted_and_work_after_a_restart(
    tmp_path: Path, db_url: str, broker: PasswordMosquitto
) -> None:
    config_dir = tmp_path / "config"
    write_config(config_dir, db_url, extra=broker_config(broker))
    driver = Driver(config_dir)
    await driver.start()
    try:
        mqtt = driver.integrations.running["mqtt"]
        status = await mqtt.async_wait_status(lambda s: s["last_error"] is not None)
        assert status["connected"] is False  # no password yet: the broker refuses the user
        assert "refused the credentials" in status["last_error"]
        await driver.integrations.save("mqtt", {"password": BROKER_PASSWORD})
        await driver.integrations.save("callbacks", {"hmac_secret": HMAC_SECRET})
        await driver.integrations.apply_saved()
        await connected(driver)
        mqtt_row, callbacks_row = await stored_row(driver, "mqtt"), await stored_row(driver, "callbacks")
    finally:
        await driver.stop()
    for row, secret in ((mqtt_row, BROKER_PASSWORD), (callbacks_row, HMAC_SECRET)):
        assert secret not in row and secret.encode() not in row.encode("unicode_escape")
        assert json.dumps(secret)[1:-1] not in row
    mqtt_data, callbacks_data = json.loads(mqtt_row), json.loads(callbacks_row)
    assert set(mqtt_data) == {"password"} and set(mqtt_data["password"]) == {SEALED}
    assert set(callbacks_data) == {"hmac_secret"} and set(callbacks_data["hmac_secret"]) == {SEALED}
    if db_url.startswith("sqlite"):
        database = Path(db_url.split(":///", 1)[1])
        files = [p for p in database.parent.glob(database.name + "*") if p.is_file()]
        assert files
        for file in files:
            raw = file.read_bytes()
            assert BROKER_PASSWORD.encode() not in raw and HMAC_SECRET.encode() not in raw

    restarted = Driver(config_dir)  # a new process would do the same: key file + database
    await restarted.start()
    try:
        status = await connected(restarted)
        assert status["broker"] == broker.url
        assert restarted.integrations.settings("mqtt")["password"] == BROKER_PASSWORD
        assert restarted.integrations.running["callbacks"].settings["hmac_secret"] == HMAC_SECRET
    finally:
        await restarted.stop()
    with pytest.raises(aiomqtt.MqttError):  # the broker really checks the password
        async with aiomqtt.Client("127.0.0.1", broker.port, username=BROKER_USER, password="wrong"):
            pass


async def test_plaintext_row_of_an_older_release_loads_and_is_encrypted_at_start(
    tmp_path: Path, db_url: str, broker: PasswordMosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    config_dir = tmp_path / "config"
    write_config(config_dir, db_url, extra=broker_config(broker))
    db = Database(db_url)
    await db.start()  # the schema, as an older release left it
    try:
        async with db.session() as session, session.begin():
            session.add_all([
                IntegrationSettings(domain="mqtt", data={"password": BROKER_PASSWORD, "qos": 1}, updated_at=T_LEGACY),
                IntegrationSettings(domain="callbacks", data={"hmac_secret": ""}, updated_at=T_LEGACY),
            ])
    finally:
        await db.stop()
    driver = Driver(config_dir)
    with caplog.at_level(logging.INFO, logger="driver_core.integrations"):
        await driver.start()
    try:
        await connected(driver)  # the plaintext password was accepted
        assert (
            "Encrypted saved secrets stored in clear by an older release: mqtt.password"
            in [r.getMessage() for r in caplog.records]
        )
        row = json.loads(await stored_row(driver, "mqtt"))
        assert row["qos"] == 1 and set(row["password"]) == {SEALED}
        assert BROKER_PASSWORD not in await stored_row(driver, "mqtt")
        assert json.loads(await stored_row(driver, "callbacks")) == {"hmac_secret": ""}
        async with driver.db.session() as session:
            stamps = (await session.scalars(select(IntegrationSettings.updated_at))).all()
        assert stamps == [T_LEGACY, T_LEGACY]  # the settings did not change: no reload anywhere
        assert await driver.integrations.seal_plaintext() == []  # nothing left in clear
    finally:
        await driver.stop()


async def test_a_secret_that_does_not_decrypt_is_ignored_with_an_error(
    tmp_path: Path, sqlite_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    config_dir = tmp_path / "config"
    write_config(config_dir, sqlite_url, extra="callbacks:\n  hmac_secret: from-yaml\n")
    driver = Driver(config_dir)
    await driver.start()
    try:
        await driver.integrations.save("callbacks", {"hmac_secret": HMAC_SECRET})
    finally:
        await driver.stop()
    key = config_dir / ".storage" / "secret.key"
    key.write_bytes(SecretBox.load_or_create(tmp_path / "other").path.read_bytes())  # wrong key
    driver = Driver(config_dir)
    with caplog.at_level(logging.ERROR, logger="driver_core.integrations"):
        await driver.start()
    try:
        assert driver.integrations.settings("callbacks")["hmac_secret"] == "from-yaml"
    finally:
        await driver.stop()
    assert [r.getMessage() for r in caplog.records if r.name == "driver_core.integrations"] == [
        "The saved callbacks.hmac_secret cannot be decrypted (cannot decrypt a stored secret with "
        f"the key in {key}: the key file was replaced or the data is damaged); it is ignored until "
        "saved again"
    ]


# ---- never shown: web panel, REST API, command line -------------------------------------------


async def test_web_api_and_cli_never_return_a_saved_secret(
    tmp_path: Path, broker: PasswordMosquitto
) -> None:
    config_dir = tmp_path / "config"
    write_config(config_dir, extra=broker_config(broker))
    driver = Driver(config_dir)
    await driver.start()
    try:
        await users_cli.create_user(driver.db, ADMIN, PASSWORD)
        token = await create_token(driver.db, "erp")
        async with new_http() as http:
            client = WebClient(origin(driver), http)
            await client.login()
            page = await client.get("/integrations/mqtt")
            form = dict(_inputs(page.text))
            page = await client.post("/integrations/mqtt", {**form, "password": BROKER_PASSWORD})
            assert page.url.endswith("/integrations/mqtt?notice=saved")
            page = await client.get("/integrations/callbacks")
            form = dict(_inputs(page.text))
            page = await client.post("/integrations/callbacks", {**form, "hmac_secret": HMAC_SECRET})
            assert page.url.endswith("/integrations/callbacks?notice=saved")
            await connected(driver)
            shown = [page.text]
            for path in ("/integrations", "/integrations/mqtt", "/integrations/callbacks", "/status"):
                page = await client.get(path)
                assert page.status == 200
                shown.append(page.text)
            headers = {"Authorization": f"Bearer {token}"}
            for path in ("/api/v1/devices", "/api/v1/device-families", "/api/v1/openapi.json", "/metrics"):
                async with http.get(origin(driver) + path, headers=headers) as response:
                    assert response.status == 200
                    shown.append(await response.text())
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "driver_core", "--config", str(config_dir), "integration", "show", "mqtt",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        out, err = await process.communicate()
        assert process.returncode == 0, err.decode()
        assert json.loads(out)["password"] == "********"
        shown.append(out.decode())
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "driver_core", "--config", str(config_dir), "integration", "show",
            "callbacks", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        out, err = await process.communicate()
        assert process.returncode == 0, err.decode()
        assert json.loads(out)["hmac_secret"] == "********"
        shown.append(out.decode())
    finally:
        await driver.stop()
    for text_ in shown:
        assert BROKER_PASSWORD not in text_ and HMAC_SECRET.strip() not in text_


def _inputs(page: str) -> list[tuple[str, str]]:
    """Text inputs and selected options as a browser submits them (checkboxes left as they are)."""
    import html
    import re

    pairs = [
        (name, html.unescape(value))
        for name, value in re.findall(r'<input type="text" id="f-[^"]+" name="([^"]+)" value="([^"]*)"', page)
    ]
    for name, body in re.findall(r'<select id="f-[^"]+" name="([^"]+)"[^>]*>(.*?)</select>', page, re.S):
        selected = re.search(r'<option value="([^"]*)" selected>', body)
        pairs.append((name, selected.group(1) if selected else ""))
    pairs += [
        (name, "on")
        for name in re.findall(r'<input type="checkbox" id="f-[^"]+" name="([^"]+)" value="on" checked', page)
    ]
    return pairs


# ---- the log at DEBUG ---------------------------------------------------------------------------


async def test_no_secret_in_the_debug_log_of_join_uplink_settings_and_api(
    tmp_path: Path, broker: PasswordMosquitto, caplog: pytest.LogCaptureFixture, restore_levels: None
) -> None:
    hooks: list[tuple[bytes, str]] = []
    got_hook = asyncio.Event()

    async def hook(request: web.Request) -> web.Response:
        hooks.append((await request.read(), request.headers.get("X-Coap-Driver-Signature", "")))
        got_hook.set()
        return web.Response(status=204)

    caplog.set_level(logging.DEBUG)
    for name in logs.QUIET:  # the libraries too, at their most talkative
        logging.getLogger(name).setLevel(logging.DEBUG)
    config_dir = tmp_path / "config"
    write_config(config_dir, extra=broker_config(broker))
    async with http_endpoint("/hook", hook) as hook_port, started_driver(config_dir) as driver:
        hook_url = f"http://127.0.0.1:{hook_port}/hook"
        # a settings save (the external broker's password, the callbacks' HMAC key)
        await driver.integrations.save("mqtt", {"password": BROKER_PASSWORD})
        await driver.integrations.save("callbacks", {"hmac_secret": HMAC_SECRET})
        await driver.integrations.apply_saved()
        await connected(driver)
        # a JOIN and an uplink
        device = make_device("S0000009", 17, 77)
        session = await enrolled_session(driver, device)
        await session.join("1.0.0", 17)
        await session.post("rx", cbor2.dumps({1: 5}))
        # API calls with a token (a good one, a wrong one)
        token = await create_token(driver.db, "erp")
        wrong_token = token[:-4] + "XXXX"
        async with aiohttp.ClientSession() as http:
            base = origin(driver) + "/api/v1"
            async with http.get(f"{base}/devices", headers={"Authorization": f"Bearer {token}"}) as response:
                assert response.status == 200
            async with http.post(
                f"{base}/devices/S0000009/downlinks",
                json={"command": "tx_interval", "parameter": 30, "callback_url": hook_url},
                headers={"Authorization": f"Bearer {token}"},
            ) as response:
                assert response.status == 201, await response.text()
            async with http.get(f"{base}/devices", headers={"Authorization": f"Bearer {wrong_token}"}) as response:
                assert response.status == 401
        async with asyncio.timeout(10):
            await got_hook.wait()  # the callback went out, signed with the HMAC key
        body, signature = hooks[0]
        assert signature == "sha256=" + hmac.new(HMAC_SECRET.encode(), body, hashlib.sha256).hexdigest()
    text_ = "\n".join(f"{r.name} {r.getMessage()} {r.__dict__}" for r in caplog.records)
    assert "Integration mqtt reloaded with new settings" in text_
    secrets = {
        "master secret": device.master_secret.hex(),
        "master salt": device.master_salt.hex(),
        "broker password": BROKER_PASSWORD,
        "HMAC secret": HMAC_SECRET.strip(),
        "api token": token,
        "wrong api token": wrong_token,
        "secret key": (config_dir / ".storage" / "secret.key").read_text().strip(),
    }
    for what, value in secrets.items():
        assert value not in text_, f"the {what} appears in the log"
    assert len(caplog.records) > 50  # the run really was logged at DEBUG


async def test_cli_set_stores_the_secret_encrypted(tmp_path: Path, sqlite_url: str) -> None:
    config_dir = tmp_path / "config"
    write_config(config_dir, sqlite_url, extra="callbacks:\n")

    async def cli(*args: str) -> tuple[int, str, str]:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "driver_core", "--config", str(config_dir), "integration", *args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        out, err = await process.communicate()
        return process.returncode, out.decode(), err.decode()

    assert await cli("set", "callbacks", f"hmac_secret={HMAC_SECRET}") == (
        0, "saved hmac_secret for callbacks; a running driver applies it within seconds\n", "",
    )
    code, out, _ = await cli("show", "callbacks")
    assert code == 0 and json.loads(out)["hmac_secret"] == "********"
    db = Database(sqlite_url)
    await db.start()
    try:
        async with db.session() as session:
            row = await session.get(IntegrationSettings, "callbacks")
        assert set(row.data) == {"hmac_secret"} and set(row.data["hmac_secret"]) == {SEALED}
        box = SecretBox.load_or_create(config_dir)
        assert unseal(row.data, frozenset({"hmac_secret"}), box, "callbacks") == {"hmac_secret": HMAC_SECRET}
    finally:
        await db.stop()
