"""The built-in broker (amqtt in-process) with real MQTT clients."""

from __future__ import annotations

import logging
import socket

import aiomqtt
import pytest

from driver_core.broker import BrokerError, BuiltinBroker
from tests.mqtt_helpers import Collector, free_port, retained


async def test_publish_and_subscribe_through_builtin_broker() -> None:
    broker = BuiltinBroker("127.0.0.1", free_port())
    await broker.start()
    try:
        assert broker.running
        assert broker.url == f"mqtt://127.0.0.1:{broker.port}"
        collector = await Collector(broker.port, "a/+/b").start()
        async with aiomqtt.Client("127.0.0.1", broker.port) as client:
            for i in range(3):
                await client.publish(f"a/{i}/b", f"m{i}".encode(), qos=1)
            await client.publish("driver/status", b"online", qos=1, retain=True)
        got = await collector.wait_for(3)
        await collector.stop()
        assert [(m.topic, m.payload) for m in got] == [
            ("a/0/b", b"m0"), ("a/1/b", b"m1"), ("a/2/b", b"m2"),
        ]
        assert await retained(broker.port, "driver/status") == b"online"
    finally:
        await broker.stop()
    assert not broker.running


async def test_stop_frees_the_port_and_start_again() -> None:
    port = free_port()
    broker = BuiltinBroker("127.0.0.1", port)
    await broker.start()
    await broker.stop()
    await broker.stop()  # idempotent
    with socket.socket() as sock:  # the port is really released
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
    await broker.start()
    try:
        async with aiomqtt.Client("127.0.0.1", port) as client:
            await client.publish("x", b"1", qos=1)
    finally:
        await broker.stop()


async def test_port_in_use_names_the_setting() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        broker = BuiltinBroker("127.0.0.1", port)
        with pytest.raises(BrokerError) as info:
            await broker.start()
    assert str(info.value) == (
        f"mqtt.builtin_port: port {port} on 127.0.0.1 is already in use "
        "(another MQTT broker, e.g. Mosquitto, may be running); choose another "
        "builtin_port or use the external broker"
    )
    assert not broker.running


async def test_default_port_clashes_with_system_mosquitto() -> None:
    """The machine's Mosquitto holds 1883: the message says what to change."""
    with pytest.raises(BrokerError, match=r"^mqtt\.builtin_port: port 1883 on 127\.0\.0\.1 is already in use"):
        await BuiltinBroker().start()


async def test_unknown_host_names_the_setting() -> None:
    with pytest.raises(BrokerError) as info:
        await BuiltinBroker("192.0.2.1", free_port()).start()
    assert str(info.value) == "mqtt.builtin_host: 192.0.2.1 is not an address of this machine"


def test_amqtt_logging_is_quiet() -> None:
    assert logging.getLogger("amqtt").level == logging.WARNING
    assert logging.getLogger("transitions").level == logging.WARNING
