"""The real thing: Home Assistant 2024.3 (its own venv) on the driver's broker.

Installs Home Assistant with scripts/install_home_assistant.sh (seconds when it is
already installed; an install failure fails the test), starts it with MQTT on a
private Mosquitto and the coap_driver custom integration, lets the driver
discover simulated devices of the three families, and checks through Home
Assistant's own REST and websocket APIs that devices and entities exist with
the right classes, units and states. Then Home Assistant drives the devices:
a button press, a number, a service call and the three blueprints each queue a
downlink that the simulated device receives.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from aiocoap.numbers.codes import Code

from driver_core.driver import Driver
from driver_core.enrollment import add_device
from driver_core.simulator import SimulatedDevice
from driver_core.tokens import create_token
from tests.conftest import make_device, session_for, write_config
from tests.ha_helpers import (
    HomeAssistant,
    install_home_assistant,
    run_in_ha_venv,
)
from tests.ha_helpers import (
    write_config as write_ha_config,
)
from tests.mqtt_helpers import Mosquitto, free_port

ROOT = Path(__file__).resolve().parent.parent
BLUEPRINTS = sorted((ROOT / "blueprints" / "automation").rglob("*.yaml"))
SCREENSHOT = ROOT / "docs" / "images" / "ha-device.png"
CHROMIUM = "/usr/bin/chromium"

DEVICES = [("C0000017", 17), ("C0000024", 24), ("C0000028", 28), ("C0000031", 31)]

VALIDATE_BLUEPRINTS = """
import sys
from homeassistant.components.blueprint.models import Blueprint
from homeassistant.util.yaml import load_yaml
for path in sys.argv[1:]:
    blueprint = Blueprint(load_yaml(path), expected_domain="automation", path=path)
    assert blueprint.metadata["source_url"].endswith(path.split("blueprints/", 1)[1]), path
    print(blueprint.name)
"""


@pytest.mark.timeout(900)
async def test_blueprints_load_with_home_assistants_blueprint_loader():
    await asyncio.to_thread(install_home_assistant)
    assert len(BLUEPRINTS) == 3
    result = await asyncio.to_thread(
        run_in_ha_venv, VALIDATE_BLUEPRINTS, *[str(path) for path in BLUEPRINTS]
    )
    assert result.returncode == 0, result.stderr
    assert sorted(result.stdout.split("\n")[:-1]) == [
        "coap-driver - change the transmission interval on a schedule",
        "coap-driver - close a valve when a leak is detected",
        "coap-driver - schedule a downlink when something happens",
    ]


class Fleet:
    """Simulated devices of the three families, known values per device."""

    def __init__(self, driver: Driver) -> None:
        self.driver = driver
        self.devices: dict[str, SimulatedDevice] = {}
        self.values: dict[str, dict[str, Any]] = {}

    async def enroll_and_report(self) -> None:
        for index, (serial, hw_type) in enumerate(DEVICES, start=1):
            enrollment = make_device(serial, hw_type, index)
            await add_device(self.driver.db, self.driver.box, enrollment)
            family = self.driver.families[hw_type]
            device = SimulatedDevice(
                enrollment, family, session_for(self.driver, enrollment), firmware="3.1.4",
                rng=random.Random(index),
            )
            assert (await device.join()).code == Code.CHANGED
            values = family.sample_values(hw_type, random.Random(serial))
            if hw_type == 31:
                values["leak"] = False
            answer = await device.session.post("rx", family.encode(hw_type, values))
            assert answer.code == Code.CHANGED
            self.devices[serial] = device
            self.values[serial] = family.decode(hw_type, family.encode(hw_type, values))

    async def transmit(self, serial: str, **changes: Any) -> list[list[Any]]:
        """One /rx (with `changes` to the known values); the downlinks it brought back."""
        device = self.devices[serial]
        family = device.family
        hw_type = device.enrollment.hw_type
        self.values[serial].update(changes)
        before = len(device.received_downlinks)
        answer = await device.session.post("rx", family.encode(hw_type, self.values[serial]))
        assert answer.code == Code.CHANGED
        await device.handle_downlinks(answer)
        return device.received_downlinks[before:]


@pytest.mark.timeout(900)
async def test_home_assistant_discovers_and_commands_the_devices(tmp_path: Path):
    await asyncio.to_thread(install_home_assistant)  # fails the test with the install's output
    broker = Mosquitto(tmp_path / "mosquitto")
    await broker.start()
    config_dir = tmp_path / "driver"
    write_config(
        config_dir, extra=f"mqtt:\n  broker: external\n  url: {broker.url}\nhomeassistant:\n"
    )
    driver = Driver(config_dir)
    await driver.start()
    ha_dir = tmp_path / "ha"
    ha = HomeAssistant(ha_dir, free_port())
    try:
        fleet = Fleet(driver)
        await fleet.enroll_and_report()
        write_ha_config(ha_dir, ha.port, broker.port)
        await ha.start()
        await check_devices_and_entities(ha, driver, fleet)
        await configure_integration(ha, driver)
        await ha.subscribe_events("coap_driver_downlink")
        await wait_for_status_subscription(ha, broker)
        await check_commands(ha, fleet)
        await check_blueprints(ha, fleet)
        await screenshot(ha, tmp_path)
        assert "Traceback" not in ha.log, ha.log_tail(60)
    finally:
        await ha.stop()
        await driver.stop()
        await broker.stop()


async def wait_for_devices(ha: HomeAssistant, count: int) -> list[dict[str, Any]]:
    deadline = asyncio.get_running_loop().time() + 60
    while True:
        devices = await ha.ws("config/device_registry/list")
        ours = [d for d in devices if any(i[1].startswith("coap_driver_") for i in d["identifiers"])]
        if len(ours) >= count:
            return ours
        assert asyncio.get_running_loop().time() < deadline, f"{len(ours)} devices:\n{ha.log_tail()}"
        await asyncio.sleep(0.2)


def number(state: dict[str, Any]) -> float:
    return float(state["state"])


async def check_devices_and_entities(ha: HomeAssistant, driver: Driver, fleet: Fleet) -> None:
    devices = await wait_for_devices(ha, len(DEVICES) + 1)
    by_identifier = {d["identifiers"][0][1]: d for d in devices}
    integration = driver.integrations.running["homeassistant"]
    hub = by_identifier[integration.driver_identifier]
    assert (hub["name"], hub["manufacturer"], hub["model"]) == (
        "coap-driver", "coap-driver", "CoAP/OSCORE device driver",
    )
    expected_models = {
        "C0000017": "VIDI Pressure", "C0000024": "VIDI Positioner",
        "C0000028": "VIDI PRV", "C0000031": "VIDI Leak",
    }
    for serial, model in expected_models.items():
        device = by_identifier[f"coap_driver_{serial}"]
        assert device["identifiers"] == [["mqtt", f"coap_driver_{serial}"]]
        assert (device["name"], device["manufacturer"], device["model"]) == (
            f"{model} {serial}", "VIDI", model,
        )
        assert device["sw_version"] == "3.1.4"
        assert device["serial_number"] == serial
        assert device["via_device_id"] == hub["id"]

    # Every discovered entity exists, attached to its device.
    registry = await ha.ws("config/entity_registry/list")
    for serial, hw_type in DEVICES:
        family = driver.families[hw_type]
        entities = [e for e in registry if e["device_id"] == by_identifier[f"coap_driver_{serial}"]["id"]]
        extra = 1 if hw_type in (24, 28) else 0  # the valve
        assert len(entities) == (
            len(family.entities_for(hw_type)) + 3 + len(family.commands_for(hw_type)) + extra
        ), serial

    values = fleet.values
    pressure = await ha.wait_state(
        "sensor.c0000017_pressure", lambda s: s["state"] not in ("unknown", "unavailable")
    )
    assert number(pressure) == values["C0000017"]["pressure"]
    assert pressure["attributes"]["device_class"] == "pressure"
    assert pressure["attributes"]["unit_of_measurement"] == "bar"
    assert pressure["attributes"]["state_class"] == "measurement"
    battery = await ha.state("sensor.c0000017_battery")
    assert number(battery) == values["C0000017"]["battery"]
    assert battery["attributes"]["unit_of_measurement"] == "%"
    assert battery["attributes"]["device_class"] == "battery"
    flow = await ha.state("sensor.c0000028_flow")
    assert number(flow) == values["C0000028"]["flow"]
    assert flow["attributes"]["unit_of_measurement"] == "m³/h"
    assert flow["attributes"]["device_class"] == "volume_flow_rate"
    inlet = await ha.state("sensor.c0000028_inlet_pressure")
    assert number(inlet) == values["C0000028"]["inlet_pressure"]
    temperature = await ha.state("sensor.c0000024_temperature")
    assert number(temperature) == values["C0000024"]["temperature"]
    assert temperature["attributes"]["unit_of_measurement"] == "°C"
    valve_state = await ha.state("sensor.c0000024_valve_state")
    assert valve_state["state"] == values["C0000024"]["valve_state"]
    assert valve_state["attributes"]["device_class"] == "enum"
    leak = await ha.state("binary_sensor.c0000031_leak")
    assert (leak["state"], leak["attributes"]["device_class"]) == ("off", "moisture")
    valve = await ha.state("valve.c0000024_valve")
    assert valve["attributes"]["current_position"] == values["C0000024"]["position"]
    assert valve["state"] == ("open" if values["C0000024"]["position"] else "closed")
    prv = await ha.state("valve.c0000028_valve")
    assert prv["state"] == ("open" if values["C0000028"]["valve_position"] else "closed")
    assert (await ha.state("sensor.c0000031_last_seen"))["attributes"]["device_class"] == "timestamp"
    assert (await ha.state("sensor.c0000024_downlink"))["state"] == "none"
    tx = await ha.state("number.c0000024_tx_interval")
    assert (tx["state"], tx["attributes"]["min"], tx["attributes"]["max"]) == ("unknown", 5, 1440)
    assert tx["attributes"]["unit_of_measurement"] == "min"
    speed = await ha.state("select.c0000024_motor_speed")
    assert speed["attributes"]["options"] == ["slow", "normal", "fast"]
    assert (await ha.state("binary_sensor.coap_driver_status"))["state"] == "on"
    # A disabled-by-default entity is registered but not created.
    assert await ha.state("sensor.c0000017_rsrp") is None


async def configure_integration(ha: HomeAssistant, driver: Driver) -> None:
    """The HACS integration's config flow: a wrong token is refused, the right one accepted."""
    url = f"http://127.0.0.1:{driver.api.port}"
    token = await create_token(driver.db, "home-assistant")
    flow = await ha.rest("POST", "/api/config/config_entries/flow", {"handler": "coap_driver"})
    assert (flow["type"], flow["step_id"]) == ("form", "user")
    path = f"/api/config/config_entries/flow/{flow['flow_id']}"
    topic = "application/COAP/device/+/downlink/status"
    refused = await ha.rest("POST", path, {"url": url, "token": "wrong", "status_topic": topic})
    assert refused["errors"] == {"base": "invalid_auth"}
    assert "token" in refused["description_placeholders"]["detail"].lower()
    created = await ha.rest("POST", path, {"url": url, "token": token, "status_topic": topic})
    assert created["type"] == "create_entry", created
    assert created["result"]["state"] == "loaded"


async def wait_for_status_subscription(ha: HomeAssistant, broker: Mosquitto) -> None:
    """Home Assistant subscribes a moment after the entry is set up: probe until an event comes."""
    probe = b'{"serial": "PROBE", "status": null}'
    async with aiomqtt.Client("127.0.0.1", broker.port) as client:
        for _ in range(60):
            await client.publish("application/COAP/device/PROBE/downlink/status", probe, qos=1)
            try:
                await ha.next_event(lambda e: e["data"].get("serial") == "PROBE", timeout=0.5)
                return
            except AssertionError:
                continue
    raise AssertionError(f"the coap_driver integration never received a downlink status:\n{ha.log_tail()}")


def downlink_event(serial: str, command: str, status: int) -> Any:
    def matches(event: dict[str, Any]) -> bool:
        data = event["data"]
        return (data.get("serial"), data.get("command"), data.get("status")) == (
            serial, command, status,
        )

    return matches


async def check_commands(ha: HomeAssistant, fleet: Fleet) -> None:
    # A button press and a number value: queued (status 0) as soon as Home Assistant publishes.
    await ha.ws("call_service", domain="button", service="press",
                target={"entity_id": "button.c0000024_calibrate"})
    await ha.next_event(downlink_event("C0000024", "calibrate", 0))
    await ha.ws("call_service", domain="number", service="set_value",
                target={"entity_id": "number.c0000024_tx_interval"}, service_data={"value": 30})
    await ha.next_event(downlink_event("C0000024", "tx_interval", 0))
    await ha.wait_state("sensor.c0000024_downlink", lambda s: s["state"] == "pending")
    # The device's next transmission carries both; it acknowledges them.
    received = await fleet.transmit("C0000024")
    assert [d[1:] for d in received] == [[6, 1], [16, 30]]
    await ha.next_event(downlink_event("C0000024", "tx_interval", 3))
    await ha.wait_state("number.c0000024_tx_interval", lambda s: s["state"] == "30")
    downlink = await ha.wait_state("sensor.c0000024_downlink", lambda s: s["state"] == "acknowledged")
    assert downlink["attributes"]["command"] == "tx_interval"
    assert downlink["attributes"]["parameter"] == 30

    # The integration's service, addressed by Home Assistant device; its answer is the downlink.
    devices = await ha.ws("config/device_registry/list")
    prv = next(d for d in devices if ["mqtt", "coap_driver_C0000028"] in d["identifiers"])
    answer = await ha.ws(
        "call_service", domain="coap_driver", service="schedule_downlink",
        service_data={"device_id": prv["id"], "command": "set_outlet_pressure", "parameter": 3000,
                      "command_id": "ha-test-1"},
        return_response=True,
    )
    scheduled = answer["response"]["downlinks"][0]
    assert (scheduled["command_id"], scheduled["state"], scheduled["parameter"]) == ("ha-test-1", 0, 3000)
    await ha.ws("call_service", domain="coap_driver", service="cancel_downlink",
                service_data={"command_id": "ha-test-1"})
    await ha.next_event(downlink_event("C0000028", "set_outlet_pressure", 1))
    with pytest.raises(AssertionError, match="only pending downlinks can be canceled"):
        await ha.ws("call_service", domain="coap_driver", service="cancel_downlink",
                    service_data={"command_id": "ha-test-1"})
    with pytest.raises(AssertionError, match="set_outlet_pressure must be between 500 and 16000"):
        await ha.ws("call_service", domain="coap_driver", service="schedule_downlink",
                    service_data={"serial": "C0000028", "command": "set_outlet_pressure",
                                  "parameter": 1})
    # The PRV valve closes with the family's close command.
    await ha.ws("call_service", domain="valve", service="close_valve",
                target={"entity_id": "valve.c0000028_valve"})
    await ha.next_event(downlink_event("C0000028", "close_valve", 0))
    assert [d[1:] for d in await fleet.transmit("C0000028")] == [[5, 1]]


async def create_automation(ha: HomeAssistant, ident: str, blueprint: str, inputs: dict) -> str:
    await ha.rest(
        "POST", f"/api/config/automation/config/{ident}",
        {"alias": ident, "description": "", "use_blueprint": {"path": blueprint, "input": inputs}},
    )
    entity_id = f"automation.{ident}"
    await ha.wait_state(entity_id, lambda s: s["state"] == "on", what="the automation enabled")
    return entity_id


async def check_blueprints(ha: HomeAssistant, fleet: Fleet) -> None:
    listed = await ha.ws("blueprint/list", domain="automation")
    ours = {path: item for path, item in listed.items() if path.startswith("coap_driver/")}
    assert sorted(ours) == [
        "coap_driver/close_valve_on_leak.yaml",
        "coap_driver/schedule_downlink.yaml",
        "coap_driver/tx_interval_schedule.yaml",
    ]
    assert all("error" not in item for item in ours.values()), ours
    devices = await ha.ws("config/device_registry/list")
    device_id = {
        identifier[1][len("coap_driver_"):]: d["id"] for d in devices
        for identifier in d["identifiers"] if identifier[1].startswith("coap_driver_C")
    }

    # A leak closes the positioner: the leak sensor reports, the valve moves to 0.
    await create_automation(ha, "leak_closes_valve", "coap_driver/close_valve_on_leak.yaml", {
        "leak_sensors": ["binary_sensor.c0000031_leak"], "valves": ["valve.c0000024_valve"],
    })
    await fleet.transmit("C0000031", leak=True)
    await ha.wait_state("binary_sensor.c0000031_leak", lambda s: s["state"] == "on")
    await ha.next_event(downlink_event("C0000024", "set_position", 0))
    assert [d[1:] for d in await fleet.transmit("C0000024")] == [[32, 0]]

    # Any trigger schedules the chosen command.
    await create_automation(ha, "reboot_on_event", "coap_driver/schedule_downlink.yaml", {
        "triggers": [{"platform": "event", "event_type": "coap_driver_test"}],
        "devices": [device_id["C0000017"]], "command": "reboot", "parameter": 1,
    })
    await ha.rest("POST", "/api/events/coap_driver_test", {})
    await ha.next_event(downlink_event("C0000017", "reboot", 0))
    assert [d[1:] for d in await fleet.transmit("C0000017")] == [[1, 1]]

    # The schedule (run now instead of waiting for its time).
    automation = await create_automation(
        ha, "night_interval", "coap_driver/tx_interval_schedule.yaml",
        {"devices": [device_id["C0000028"]], "at": "23:00:00", "interval": 120},
    )
    await ha.ws("call_service", domain="automation", service="trigger",
                target={"entity_id": automation}, service_data={"skip_condition": True})
    await ha.next_event(downlink_event("C0000028", "tx_interval", 0))
    assert [d[1:] for d in await fleet.transmit("C0000028")] == [[16, 120]]


async def screenshot(ha: HomeAssistant, tmp_path: Path) -> None:
    """The device page as a user sees it (saved to docs/ when UPDATE_SCREENSHOT=1)."""
    from playwright.async_api import async_playwright

    devices = await ha.ws("config/device_registry/list")
    device = next(d for d in devices if ["mqtt", "coap_driver_C0000024"] in d["identifiers"])
    tokens = {
        "access_token": ha.token, "refresh_token": ha.refresh_token, "token_type": "Bearer",
        "expires_in": 1800, "hassUrl": ha.url, "clientId": ha.client_id,
        "expires": 4102444800000,
    }
    target = tmp_path / "ha-device.png"
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM)
        try:
            page = await browser.new_page(viewport={"width": 1300, "height": 1500})
            await page.goto(f"{ha.url}/auth/authorize?response_type=code")
            await page.evaluate(
                "tokens => localStorage.setItem('hassTokens', JSON.stringify(tokens))", tokens
            )
            await page.goto(f"{ha.url}/config/devices/device/{device['id']}")
            await page.get_by_text("VIDI Positioner C0000024").first.wait_for(timeout=30000)
            await page.get_by_text("Set position").first.wait_for(timeout=30000)
            await page.wait_for_timeout(1500)  # let the cards finish their layout
            await page.screenshot(path=str(target))
        finally:
            await browser.close()
    assert target.stat().st_size > 10_000
    if os.environ.get("UPDATE_SCREENSHOT") == "1":
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(target, SCREENSHOT)


