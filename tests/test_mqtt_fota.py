"""FOTA status on MQTT: every firmware update event of a real driver arrives on fota_status_topic."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from driver_core.driver import Driver
from driver_core.enrollment import add_device
from driver_core.events import EVENT_FOTA_STATE
from driver_core.fota import library
from driver_core.simulator import SimulatedDevice
from tests.conftest import make_device, session_for, write_config
from tests.mqtt_helpers import Collector, free_port
from tests.test_fota import IMAGE, chunks_of


@pytest.fixture
async def builtin(tmp_path: Path) -> AsyncIterator[tuple[Driver, int]]:
    port = free_port()
    config_dir = tmp_path / "config"
    write_config(config_dir, extra=f"mqtt:\n  builtin_port: {port}\n  qos: 1\n")
    driver = Driver(config_dir)
    await driver.start()
    try:
        await driver.integrations.running["mqtt"].async_wait_status(lambda s: s["connected"])
        yield driver, port
    finally:
        await driver.stop()


async def test_every_fota_state_change_is_published_as_compact_json(builtin) -> None:
    driver, port = builtin
    await library.save_image(
        driver.db, driver.config_dir, chunks_of(IMAGE), hw_type=17, version="2.0.0"
    )
    await library.set_target(driver.db, "2.0.0", hw_type=17)
    await driver.fota.reload()
    enrollment = make_device("F0MQTT01", 17, 61)
    await add_device(driver.db, driver.box, enrollment)
    events = []
    driver.bus.listen(EVENT_FOTA_STATE, events.append)
    collector = await Collector(port, "application/COAP/device/+/fota/status").start()
    try:
        device = SimulatedDevice(enrollment, driver.families[17], session_for(driver, enrollment))
        await device.join()
        assert await device.check_firmware() == "installed 2.0.0"
        states = [e.state for e in events]
        assert states[0] == "offered" and states[-2:] == ["downloaded", "installed"]
        received = await collector.wait_for(len(events))
    finally:
        await collector.stop()
    assert [m.topic for m in received] == ["application/COAP/device/F0MQTT01/fota/status"] * len(
        events
    )
    assert not any(m.retain for m in received)
    assert [m.payload for m in received] == [
        json.dumps(e.as_json(), separators=(",", ":")).encode() for e in events
    ]
    first = json.loads(received[0].payload)
    assert {k: v for k, v in first.items() if k != "at"} == {
        "serial": "F0MQTT01", "hw_type": 17, "version": "2.0.0", "state": "offered",
        "previous_state": None, "percent": 0, "blocks": 0, "received_bytes": 0,
        "size": len(IMAGE), "error": None,
    }
    last = json.loads(received[-1].payload)
    assert (last["state"], last["previous_state"], last["percent"]) == (
        "installed", "downloaded", 100,
    )


async def test_fota_status_topic_is_validated() -> None:
    from custom_components.mqtt.config_flow import async_validate

    errors = await async_validate({"fota_status_topic": "a/{{serial}}/#"})
    assert set(errors) == {"fota_status_topic"}
    errors = await async_validate(
        {"fota_status_topic": "x/{{serial}}/cmd", "downlink_command_topic": "x/{{serial}}/cmd"}
    )
    assert errors == {
        "downlink_command_topic": "the command topic must differ from the firmware update "
        "status topic (fota_status_topic): the driver would read its own messages, e.g. on "
        "x/A0000001/cmd, as commands"
    }
