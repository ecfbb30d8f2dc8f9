"""Where callbacks may go: refused destinations at scheduling (REST, MQTT) and at connect time.

A real driver on loopback, real aiohttp receivers on loopback, the built-in
MQTT broker on a free port. No traffic is ever sent to a non-loopback address:
a private address is only checked for acceptance, with no callbacks running.
"""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import voluptuous as vol
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult

from custom_components.callbacks import SETTINGS_SCHEMA
from custom_components.callbacks.delivery import CallbackDelivery
from custom_components.callbacks.store import CallbackStore
from driver_core.callback_policy import CallbackPolicy
from driver_core.cluster import EVENT_DOWNLINK_ROWS
from driver_core.driver import Driver
from driver_core.storage.db import Database
from driver_core.web import users_cli
from tests.api_fixtures import ApiClient, client_for
from tests.conftest import make_device, started_driver, write_config
from tests.http_helpers import http_endpoint
from tests.mqtt_helpers import Collector, free_port
from tests.test_callbacks import FAST, Core, Receiver, serve
from tests.web_fixtures import ADMIN, PASSWORD, WebClient, new_http

SERIAL = "F0000042"
ALLOW_LOOPBACK = "callbacks:\n  allowed_networks: [127.0.0.0/8]\n"


def refused_by_default(shown: str, network: str, kind: str) -> str:
    return (
        f"callback_url: {shown} is in {network} ({kind}), which callbacks refuse by default; "
        f"to allow it, add {network} to callbacks.allowed_networks"
    )


def own_listener(shown: str, port: int, name: str = "HTTP") -> str:
    return (
        f"callback_url: {shown} port {port} is the driver's own {name} listener; callbacks are "
        "never posted to the driver itself, whatever callbacks.allowed_networks says"
    )


LOOPBACK = "loopback"
REFUSED = [
    ("http://127.0.0.1:9/cb", refused_by_default("127.0.0.1", "127.0.0.0/8", LOOPBACK)),
    ("http://127.8.9.10:9/cb", refused_by_default("127.8.9.10", "127.0.0.0/8", LOOPBACK)),
    ("http://[::1]:9/cb", refused_by_default("::1", "::1/128", LOOPBACK)),
    ("http://localhost:9/cb", refused_by_default("localhost (127.0.0.1)", "127.0.0.0/8", LOOPBACK)),
    ("http://LocalHost./cb", refused_by_default("localhost. (127.0.0.1)", "127.0.0.0/8", LOOPBACK)),
    ("http://api.localhost/cb", refused_by_default("api.localhost (127.0.0.1)", "127.0.0.0/8", LOOPBACK)),
    ("http://169.254.169.254/latest/meta-data/",
     refused_by_default("169.254.169.254", "169.254.0.0/16", "link-local, e.g. a cloud metadata service")),
    ("http://0.0.0.0:9/cb",
     refused_by_default("0.0.0.0", "0.0.0.0/8", "unspecified, reaches this host")),
    ("http://[::]:9/cb", refused_by_default("::", "::/128", "unspecified, reaches this host")),
    ("http://[::ffff:127.0.0.1]:9/cb",
     refused_by_default("::ffff:7f00:1 (127.0.0.1)", "127.0.0.0/8", LOOPBACK)),
    ("http://0x7f000001:9/cb", refused_by_default("0x7f000001 (127.0.0.1)", "127.0.0.0/8", LOOPBACK)),
    ("http://127.1:9/cb", refused_by_default("127.1 (127.0.0.1)", "127.0.0.0/8", LOOPBACK)),
    ("http://224.0.0.1/cb", refused_by_default("224.0.0.1", "224.0.0.0/4", "multicast")),
    ("http://[ff02::1]/cb", refused_by_default("ff02::1", "ff00::/8", "multicast")),
    ("http://[fe80::1]/cb", refused_by_default("fe80::1", "fe80::/10", "link-local")),
]
PRIVATE = ["http://10.0.0.1/cb", "https://192.168.1.20:8443/erp", "http://172.16.0.9/x",
           "http://[fd00::1]/cb", "https://erp.example.com/hook"]


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[ApiClient]:
    """A driver with the default configuration's callbacks section (default policy)."""
    config_dir = tmp_path / "config"
    write_config(config_dir, extra="callbacks:\n  retry_for: 0\n")
    async with started_driver(config_dir) as driver, client_for(driver) as client:
        await add_device(driver)
        yield client


async def add_device(driver: Driver, serial: str = SERIAL) -> None:
    from driver_core.enrollment import add_device as enroll

    await enroll(driver.db, driver.box, make_device(serial, 17, 42))


async def schedule(api: ApiClient, url: str, command_id: str | None = None) -> Any:
    body: dict[str, Any] = {"command": "reboot", "callback_url": url}
    if command_id:
        body["command_id"] = command_id
    return await api.call("POST", f"/devices/{SERIAL}/downlinks", json=body)


async def downlink_count(api: ApiClient) -> int:
    items = await api.call("GET", f"/devices/{SERIAL}/downlinks")
    return items.body["total"]


# ---- scheduling -------------------------------------------------------------------------------


@pytest.mark.parametrize(("url", "detail"), REFUSED)
async def test_rest_refuses_local_destinations_and_queues_nothing(
    api: ApiClient, url: str, detail: str
) -> None:
    reply = await schedule(api, url)
    assert (reply.status, reply.body) == (
        400, {"error": "callback_refused", "detail": detail, "field": "callback_url"},
    )
    assert await downlink_count(api) == 0


async def test_rest_refuses_the_drivers_own_http_port(api: ApiClient) -> None:
    port = api.server.port
    reply = await schedule(api, f"http://127.0.0.1:{port}/metrics")
    assert (reply.status, reply.body["detail"]) == (400, own_listener("127.0.0.1", port))
    assert await downlink_count(api) == 0


async def test_private_networks_and_names_are_accepted(tmp_path: Path) -> None:
    """Accepted, never contacted: this driver runs no callbacks integration."""
    config_dir = tmp_path / "config"
    write_config(config_dir)
    async with started_driver(config_dir) as driver, client_for(driver) as api:
        await add_device(driver)
        assert "callbacks" not in driver.integrations.running
        for index, url in enumerate(PRIVATE):
            reply = await schedule(api, url, f"p-{index}")
            assert (reply.status, reply.body["callback_url"]) == (201, url)
        # The default policy also holds without the callbacks integration.
        reply = await schedule(api, "http://127.0.0.1:9/cb")
        assert (reply.status, reply.body["detail"]) == (
            400, refused_by_default("127.0.0.1", "127.0.0.0/8", LOOPBACK),
        )


async def test_mqtt_command_with_a_refused_url_is_reported_on_the_status_topic(
    tmp_path: Path,
) -> None:
    port = free_port()
    config_dir = tmp_path / "config"
    write_config(config_dir, extra=f"mqtt:\n  builtin_port: {port}\ncallbacks:\n")
    async with started_driver(config_dir) as driver:
        await add_device(driver)
        mqtt = driver.integrations.running["mqtt"]
        await mqtt.async_wait_downlink_status(
            lambda s: s["subscribed"] == "application/COAP/device/+/downlink"
        )
        collector = await Collector(port, f"application/COAP/device/{SERIAL}/downlink/status").start()
        try:
            async with aiohttp_free_mqtt(port) as client:
                await client.publish(
                    f"application/COAP/device/{SERIAL}/downlink",
                    b'{"command":"reboot","command_id":"m-1",'
                    b'"callback_url":"http://169.254.169.254/latest/meta-data/"}',
                    qos=1,
                )
            got = await collector.wait_for(1)
        finally:
            await collector.stop()
        report = json.loads(got[0].payload)
        assert (report["command_id"], report["status"], report["error"], report["detail"]) == (
            "m-1", None, "callback_refused",
            refused_by_default(
                "169.254.169.254", "169.254.0.0/16", "link-local, e.g. a cloud metadata service"
            ),
        )
        assert await driver.downlinks.history(SERIAL, 0, 10) == ([], 0)


def aiohttp_free_mqtt(port: int) -> Any:
    import aiomqtt

    return aiomqtt.Client("127.0.0.1", port)


async def test_allowed_loopback_is_delivered_but_the_own_listeners_stay_refused(
    tmp_path: Path,
) -> None:
    mqtt_port = free_port()
    config_dir = tmp_path / "config"
    write_config(config_dir, extra=f"mqtt:\n  builtin_port: {mqtt_port}\n{ALLOW_LOOPBACK}")
    async with (
        started_driver(config_dir) as driver,
        client_for(driver) as api,
        serve() as receiver,
    ):
        await add_device(driver)
        reply = await schedule(api, receiver.url("/cb"), "lo-1")
        assert reply.status == 201
        await receiver.wait_for(1, "/cb")
        assert receiver.bodies("/cb")[0]["command_id"] == "lo-1"
        http_port = api.server.port
        for url, shown, port, name in [
            (f"http://127.0.0.1:{http_port}/metrics", "127.0.0.1", http_port, "HTTP"),
            (f"http://localhost:{http_port}/login", "localhost (127.0.0.1)", http_port, "HTTP"),
            (f"http://127.0.0.1:{mqtt_port}/", "127.0.0.1", mqtt_port, "MQTT"),
        ]:
            reply = await schedule(api, url)
            assert (reply.status, reply.body["detail"]) == (400, own_listener(shown, port, name))


# ---- connect time -----------------------------------------------------------------------------


class NamesResolver(AbstractResolver):
    """A resolver with fixed answers (the test network has no DNS): name -> address."""

    def __init__(self, names: dict[str, str]) -> None:
        self._names = names

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if host not in self._names:
            raise OSError(f"unknown name {host}")
        address = self._names[host]
        return [{"hostname": host, "host": address, "port": port, "family": socket.AF_INET,
                 "proto": 0, "flags": 0}]

    async def close(self) -> None:
        return None


async def deliver_with(
    core: Core, settings: dict[str, Any], resolver: AbstractResolver, url: str, command_id: str
) -> CallbackDelivery:
    """One owed callback, delivered by a worker whose system resolver is `resolver`."""
    validated = SETTINGS_SCHEMA({**FAST, "retry_for": 60, **settings})
    delivery = CallbackDelivery(
        CallbackStore(core.db), validated, lambda: None, CallbackPolicy.from_settings(validated, dict),
        resolver=resolver,
    )
    delivery.start()
    downlink = await core.downlink(command_id, url)
    await core.change(downlink, 0, fire=False)
    delivery.notify()
    return delivery


async def wait_settled(core: Core, command_id: str) -> list[tuple]:
    import asyncio

    async with asyncio.timeout(10):
        while True:
            events = await core.events(command_id)
            if all(event[1] is not None for event in events):
                return events
            await asyncio.sleep(0.02)


@pytest.fixture
async def core(tmp_path: Path, sqlite_url: str) -> AsyncIterator[Core]:
    db = Database(sqlite_url)
    await db.start()
    try:
        yield Core(db, tmp_path / "config")
    finally:
        await db.stop()


async def test_a_name_resolving_to_loopback_is_refused_at_connect_time(
    core: Core, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    resolver = NamesResolver({"erp.test": "127.0.0.1"})
    url = f"http://erp.test:{receiver.port}/cb"
    assert CallbackPolicy().url_refusal(url) is None  # scheduling cannot know
    caplog.set_level(logging.WARNING, logger="custom_components.callbacks")
    delivery = await deliver_with(core, {}, resolver, url, "dns-1")
    try:
        events = await wait_settled(core, "dns-1")
    finally:
        await delivery.close()
    detail = refused_by_default("erp.test (127.0.0.1)", "127.0.0.0/8", LOOPBACK)
    assert events == [(0, "failed", 1, detail)]  # one attempt: permanent, no retries
    assert receiver.requests == []
    assert [r.getMessage() for r in caplog.records] == [
        f"Callback of downlink dns-1 (status 0) to http://erp.test:{receiver.port}/cb failed "
        f"after 1 attempt(s): {detail}"
    ]


async def test_a_name_resolving_to_an_allowed_network_is_delivered(
    core: Core, receiver: Receiver
) -> None:
    resolver = NamesResolver({"erp.test": "127.0.0.1"})
    delivery = await deliver_with(
        core, {"allowed_networks": ["127.0.0.0/8"]}, resolver,
        f"http://erp.test:{receiver.port}/cb", "dns-2",
    )
    try:
        assert await wait_settled(core, "dns-2") == [(0, "delivered", 1, None)]
    finally:
        await delivery.close()
    assert [r.headers["Host"] for r in receiver.requests] == [f"erp.test:{receiver.port}"]


async def test_a_stored_url_refused_now_fails_at_once(core: Core, receiver: Receiver) -> None:
    """A row written before the policy (or by an older release) is checked again at send time."""
    delivery = await deliver_with(
        core, {"denied_networks": ["127.0.0.2/32"], "allowed_networks": ["127.0.0.0/8"]},
        NamesResolver({}), f"http://127.0.0.2:{receiver.port}/cb", "old-1",
    )
    try:
        assert await wait_settled(core, "old-1") == [
            (0, "failed", 1,
             "callback_url: 127.0.0.2 is in 127.0.0.2/32, which callbacks.denied_networks refuses"),
        ]
    finally:
        await delivery.close()
    assert receiver.requests == []


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with serve() as rec:
        yield rec


# ---- settings ---------------------------------------------------------------------------------


def test_network_settings_are_lists_of_canonical_networks() -> None:
    settings = SETTINGS_SCHEMA(
        {"allowed_networks": ["127.0.0.0/8", "::1"], "denied_networks": "10.9.0.0/16, fd00::/8"}
    )
    assert (settings["allowed_networks"], settings["denied_networks"]) == (
        ["127.0.0.0/8", "::1/128"], ["10.9.0.0/16", "fd00::/8"],
    )
    assert (SETTINGS_SCHEMA({})["allowed_networks"], SETTINGS_SCHEMA({})["denied_networks"]) == (
        [], [],
    )
    assert SETTINGS_SCHEMA({"allowed_networks": None})["allowed_networks"] == []


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("localhost", "allowed_networks entry 'localhost' is not a network; write it like "
                      "10.0.0.0/8 or fd00::/8"),
        (["127.0.0.1/8"], "allowed_networks entry '127.0.0.1/8' has host bits set; did you mean "
                          "127.0.0.0/8?"),
        ([8], "allowed_networks entry 8 is not a network; write it like 10.0.0.0/8 or fd00::/8"),
        ({"a": 1}, "allowed_networks must be a list of networks, e.g. [127.0.0.0/8]"),
    ],
)
def test_bad_networks_are_refused_with_a_clear_message(value: Any, message: str) -> None:
    with pytest.raises(vol.MultipleInvalid) as info:
        SETTINGS_SCHEMA({"allowed_networks": value})
    assert info.value.errors[0].msg == message


async def test_reload_applies_new_networks_to_scheduling(tmp_path: Path) -> None:
    config_dir = tmp_path / "config"
    write_config(config_dir, extra="callbacks:\n")
    async with started_driver(config_dir) as driver, client_for(driver) as api:
        await add_device(driver)
        assert (await schedule(api, "http://127.0.0.1:9/cb", "r-1")).status == 400
        await driver.integrations.running["callbacks"].async_reload(
            {"allowed_networks": ["127.0.0.0/8"], "retry_for": 0}
        )
        assert (await schedule(api, "http://127.0.0.1:9/cb", "r-2")).status == 201
        await driver.integrations.running["callbacks"].async_reload(
            {"allowed_networks": ["127.0.0.0/8"], "denied_networks": ["127.0.0.0/24"]}
        )
        reply = await schedule(api, "http://127.0.0.1:9/cb", "r-3")
        assert (reply.status, reply.body["detail"]) == (
            400,
            "callback_url: 127.0.0.1 is in 127.0.0.0/24, which callbacks.denied_networks refuses",
        )


# ---- the driver's own authentication budget ---------------------------------------------------


async def test_callbacks_never_spend_the_admins_login_budget(tmp_path: Path) -> None:
    """40 callbacks at the driver: direct ones are refused at connect time, 30 through a
    reverse proxy on loopback reach it and are answered 403 without counting; the admin,
    on the same address as the driver, still logs in (burst 20)."""
    config_dir = tmp_path / "config"
    write_config(config_dir, extra="callbacks:\n  allowed_networks: [127.0.0.0/8]\n  retry_for: 0\n")
    async with started_driver(config_dir) as driver:
        integration = driver.integrations.running["callbacks"]
        origin = f"http://127.0.0.1:{driver.api.port}"
        forwarded: list[tuple[int, Any]] = []

        async def proxy(request: web.Request) -> web.Response:
            async with aiohttp.ClientSession() as http, http.post(
                origin + "/metrics", data=await request.read(), headers=dict(request.headers)
            ) as response:
                forwarded.append((response.status, await response.json()))
                return web.Response(status=response.status)

        async with http_endpoint("/{tail:.*}", proxy) as proxy_port:
            core = Core(driver.db, config_dir)
            core.bus = driver.bus
            for index in range(10):  # rows as an older release may have stored them
                downlink = await core.downlink(f"own-{index}", f"{origin}/metrics")
                await core.change(downlink, 0, fire=False)
            for index in range(30):
                downlink = await core.downlink(f"via-{index}", f"http://127.0.0.1:{proxy_port}/m")
                await core.change(downlink, 0, fire=False)
            driver.bus.fire(EVENT_DOWNLINK_ROWS, None)  # as another instance announces rows
            await integration.async_wait_status(lambda s: s["failed"] == 40, within=20)
        assert forwarded == [(403, {
            "error": "own_callback",
            "detail": "this is the coap-driver's own callback: the driver does not post callbacks "
            "to itself; point callback_url at the receiving application",
        })] * 30
        own = await core.events("own-0")
        assert own == [(0, "failed", 1, own_listener("127.0.0.1", driver.api.port))]
        await users_cli.create_user(driver.db, ADMIN, PASSWORD)
        async with new_http() as http:
            page = await WebClient(origin, http).login(ADMIN, PASSWORD)
            assert page.status == 200


def test_the_web_form_shows_networks_as_the_text_it_accepts() -> None:
    from driver_core.web import forms

    fields = forms.fill(
        forms.describe(SETTINGS_SCHEMA),
        SETTINGS_SCHEMA({"allowed_networks": ["127.0.0.0/8", "::1"]}),
    )
    shown = {item.name: item.value for item in fields}
    assert (shown["allowed_networks"], shown["denied_networks"]) == ("127.0.0.0/8, ::1/128", "")
    submitted = forms.changes_from(fields, {"allowed_networks": shown["allowed_networks"]})
    assert SETTINGS_SCHEMA(submitted)["allowed_networks"] == ["127.0.0.0/8", "::1/128"]
