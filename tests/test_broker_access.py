"""The built-in broker is never an open relay: credentials, per-user topic rights, TLS, rotation.

A real driver with its built-in amqtt broker on a free port, real MQTT clients
(aiomqtt), real devices over UDP.
"""

from __future__ import annotations

import asyncio
import json
import stat
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiomqtt
import cbor2
import pytest

from driver_core.broker import BrokerError, BuiltinBroker
from driver_core.broker_access import (
    APPLICATION_USER,
    DRIVER_USER,
    CredentialsError,
    CredentialStore,
    credentials_path,
    is_loopback,
    topic_matches,
)
from driver_core.driver import Driver
from driver_core.enrollment import add_device
from driver_core.storage.secretbox import SecretBox
from tests.conftest import make_device, session_for, write_config
from tests.mqtt_helpers import client_tls_context, free_port, make_tls_files, wait_until
from tests.test_web import client, panel  # noqa: F401 - fixtures of the web panel

UPLINKS = "application/COAP/device/+/uplink"
NOT_AUTHORIZED = "Not authorized"  # CONNACK return code 5


@dataclass
class Running:
    driver: Driver
    port: int
    store: CredentialStore

    def password(self, user: str) -> str:
        return self.store.password(user)

    def client(self, user: str | None = None, password: str | None = None, **kwargs) -> aiomqtt.Client:
        if user is not None and password is None:
            password = self.password(user)
        return aiomqtt.Client("127.0.0.1", self.port, username=user, password=password, **kwargs)


async def start(tmp_path: Path, mqtt: str = "") -> Running:
    port = free_port()
    config_dir = tmp_path / "config"
    write_config(config_dir, extra=f"mqtt:\n  builtin_port: {port}\n{mqtt}")
    driver = Driver(config_dir)
    await driver.start()
    store = CredentialStore(config_dir, driver.box)
    return Running(driver, port, store)


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[Running]:
    setup = await start(tmp_path)
    try:
        await setup.driver.integrations.running["mqtt"].async_wait_status(lambda s: s["connected"])
        yield setup
    finally:
        await setup.driver.stop()


class Watcher:
    """A subscriber that records (topic, payload) in arrival order (retained ones left out)."""

    def __init__(self, mqtt_client: aiomqtt.Client, topic_filter: str = "#") -> None:
        self.client = mqtt_client
        self.filter = topic_filter
        self.messages: list[tuple[str, bytes]] = []
        self._grew = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Watcher:
        await self.client.__aenter__()
        await self.client.subscribe(self.filter, qos=1)
        self._task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        async for message in self.client.messages:
            if message.retain:  # e.g. the driver's availability, sent at subscription time
                continue
            self.messages.append((str(message.topic), bytes(message.payload)))
            self._grew.set()

    async def wait_for(self, count: int, timeout: float = 10.0) -> list[tuple[str, bytes]]:
        async with asyncio.timeout(timeout):
            while len(self.messages) < count:
                self._grew.clear()
                await self._grew.wait()
        return self.messages

    async def __aexit__(self, *exc) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        await self.client.__aexit__(None, None, None)


async def refused(mqtt_client: aiomqtt.Client) -> str:
    with pytest.raises(aiomqtt.MqttCodeError) as info:
        async with mqtt_client:
            pass
    return str(info.value.rc)


# ---- credentials ---------------------------------------------------------------------------


async def test_credentials_generated_on_first_run_hashed_and_private(running: Running) -> None:
    path = credentials_path(running.driver.config_dir)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    shown = running.store.shown()
    assert [(u.name, u.role) for u in shown] == [
        (DRIVER_USER, "driver"), (APPLICATION_USER, "application")
    ]
    text = path.read_text()
    for user in shown:
        assert len(user.password) == 24
        assert user.password not in text  # only the Argon2 hash and the encrypted copy
    entries = json.loads(text)["users"]
    assert all(entry["password_hash"].startswith("$argon2id$") for entry in entries.values())


async def test_anonymous_on_localhost_reads_but_cannot_forge(running: Running) -> None:
    """Anonymous clients (allowed on 127.0.0.1 only) are application users: read, send commands."""
    device = make_device("F0000001", 17, 61)
    await add_device(running.driver.db, running.driver.box, device)
    async with Watcher(running.client(), UPLINKS) as anonymous, Watcher(running.client(APPLICATION_USER)) as everything:
        async with running.client() as forger:
            await forger.publish("application/COAP/device/F0000001/uplink", b'{"forged":1}', qos=1)
            await forger.publish("application/COAP/device/F0000001/downlink", b"{}", qos=1)
        first = (await everything.wait_for(1))[0]
        assert first == ("application/COAP/device/F0000001/downlink", b"{}")
        await session_for(running.driver, device).join("1.0.0", 17)  # the driver publishes
        (topic, payload), = await anonymous.wait_for(1)
    assert topic == "application/COAP/device/F0000001/uplink"
    assert json.loads(payload)["message_type"] == "join"


async def test_wrong_password_and_unknown_user_are_refused(running: Running) -> None:
    assert await refused(running.client(APPLICATION_USER, "not-the-password")) == NOT_AUTHORIZED
    assert await refused(running.client(DRIVER_USER, running.password(APPLICATION_USER))) == NOT_AUTHORIZED
    assert await refused(running.client("intruder", "x")) == NOT_AUTHORIZED
    assert await refused(running.client(APPLICATION_USER, "")) == NOT_AUTHORIZED


async def test_read_only_user_cannot_publish_uplinks_or_downlink_status(running: Running) -> None:
    device = make_device("F0000002", 24, 62)
    await add_device(running.driver.db, running.driver.box, device)
    session = session_for(running.driver, device)
    async with Watcher(running.client(APPLICATION_USER)) as watcher:
        async with running.client(APPLICATION_USER) as app:
            await app.publish("application/COAP/device/F0000002/uplink", b"forged uplink", qos=1)
            await app.publish("application/COAP/device/F0000002/downlink/status", b"forged", qos=1)
            await app.publish("coap-driver/status", b"offline", qos=1, retain=True)
            # Allowed: the command topic and homeassistant/status (builtin_app_topics).
            await app.publish("homeassistant/status", b"online", qos=1)
        assert (await watcher.wait_for(1))[0] == ("homeassistant/status", b"online")
        await session.join("2.0.0", 24)
        await session.post("rx", cbor2.dumps({1: 1}))
        await watcher.wait_for(3)
    topics = [topic for topic, _ in watcher.messages]
    assert topics[:3] == [
        "homeassistant/status",
        "application/COAP/device/F0000002/uplink",
        "application/COAP/device/F0000002/uplink",
    ]
    assert [json.loads(p)["message_type"] for _, p in watcher.messages[1:3]] == ["join", "rx"]
    assert all(payload not in (b"forged uplink", b"forged", b"offline") for _, payload in watcher.messages)


async def test_application_user_schedules_a_command(running: Running) -> None:
    device = make_device("F0000003", 17, 63)
    await add_device(running.driver.db, running.driver.box, device)
    mqtt = running.driver.integrations.running["mqtt"]
    async with running.client(APPLICATION_USER) as app:
        await app.publish(
            "application/COAP/device/F0000003/downlink",
            json.dumps({"command": "tx_interval", "parameter": 30, "command_id": "c-1"}),
            qos=1,
        )
    await mqtt.async_wait_downlink_status(lambda s: s["commands_accepted"] == 1)
    assert (await running.driver.downlinks.get("c-1")).serial == "F0000003"


async def test_rotation_disconnects_the_old_password_and_the_driver_reconnects(running: Running) -> None:
    old_app = running.password(APPLICATION_USER)
    old_driver = running.password(DRIVER_USER)
    mqtt = running.driver.integrations.running["mqtt"]
    async with running.client(APPLICATION_USER, old_app) as app:
        await app.subscribe("#", qos=1)
        rotated = running.store.rotate()  # as `coap-driver broker rotate` does, from outside
        assert sorted(u.name for u in rotated) == [APPLICATION_USER, DRIVER_USER]
        async with running.client(APPLICATION_USER, running.password(APPLICATION_USER)):
            pass  # a login with the new password first: the broker re-reads the file now
        with pytest.raises(aiomqtt.MqttError):
            async with asyncio.timeout(10):
                async for _ in app.messages:  # the broker closes the session with the old password
                    pass
    assert await refused(running.client(APPLICATION_USER, old_app)) == NOT_AUTHORIZED
    assert await refused(running.client(DRIVER_USER, old_driver)) == NOT_AUTHORIZED
    new_app = running.password(APPLICATION_USER)
    assert new_app != old_app
    async with running.client(APPLICATION_USER, new_app):
        pass
    # The driver's own session was closed too; it logs in again with its new password.
    await wait_until(lambda: mqtt.status["connected"] and mqtt.status["last_error"] is None, 15, "reconnect")
    device = make_device("F0000004", 17, 64)
    await add_device(running.driver.db, running.driver.box, device)
    async with Watcher(running.client(APPLICATION_USER), UPLINKS) as watcher:
        await session_for(running.driver, device).join("1.0.0", 17)
        assert len(await watcher.wait_for(1)) == 1


# ---- a broker reachable from other machines -------------------------------------------------


async def test_non_local_listener_requires_authentication(tmp_path: Path) -> None:
    setup = await start(tmp_path, "  builtin_host: 0.0.0.0\n")
    try:
        mqtt = setup.driver.integrations.running["mqtt"]
        await mqtt.async_wait_status(lambda s: s["connected"])  # the driver logs in as itself
        assert await refused(setup.client()) == NOT_AUTHORIZED  # anonymous: refused
        assert await refused(setup.client(APPLICATION_USER, "wrong")) == NOT_AUTHORIZED
        device = make_device("F0000005", 17, 65)
        await add_device(setup.driver.db, setup.driver.box, device)
        async with Watcher(setup.client(APPLICATION_USER), UPLINKS) as watcher:
            await session_for(setup.driver, device).join("1.0.0", 17)
            assert len(await watcher.wait_for(1)) == 1
    finally:
        await setup.driver.stop()


async def test_bare_broker_refuses_a_non_local_address_without_credentials() -> None:
    with pytest.raises(BrokerError) as info:
        await BuiltinBroker("0.0.0.0", free_port()).start()
    assert str(info.value) == (
        "mqtt.builtin_host: 0.0.0.0 is reachable from other machines, so the built-in broker "
        "requires authentication (anonymous access is only for 127.0.0.1 / ::1)"
    )


def test_loopback_detection() -> None:
    assert [is_loopback(h) for h in ("127.0.0.1", "::1", "localhost", "127.1.2.3")] == [True] * 4
    assert [is_loopback(h) for h in ("0.0.0.0", "::", "192.0.2.1")] == [False] * 3


def test_topic_filter_matching() -> None:
    assert topic_matches("a/b/c", "a/+/c") and topic_matches("a/b/c", "a/#") and topic_matches("a", "a/#")
    assert not topic_matches("a/b/c/d", "a/+/c") and not topic_matches("a/b", "a/b/c")
    assert not topic_matches("application/COAP/device/X/uplink", "application/COAP/device/+/downlink")


# ---- TLS --------------------------------------------------------------------------------------


async def test_tls_listener_with_the_operators_certificate(tmp_path: Path) -> None:
    tls = make_tls_files(tmp_path / "tls")
    tls_port = free_port()
    setup = await start(
        tmp_path,
        f"  builtin_tls_port: {tls_port}\n  builtin_tls_certfile: {tls.server_cert}\n"
        f"  builtin_tls_keyfile: {tls.server_key}\n",
    )
    try:
        await setup.driver.integrations.running["mqtt"].async_wait_status(lambda s: s["connected"])
        device = make_device("F0000006", 18, 66)
        await add_device(setup.driver.db, setup.driver.box, device)
        secure = aiomqtt.Client(
            "127.0.0.1", tls_port, username=APPLICATION_USER,
            password=setup.password(APPLICATION_USER), tls_context=client_tls_context(tls),
        )
        async with Watcher(secure, UPLINKS) as watcher:
            await session_for(setup.driver, device).join("1.0.0", 18)
            (topic, _), = await watcher.wait_for(1)
        assert topic == "application/COAP/device/F0000006/uplink"
        wrong = aiomqtt.Client(
            "127.0.0.1", tls_port, username=APPLICATION_USER, password="wrong",
            tls_context=client_tls_context(tls),
        )
        assert await refused(wrong) == NOT_AUTHORIZED
    finally:
        await setup.driver.stop()


async def test_tls_settings_are_checked(tmp_path: Path) -> None:
    from custom_components.mqtt.config_flow import async_validate

    tls = make_tls_files(tmp_path / "tls")
    assert await async_validate({"builtin_tls_port": 8883}) == {
        "builtin_tls_certfile": "required for the TLS listener",
        "builtin_tls_keyfile": "required for the TLS listener",
    }
    assert await async_validate({"builtin_tls_port": 1883}) == {
        "builtin_tls_port": "the TLS port must differ from the built-in broker port"
    }
    assert await async_validate(
        {"builtin_tls_port": 8883, "builtin_tls_certfile": str(tmp_path / "none.pem"),
         "builtin_tls_keyfile": str(tls.server_key)}
    ) == {"builtin_tls_certfile": f"file not found: {tmp_path / 'none.pem'}"}
    errors = await async_validate(
        {"builtin_tls_port": 8883, "builtin_tls_certfile": str(tls.ca_cert),
         "builtin_tls_keyfile": str(tls.server_key)}
    )
    assert list(errors) == ["builtin_tls_certfile"]
    assert errors["builtin_tls_certfile"].startswith("cannot load this certificate with the key file:")
    assert await async_validate({"builtin_app_topics": "a/#/b"}) == {
        "builtin_app_topics": "'a/#/b': # must be a whole level, the last one"
    }


# ---- the store on its own ---------------------------------------------------------------------


def test_store_operations_and_their_errors(tmp_path: Path) -> None:
    box = SecretBox.load_or_create(tmp_path)
    store = CredentialStore(tmp_path, box)
    with pytest.raises(CredentialsError, match="no broker credentials yet"):
        store.load()
    store.ensure()
    before = store.password(APPLICATION_USER)
    (rotated,) = store.rotate([APPLICATION_USER])
    assert rotated.password == store.password(APPLICATION_USER) != before
    added = store.add("grafana")
    assert (added.role, store.password("grafana")) == ("application", added.password)
    with pytest.raises(CredentialsError, match="already exists"):
        store.add("grafana")
    with pytest.raises(CredentialsError, match="invalid broker user name"):
        store.add("a b")
    with pytest.raises(CredentialsError, match="unknown role 'admin'"):
        store.add("ops", "admin")
    with pytest.raises(CredentialsError, match=r"no broker user named 'nobody' \(users: application, coap-driver, grafana\)"):
        store.rotate(["nobody"])
    with pytest.raises(CredentialsError, match="cannot be removed"):
        store.remove(DRIVER_USER)
    store.remove("grafana")
    assert [u.name for u in store.shown()] == [DRIVER_USER, APPLICATION_USER]
    credentials_path(tmp_path).write_text("{not json")
    with pytest.raises(CredentialsError, match="is damaged"):
        CredentialStore(tmp_path, box).load()


# ---- the web panel's MQTT page ----------------------------------------------------------------


async def test_mqtt_page_shows_the_broker_users(client, panel) -> None:  # noqa: F811
    store = CredentialStore(panel.driver.config_dir, panel.driver.box)
    page = await client.get("/integrations/mqtt")
    assert page.status == 200
    section = page.text.split('id="broker-access"', 1)[1].split("</section>", 1)[0]
    assert f"mqtt://127.0.0.1:{panel.mqtt_port}" in section
    assert "Clients without credentials may read and send commands (localhost only)." in section
    for user in store.shown():
        assert f"<code>{user.name}</code>" in section
        assert f'<code class="secret">{user.password}</code>' in section
    rotated = store.rotate([APPLICATION_USER])[0]
    assert rotated.password in (await client.get("/integrations/mqtt")).text
    await panel.driver.integrations.save("mqtt", {"broker": "external", "url": "mqtt://127.0.0.1:1883"})
    await panel.driver.integrations.apply_saved()
    assert 'id="broker-access"' not in (await client.get("/integrations/mqtt")).text


# ---- the command line ---------------------------------------------------------------------------


def test_cli_shows_and_rotates_the_credentials(tmp_path: Path) -> None:
    from tests.test_cli import run_cli

    config = tmp_path / "config"
    shown = run_cli("--config", str(config), "broker", "credentials", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[1].split() == ["username", "role", "password"]
    users = {line.split()[0]: line.split() for line in lines[2:]}
    assert [users[name][1] for name in (DRIVER_USER, APPLICATION_USER)] == ["driver", "application"]
    rotated = run_cli("--config", str(config), "broker", "rotate", APPLICATION_USER, cwd=tmp_path)
    assert rotated.returncode == 0, rotated.stderr
    (name, role, password), = [line.split() for line in rotated.stdout.splitlines()[2:]]
    assert (name, role) == (APPLICATION_USER, "application") and password != users[APPLICATION_USER][2]
    store = CredentialStore(config, SecretBox.load_or_create(config))
    assert store.password(APPLICATION_USER) == password
    assert store.password(DRIVER_USER) == users[DRIVER_USER][2]  # only the one named changed
    added = run_cli("--config", str(config), "broker", "add-user", "grafana", cwd=tmp_path)
    assert added.stdout.startswith("broker user 'grafana' (application) created; password: ")
    unknown = run_cli("--config", str(config), "broker", "rotate", "nobody", cwd=tmp_path)
    assert (unknown.returncode, unknown.stderr) == (
        2, "coap-driver: no broker user named 'nobody' (users: application, coap-driver, grafana)\n"
    )
    removed = run_cli("--config", str(config), "broker", "remove-user", DRIVER_USER, cwd=tmp_path)
    assert (removed.returncode, removed.stderr) == (
        2, "coap-driver: the driver's own broker user cannot be removed (rotate it instead)\n"
    )
