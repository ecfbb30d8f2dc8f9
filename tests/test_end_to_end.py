"""The issue's acceptance path: simulated devices of three families -> driver -> MQTT, exactly as documented.

Real UDP, real brokers (the built-in amqtt broker, the machine's Mosquitto, private
Mosquitto processes for TLS and outages), real SQLite.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import cbor2
import pytest
from aiocoap.numbers.codes import Code

from driver_core.driver import Driver
from driver_core.enrollment import add_device
from tests.conftest import make_device, session_for, write_config
from tests.mqtt_helpers import Collector, Mosquitto, free_port, make_tls_files

RX_DATE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00$")
ZULU = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
FIELDS = ["protocol", "rx_date", "hw_type", "message_type", "serial", "join_date", "last_seen", "data"]


@pytest.fixture
async def mqtt_driver(tmp_path: Path) -> AsyncIterator[tuple[Driver, int]]:
    """A driver publishing on its built-in broker (on a free port)."""
    port = free_port()
    config_dir = tmp_path / "config"
    write_config(config_dir, extra=f"mqtt:\n  builtin_port: {port}\n")
    driver = Driver(config_dir)
    await driver.start()
    try:
        yield driver, port
    finally:
        await driver.stop()


async def test_three_families_publish_every_documented_field(mqtt_driver):
    driver, port = mqtt_driver
    collector = await Collector(port, "application/COAP/device/+/uplink").start()
    try:
        devices = [make_device("C0000017", 17, 31), make_device("C0000024", 24, 32), make_device("C0000028", 28, 33)]
        payloads = {}
        for device in devices:
            await add_device(driver.db, driver.box, device)
            session = session_for(driver, device)
            assert (await session.join("3.2.1", device.hw_type, reset_cause=2)).code == Code.CHANGED
            family = driver.families[device.hw_type]
            import random

            values = family.sample_values(device.hw_type, random.Random(device.serial))
            payloads[device.serial] = family.encode(device.hw_type, values)
            assert (await session.post("rx", payloads[device.serial])).code == Code.CHANGED
            assert (await session.post("ack", cbor2.dumps([77, 0]))).code == Code.CHANGED
            assert (await session.post("fota", cbor2.dumps({1: "3.2.1"}))).code == Code.CHANGED
        received = await collector.wait_for(12)
    finally:
        await collector.stop()

    by_serial: dict[str, list[dict]] = {}
    for message in received:
        document = json.loads(message.payload)
        assert message.topic == f"application/COAP/device/{document['serial']}/uplink"
        by_serial.setdefault(document["serial"], []).append(document)
    assert sorted(by_serial) == ["C0000017", "C0000024", "C0000028"]
    for device in devices:
        docs = by_serial[device.serial]
        assert [d["message_type"] for d in docs] == ["join", "rx", "ack", "fota"]
        join_date = docs[0]["join_date"]
        for index, doc in enumerate(docs):
            assert list(doc) == FIELDS
            assert doc["protocol"] == 2
            assert doc["hw_type"] == str(device.hw_type)
            assert doc["serial"] == device.serial
            assert RX_DATE.match(doc["rx_date"]) and ZULU.match(doc["join_date"])
            assert doc["join_date"] == join_date
            if index == 0:
                assert doc["last_seen"] is None  # never seen before this JOIN
            else:  # the previous uplink's reception, to the millisecond
                assert ZULU.match(doc["last_seen"])
                assert doc["last_seen"][:19] == docs[index - 1]["rx_date"][:19]
        assert docs[1]["last_seen"] == join_date
        assert docs[2]["last_seen"] > docs[1]["last_seen"] and docs[3]["last_seen"] > docs[2]["last_seen"]
        family = driver.families[device.hw_type]
        assert docs[0]["data"] == {"firmware": "3.2.1", "hw_type": device.hw_type, "reset_cause": 2}
        assert docs[1]["data"] == family.decode(device.hw_type, payloads[device.serial])
        assert docs[2]["data"] == {"downlink_id": 77, "result": 0, "accepted": True}
        assert docs[3]["data"] == {"firmware": "3.2.1"}


async def test_external_broker_and_topic_change_apply_without_restart(mqtt_driver):
    driver, _ = mqtt_driver
    device = make_device("C0000100", 16, 40)
    await add_device(driver.db, driver.box, device)
    session = session_for(driver, device)
    await session.join("1.0.0", 16)
    prefix = f"e2e-{uuid.uuid4().hex[:8]}"
    collector = await Collector(1883, f"{prefix}/#").start()  # the machine's Mosquitto
    try:
        await driver.integrations.save(
            "mqtt", {"broker": "external", "url": "mqtt://127.0.0.1:1883", "uplink_topic": prefix + "/a/{{serial}}"}
        )
        # No reload call: the running driver notices the saved settings by itself, within seconds.
        mqtt = driver.integrations.running["mqtt"]
        await mqtt.async_wait_status(
            lambda status: status["connected"] and status["broker"].endswith("127.0.0.1:1883"), within=10
        )
        await session.post("rx", cbor2.dumps({1: 50}))
        first = await collector.wait_for(1, timeout=15)
        assert first[0].topic == f"{prefix}/a/C0000100"
        assert json.loads(first[0].payload)["message_type"] == "rx"
        await driver.integrations.save("mqtt", {"uplink_topic": prefix + "/b/{{serial}}/up"})
        await driver.integrations.apply_saved()
        await session.post("rx", cbor2.dumps({1: 51}))
        second = await collector.wait_for(2, timeout=15)
        assert second[1].topic == f"{prefix}/b/C0000100/up"
        assert json.loads(second[1].payload)["data"]["battery"] == 51
    finally:
        await collector.stop()


async def test_external_broker_over_tls(mqtt_driver, tmp_path: Path):
    driver, _ = mqtt_driver
    tls = make_tls_files(tmp_path / "tls")
    broker = Mosquitto(tmp_path / "mosq-tls", tls=tls)
    await broker.start()
    collector = None
    try:
        collector = await Collector(broker.port, "application/COAP/device/+/uplink", tls=tls).start()
        await driver.integrations.save(
            "mqtt", {"broker": "external", "url": broker.url, "tls_ca_file": str(tls.ca_cert)}
        )
        await driver.integrations.apply_saved()
        device = make_device("C0000200", 18, 41)
        await add_device(driver.db, driver.box, device)
        session = session_for(driver, device)
        await session.join("1.0.0", 18)
        await session.post("rx", cbor2.dumps({1: 60, 17: 1234}))
        received = await collector.wait_for(2, timeout=15)  # over TLS
        assert [json.loads(m.payload)["message_type"] for m in received] == ["join", "rx"]
        assert json.loads(received[1].payload)["data"]["temperature"] == 12.34
    finally:
        if collector is not None:
            await collector.stop()
        await broker.stop()


async def test_broker_outage_loses_nothing_and_keeps_order(mqtt_driver, tmp_path: Path):
    driver, _ = mqtt_driver
    broker = Mosquitto(tmp_path / "mosq", persistence=True)
    await broker.start()
    collector = await Collector(
        broker.port, "application/COAP/device/+/uplink", persistent=True, client_id="e2e-outage"
    ).start()
    try:
        await driver.integrations.save("mqtt", {"broker": "external", "url": broker.url})
        await driver.integrations.apply_saved()
        device = make_device("C0000300", 31, 42)
        await add_device(driver.db, driver.box, device)
        session = session_for(driver, device)
        await session.join("1.0.0", 31)
        await collector.wait_for(1, timeout=15)
        await collector.sync()
        await broker.stop()
        for battery in range(10, 15):  # answered while the broker is away: durable outbox
            answer = await session.post("rx", cbor2.dumps({1: battery}))
            assert answer.code == Code.CHANGED
        await broker.start()
        received = await collector.wait_for(6, timeout=30)
    finally:
        await collector.stop()
        await broker.stop()
    batteries = [json.loads(m.payload)["data"].get("battery") for m in received[1:]]
    assert batteries == [10, 11, 12, 13, 14]
    assert len(collector.messages) == 6
