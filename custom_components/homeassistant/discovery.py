"""Home Assistant MQTT discovery payloads for one device, built from its family.

Pure functions: given a device and its family they return the retained
``<prefix>/<component>/<unique_id>/config`` messages (the per-entity form,
understood by every Home Assistant version). Every entity reads the device's
one retained JSON state document; commands publish to the mqtt integration's
downlink command topic, so scheduling from Home Assistant goes through the same
validation and status reporting as any other MQTT client.

Availability: measured values need the driver online *and* the device within
its transmission scheme; command entities, the downlink sensor and the
timestamps need only the driver, because a sleeping device is exactly when a
downlink is queued. Entities whose state cannot be "unknown" in Home Assistant
(enum and timestamp sensors) are also unavailable until their value exists.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from driver_core.family import CommandSpec, EntitySpec, Family

UNIQUE_PREFIX = "coap_driver"
ORIGIN_NAME = "coap-driver"
SUPPORT_URL = "https://github.com/coap-driver/coap-driver"
DOWNLINK_STATUSES = {
    0: "pending",
    1: "canceled",
    2: "sent",
    3: "acknowledged",
    4: "rejected",
    5: "unacknowledged",
}
NO_DOWNLINK = "none"
WIDE_NUMBER_STEPS = 100  # a number with more steps than this is typed, not slid
_SAFE = re.compile(r"[^a-zA-Z0-9_-]")

Message = tuple[str, dict[str, Any]]


@dataclass(frozen=True, slots=True)
class DeviceRecord:
    """What discovery and availability need of an enrolled device (one DB row)."""

    device_id: int
    serial: str
    hw_type: int
    name: str | None = None
    firmware: str | None = None
    join_date: datetime | None = None
    last_seen: datetime | None = None
    tx_interval: int = 60
    uplinks_since_join: int = 0


@dataclass(frozen=True, slots=True)
class Topics:
    """Every topic the discovery payloads name (templates hold `{{serial}}`)."""

    prefix: str
    state: str
    availability: str
    driver_status: str
    command: str

    def for_device(self, template: str, serial: str) -> str:
        return re.sub(r"\{\{\s*serial\s*\}\}", serial, template)


@dataclass(frozen=True, slots=True)
class Driver:
    """The driver as a Home Assistant device (every device's via_device)."""

    identifier: str
    version: str


# ---------------------------------------------------------------------------- helpers


def unique_id(serial: str, object_id: str) -> str:
    return _SAFE.sub("_", f"{UNIQUE_PREFIX}_{serial}_{object_id}")


def device_identifier(serial: str) -> str:
    return f"{UNIQUE_PREFIX}_{serial}"


def config_topic(prefix: str, component: str, uid: str) -> str:
    return f"{prefix}/{component}/{uid}/config"


def _get(section: str, key: str) -> str:
    """Jinja expression for one value of the state document (None when absent)."""
    return f"value_json.{section}.get({json.dumps(key)})"


def _present(expression: str) -> str:
    return f"{{{{ 'online' if {expression} is not none else 'offline' }}}}"


def sensor_template(entity: EntitySpec) -> str:
    """State of a family entity; "None" (unknown in Home Assistant) until it is reported."""
    value = _get("data", entity.key)
    if entity.platform == "sensor":
        return f"{{{{ {value} }}}}"
    if entity.bit:
        test = f"{json.dumps(entity.bit)} in v"
    elif entity.on_value:
        test = f"v == {json.dumps(entity.on_value)}"
    else:
        test = "v"
    return f"{{% set v = {value} %}}{{{{ 'None' if v is none else ('ON' if {test} else 'OFF') }}}}"


def _title(name: str) -> str:
    return name.replace("_", " ").capitalize()


# ---------------------------------------------------------------------------- payloads


class DeviceDiscovery:
    """Builds the discovery messages of devices for one set of topics."""

    def __init__(self, topics: Topics, driver: Driver):
        self.topics = topics
        self.driver = driver

    # -- the driver itself ---------------------------------------------------------
    def driver_device(self) -> dict[str, Any]:
        return {
            "identifiers": [self.driver.identifier],
            "name": "coap-driver",
            "manufacturer": ORIGIN_NAME,
            "model": "CoAP/OSCORE device driver",
            "sw_version": self.driver.version,
        }

    def origin(self) -> dict[str, Any]:
        return {"name": ORIGIN_NAME, "sw_version": self.driver.version, "support_url": SUPPORT_URL}

    def driver_messages(self) -> list[Message]:
        uid = f"{self.driver.identifier}_status"
        payload = {
            "name": "Status",
            "unique_id": uid,
            "object_id": "coap_driver_status",
            "device_class": "connectivity",
            "entity_category": "diagnostic",
            "state_topic": self.topics.driver_status,
            "payload_on": "online",
            "payload_off": "offline",
            "device": self.driver_device(),
            "origin": self.origin(),
        }
        return [(config_topic(self.topics.prefix, "binary_sensor", uid), payload)]

    # -- one enrolled device -------------------------------------------------------
    def device_block(self, family: Family, device: DeviceRecord) -> dict[str, Any]:
        model = family.hw_types.get(device.hw_type, family.name)
        block: dict[str, Any] = {
            "identifiers": [device_identifier(device.serial)],
            "name": device.name or f"{model} {device.serial}",
            "manufacturer": family.manufacturer,
            "model": model,
            "hw_version": f"{family.name}, hw_type {device.hw_type}",
            "serial_number": device.serial,
            "via_device": self.driver.identifier,
        }
        if device.firmware:
            block["sw_version"] = device.firmware
        return block

    def messages(self, family: Family, device: DeviceRecord) -> list[Message]:
        """Every retained discovery config of `device` (topic, payload)."""
        serial = device.serial
        state = self.topics.for_device(self.topics.state, serial)
        command = self.topics.for_device(self.topics.command, serial)
        driver_only = [{"topic": self.topics.driver_status}]
        measured = [*driver_only, {"topic": self.topics.for_device(self.topics.availability, serial)}]
        common = {"device": self.device_block(family, device), "origin": self.origin()}

        out: list[Message] = []

        def add(component: str, object_id: str, payload: dict[str, Any], availability: list) -> None:
            uid = unique_id(serial, object_id)
            body = {
                **payload,
                "unique_id": uid,
                "object_id": _SAFE.sub("_", f"{serial}_{object_id}").lower(),
                "availability": availability,
                "availability_mode": "all",
                **common,
            }
            out.append((config_topic(self.topics.prefix, component, uid), body))

        for entity in family.entities_for(device.hw_type):
            payload: dict[str, Any] = {
                "name": entity.name,
                "state_topic": state,
                "value_template": sensor_template(entity),
            }
            for key, value in (
                ("device_class", entity.device_class),
                ("state_class", entity.state_class),
                ("unit_of_measurement", entity.unit),
                ("entity_category", entity.entity_category),
                ("icon", entity.icon),
            ):
                if value is not None:
                    payload[key] = value
            if not entity.enabled_by_default:
                payload["enabled_by_default"] = False
            availability = measured
            if entity.options:
                payload["options"] = list(entity.options)
                availability = [*measured, self._presence(state, _get("data", entity.key))]
            add(entity.platform, entity.object_id, payload, availability)

        for key, name in (("last_seen", "Last seen"), ("join_date", "Join date")):
            add(
                "sensor",
                key,
                {
                    "name": name,
                    "state_topic": state,
                    "value_template": f"{{{{ value_json.{key} }}}}",
                    "device_class": "timestamp",
                    "entity_category": "diagnostic",
                },
                [*driver_only, self._presence(state, f"value_json.{key}")],
            )
        add(
            "sensor",
            "downlink",
            {
                "name": "Last downlink",
                "icon": "mdi:download-network",
                "state_topic": state,
                "value_template": (
                    f"{{{{ value_json.downlink.status if value_json.downlink "
                    f"else '{NO_DOWNLINK}' }}}}"
                ),
                "device_class": "enum",
                "options": [NO_DOWNLINK, *DOWNLINK_STATUSES.values()],
                "json_attributes_topic": state,
                "json_attributes_template": "{{ (value_json.downlink or {}) | tojson }}",
                "entity_category": "diagnostic",
            },
            driver_only,
        )

        for spec in family.commands_for(device.hw_type):
            component, payload = self._command_entity(spec, state, command)
            add(component, spec.name, payload, driver_only)

        valve = self._valve(family, device, state, command)
        if valve is not None:
            add("valve", "valve", valve, driver_only)
        return out

    @staticmethod
    def _presence(state_topic: str, expression: str) -> dict[str, Any]:
        """Availability entry: online while the state document holds `expression`."""
        return {"topic": state_topic, "value_template": _present(expression)}

    @staticmethod
    def _command_entity(spec: CommandSpec, state: str, command: str) -> tuple[str, dict[str, Any]]:
        name = _title(spec.name)
        base = {"name": name, "command_topic": command}
        quoted = json.dumps(spec.name)
        if spec.kind == "command":
            payload = {
                **base,
                "payload_press": json.dumps({"command": spec.name}),
            }
            if spec.name == "reboot":
                payload["device_class"] = "restart"
                payload["entity_category"] = "config"
            return "button", payload
        config = {**base, "entity_category": "config", "state_topic": state}
        if spec.type == "str":
            config.pop("state_topic")  # the device does not report it: last value sent
            text: dict[str, Any] = {
                **config,
                "command_template": f'{{"command": {quoted}, "parameter": {{{{ value | tojson }}}}}}',
                "min": spec.min_length or 0,
            }
            if spec.max_length is not None:
                text["max"] = spec.max_length
            return "text", text
        if spec.options:
            labels = {code: label for code, label in spec.options.items()}
            return "select", {
                **config,
                "options": list(labels.values()),
                "value_template": f"{{{{ {json.dumps(labels)}.get(({_get('config', spec.name)} | string)) }}}}",
                "command_template": f'{{"command": {quoted}, "parameter": {{{{ value | tojson }}}}}}',
            }
        number: dict[str, Any] = {
            **config,
            "min": spec.minimum,
            "max": spec.maximum,
            "step": spec.step,
            "value_template": f"{{{{ {_get('config', spec.name)} }}}}",
            "command_template": f'{{"command": {quoted}, "parameter": {{{{ value | int }}}}}}',
        }
        if spec.unit:
            number["unit_of_measurement"] = spec.unit
        if (spec.maximum - spec.minimum) / spec.step > WIDE_NUMBER_STEPS:
            number["mode"] = "box"
        return "number", number

    def _valve(
        self, family: Family, device: DeviceRecord, state: str, command: str
    ) -> dict[str, Any] | None:
        mapping = family.home_assistant.get("valve")
        if mapping is None:
            return None
        sent = set(family.hw_fields.get(device.hw_type, ()))
        commands = {spec.name for spec in family.commands_for(device.hw_type)}
        base = {
            "name": "Valve",
            "device_class": "water",
            "state_topic": state,
            "command_topic": command,
        }
        if "position" in mapping:
            if mapping["position"] not in sent or mapping["set_position"] not in commands:
                return None
            position = _get("data", mapping["position"])
            moving = mapping.get("moving_field")
            template = f"{{% set p = {position} %}}"
            if moving in sent:
                template += (
                    f"{{% set m = {_get('data', moving)} %}}"
                    "{% if m in ['opening', 'closing'] %}{{ m }}"
                    "{% elif p is not none %}{{ p }}{% endif %}"
                )
            else:
                template += "{% if p is not none %}{{ p }}{% endif %}"
            return {
                **base,
                "reports_position": True,
                "value_template": template,
                "command_template": (
                    f'{{"command": {json.dumps(mapping["set_position"])}, '
                    '"parameter": {{ value | int }}}'
                ),
            }
        if (
            mapping["state_field"] not in sent
            or mapping["open"] not in commands
            or mapping["close"] not in commands
        ):
            return None
        field = _get("data", mapping["state_field"])
        return {
            **base,
            "reports_position": False,
            "value_template": (
                f"{{% set p = {field} %}}"
                "{% if p is not none %}{{ 'open' if p > 0 else 'closed' }}{% endif %}"
            ),
            "payload_open": json.dumps({"command": mapping["open"]}),
            "payload_close": json.dumps({"command": mapping["close"]}),
        }

    def topics_of(self, family: Family, device: DeviceRecord) -> list[str]:
        """The config topics `messages` gives (to clear them when the device goes)."""
        return [topic for topic, _ in self.messages(family, device)]
