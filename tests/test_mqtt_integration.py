"""The MQTT integration against real brokers: the machine's Mosquitto, private
Mosquitto processes (plain, TLS, restarted) and the built-in amqtt broker."""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import voluptuous as vol

from custom_components.mqtt import MqttIntegration, async_setup
from custom_components.mqtt.config_flow import (
    SETTINGS_SCHEMA,
    async_validate,
)
from driver_core.broker import BrokerError
from driver_core.components import builtin_components_dir, import_integration, read_manifest
from driver_core.integration_base import SettingsError
from driver_core.storage.db import Database
from driver_core.storage.models import OutboxMessage
from driver_core.timefmt import utcnow
from tests.mqtt_helpers import (
    SYSTEM_BROKER_PORT,
    Collector,
    Core,
    Mosquitto,
    free_port,
    integration_starter,
    make_tls_files,
    outbox_count,
    retained,
)

SYSTEM_URL = f"mqtt://127.0.0.1:{SYSTEM_BROKER_PORT}"

Setup = Callable[..., Awaitable[MqttIntegration]]


@pytest.fixture
async def core(tmp_path: Path, sqlite_url: str) -> AsyncIterator[Core]:
    db = Database(sqlite_url)
    await db.start()
    try:
        yield Core(db, tmp_path)
    finally:
        await db.stop()


@pytest.fixture
async def any_core(tmp_path: Path, database: Database) -> Core:
    """The same tests on SQLite and on PostgreSQL."""
    return Core(database, tmp_path)


@pytest.fixture
async def setup() -> AsyncIterator[Setup]:
    """`await setup(core, **settings)`; every integration is unloaded after the test."""
    async with integration_starter(async_setup) as start:
        yield start


@pytest.fixture
def prefix() -> str:
    """A topic prefix of our own on the shared Mosquitto."""
    return f"coap-driver-test/{uuid.uuid4().hex}"


def connected(status: dict) -> bool:
    return status["connected"]


def drained(status: dict) -> bool:
    return status["outbox"] == 0


# ---- delivery ---------------------------------------------------------------------


async def test_builtin_broker_default_topic_exact_payloads(core: Core, setup: Setup) -> None:
    port = free_port()
    mqtt = await setup(core, builtin_port=port)
    assert await mqtt.async_wait_status(connected) == {
        "connected": True, "broker": "builtin", "outbox": 0, "published": 0, "last_error": None,
    }
    collector = await Collector(port, "application/COAP/device/+/uplink").start()
    sent = [
        await core.commit_uplink("A0000001", {"pressure": 1.5}),
        await core.commit_uplink("A0000002", {"pressure": 2.25}, hw_type=16),
        await core.commit_uplink("A0000001", {"pressure": 1.75}),
    ]
    got = await collector.wait_for(3)
    assert [(m.topic, m.payload) for m in got] == [
        (f"application/COAP/device/{uplink.serial}/uplink", payload) for uplink, payload in sent
    ]
    first = sent[0][0]
    rx_date = first.rx_date.strftime("%Y-%m-%dT%H:%M:%S+00:00")
    join_date, last_seen = first.document()["join_date"], first.document()["last_seen"]
    assert got[0].payload.decode() == (
        f'{{"protocol":2,"rx_date":"{rx_date}","hw_type":"17","message_type":"rx",'
        f'"serial":"A0000001","join_date":"{join_date}","last_seen":"{last_seen}",'
        '"data":{"pressure":1.5}}'
    )
    await mqtt.async_wait_status(drained)
    assert await outbox_count(core.db) == 0
    assert mqtt.status["published"] == 3
    assert await retained(port, "coap-driver/status") == b"online"
    await collector.stop()


async def test_system_mosquitto_qos1_and_outbox_emptied(
    any_core: Core, setup: Setup, prefix: str
) -> None:
    collector = await Collector(SYSTEM_BROKER_PORT, f"{prefix}/#").start()
    mqtt = await setup(
        any_core,
        broker="external",
        url=SYSTEM_URL,
        uplink_topic=prefix + "/{{hw_type}}/{{serial}}",
        status_topic=f"{prefix}/status",
    )
    await mqtt.async_wait_status(connected)
    assert mqtt.status["broker"] == SYSTEM_URL
    sent = [await any_core.commit_uplink(f"B{i:07d}", {"n": i}, hw_type=14 + i) for i in range(5)]
    got = await collector.wait_for(6)  # the retained "online" comes first
    assert (got[0].topic, got[0].payload) == (f"{prefix}/status", b"online")
    assert [(m.topic, m.payload) for m in got[1:]] == [
        (f"{prefix}/{uplink.hw_type}/{uplink.serial}", payload) for uplink, payload in sent
    ]
    await mqtt.async_wait_status(drained)
    assert await outbox_count(any_core.db) == 0
    await mqtt.async_unload()
    assert await retained(SYSTEM_BROKER_PORT, f"{prefix}/status") == b"offline"
    await collector.stop()


async def test_waiting_rows_go_first_then_live_ones_in_id_order(
    core: Core, setup: Setup, prefix: str
) -> None:
    backlog = [
        await core.commit_uplink(f"C{i:07d}", {"old": i}, announce=False) for i in range(30)
    ]
    collector = await Collector(SYSTEM_BROKER_PORT, f"{prefix}/+/up").start()
    mqtt = await setup(
        core, broker="external", url=SYSTEM_URL, uplink_topic=prefix + "/{{serial}}/up",
        status_topic=f"{prefix}/status",
    )
    live = [await core.commit_uplink(f"C{i:07d}", {"new": i}) for i in range(10)]
    got = await collector.wait_for(40)
    assert [m.payload for m in got] == [payload for _, payload in backlog + live]
    await mqtt.async_wait_status(drained)
    assert await outbox_count(core.db) == 0
    await collector.stop()


async def test_two_thousand_messages_in_order_exactly_once(
    core: Core, setup: Setup, prefix: str
) -> None:
    count = 2000
    async with core.db.session() as session:
        now = utcnow()
        session.add_all(
            OutboxMessage(serial=f"D{i:07d}", document=f'{{"n":{i}}}', created_at=now)
            for i in range(count)
        )
        await session.commit()
    collector = await Collector(SYSTEM_BROKER_PORT, f"{prefix}/+", qos=0).start()
    started = time.perf_counter()
    mqtt = await setup(
        core, broker="external", url=SYSTEM_URL, uplink_topic=prefix + "/{{serial}}",
        status_topic=f"{prefix}/x/status",
    )
    _, sentinel = await core.commit_uplink("Z0000001", {"last": True})
    got = await collector.wait_for(count + 1, timeout=60)
    elapsed = time.perf_counter() - started
    assert [m.payload for m in got] == [
        f'{{"n":{i}}}'.encode() for i in range(count)
    ] + [sentinel]
    assert [m.topic for m in got[:3]] == [f"{prefix}/D0000000", f"{prefix}/D0000001", f"{prefix}/D0000002"]
    await mqtt.async_wait_status(drained, within=20)
    assert await outbox_count(core.db) == 0
    assert len(collector.messages) == count + 1
    print(f"\n{count} outbox rows delivered in {elapsed:.2f} s ({count / elapsed:.0f} msg/s)")
    await collector.stop()


# ---- live changes -------------------------------------------------------------------


async def test_topic_change_applies_to_queued_rows(core: Core, setup: Setup, tmp_path: Path) -> None:
    mosquitto = Mosquitto(tmp_path / "mq", persistence=True)
    await mosquitto.start()
    collector = await Collector(
        mosquitto.port, "up/#", persistent=True, client_id=f"sub-{uuid.uuid4().hex[:8]}"
    ).start()
    try:
        mqtt = await setup(
            core, broker="external", url=mosquitto.url, uplink_topic="up/old/{{serial}}"
        )
        await mqtt.async_wait_status(connected)
        _, first = await core.commit_uplink("E0000001", {"n": 1})
        await collector.wait_for(1)
        await collector.sync()
        await mqtt.async_wait_status(drained)
        await mosquitto.stop()
        await mqtt.async_wait_status(lambda s: not s["connected"])
        _, queued = await core.commit_uplink("E0000001", {"n": 2})
        await mqtt.async_reload(
            {"broker": "external", "url": mosquitto.url, "uplink_topic": "up/new/{{serial}}"}
        )
        await mosquitto.start()
        _, live = await core.commit_uplink("E0000002", {"n": 3})
        got = await collector.wait_for(3, timeout=30)
        assert [(m.topic, m.payload) for m in got] == [
            ("up/old/E0000001", first),
            ("up/new/E0000001", queued),
            ("up/new/E0000002", live),
        ]
        await mqtt.async_wait_status(drained)
    finally:
        await collector.stop()
        await mosquitto.stop()


async def test_switch_builtin_to_external_and_back(core: Core, setup: Setup, prefix: str) -> None:
    port = free_port()
    mqtt = await setup(core, builtin_port=port, uplink_topic=prefix + "/{{serial}}")
    await mqtt.async_wait_status(connected)
    on_builtin = await Collector(port, f"{prefix}/#").start()
    _, first = await core.commit_uplink("F0000001", {"n": 1})
    assert [m.payload for m in await on_builtin.wait_for(1)] == [first]
    await on_builtin.stop()

    on_system = await Collector(SYSTEM_BROKER_PORT, f"{prefix}/#").start()
    external = {
        "broker": "external", "url": SYSTEM_URL, "uplink_topic": prefix + "/{{serial}}",
        "status_topic": f"{prefix}/status",
    }
    started = time.monotonic()
    await mqtt.async_reload(external)
    await mqtt.async_wait_status(lambda s: s["connected"] and s["broker"] == SYSTEM_URL)
    assert time.monotonic() - started < 5
    _, second = await core.commit_uplink("F0000001", {"n": 2})
    got = await on_system.wait_for(2)
    assert [(m.topic, m.payload) for m in got] == [
        (f"{prefix}/status", b"online"), (f"{prefix}/F0000001", second),
    ]
    with socket.socket() as sock:  # the built-in broker has been stopped
        sock.bind(("127.0.0.1", port))

    await mqtt.async_reload({"builtin_port": port, "uplink_topic": prefix + "/{{serial}}"})
    await mqtt.async_wait_status(lambda s: s["connected"] and s["broker"] == "builtin")
    back = await Collector(port, f"{prefix}/#").start()
    _, third = await core.commit_uplink("F0000001", {"n": 3})
    assert [m.payload for m in await back.wait_for(1)] == [third]
    assert await retained(SYSTEM_BROKER_PORT, f"{prefix}/status") == b"offline"
    await back.stop()
    await on_system.stop()
    await mqtt.async_wait_status(drained)
    assert await outbox_count(core.db) == 0


async def test_reload_to_a_taken_port_keeps_the_old_connection(
    core: Core, setup: Setup, prefix: str
) -> None:
    collector = await Collector(SYSTEM_BROKER_PORT, f"{prefix}/+/up").start()
    mqtt = await setup(
        core, broker="external", url=SYSTEM_URL, uplink_topic=prefix + "/{{serial}}/up",
        status_topic=f"{prefix}/status",
    )
    await mqtt.async_wait_status(connected)
    with pytest.raises(BrokerError) as info:
        await mqtt.async_reload({"broker": "builtin", "builtin_port": SYSTEM_BROKER_PORT})
    assert str(info.value).startswith(
        "mqtt.builtin_port: port 1883 on 127.0.0.1 is already in use"
    )
    assert mqtt.status["connected"] is True
    assert mqtt.status["broker"] == SYSTEM_URL
    _, payload = await core.commit_uplink("G0000001", {"still": "here"})
    assert [m.payload for m in await collector.wait_for(1)] == [payload]
    await collector.stop()


# ---- outage -----------------------------------------------------------------------


async def test_broker_outage_loses_nothing_and_keeps_order(
    any_core: Core, setup: Setup, tmp_path: Path
) -> None:
    mosquitto = Mosquitto(tmp_path / "mq", persistence=True)
    await mosquitto.start()
    collector = await Collector(
        mosquitto.port, "app/+/up", persistent=True, client_id=f"sub-{uuid.uuid4().hex[:8]}"
    ).start()
    try:
        mqtt = await setup(
            any_core, broker="external", url=mosquitto.url, uplink_topic="app/{{serial}}/up"
        )
        await mqtt.async_wait_status(connected)
        sent = [await any_core.commit_uplink(f"H{i % 3:07d}", {"n": i}) for i in range(5)]
        await collector.wait_for(5)
        await collector.sync()
        await mqtt.async_wait_status(drained)

        await mosquitto.stop()
        status = await mqtt.async_wait_status(lambda s: not s["connected"])
        assert status["last_error"] is not None
        sent += [await any_core.commit_uplink(f"H{i % 3:07d}", {"n": i}) for i in range(5, 55)]
        assert await outbox_count(any_core.db) == 50
        assert mqtt.status["outbox"] == 50

        await mosquitto.start()
        sent.append(await any_core.commit_uplink("H0000009", {"sentinel": True}))
        got = await collector.wait_for(56, timeout=30)
        assert [(m.topic, m.payload) for m in got] == [
            (f"app/{uplink.serial}/up", payload) for uplink, payload in sent
        ]
        status = await mqtt.async_wait_status(lambda s: s["connected"] and s["outbox"] == 0)
        assert status["last_error"] is None
        assert await outbox_count(any_core.db) == 0
        assert len(collector.messages) == 56
    finally:
        await collector.stop()
        await mosquitto.stop()


# ---- TLS --------------------------------------------------------------------------


@pytest.fixture
async def tls_broker(tmp_path: Path) -> AsyncIterator[Mosquitto]:
    tls = make_tls_files(tmp_path / "tls")
    mosquitto = Mosquitto(tmp_path / "mq-tls", tls=tls)
    await mosquitto.start()
    yield mosquitto
    await mosquitto.stop()


async def test_tls_with_ca_file(core: Core, setup: Setup, tls_broker: Mosquitto) -> None:
    assert tls_broker.tls is not None
    collector = await Collector(tls_broker.port, "secure/#", tls=tls_broker.tls).start()
    mqtt = await setup(
        core, broker="external", url=tls_broker.url, uplink_topic="secure/{{serial}}",
        tls_ca_file=str(tls_broker.tls.ca_cert),
    )
    await mqtt.async_wait_status(connected)
    _, payload = await core.commit_uplink("J0000001", {"tls": True})
    got = await collector.wait_for(1)
    assert [(m.topic, m.payload) for m in got] == [("secure/J0000001", payload)]
    await mqtt.async_wait_status(drained)
    await collector.stop()


async def test_tls_without_ca_file_reports_untrusted_certificate(
    core: Core, setup: Setup, tls_broker: Mosquitto
) -> None:
    mqtt = await setup(core, broker="external", url=tls_broker.url)
    status = await mqtt.async_wait_status(lambda s: s["last_error"] is not None)
    assert status["connected"] is False
    assert status["last_error"] == (
        f"TLS certificate of mqtts://127.0.0.1:{tls_broker.port} not trusted "
        "(self-signed certificate in certificate chain); "
        "set mqtt.tls_ca_file to the CA that signed it"
    )
    await core.commit_uplink("J0000002", {"kept": True})
    assert await outbox_count(core.db) == 1  # nothing is lost while it cannot connect


async def test_tls_insecure_skips_verification(
    core: Core, setup: Setup, tls_broker: Mosquitto
) -> None:
    """With verification off an uplink goes through the untrusted certificate; with it on,
    the same certificate is refused and the next uplink waits in the outbox."""
    assert tls_broker.tls is not None
    collector = await Collector(tls_broker.port, "insecure/#", tls=tls_broker.tls).start()
    try:
        mqtt = await setup(
            core, broker="external", url=tls_broker.url, uplink_topic="insecure/{{serial}}",
            tls_insecure=True,
        )
        await mqtt.async_wait_status(connected)
        _, payload = await core.commit_uplink("J0000003", {"insecure": True})
        got = await collector.wait_for(1)
        assert [(m.topic, m.payload) for m in got] == [("insecure/J0000003", payload)]
        await mqtt.async_wait_status(drained)
        await mqtt.async_unload()

        verified = await setup(
            core, broker="external", url=tls_broker.url, uplink_topic="insecure/{{serial}}",
        )
        status = await verified.async_wait_status(lambda s: s["last_error"] is not None)
        assert (status["connected"], status["last_error"]) == (False, (
            f"TLS certificate of mqtts://127.0.0.1:{tls_broker.port} not trusted "
            "(self-signed certificate in certificate chain); "
            "set mqtt.tls_ca_file to the CA that signed it"
        ))
        await core.commit_uplink("J0000004", {"kept": True})
        assert await outbox_count(core.db) == 1
        await collector.sync()
        assert len(collector.messages) == 1  # nothing went through the refused connection
    finally:
        await collector.stop()


async def test_refused_connection_status(core: Core, setup: Setup) -> None:
    port = free_port()
    mqtt = await setup(core, broker="external", url=f"mqtt://127.0.0.1:{port}")
    status = await mqtt.async_wait_status(lambda s: s["last_error"] is not None)
    assert status == {
        "connected": False,
        "broker": f"mqtt://127.0.0.1:{port}",
        "outbox": 0,
        "published": 0,
        "last_error": (
            f"cannot connect to mqtt://127.0.0.1:{port}: connection refused "
            "(is the broker running?)"
        ),
    }


# ---- setup errors and settings ------------------------------------------------------


async def test_builtin_port_taken_at_setup(core: Core) -> None:
    with pytest.raises(BrokerError) as info:
        await async_setup(core, {"builtin_port": SYSTEM_BROKER_PORT})
    assert str(info.value) == (
        "mqtt.builtin_port: port 1883 on 127.0.0.1 is already in use (another MQTT broker, "
        "e.g. Mosquitto, may be running); choose another builtin_port or use the external broker"
    )


async def test_invalid_settings_refused_at_setup(core: Core) -> None:
    with pytest.raises(SettingsError) as info:
        await async_setup(core, {"broker": "external", "qos": 3})
    assert str(info.value) == "mqtt.qos: QoS must be 0, 1 or 2"
    with pytest.raises(SettingsError) as info:
        await async_setup(core, {"broker": "external"})
    assert str(info.value) == "mqtt.url: a broker URL is required when the external broker is used"
    assert info.value.errors == {"url": "a broker URL is required when the external broker is used"}


def test_defaults() -> None:
    assert SETTINGS_SCHEMA({}) == {
        "broker": "builtin",
        "url": "",
        "username": "",
        "password": "",
        "qos": 1,
        "uplink_topic": "application/COAP/device/{{serial}}/uplink",
        "tls_ca_file": "",
        "tls_insecure": False,
        "client_id": "",
        "status_topic": "coap-driver/status",
        "builtin_host": "127.0.0.1",
        "builtin_port": 1883,
        "builtin_anonymous": True,
        "builtin_app_topics": "homeassistant/status",
        "builtin_tls_port": 0,
        "builtin_tls_certfile": "",
        "builtin_tls_keyfile": "",
        "downlink_status_topic": "application/COAP/device/{{serial}}/downlink/status",
        "fota_status_topic": "application/COAP/device/{{serial}}/fota/status",
        "downlink_command_topic": "application/COAP/device/{{serial}}/downlink",
    }


def test_form_metadata_comes_with_the_schema() -> None:
    fields = {str(key): key.description for key in SETTINGS_SCHEMA.schema}
    assert fields["broker"]["label"] == "Use external broker"
    assert fields["url"]["label"] == "Broker URL"
    assert fields["uplink_topic"]["label"] == "Uplink topic"
    assert fields["password"]["secret"] is True
    assert all(meta["label"] and meta["help"] for meta in fields.values())


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"url": "http://broker:1883"}, "unsupported URL scheme 'http': use mqtt:// or mqtts:// (TLS) for dictionary value @ data['url']"),
        ({"url": "broker:1883"}, "the broker URL must look like mqtt://host:port or mqtts://host:port for dictionary value @ data['url']"),
        ({"url": "mqtt://:1883"}, "the broker URL has no host name for dictionary value @ data['url']"),
        ({"url": "mqtt://broker:99999"}, "the broker URL has an invalid port (1-65535) for dictionary value @ data['url']"),
        ({"url": "mqtt://user:pw@broker"}, "put the credentials in username and password, not in the URL for dictionary value @ data['url']"),
        ({"qos": 3}, "QoS must be 0, 1 or 2 for dictionary value @ data['qos']"),
        ({"qos": "high"}, "QoS must be 0, 1 or 2 for dictionary value @ data['qos']"),
        ({"broker": "cloud"}, "broker must be builtin or external for dictionary value @ data['broker']"),
        ({"uplink_topic": "{{serial"}, "not a valid template: unexpected end of template, expected 'end of print statement' (line 1) for dictionary value @ data['uplink_topic']"),
        ({"uplink_topic": "devices/{{ device }}"}, "unknown variable 'device' in the topic template; available: serial, hw_type for dictionary value @ data['uplink_topic']"),
        ({"uplink_topic": "devices/+/{{serial}}"}, "the topic 'devices/+/A0000001' must not contain the wildcards + or # for dictionary value @ data['uplink_topic']"),
        ({"uplink_topic": "$SYS/{{serial}}"}, "the topic '$SYS/A0000001' must not start with $ (reserved for the broker) for dictionary value @ data['uplink_topic']"),
        ({"uplink_topic": ""}, "the topic is empty for dictionary value @ data['uplink_topic']"),
        ({"status_topic": "driver/#"}, "the topic 'driver/#' must not contain the wildcards + or # for dictionary value @ data['status_topic']"),
        ({"builtin_port": 70000}, "the port must be between 1 and 65535 for dictionary value @ data['builtin_port']"),
        ({"tls_insecure": "maybe"}, "expected true or false for dictionary value @ data['tls_insecure']"),
        ({"colour": "red"}, "extra keys not allowed @ data['colour']"),
    ],
)
def test_schema_messages(settings: dict, message: str) -> None:
    with pytest.raises(vol.MultipleInvalid) as info:
        SETTINGS_SCHEMA(settings)
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("settings", "errors"),
    [
        ({"broker": "external"}, {"url": "a broker URL is required when the external broker is used"}),
        ({"url": "ws://broker"}, {"url": "unsupported URL scheme 'ws': use mqtt:// or mqtts:// (TLS)"}),
        ({"qos": 3, "uplink_topic": "a/#"}, {
            "qos": "QoS must be 0, 1 or 2",
            "uplink_topic": "the topic 'a/#' must not contain the wildcards + or #",
        }),
        ({"broker": "external", "url": "mqtts://broker", "tls_ca_file": "/nonexistent/ca.pem"},
         {"tls_ca_file": "file not found: /nonexistent/ca.pem"}),
        ({"password": "secret"}, {"username": "a password is set but the username is empty"}),
        ({"broker": "external", "url": "mqtts://broker.example.com:8883", "username": "u", "password": "p"}, {}),
        ({}, {}),
        (None, {}),
    ],
)
async def test_async_validate(settings: dict | None, errors: dict) -> None:
    assert await async_validate(settings) == errors


async def test_ca_file_that_is_not_pem(tmp_path: Path) -> None:
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate")
    errors = await async_validate({"url": "mqtts://b", "tls_ca_file": str(bad)})
    assert list(errors) == ["tls_ca_file"]
    assert errors["tls_ca_file"].startswith(f"not a readable PEM CA certificate file: {bad} (")


def test_manifest_and_loader() -> None:
    manifest = read_manifest(builtin_components_dir() / "mqtt")
    assert (manifest.domain, manifest.name, manifest.type, manifest.requirements) == (
        "mqtt", "MQTT", "integration", [],
    )
    module = import_integration(manifest)
    assert module.async_setup is async_setup
    assert module.config_flow.SETTINGS_SCHEMA is SETTINGS_SCHEMA
