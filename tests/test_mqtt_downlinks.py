"""Downlinks over MQTT: state changes on the status topic, commands from the command topic.

A real Driver with simulated devices over real UDP, the built-in broker on a
free port, the machine's Mosquitto (unique topic prefixes) and private
Mosquitto processes for outages; real SQLite and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import cbor2
import pytest
from aiocoap.numbers.codes import Code
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import create_async_engine

from custom_components.mqtt import MqttIntegration, SettingsError
from custom_components.mqtt.config_flow import SETTINGS_SCHEMA, async_validate
from custom_components.mqtt.topic import CommandTopic
from driver_core.device_client import DeviceSession
from driver_core.downlinks import STATE_NAMES, DownlinkError, DownlinkView
from driver_core.driver import Driver
from driver_core.enrollment import add_device
from driver_core.storage.db import Database, normalize_url, run_migrations
from driver_core.storage.models import Downlink, DownlinkEvent
from tests.conftest import make_device, session_for, write_config
from tests.mqtt_helpers import SYSTEM_BROKER_PORT, Collector, Mosquitto, Received, free_port

RX = cbor2.dumps({1: 90, 14: 3000})
SERIAL = "B0000001"
COMMAND_TOPIC = f"application/COAP/device/{SERIAL}/downlink"
STATUS_TOPIC = f"application/COAP/device/{SERIAL}/downlink/status"
STATUS_FILTER = "application/COAP/device/+/downlink/status"
EXAMPLE = '{"command": "tx_interval", "parameter": 30}'


# ---- helpers ----------------------------------------------------------------------------


@dataclass
class Running:
    driver: Driver
    config_dir: Path
    port: int  # the broker the driver talks to

    @property
    def mqtt(self) -> MqttIntegration:
        return self.driver.integrations.running["mqtt"]


async def start_driver(config_dir: Path, mqtt_yaml: str, database_url: str | None = None) -> Driver:
    write_config(config_dir, database_url, extra=mqtt_yaml)
    driver = Driver(config_dir)
    await driver.start()
    return driver


async def joined(driver: Driver, serial: str = SERIAL, index: int = 20) -> DeviceSession:
    device = make_device(serial, 17, index)
    await add_device(driver.db, driver.box, device)
    session = session_for(driver, device)
    assert (await session.join("1.0.0", 17)).code == Code.CHANGED
    return session


async def publish(port: int, topic: str, *payloads: bytes, retain: bool = False) -> None:
    """Publish like an automation would: one client, QoS 1, in order."""
    async with aiomqtt.Client("127.0.0.1", port) as client:
        for payload in payloads:
            await client.publish(topic, payload, qos=1, retain=retain)


def subscribed_to(topic_filter: str):
    return lambda status: status["subscribed"] == topic_filter


def state_json(view: DownlinkView, state: int, at: Any) -> bytes:
    """The documented status message, spelled out field by field."""
    return (
        f'{{"command_id":"{view.command_id}","status":{state},'
        f'"timestamp":{int(at.timestamp())},"serial":"{view.serial}",'
        f'"command":"{view.command}","parameter":{json.dumps(view.parameter)},'
        f'"state_name":"{STATE_NAMES[state]}"}}'
    ).encode()


def error_json(command_id: str | None, error: str, detail: str, timestamp: int) -> bytes:
    return json.dumps(
        {
            "command_id": command_id, "status": None, "error": error, "detail": detail,
            "timestamp": timestamp,
        },
        separators=(",", ":"),
    ).encode()


def split(messages: list[Received]) -> tuple[list[Received], list[Received]]:
    """(state changes, refusal reports) in arrival order."""
    states = [m for m in messages if json.loads(m.payload)["status"] is not None]
    errors = [m for m in messages if json.loads(m.payload)["status"] is None]
    return states, errors


async def unsent_events(db: Any) -> int:
    async with db.session() as session:
        query = select(func.count(DownlinkEvent.id)).where(DownlinkEvent.mqtt_sent.is_(False))
        return int((await session.execute(query)).scalar_one())


async def downlink_count(db: Any) -> int:
    async with db.session() as session:
        return int((await session.execute(select(func.count(Downlink.id)))).scalar_one())


@pytest.fixture
def prefix() -> str:
    """A topic prefix of our own on the shared Mosquitto."""
    return f"coap-driver-test/{uuid.uuid4().hex}"


@pytest.fixture
async def builtin(tmp_path: Path) -> AsyncIterator[Running]:
    """A driver on its built-in broker (free port), subscribed to the default command topic."""
    port = free_port()
    config_dir = tmp_path / "config"
    driver = await start_driver(config_dir, f"mqtt:\n  builtin_port: {port}\n")
    try:
        running = Running(driver, config_dir, port)
        await running.mqtt.async_wait_downlink_status(
            subscribed_to("application/COAP/device/+/downlink")
        )
        yield running
    finally:
        await driver.stop()


# ---- scheduling by MQTT -----------------------------------------------------------------


async def test_scheduled_by_mqtt_then_sent_and_acknowledged(builtin: Running) -> None:
    session = await joined(builtin.driver)
    collector = await Collector(builtin.port, STATUS_FILTER).start()
    try:
        await publish(
            builtin.port, COMMAND_TOPIC,
            b'{"command":"tx_interval","parameter":30,"command_id":"mq-1"}',
        )
        await collector.wait_for(1)
        view = await builtin.driver.downlinks.get("mq-1")
        assert (view.state, view.parameter, view.callback_url) == (0, 30, None)

        answer = await session.post("rx", RX)  # the device receives it...
        assert answer.body == {3: 0, 4: [view.downlink_id, 16, 30]}
        await collector.wait_for(2)
        ack = await session.post("ack", cbor2.dumps([view.downlink_id, 0]))  # ...and accepts it
        assert ack.code == Code.CHANGED
        got = await collector.wait_for(3)
        final = await builtin.driver.downlinks.get("mq-1")
        assert [(m.topic, m.payload, m.retain) for m in got] == [
            (STATUS_TOPIC, state_json(final, 0, final.inserted_at), False),
            (STATUS_TOPIC, state_json(final, 2, final.dispatched_at), False),
            (STATUS_TOPIC, state_json(final, 3, final.acknowledged_at), False),
        ]
        assert got[0].payload == (
            b'{"command_id":"mq-1","status":0,"timestamp":'
            + str(int(final.inserted_at.timestamp())).encode()
            + b',"serial":"B0000001","command":"tx_interval","parameter":30,'
            b'"state_name":"Pending, waiting for the device to come online"}'
        )
        status = await builtin.mqtt.async_wait_downlink_status(
            lambda s: s["status_waiting"] == 0 and s["status_published"] == 3
        )
        assert status == {
            "subscribed": "application/COAP/device/+/downlink",
            "subscription_error": None,
            "status_waiting": 0,
            "status_published": 3,
            "commands_accepted": 1,
            "commands_rejected": 0,
            "commands_ignored": 0,
            "reports_published": 0,
        }
        assert await unsent_events(builtin.driver.db) == 0
    finally:
        await collector.stop()


async def test_state_changes_made_elsewhere_are_published_too(builtin: Running) -> None:
    """Scheduled with the REST API's queue call, canceled, another left pending: 0, 1, 0."""
    await joined(builtin.driver)
    collector = await Collector(builtin.port, STATUS_FILTER).start()
    try:
        queue = builtin.driver.downlinks
        first, _ = await queue.schedule(SERIAL, "apn", "iot.example", "api-1")
        await queue.cancel("api-1")
        second, _ = await queue.schedule(SERIAL, "reboot", None, "api-2")
        got = await collector.wait_for(3)
        first = await queue.get("api-1")
        assert [m.payload for m in got] == [
            state_json(first, 0, first.inserted_at),
            state_json(first, 1, first.canceled_at),
            state_json(second, 0, second.inserted_at),
        ]
        assert json.loads(got[2].payload)["parameter"] == 1  # a command's parameter is 1
    finally:
        await collector.stop()


# ---- refused commands -------------------------------------------------------------------

REFUSED = [
    # (serial in the topic, message, command_id reported, error, detail)
    (SERIAL, b"{not json", None, "invalid_json",
     "the message is not valid JSON: Expecting property name enclosed in double quotes: "
     "line 1 column 2 (char 1)"),
    (SERIAL, b"\xff\xfe", None, "invalid_json", "the message is not UTF-8 text"),
    (SERIAL, b'{"command":"reboot","command_id":"\\ud800"}', None, "invalid_json",
     "the message contains an escaped lone surrogate (\\ud800-\\udfff)"),
    (SERIAL, b"[" * 5000 + b"]" * 5000, None, "invalid_json",
     "the message is not valid JSON: maximum recursion depth exceeded while decoding a JSON "
     "array from a unicode string"),
    (SERIAL, b"[1, 2]", None, "invalid_body", f"the message must be a JSON object, e.g. {EXAMPLE}"),
    (SERIAL, b'"reboot"', None, "invalid_body", f"the message must be a JSON object, e.g. {EXAMPLE}"),
    (SERIAL, b'{"command":"reboot","colour":"red","command_id":"e-1"}', "e-1", "invalid_field",
     "colour: unknown field (expected: callback_url, command, command_id, parameter)"),
    (SERIAL, b'{"parameter":1,"command_id":"e-2"}', "e-2", "invalid_field", "command: required"),
    (SERIAL, b'{"command":"reboot","command_id":"' + b"x" * 129 + b'"}', None, "invalid_field",
     "command_id: must be 1 to 128 printable characters"),
    (SERIAL, b'{"command":"self_destruct","command_id":"e-3"}', "e-3", "invalid_command",
     "unknown command 'self_destruct' for hw_type 17; allowed: alarm_transmission, apn, "
     "clear_alarms, firmware_check, pressure_alarm_high, pressure_alarm_low, reboot, "
     "sampling_interval, tx_interval"),
    (SERIAL, b'{"command":"tx_interval","parameter":0,"command_id":"e-4"}', "e-4",
     "invalid_parameter", "tx_interval must be between 5 and 1440 min, got 0"),
    (SERIAL, b'{"command":"reboot","parameter":5,"command_id":"e-5"}', "e-5",
     "invalid_parameter", "reboot is a command: its parameter must be 1, got 5"),
    (SERIAL, b'{"command":"reboot","callback_url":"ftp://x","command_id":"e-6"}', "e-6",
     "invalid_field",
     "callback_url: must be an http:// or https:// URL of at most 2048 characters"),
    ("Z9999999", b'{"command":"reboot","parameter":1,"command_id":"e-7"}', "e-7", "not_found",
     "no device with serial 'Z9999999'"),
    (SERIAL, b'{"command":"tx_interval","parameter":30,"command_id":"c-1"}', "c-1", "conflict",
     "command_id 'c-1' is already used by a different downlink"),
]


async def test_refused_commands_are_reported_and_nothing_is_queued(
    builtin: Running, caplog: pytest.LogCaptureFixture
) -> None:
    await joined(builtin.driver)
    collector = await Collector(builtin.port, STATUS_FILTER).start()
    accepted, _ = await builtin.driver.downlinks.schedule(SERIAL, "reboot", 1, "c-1")
    caplog.set_level(logging.INFO, logger="custom_components.mqtt")
    try:
        await collector.wait_for(1)  # c-1 pending
        before = int(time.time())
        async with aiomqtt.Client("127.0.0.1", builtin.port) as client:
            for serial, payload, *_ in REFUSED:
                await client.publish(
                    f"application/COAP/device/{serial}/downlink", payload, qos=1
                )
        await builtin.mqtt.async_wait_downlink_status(
            lambda s: s["reports_published"] == len(REFUSED)
        )
        got = await collector.wait_for(1 + len(REFUSED))
        after = int(time.time())
    finally:
        await collector.stop()
    states, errors = split(got)
    assert [m.payload for m in states] == [state_json(accepted, 0, accepted.inserted_at)]
    timestamps = [json.loads(m.payload)["timestamp"] for m in errors]
    assert all(before <= stamp <= after for stamp in timestamps)
    assert [(m.topic, m.payload, m.retain) for m in errors] == [
        (
            f"application/COAP/device/{serial}/downlink/status",
            error_json(command_id, error, detail, stamp),
            False,
        )
        for (serial, _, command_id, error, detail), stamp in zip(REFUSED, timestamps, strict=True)
    ]
    assert await downlink_count(builtin.driver.db) == 1  # only c-1, as before
    assert (await builtin.driver.downlinks.get("c-1")).command == "reboot"
    status = builtin.mqtt.downlink_status
    assert (status["commands_accepted"], status["commands_rejected"]) == (0, len(REFUSED))
    # Each refusal is one log line, never a traceback.
    refusals = [r for r in caplog.records if r.name == "custom_components.mqtt.commands"]
    assert len(refusals) == len(REFUSED)
    assert all(r.exc_info is None and r.levelno == logging.WARNING for r in refusals)
    assert refusals[0].getMessage() == (
        f"Refused the MQTT command message on {COMMAND_TOPIC} (command_id None): invalid_json: "
        + REFUSED[0][4]
    )
    assert not [r for r in caplog.records if r.exc_info]


async def test_repeat_with_same_id_and_body_is_a_no_op(builtin: Running) -> None:
    await joined(builtin.driver)
    collector = await Collector(builtin.port, STATUS_FILTER).start()
    try:
        message = b'{"command":"sampling_interval","parameter":2,"command_id":"rep-1"}'
        await publish(builtin.port, COMMAND_TOPIC, message, message)
        await builtin.mqtt.async_wait_downlink_status(lambda s: s["commands_accepted"] == 2)
        await builtin.driver.downlinks.schedule(SERIAL, "reboot", 1, "sentinel")
        got = await collector.wait_for(2)
        assert [json.loads(m.payload)["command_id"] for m in got] == ["rep-1", "sentinel"]
        assert await downlink_count(builtin.driver.db) == 2
        assert builtin.mqtt.downlink_status["reports_published"] == 0
    finally:
        await collector.stop()


async def test_retained_and_empty_messages_are_not_commands(tmp_path: Path, prefix: str) -> None:
    """A retained command comes back at every subscription: it must not be queued again."""
    driver = await start_driver(
        tmp_path / "config",
        "mqtt:\n  broker: external\n  url: mqtt://127.0.0.1:1883\n"
        f"  downlink_command_topic: {prefix}/{{{{serial}}}}/cmd\n"
        f"  downlink_status_topic: {prefix}/{{{{serial}}}}/st\n"
        f"  status_topic: {prefix}/driver\n",
    )
    try:
        mqtt: MqttIntegration = driver.integrations.running["mqtt"]
        await mqtt.async_wait_downlink_status(subscribed_to(f"{prefix}/+/cmd"))
        await joined(driver)
        topic = f"{prefix}/{SERIAL}/cmd"
        await publish(SYSTEM_BROKER_PORT, topic, b'{"command":"reboot"}', retain=True)
        await mqtt.async_wait_downlink_status(lambda s: s["commands_accepted"] == 1)

        # Subscribe again (command topic changed and changed back): the broker resends it retained.
        for command_topic in (prefix + "/other/{{serial}}", prefix + "/{{serial}}/cmd"):
            await mqtt.async_reload(
                {**mqtt.settings, "downlink_command_topic": command_topic}
            )
        await mqtt.async_wait_downlink_status(lambda s: s["commands_ignored"] == 1)
        await publish(SYSTEM_BROKER_PORT, topic, b"", retain=True)  # clears it: not a command
        await publish(SYSTEM_BROKER_PORT, topic, b'{"command":"clear_alarms","command_id":"last"}')
        status = await mqtt.async_wait_downlink_status(lambda s: s["commands_accepted"] == 2)
        assert status["commands_ignored"] == 2
        assert status["commands_rejected"] == 0
        assert await downlink_count(driver.db) == 2
    finally:
        await driver.stop()


# ---- live topic changes -------------------------------------------------------------------


async def test_topic_changes_apply_live(builtin: Running) -> None:
    await joined(builtin.driver)
    port = builtin.port
    old_states = await Collector(port, STATUS_FILTER).start()
    new_states = await Collector(port, "live/+/+/status").start()
    try:
        await builtin.driver.integrations.save(
            "mqtt",
            {
                "downlink_status_topic": "live/{{hw_type}}/{{serial}}/status",
                "downlink_command_topic": "live/cmd/dev-{{serial}}",
            },
        )
        await builtin.driver.integrations.apply_saved()
        await builtin.mqtt.async_wait_downlink_status(subscribed_to("live/cmd/+"))
        async with aiomqtt.Client("127.0.0.1", port) as client:
            await client.publish(COMMAND_TOPIC, b'{"command":"reboot","command_id":"old-1"}', qos=1)
            await client.publish(
                f"live/cmd/dev-{SERIAL}", b'{"command":"reboot","command_id":"new-1"}', qos=1
            )
            await client.publish(f"live/cmd/dev-{SERIAL}", b"oops", qos=1)
        (state,), (error,) = split(await new_states.wait_for(2))  # two paths: any order
        view = await builtin.driver.downlinks.get("new-1")
        assert (state.topic, state.payload) == (
            f"live/17/{SERIAL}/status", state_json(view, 0, view.inserted_at)
        )
        assert error.topic == f"live/17/{SERIAL}/status"
        assert json.loads(error.payload)["error"] == "invalid_json"
        with pytest.raises(DownlinkError):
            await builtin.driver.downlinks.get("old-1")  # the old topic is not listened to
        assert old_states.messages == []
        assert len(new_states.messages) == 2

        # A change that would make the driver read its own messages is refused; nothing changes.
        with pytest.raises(SettingsError) as info:
            await builtin.mqtt.async_reload(
                {**builtin.mqtt.settings, "downlink_command_topic": "live/17/{{serial}}/status"}
            )
        assert str(info.value) == (
            "mqtt.downlink_command_topic: the command topic must differ from the downlink "
            "status topic (downlink_status_topic): the driver would read its own messages, "
            "e.g. on live/17/A0000001/status, as commands"
        )
        assert builtin.mqtt.downlink_status["subscribed"] == "live/cmd/+"
    finally:
        await old_states.stop()
        await new_states.stop()


# ---- outage and restart ---------------------------------------------------------------------


@pytest.fixture
async def private_broker(tmp_path: Path) -> AsyncIterator[Mosquitto]:
    broker = Mosquitto(tmp_path / "mosq", persistence=True)
    await broker.start()
    yield broker
    await broker.stop()


async def test_broker_outage_loses_no_state_change(
    tmp_path: Path, private_broker: Mosquitto, db_url: str
) -> None:
    collector = await Collector(
        private_broker.port, STATUS_FILTER, persistent=True, client_id=f"st-{uuid.uuid4().hex[:8]}"
    ).start()
    driver = await start_driver(
        tmp_path / "config",
        f"mqtt:\n  broker: external\n  url: {private_broker.url}\n",
        db_url,
    )
    try:
        mqtt: MqttIntegration = driver.integrations.running["mqtt"]
        queue = driver.downlinks
        session = await joined(driver)
        await queue.schedule(SERIAL, "tx_interval", 15, "o-1")
        await collector.wait_for(1)
        await collector.sync()
        await mqtt.async_wait_downlink_status(lambda s: s["status_waiting"] == 0)

        await private_broker.stop()
        await mqtt.async_wait_status(lambda s: not s["connected"])
        view = await queue.get("o-1")
        assert (await session.post("rx", RX)).body == {3: 0, 4: [view.downlink_id, 16, 15]}
        await session.post("ack", cbor2.dumps([view.downlink_id, 0]))
        await queue.schedule(SERIAL, "reboot", 1, "o-2")
        await queue.cancel("o-2")
        await queue.schedule(SERIAL, "clear_alarms", 1, "o-3")
        assert await unsent_events(driver.db) == 5
        assert mqtt.downlink_status["status_waiting"] == 5

        await private_broker.start()
        await collector.wait_for(6, timeout=30)
        # Subscribed again after the reconnection: a command by MQTT is the last message.
        # Anything sent twice would come before it (same connection, in order).
        await mqtt.async_wait_downlink_status(subscribed_to("application/COAP/device/+/downlink"))
        await publish(private_broker.port, COMMAND_TOPIC, b'{"command":"reboot","command_id":"sentinel"}')
        got = await collector.wait_for(7, timeout=30)
        o1, o2, o3, last = [await queue.get(i) for i in ("o-1", "o-2", "o-3", "sentinel")]
        assert [m.payload for m in collector.messages] == [
            state_json(o1, 0, o1.inserted_at),
            state_json(o1, 2, o1.dispatched_at),
            state_json(o1, 3, o1.acknowledged_at),
            state_json(o2, 0, o2.inserted_at),
            state_json(o2, 1, o2.canceled_at),
            state_json(o3, 0, o3.inserted_at),
            state_json(last, 0, last.inserted_at),
        ]
        assert {m.topic for m in got} == {STATUS_TOPIC}
        await mqtt.async_wait_downlink_status(lambda s: s["status_waiting"] == 0)
        assert await unsent_events(driver.db) == 0
    finally:
        await collector.stop()
        await driver.stop()


async def test_driver_restart_during_outage_loses_no_state_change(
    tmp_path: Path, private_broker: Mosquitto
) -> None:
    collector = await Collector(
        private_broker.port, STATUS_FILTER, persistent=True, client_id=f"st-{uuid.uuid4().hex[:8]}"
    ).start()
    config_dir = tmp_path / "config"
    mqtt_yaml = f"mqtt:\n  broker: external\n  url: {private_broker.url}\n"
    driver = await start_driver(config_dir, mqtt_yaml)
    try:
        session = await joined(driver)
        await driver.integrations.running["mqtt"].async_wait_status(lambda s: s["connected"])
        await private_broker.stop()
        view, _ = await driver.downlinks.schedule(SERIAL, "reboot", 1, "r-1")
        await session.post("rx", RX)  # sent: state 2
        assert await unsent_events(driver.db) == 2
    finally:
        await driver.stop()
    driver = await start_driver(config_dir, mqtt_yaml)  # while the broker is still away
    try:
        mqtt: MqttIntegration = driver.integrations.running["mqtt"]
        assert mqtt.downlink_status["status_waiting"] == 2
        await private_broker.start()
        await collector.wait_for(2, timeout=30)
        await driver.downlinks.schedule(SERIAL, "clear_alarms", 1, "sentinel")
        await collector.wait_for(3, timeout=30)
        view, last = await driver.downlinks.get("r-1"), await driver.downlinks.get("sentinel")
        assert [m.payload for m in collector.messages] == [
            state_json(view, 0, view.inserted_at),
            state_json(view, 2, view.dispatched_at),
            state_json(last, 0, last.inserted_at),
        ]
    finally:
        await collector.stop()
        await driver.stop()


# ---- a flood of bad commands ----------------------------------------------------------------


async def test_a_flood_of_bad_commands_does_not_disturb_uplinks(
    tmp_path: Path, prefix: str
) -> None:
    flood = 2000
    uplinks = await Collector(SYSTEM_BROKER_PORT, f"{prefix}/+/up").start()
    reports = await Collector(SYSTEM_BROKER_PORT, f"{prefix}/+/st", qos=0).start()
    driver = await start_driver(
        tmp_path / "config",
        "mqtt:\n  broker: external\n  url: mqtt://127.0.0.1:1883\n"
        f"  uplink_topic: {prefix}/{{{{serial}}}}/up\n"
        f"  downlink_status_topic: {prefix}/{{{{serial}}}}/st\n"
        f"  downlink_command_topic: {prefix}/{{{{serial}}}}/cmd\n"
        f"  status_topic: {prefix}/driver\n",
    )
    try:
        mqtt: MqttIntegration = driver.integrations.running["mqtt"]
        await mqtt.async_wait_downlink_status(subscribed_to(f"{prefix}/+/cmd"))
        session = await joined(driver)
        await uplinks.wait_for(1)

        async def flooder() -> None:
            async with aiomqtt.Client("127.0.0.1", SYSTEM_BROKER_PORT) as client:
                for i in range(flood):
                    if i % 2:
                        await client.publish(f"{prefix}/{SERIAL}/cmd", b"{bad", qos=1)
                    else:  # costs a database look-up each
                        await client.publish(
                            f"{prefix}/Z{i:07d}/cmd", b'{"command":"reboot"}', qos=1
                        )

        flooding = asyncio.create_task(flooder())
        await mqtt.async_wait_downlink_status(lambda s: s["commands_rejected"] >= 100)
        latencies = []
        for battery in range(30):
            started = time.perf_counter()
            assert (await session.post("rx", cbor2.dumps({1: battery}))).code == Code.CHANGED
            await uplinks.wait_for(2 + battery)
            latencies.append(time.perf_counter() - started)
        during = mqtt.downlink_status["commands_rejected"]
        await flooding
        await mqtt.async_wait_downlink_status(
            lambda s: s["reports_published"] == flood, within=60
        )
        got = await reports.wait_for(flood, timeout=60)
    finally:
        await uplinks.stop()
        await reports.stop()
        await driver.stop()
    print(
        f"\nuplink latency during the flood: max {max(latencies) * 1000:.0f} ms, "
        f"{during} of {flood} bad commands handled meanwhile"
    )
    assert during < flood  # the uplinks really went through while the flood was handled
    batteries = [json.loads(m.payload)["data"]["battery"] for m in uplinks.messages[1:]]
    assert batteries == list(range(30))
    errors = [json.loads(m.payload)["error"] for m in got]
    assert (errors.count("invalid_json"), errors.count("not_found")) == (flood // 2, flood // 2)


# ---- settings ---------------------------------------------------------------------------------


def test_defaults_of_the_downlink_topics() -> None:
    defaults = SETTINGS_SCHEMA({})
    assert defaults["downlink_status_topic"] == "application/COAP/device/{{serial}}/downlink/status"
    assert defaults["downlink_command_topic"] == "application/COAP/device/{{serial}}/downlink"


@pytest.mark.parametrize(
    ("settings", "errors"),
    [
        ({"downlink_command_topic": "cmd/{{hw_type}}/{{serial}}"}, {
            "downlink_command_topic": "{{hw_type}} cannot be used in the command topic: only "
            "{{serial}} can be read back from the topic of a received command",
        }),
        ({"downlink_command_topic": "cmd/all"}, {
            "downlink_command_topic": "the command topic must contain {{serial}}: the serial in "
            "the topic says which device the command is for",
        }),
        ({"downlink_command_topic": "cmd/{{ serial | lower }}"}, {
            "downlink_command_topic": "the command topic can only contain text and {{serial}} "
            "(no other template syntax): the driver subscribes to it with + in place of the serial",
        }),
        ({"downlink_command_topic": "cmd/+/{{serial}}"}, {
            "downlink_command_topic": "the topic 'cmd/+/A0000001' must not contain the "
            "wildcards + or #",
        }),
        ({"downlink_command_topic": "cmd/{{serial"}, {
            "downlink_command_topic": "not a valid template: unexpected end of template, "
            "expected 'end of print statement' (line 1)",
        }),
        ({"downlink_status_topic": "st/{{ device }}"}, {
            "downlink_status_topic": "unknown variable 'device' in the topic template; "
            "available: serial, hw_type",
        }),
        ({"downlink_command_topic": "application/COAP/device/{{serial}}/downlink/status"}, {
            "downlink_command_topic": "the command topic must differ from the downlink status "
            "topic (downlink_status_topic): the driver would read its own messages, e.g. on "
            "application/COAP/device/A0000001/downlink/status, as commands",
        }),
        ({"downlink_command_topic": "x/{{serial}}", "downlink_status_topic": "x/{{serial}}"}, {
            "downlink_command_topic": "the command topic must differ from the downlink status "
            "topic (downlink_status_topic): the driver would read its own messages, e.g. on "
            "x/A0000001, as commands",
        }),
        ({"downlink_command_topic": "s/{{serial}}/x", "downlink_status_topic": "s/{{hw_type}}/{{serial}}"}, {
            "downlink_command_topic": "the command topic must differ from the downlink status "
            "topic (downlink_status_topic): the driver would read its own messages, e.g. on "
            "s/A0000001/x, as commands",
        }),
        ({"uplink_topic": "dev/{{serial}}", "downlink_command_topic": "dev/{{serial}}"}, {
            "downlink_command_topic": "the command topic must differ from the uplink topic "
            "(uplink_topic): the driver would read its own messages, e.g. on dev/A0000001, "
            "as commands",
        }),
        ({"downlink_command_topic": "coap-driver/{{serial}}"}, {
            "downlink_command_topic": "the command topic must differ from the status topic "
            "(status_topic): the driver would read its own messages, e.g. on "
            "coap-driver/status, as commands",
        }),
        ({"downlink_command_topic": "cmd/dev-{{serial}}/x", "downlink_status_topic": "st/{{serial}}"}, {}),
    ],
)
async def test_downlink_topic_settings(settings: dict, errors: dict) -> None:
    assert await async_validate(settings) == errors


def test_command_topic_filter_and_serial() -> None:
    plain = CommandTopic("application/COAP/device/{{serial}}/downlink")
    assert plain.filter == "application/COAP/device/+/downlink"
    assert plain.serial("application/COAP/device/A0000001/downlink") == "A0000001"
    assert plain.serial("application/COAP/device/A0000001/downlink/status") is None
    assert plain.serial("application/COAP/device//downlink") is None
    inside = CommandTopic("cmd/dev-{{ serial }}.x/in")
    assert inside.filter == "cmd/+/in"
    assert inside.serial("cmd/dev-B7.x/in") == "B7"
    assert inside.serial("cmd/B7/in") is None
    twice = CommandTopic("{{serial}}/to/{{serial}}")
    assert twice.filter == "+/to/+"
    assert twice.serial("A1/to/A1") == "A1"
    assert twice.serial("A1/to/B2") is None


# ---- migration --------------------------------------------------------------------------------


async def test_migration_does_not_replay_history(db_url: str) -> None:
    """Rows from before 0003 count as sent; new rows start unsent (server default)."""
    engine = create_async_engine(normalize_url(db_url))
    await run_migrations(engine, "0002")
    now = "2026-01-01 00:00:00+00:00"
    async with engine.begin() as conn:
        await conn.execute(text(
            "INSERT INTO devices (id, serial, hw_type, kid, master_secret_enc, master_salt_enc, "
            "created_at, tx_interval, uplinks_since_join) "
            f"VALUES (1, 'M1', 17, :kid, :x, :x, '{now}', 60, 0)"
        ), {"kid": b"\x01", "x": b"x"})
        await conn.execute(text(
            "INSERT INTO downlinks (id, command_id, device_id, command, code, parameter, state, "
            f"inserted_at, updated_at) VALUES (1, 'old', 1, 'reboot', 1, '1', 0, '{now}', '{now}')"
        ))
        await conn.execute(text(
            "INSERT INTO downlink_events (downlink_id, command_id, serial, state, at, "
            f"callback_attempts) VALUES (1, 'old', 'M1', 0, '{now}', 0)"
        ))
    await engine.dispose()
    database = Database(db_url)
    await database.start()  # migrates to the head
    try:
        async with database.engine.begin() as conn:
            await conn.execute(text(
                "INSERT INTO downlink_events (downlink_id, command_id, serial, state, at, "
                f"callback_attempts) VALUES (1, 'old', 'M1', 1, '{now}', 0)"
            ))
            rows = (await conn.execute(
                text("SELECT state, mqtt_sent FROM downlink_events ORDER BY id")
            )).all()
        assert [(state, bool(sent)) for state, sent in rows] == [(0, True), (1, False)]
    finally:
        await database.stop()
