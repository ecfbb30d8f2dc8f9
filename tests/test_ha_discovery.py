"""Home Assistant MQTT discovery without Home Assistant: exact payloads on a real broker.

A real driver (real UDP, SQLite) publishes through its mqtt integration to a
private Mosquitto; the tests read what is retained there, publish what Home
Assistant would publish (button presses, number values, `homeassistant/status`),
and check the devices' answers. tests/test_home_assistant.py runs the same
discovery against a real Home Assistant.
"""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from importlib import metadata
from pathlib import Path
from typing import Any

import aiomqtt
import cbor2
import pytest
from aiocoap.numbers.codes import Code
from sqlalchemy import select

from driver_core.driver import Driver
from driver_core.enrollment import add_device, delete_device
from driver_core.storage.models import Device
from driver_core.timefmt import utcnow, zulu_millis
from tests.conftest import make_device, session_for, write_config
from tests.mqtt_helpers import Collector, Mosquitto, wait_until

VERSION = metadata.version("coap-driver")
ORIGIN = {
    "name": "coap-driver",
    "sw_version": VERSION,
    "support_url": "https://github.com/coap-driver/coap-driver",
}
STATUS = {"topic": "coap-driver/status"}


@dataclass
class Setup:
    driver: Driver
    broker: Mosquitto

    @property
    def ha(self) -> Any:
        return self.driver.integrations.running["homeassistant"]

    async def settled(self, within: float = 20) -> dict[str, Any]:
        """Connected and nothing left to publish."""
        return await self.ha.async_wait_status(
            lambda s: s["connected"] and not s["republishing"], within=within
        )

    async def retained(self, topic_filter: str, count: int) -> dict[str, bytes]:
        """The retained messages under `topic_filter` (exactly `count` of them)."""
        collector = await Collector(self.broker.port, topic_filter).start()
        try:
            messages = await collector.wait_for(count, timeout=10)
            await collector.sync()
            assert len(collector.messages) == count, [m.topic for m in collector.messages]
        finally:
            await collector.stop()
        assert all(m.retain for m in messages)
        return {m.topic: m.payload for m in messages}

    async def latest(self, topic: str) -> dict[str, Any]:
        """The newest JSON message on `topic` (retained, or published while reading)."""
        collector = await Collector(self.broker.port, topic).start()
        try:
            await collector.wait_for(1, timeout=10)
            await collector.sync()
        finally:
            await collector.stop()
        return json.loads(collector.messages[-1].payload)

    async def publish(self, topic: str, payload: str | bytes) -> None:
        async with aiomqtt.Client("127.0.0.1", self.broker.port) as client:
            await client.publish(topic, payload, qos=1)


async def start_driver(tmp_path: Path, broker: Mosquitto, ha: str = "", devices: str = "") -> Driver:
    config_dir = tmp_path / "config"
    write_config(
        config_dir,
        extra=(
            f"mqtt:\n  broker: external\n  url: {broker.url}\n"
            f"homeassistant:\n  availability_check: 0.2\n{ha}{devices}"
        ),
    )
    driver = Driver(config_dir)
    driver.load()
    return driver


@pytest.fixture
async def broker(tmp_path: Path) -> AsyncIterator[Mosquitto]:
    async with Mosquitto(tmp_path / "mosquitto") as mosquitto:
        yield mosquitto


@pytest.fixture
async def setup(tmp_path: Path, broker: Mosquitto) -> AsyncIterator[Setup]:
    """Three devices (one per family) enrolled before the driver starts, never seen."""
    driver = await start_driver(tmp_path, broker)
    from driver_core.storage.db import Database
    from driver_core.storage.secretbox import SecretBox

    db = Database(driver.config.database["url"])
    await db.start()
    box = SecretBox.load_or_create(driver.config_dir)
    for index, (serial, hw_type) in enumerate(
        [("C0000017", 17), ("C0000024", 24), ("C0000028", 28)], start=1
    ):
        await add_device(db, box, make_device(serial, hw_type, index))
    await db.stop()
    await driver.start()
    try:
        yield Setup(driver, broker)
    finally:
        await driver.stop()


def device_block(setup: Setup, serial: str, model: str, family: str, hw_type: int, **extra: Any):
    return {
        "identifiers": [f"coap_driver_{serial}"],
        "name": f"{model} {serial}",
        "manufacturer": "VIDI",
        "model": model,
        "hw_version": f"{family}, hw_type {hw_type}",
        "serial_number": serial,
        "via_device": setup.ha.driver_identifier,
        **extra,
    }


def common(setup: Setup, serial: str, object_id: str, availability: list, device: dict) -> dict:
    return {
        "unique_id": f"coap_driver_{serial}_{object_id}",
        "object_id": f"{serial.lower()}_{object_id}",
        "availability": availability,
        "availability_mode": "all",
        "device": device,
        "origin": ORIGIN,
    }


def expected_topics(setup: Setup, serial: str) -> list[str]:
    """Every config topic of a device, from its family (one per entity and command + extras)."""
    hw_type = int(serial[-2:])  # the fixtures' serials end with the hw_type
    family = setup.driver.families[hw_type]
    topics = [
        f"homeassistant/{e.platform}/coap_driver_{serial}_{e.object_id}/config"
        for e in family.entities_for(hw_type)
    ]
    topics += [
        f"homeassistant/sensor/coap_driver_{serial}_{key}/config"
        for key in ("last_seen", "join_date", "downlink")
    ]
    for spec in family.commands_for(hw_type):
        component = (
            "button" if spec.kind == "command"
            else "text" if spec.type == "str"
            else "select" if spec.options
            else "number"
        )
        topics.append(f"homeassistant/{component}/coap_driver_{serial}_{spec.name}/config")
    if family.domain in ("vidi_positioner", "vidi_prv"):
        topics.append(f"homeassistant/valve/coap_driver_{serial}_valve/config")
    return sorted(topics)


async def test_every_enrolled_device_is_discovered_with_exact_payloads(setup: Setup):
    await setup.settled()
    topics = {s: expected_topics(setup, s) for s in ("C0000017", "C0000024", "C0000028")}
    assert len(topics["C0000017"]) == 26 and len(topics["C0000024"]) == 32
    assert len(topics["C0000028"]) == 35
    total = sum(len(t) for t in topics.values()) + 1  # + the driver's own status entity
    configs = await setup.retained("homeassistant/+/+/config", total)
    driver_id = setup.ha.driver_identifier
    assert sorted(configs) == sorted(
        [*topics["C0000017"], *topics["C0000024"], *topics["C0000028"],
         f"homeassistant/binary_sensor/{driver_id}_status/config"]
    )
    loaded = {topic: json.loads(payload) for topic, payload in configs.items()}

    assert loaded[f"homeassistant/binary_sensor/{driver_id}_status/config"] == {
        "name": "Status",
        "unique_id": f"{driver_id}_status",
        "object_id": "coap_driver_status",
        "device_class": "connectivity",
        "entity_category": "diagnostic",
        "state_topic": "coap-driver/status",
        "payload_on": "online",
        "payload_off": "offline",
        "device": {
            "identifiers": [driver_id],
            "name": "coap-driver",
            "manufacturer": "coap-driver",
            "model": "CoAP/OSCORE device driver",
            "sw_version": VERSION,
        },
        "origin": ORIGIN,
    }
    pressure = device_block(setup, "C0000017", "VIDI Pressure", "VIDI Transmitter", 17)
    measured = [STATUS, {"topic": "coap-driver/C0000017/availability"}]
    assert loaded["homeassistant/sensor/coap_driver_C0000017_pressure/config"] == {
        "name": "Pressure",
        "state_topic": "coap-driver/C0000017/state",
        "value_template": '{{ value_json.data.get("pressure") }}',
        "device_class": "pressure",
        "state_class": "measurement",
        "unit_of_measurement": "bar",
        **common(setup, "C0000017", "pressure", measured, pressure),
    }
    assert loaded["homeassistant/sensor/coap_driver_C0000017_rsrp/config"] == {
        "name": "RSRP",
        "state_topic": "coap-driver/C0000017/state",
        "value_template": '{{ value_json.data.get("rsrp") }}',
        "device_class": "signal_strength",
        "state_class": "measurement",
        "unit_of_measurement": "dBm",
        "entity_category": "diagnostic",
        "enabled_by_default": False,
        **common(setup, "C0000017", "rsrp", measured, pressure),
    }
    assert loaded["homeassistant/binary_sensor/coap_driver_C0000017_alarms_high_threshold/config"] == {
        "name": "High threshold",
        "state_topic": "coap-driver/C0000017/state",
        "value_template": (
            '{% set v = value_json.data.get("alarms") %}'
            "{{ 'None' if v is none else ('ON' if \"high_threshold\" in v else 'OFF') }}"
        ),
        "device_class": "problem",
        **common(setup, "C0000017", "alarms_high_threshold", measured, pressure),
    }
    assert loaded["homeassistant/sensor/coap_driver_C0000017_last_seen/config"] == {
        "name": "Last seen",
        "state_topic": "coap-driver/C0000017/state",
        "value_template": "{{ value_json.last_seen }}",
        "device_class": "timestamp",
        "entity_category": "diagnostic",
        **common(
            setup, "C0000017", "last_seen",
            [STATUS, {
                "topic": "coap-driver/C0000017/state",
                "value_template": "{{ 'online' if value_json.last_seen is not none else 'offline' }}",
            }],
            pressure,
        ),
    }
    assert loaded["homeassistant/sensor/coap_driver_C0000017_downlink/config"] == {
        "name": "Last downlink",
        "icon": "mdi:download-network",
        "state_topic": "coap-driver/C0000017/state",
        "value_template": "{{ value_json.downlink.status if value_json.downlink else 'none' }}",
        "device_class": "enum",
        "options": [
            "none", "pending", "canceled", "sent", "acknowledged", "rejected", "unacknowledged",
        ],
        "json_attributes_topic": "coap-driver/C0000017/state",
        "json_attributes_template": "{{ (value_json.downlink or {}) | tojson }}",
        "entity_category": "diagnostic",
        **common(setup, "C0000017", "downlink", [STATUS], pressure),
    }
    command_topic = "application/COAP/device/C0000017/downlink"
    assert loaded["homeassistant/button/coap_driver_C0000017_reboot/config"] == {
        "name": "Reboot",
        "command_topic": command_topic,
        "payload_press": '{"command": "reboot"}',
        "device_class": "restart",
        "entity_category": "config",
        **common(setup, "C0000017", "reboot", [STATUS], pressure),
    }
    assert loaded["homeassistant/number/coap_driver_C0000017_pressure_alarm_high/config"] == {
        "name": "Pressure alarm high",
        "command_topic": command_topic,
        "entity_category": "config",
        "state_topic": "coap-driver/C0000017/state",
        "min": 0,
        "max": 25000,
        "step": 1,
        "value_template": '{{ value_json.config.get("pressure_alarm_high") }}',
        "command_template": '{"command": "pressure_alarm_high", "parameter": {{ value | int }}}',
        "unit_of_measurement": "mbar",
        "mode": "box",
        **common(setup, "C0000017", "pressure_alarm_high", [STATUS], pressure),
    }
    assert loaded["homeassistant/select/coap_driver_C0000017_alarm_transmission/config"] == {
        "name": "Alarm transmission",
        "command_topic": command_topic,
        "entity_category": "config",
        "state_topic": "coap-driver/C0000017/state",
        "options": ["next_interval", "immediate"],
        "value_template": (
            '{{ {"0": "next_interval", "1": "immediate"}'
            '.get((value_json.config.get("alarm_transmission") | string)) }}'
        ),
        "command_template": '{"command": "alarm_transmission", "parameter": {{ value | tojson }}}',
        **common(setup, "C0000017", "alarm_transmission", [STATUS], pressure),
    }
    assert loaded["homeassistant/text/coap_driver_C0000017_apn/config"] == {
        "name": "Apn",
        "command_topic": command_topic,
        "entity_category": "config",
        "command_template": '{"command": "apn", "parameter": {{ value | tojson }}}',
        "min": 1,
        "max": 63,
        **common(setup, "C0000017", "apn", [STATUS], pressure),
    }

    positioner = device_block(setup, "C0000024", "VIDI Positioner", "VIDI Positioner", 24)
    assert loaded["homeassistant/valve/coap_driver_C0000024_valve/config"] == {
        "name": "Valve",
        "device_class": "water",
        "state_topic": "coap-driver/C0000024/state",
        "command_topic": "application/COAP/device/C0000024/downlink",
        "reports_position": True,
        "value_template": (
            '{% set p = value_json.data.get("position") %}'
            '{% set m = value_json.data.get("valve_state") %}'
            "{% if m in ['opening', 'closing'] %}{{ m }}{% elif p is not none %}{{ p }}{% endif %}"
        ),
        "command_template": '{"command": "set_position", "parameter": {{ value | int }}}',
        **common(setup, "C0000024", "valve", [STATUS], positioner),
    }
    assert loaded["homeassistant/sensor/coap_driver_C0000024_valve_state/config"] == {
        "name": "Valve state",
        "state_topic": "coap-driver/C0000024/state",
        "value_template": '{{ value_json.data.get("valve_state") }}',
        "device_class": "enum",
        "icon": "mdi:valve",
        "options": ["closed", "open", "opening", "closing", "intermediate", "blocked"],
        **common(
            setup, "C0000024", "valve_state",
            [STATUS, {"topic": "coap-driver/C0000024/availability"}, {
                "topic": "coap-driver/C0000024/state",
                "value_template": (
                    "{{ 'online' if value_json.data.get(\"valve_state\") is not none "
                    "else 'offline' }}"
                ),
            }],
            positioner,
        ),
    }
    prv = device_block(setup, "C0000028", "VIDI PRV", "VIDI PRV", 28)
    assert loaded["homeassistant/valve/coap_driver_C0000028_valve/config"] == {
        "name": "Valve",
        "device_class": "water",
        "state_topic": "coap-driver/C0000028/state",
        "command_topic": "application/COAP/device/C0000028/downlink",
        "reports_position": False,
        "value_template": (
            '{% set p = value_json.data.get("valve_position") %}'
            "{% if p is not none %}{{ 'open' if p > 0 else 'closed' }}{% endif %}"
        ),
        "payload_open": '{"command": "open_valve"}',
        "payload_close": '{"command": "close_valve"}',
        **common(setup, "C0000028", "valve", [STATUS], prv),
    }
    assert loaded["homeassistant/sensor/coap_driver_C0000028_flow/config"]["unit_of_measurement"] == "m³/h"
    assert '"m³/h"' in configs["homeassistant/sensor/coap_driver_C0000028_flow/config"].decode()

    # Never seen: offline, and no state document yet (entities stay "unknown").
    assert await setup.retained("coap-driver/+/availability", 3) == {
        f"coap-driver/{s}/availability": b"offline" for s in ("C0000017", "C0000024", "C0000028")
    }
    collector = await Collector(setup.broker.port, "coap-driver/+/state").start()
    await collector.sync()
    await collector.stop()
    assert collector.messages == []


async def test_uplinks_fill_the_retained_state_and_make_the_device_online(setup: Setup):
    await setup.settled()
    driver = setup.driver
    device = make_device("C0000028", 28, 3)
    session = session_for(driver, device)
    assert (await session.join("2.4.1", 28)).code == Code.CHANGED
    family = driver.families[28]
    values = family.sample_values(28, random.Random(7))
    payload = family.encode(28, values)
    assert (await session.post("rx", payload)).code == Code.CHANGED
    partial = {10: 7000}  # a later uplink with only the inlet pressure: the rest is kept
    assert (await session.post("rx", cbor2.dumps(partial))).code == Code.CHANGED

    async def state() -> dict[str, Any]:
        return await setup.latest("coap-driver/C0000028/state")

    async with driver.db.session() as db:
        row = (await db.execute(select(Device).where(Device.serial == "C0000028"))).scalar_one()
    expected_data = {**family.decode(28, payload), "inlet_pressure": 7.0}

    async def current() -> bool:
        return (await state())["data"] == expected_data

    await wait_until(current, timeout=10, what="the merged state")
    assert await state() == {
        "serial": "C0000028",
        "hw_type": 28,
        "firmware": "2.4.1",
        "join_date": zulu_millis(row.join_date),
        "last_seen": zulu_millis(row.last_seen),
        "data": expected_data,
        "config": {},
        "downlink": None,
    }
    assert await setup.retained("coap-driver/C0000028/availability", 1) == {
        "coap-driver/C0000028/availability": b"online"
    }
    # The JOIN's firmware is the device's sw_version in Home Assistant.
    config = await setup.latest("homeassistant/sensor/coap_driver_C0000028_flow/config")
    assert config["device"]["sw_version"] == "2.4.1"


async def test_command_topics_of_the_entities_queue_downlinks_the_device_receives(setup: Setup):
    await setup.settled()
    driver = setup.driver
    device = make_device("C0000024", 24, 2)
    session = session_for(driver, device)
    await session.join("1.0.0", 24)
    configs = await setup.retained("homeassistant/+/+/config", 26 + 32 + 35 + 1)
    button = json.loads(configs["homeassistant/button/coap_driver_C0000024_calibrate/config"])
    number = json.loads(configs["homeassistant/number/coap_driver_C0000024_tx_interval/config"])
    select = json.loads(configs["homeassistant/select/coap_driver_C0000024_motor_speed/config"])
    # What Home Assistant publishes on a press / a new value (templates rendered as HA does).
    await setup.publish(button["command_topic"], button["payload_press"])
    await setup.publish(number["command_topic"], '{"command": "tx_interval", "parameter": 30}')
    await setup.publish(select["command_topic"], '{"command": "motor_speed", "parameter": "slow"}')
    mqtt = driver.integrations.running["mqtt"]
    await mqtt.async_wait_downlink_status(lambda s: s["commands_accepted"] == 3)

    from driver_core.simulator import SimulatedDevice

    simulated = SimulatedDevice(device, driver.families[24], session)
    await simulated.send_rx()
    assert [d[1:] for d in simulated.received_downlinks] == [[6, 1], [16, 30], [34, 0]]

    async def acknowledged() -> bool:
        state = await setup.latest("coap-driver/C0000024/state")
        return state["config"] == {"tx_interval": 30, "motor_speed": 0} and (
            state["downlink"]["command"] == "motor_speed"
        )

    await wait_until(acknowledged, timeout=10, what="the acknowledged configurations")
    state = await setup.latest("coap-driver/C0000024/state")
    downlink = state["downlink"]
    assert {k: downlink[k] for k in ("command", "parameter", "state", "status")} == {
        "command": "motor_speed", "parameter": 0, "state": 3, "status": "acknowledged",
    }
    assert setup.ha._tracked["C0000024"].tx_interval == 30  # the availability clock follows


async def test_home_assistant_online_republishes_everything(setup: Setup):
    await setup.settled()
    before = setup.ha.status["published"]
    collector = await Collector(setup.broker.port, "homeassistant/sensor/+/config").start()
    try:
        await collector.sync()  # the retained ones have arrived
        seen = len(collector.messages)
        assert seen == 3 * 3 + 8 + 11 + 12  # timestamps + downlink, then each family's sensors
        await setup.publish("homeassistant/status", "online")
        await setup.ha.async_wait_status(
            lambda s: s["published"] >= before + 26 + 32 + 35 + 1 + 3 and not s["republishing"]
        )
        await collector.sync()  # everything the broker acknowledged has arrived
        again = collector.messages
        assert len(again) == 2 * seen
        assert sorted(m.topic for m in again[seen:]) == sorted(m.topic for m in again[:seen])
        assert not any(m.retain for m in again[seen:])  # live copies of the same configs
    finally:
        await collector.stop()


async def test_a_removed_device_removes_its_entities(setup: Setup, monkeypatch):
    import custom_components.homeassistant as ha_module

    monkeypatch.setattr(ha_module, "FLEET_CHECK_S", 0.1)
    await setup.settled()
    topics = expected_topics(setup, "C0000017")
    assert await delete_device(setup.driver.db, "C0000017")
    await setup.ha.async_wait_status(lambda s: s["devices"] == 2, within=10)
    await setup.settled()
    cleared = [*topics, "coap-driver/C0000017/availability"]
    collector = await Collector(setup.broker.port, "#").start()
    await collector.sync()
    await collector.stop()
    left = {m.topic for m in collector.messages}
    assert not left & set(cleared)  # empty retained messages deleted them on the broker
    assert len([t for t in left if "C0000024" in t]) == 32 + 1


async def test_a_late_device_goes_offline_when_its_transmission_is_overdue(tmp_path, broker):
    driver = await start_driver(tmp_path, broker, devices="devices:\n  grace_minutes: 0\n")
    await driver.start()
    try:
        device = make_device("C0000018", 18, 4)
        await add_device(driver.db, driver.box, device)
        session = session_for(driver, device)
        await session.join("1.0.0", 18)
        setup = Setup(driver, broker)
        # The JOIN promises the next transmission within 5 minutes: pretend it was
        # 5 minutes minus 1 second ago.
        await setup.ha.async_wait_status(lambda s: s["online"] == 1, within=15)
        tracked = setup.ha._tracked["C0000018"]
        tracked.last_seen = utcnow() - timedelta(minutes=5) + timedelta(seconds=1)
        setup.ha._schedule_availability(tracked, timedelta(0))
        await setup.ha.async_wait_status(lambda s: s["online"] == 0, within=10)
        assert await setup.retained("coap-driver/C0000018/availability", 1) == {
            "coap-driver/C0000018/availability": b"offline"
        }
        await session.post("rx", cbor2.dumps({1: 80, 17: 2000}))
        await setup.ha.async_wait_status(lambda s: s["online"] == 1, within=10)
    finally:
        await driver.stop()


async def test_new_prefix_moves_discovery_and_disabling_removes_it(setup: Setup):
    await setup.settled()
    driver = setup.driver
    await driver.integrations.save("homeassistant", {"discovery_prefix": "ha2"})
    await driver.integrations.apply_saved()
    await setup.settled()
    moved = await setup.retained("ha2/+/+/config", 26 + 32 + 35 + 1)
    assert "ha2/button/coap_driver_C0000028_resume_regulation/config" in moved
    collector = await Collector(setup.broker.port, "homeassistant/#").start()
    await collector.sync()
    await collector.stop()
    assert collector.messages == []  # the old prefix is empty
    await driver.integrations.save("homeassistant", {"enabled": False})
    await driver.integrations.apply_saved()
    collector = await Collector(setup.broker.port, "#").start()
    await collector.sync()
    await collector.stop()
    assert [m.topic for m in collector.messages if m.retain] == ["coap-driver/status"]


@pytest.mark.parametrize(
    ("settings", "errors"),
    [
        ({"discovery_prefix": "ha/+"}, {"discovery_prefix": "the discovery prefix must not contain the wildcards + or #"}),
        ({"discovery_prefix": " "}, {"discovery_prefix": "the discovery prefix is empty (Home Assistant's default is homeassistant)"}),
        ({"state_topic": "coap/state"}, {"state_topic": "the state topic must contain {{serial}}: every device needs its own topic"}),
        ({"state_topic": "coap/{{serial}}/{{hw_type}}"}, {"state_topic": "the state topic can only contain text and {{serial}}"}),
        ({"availability_topic": "x/{{ serial }}/#"}, {"availability_topic": "the availability topic must not contain the wildcards + or #"}),
        ({"availability_topic": "coap-driver/{{serial}}/state"}, {"availability_topic": "the availability topic must differ from the state topic"}),
        ({"availability_check": 0}, {"availability_check": "the availability check must be more than 0 and at most 3600 seconds"}),
        ({"enabled": "maybe"}, {"enabled": "expected true or false"}),
    ],
)
async def test_bad_settings_are_refused_with_a_clear_message(settings, errors):
    from custom_components.homeassistant.config_flow import async_validate

    assert await async_validate(settings) == errors


async def test_bad_settings_stop_the_driver_with_the_field_named(tmp_path, broker):
    from driver_core.config import ConfigError

    with pytest.raises(ConfigError) as raised:
        await start_driver(tmp_path, broker, ha="  discovery_prefix: 'a/#'\n")
    assert "homeassistant.discovery_prefix" in str(raised.value)
    assert "the discovery prefix must not contain the wildcards + or #" in str(raised.value)


async def test_no_device_is_published_twice_on_startup(setup: Setup):
    status = await setup.settled()
    # 3 devices never seen: configs + availability; the driver entity once.
    assert status["published"] == 26 + 32 + 35 + 1 + 3
    assert status["devices"] == 3 and status["online"] == 0 and status["last_error"] is None


async def test_the_state_is_rebuilt_from_the_database_after_a_restart(tmp_path, broker, db_url):
    """Merged values, acknowledged configurations and the last downlink survive a restart
    (on SQLite and PostgreSQL), and the broker then holds the very same document."""
    config_dir = tmp_path / "restart"
    write_config(
        config_dir, db_url,
        extra=f"mqtt:\n  broker: external\n  url: {broker.url}\nhomeassistant:\n",
    )
    device = make_device("C0000016", 16, 9)
    driver = Driver(config_dir)
    await driver.start()
    try:
        await add_device(driver.db, driver.box, device)
        session = session_for(driver, device)
        await session.join("1.0.0", 16)
        await session.post("rx", cbor2.dumps({1: 90, 12: 1.5, 13: 1000}))
        await driver.downlinks.schedule("C0000016", "tx_interval", 15, command_id="r-1")
        answer = await session.post("rx", cbor2.dumps({1: 89}))  # partial: flow, volume kept
        from driver_core.simulator import SimulatedDevice

        await SimulatedDevice(device, driver.families[16], session).handle_downlinks(answer)
        setup = Setup(driver, broker)

        async def settled_state() -> bool:
            state = await setup.latest("coap-driver/C0000016/state")
            return state["config"] == {"tx_interval": 15}

        await wait_until(settled_state, timeout=15, what="the acknowledged tx_interval")
        before = await setup.latest("coap-driver/C0000016/state")
    finally:
        await driver.stop()
    assert before["data"]["flow"] == 1.5 and before["data"]["volume"] == 1.0
    assert before["downlink"]["command_id"] == "r-1" and before["downlink"]["status"] == "acknowledged"

    # Clear the broker's copy, restart: the document comes back from the database alone.
    async with aiomqtt.Client("127.0.0.1", broker.port) as client:
        await client.publish("coap-driver/C0000016/state", b"", qos=1, retain=True)
    driver = Driver(config_dir)
    await driver.start()
    try:
        setup = Setup(driver, broker)
        await setup.settled()
        after = await setup.latest("coap-driver/C0000016/state")
        assert setup.ha._tracked["C0000016"].tx_interval == 15  # confirmed after the last JOIN
    finally:
        await driver.stop()
    assert after == before
