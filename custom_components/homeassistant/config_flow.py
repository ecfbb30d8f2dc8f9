"""Home Assistant discovery settings: one schema for configuration.yaml, the web form and the API.

Each field carries its form label and help text as marker `description` (the
web panel builds the form from the schema). Per-device topics are literal text
with `{{serial}}`, substituted without Jinja2 because they are rendered for
every device of the fleet.
"""

from __future__ import annotations

import re
from typing import Any

import voluptuous as vol

from driver_core.integration_base import form_field, schema_errors, text_setting, validated_settings

DOMAIN = "homeassistant"
DEFAULT_DISCOVERY_PREFIX = "homeassistant"
DEFAULT_STATE_TOPIC = "coap-driver/{{serial}}/state"
DEFAULT_AVAILABILITY_TOPIC = "coap-driver/{{serial}}/availability"
MAX_CHECK_SECONDS = 3600

_form = form_field
_PLACEHOLDER = re.compile(r"\{\{\s*serial\s*\}\}")


_text = text_setting


def discovery_prefix(value: Any) -> str:
    """A topic (one or more levels) without wildcards, e.g. homeassistant."""
    value = _text(value).strip("/")
    if not value:
        raise vol.Invalid(
            "the discovery prefix is empty (Home Assistant's default is homeassistant)"
        )
    if "+" in value or "#" in value or "\x00" in value:
        raise vol.Invalid("the discovery prefix must not contain the wildcards + or #")
    if value.startswith("$"):
        raise vol.Invalid("the discovery prefix must not start with $ (reserved for the broker)")
    return value


def device_topic(field: str) -> Any:
    """A per-device topic: literal text with {{serial}}."""

    def validate(value: Any) -> str:
        text = _text(value)
        if not _PLACEHOLDER.search(text):
            raise vol.Invalid(
                f"the {field} must contain {{{{serial}}}}: every device needs its own topic"
            )
        rest = _PLACEHOLDER.sub("", text)
        if "{" in rest or "}" in rest:
            raise vol.Invalid(f"the {field} can only contain text and {{{{serial}}}}")
        if "+" in rest or "#" in rest or "\x00" in rest:
            raise vol.Invalid(f"the {field} must not contain the wildcards + or #")
        if text.startswith("$"):
            raise vol.Invalid(f"the {field} must not start with $ (reserved for the broker)")
        return text

    return validate


def render_topic(template: str, serial: str) -> str:
    """`template` with the device's serial in place of {{serial}}."""
    return _PLACEHOLDER.sub(serial, template)


def check_seconds(value: Any) -> float:
    if isinstance(value, bool):
        raise vol.Invalid("expected a number of seconds")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise vol.Invalid("expected a number of seconds") from None
    if not 0 < number <= MAX_CHECK_SECONDS:
        raise vol.Invalid(
            f"the availability check must be more than 0 and at most {MAX_CHECK_SECONDS} seconds"
        )
    return number


SETTINGS_SCHEMA = vol.Schema(
    {
        vol.Optional(
            "enabled",
            default=True,
            description=_form(
                "Enabled",
                "Publish MQTT discovery so every device appears in Home Assistant; turning it "
                "off removes the devices from Home Assistant",
            ),
        ): vol.Boolean(msg="expected true or false"),
        vol.Optional(
            "discovery_prefix",
            default=DEFAULT_DISCOVERY_PREFIX,
            description=_form(
                "Discovery prefix",
                "Home Assistant's MQTT discovery prefix (homeassistant unless changed in "
                "Home Assistant's MQTT options)",
            ),
        ): discovery_prefix,
        vol.Optional(
            "state_topic",
            default=DEFAULT_STATE_TOPIC,
            description=_form(
                "State topic",
                "Retained JSON with each device's latest values; {{serial}} is the serial number",
            ),
        ): device_topic("state topic"),
        vol.Optional(
            "availability_topic",
            default=DEFAULT_AVAILABILITY_TOPIC,
            description=_form(
                "Device availability topic",
                "Retained online/offline of each device: online until its expected next "
                "transmission is missed by the grace margin; {{serial}} is the serial number",
            ),
        ): device_topic("availability topic"),
        vol.Optional(
            "availability_check",
            default=30.0,
            description=_form(
                "Availability check (seconds)",
                "How often devices whose expected transmission is overdue are marked offline",
            ),
        ): check_seconds,
    }
)


async def async_validate(settings: dict[str, Any] | None) -> dict[str, str]:
    """Every problem with `settings` as field -> message (empty: they can be applied)."""
    try:
        data = SETTINGS_SCHEMA(dict(settings or {}))
    except vol.MultipleInvalid as exc:
        return schema_errors(exc)
    if render_topic(data["state_topic"], "x") == render_topic(data["availability_topic"], "x"):
        return {"availability_topic": "the availability topic must differ from the state topic"}
    return {}


async def async_validated(settings: dict[str, Any] | None) -> dict[str, Any]:
    """`settings` with defaults applied, or SettingsError listing every problem."""
    return await validated_settings(settings, SETTINGS_SCHEMA, async_validate, DOMAIN)
