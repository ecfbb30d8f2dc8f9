"""MQTT settings: one schema for configuration.yaml, the web form and the REST API.

Each field carries its form label and help text as marker `description`, so the
web panel builds the form from this schema instead of repeating it.
`async_validate` adds the checks a schema cannot express (one field depends on
another, a file must exist) and reports every problem as field -> message.
"""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import voluptuous as vol

from driver_core.integration_base import form_field, schema_errors, text_setting, validated_settings

from .topic import (
    DEFAULT_DOWNLINK_COMMAND_TOPIC,
    DEFAULT_DOWNLINK_STATUS_TOPIC,
    DEFAULT_UPLINK_TOPIC,
    CommandTopic,
    TopicTemplate,
    check_topic_name,
)

DOMAIN = "mqtt"
DEFAULT_FOTA_STATUS_TOPIC = "application/COAP/device/{{serial}}/fota/status"
DEFAULT_STATUS_TOPIC = "coap-driver/status"
BROKER_BUILTIN = "builtin"
BROKER_EXTERNAL = "external"
DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}
DEFAULT_APP_TOPICS = "homeassistant/status"

_form = form_field


_text = text_setting


def broker_url(value: Any) -> str:
    """``mqtt://host[:port]`` or ``mqtts://host[:port]``; empty means not set."""
    value = _text(value)
    if not value:
        return value
    parts = urlsplit(value)
    if parts.scheme not in DEFAULT_PORTS:
        if "://" not in value:
            raise vol.Invalid("the broker URL must look like mqtt://host:port or mqtts://host:port")
        raise vol.Invalid(
            f"unsupported URL scheme {parts.scheme!r}: use mqtt:// or mqtts:// (TLS)"
        )
    if parts.username is not None or parts.password is not None:
        raise vol.Invalid("put the credentials in username and password, not in the URL")
    if not parts.hostname:
        raise vol.Invalid("the broker URL has no host name")
    try:
        port = parts.port
    except ValueError:
        raise vol.Invalid("the broker URL has an invalid port (1-65535)") from None
    if port == 0:
        raise vol.Invalid("the broker URL has an invalid port (1-65535)")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise vol.Invalid("the broker URL must not have a path, query or fragment")
    return value


def topic_template(value: Any) -> str:
    try:
        TopicTemplate(_text(value))
    except ValueError as exc:
        raise vol.Invalid(str(exc)) from None
    return _text(value)


def command_topic(value: Any) -> str:
    try:
        CommandTopic(_text(value))
    except ValueError as exc:
        raise vol.Invalid(str(exc)) from None
    return _text(value)


def topic_name(value: Any) -> str:
    try:
        return check_topic_name(_text(value))
    except ValueError as exc:
        raise vol.Invalid(str(exc)) from None


def topic_filters(value: Any) -> str:
    """Comma-separated MQTT topic filters (``+`` and ``#`` allowed where MQTT allows them)."""
    text = _text(value)
    for item in split_filters(text):
        levels = item.split("/")
        if any(("#" in level and (level != "#" or i != len(levels) - 1)) for i, level in enumerate(levels)):
            raise vol.Invalid(f"{item!r}: # must be a whole level, the last one")
        if any("+" in level and level != "+" for level in levels):
            raise vol.Invalid(f"{item!r}: + must be a whole level")
        if item.startswith("$"):
            raise vol.Invalid(f"{item!r}: topics starting with $ are reserved for the broker")
    return text


def split_filters(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


_PORT = vol.All(
    vol.Coerce(int, msg="expected a port number"),
    vol.Range(min=1, max=65535, msg="the port must be between 1 and 65535"),
)

SETTINGS_SCHEMA = vol.Schema(
    {
        vol.Required(
            "broker",
            default=BROKER_BUILTIN,
            description=_form(
                "Use external broker",
                "builtin: the driver's own broker; external: an existing broker at Broker URL",
                options={BROKER_BUILTIN: "Built-in broker", BROKER_EXTERNAL: "External broker"},
            ),
        ): vol.In((BROKER_BUILTIN, BROKER_EXTERNAL), msg="broker must be builtin or external"),
        vol.Optional(
            "url",
            default="",
            description=_form(
                "Broker URL",
                "mqtt://host:port, or mqtts://host:port for MQTT over TLS (external broker only)",
            ),
        ): broker_url,
        vol.Optional(
            "username", default="", description=_form("Username", "Leave empty for anonymous")
        ): _text,
        vol.Optional(
            "password",
            default="",
            description=_form("Password", "Password of the broker user", secret=True),
        ): vol.All(vol.Any(None, str, msg="expected text"), lambda v: v or ""),
        vol.Required(
            "qos",
            default=1,
            description=_form(
                "QoS", "0 at most once, 1 at least once, 2 exactly once", options=[0, 1, 2]
            ),
        ): vol.All(vol.Coerce(int, msg="QoS must be 0, 1 or 2"), vol.In((0, 1, 2), msg="QoS must be 0, 1 or 2")),
        vol.Required(
            "uplink_topic",
            default=DEFAULT_UPLINK_TOPIC,
            description=_form(
                "Uplink topic",
                "Topic of each uplink; {{serial}} is the device serial number "
                "({{hw_type}} is also available)",
            ),
        ): topic_template,
        vol.Optional(
            "downlink_status_topic",
            default=DEFAULT_DOWNLINK_STATUS_TOPIC,
            description=_form(
                "Downlink status topic",
                "Every state change of a downlink, and every refused command, is published "
                "here; {{serial}} is the device serial number ({{hw_type}} is also available)",
            ),
        ): topic_template,
        vol.Optional(
            "fota_status_topic",
            default=DEFAULT_FOTA_STATUS_TOPIC,
            description=_form(
                "Firmware update status topic",
                "Every state change and every 10 % of progress of a device's firmware update "
                "is published here; {{serial}} is the device serial number ({{hw_type}} is "
                "also available)",
            ),
        ): topic_template,
        vol.Optional(
            "downlink_command_topic",
            default=DEFAULT_DOWNLINK_COMMAND_TOPIC,
            description=_form(
                "Downlink command topic",
                "Publish a JSON command here to schedule a downlink; text and {{serial}} only "
                "(the driver subscribes with + in place of the serial)",
            ),
        ): command_topic,
        vol.Optional(
            "tls_ca_file",
            default="",
            description=_form(
                "CA certificate file",
                "PEM file of the CA that signed the broker certificate (mqtts://); "
                "empty = the system's CAs",
            ),
        ): _text,
        vol.Optional(
            "tls_insecure",
            default=False,
            description=_form(
                "Skip TLS verification", "Accept any broker certificate (testing only)"
            ),
        ): vol.Boolean(msg="expected true or false"),
        vol.Optional(
            "client_id",
            default="",
            description=_form("Client ID", "MQTT client identifier; empty = generated"),
        ): vol.All(_text, vol.Length(max=128, msg="the client ID is longer than 128 characters")),
        vol.Optional(
            "status_topic",
            default=DEFAULT_STATUS_TOPIC,
            description=_form(
                "Status topic",
                "Retained online/offline availability of the driver (last will)",
            ),
        ): topic_name,
        vol.Optional(
            "builtin_host",
            default="127.0.0.1",
            description=_form(
                "Built-in broker address", "Address the built-in broker listens on"
            ),
        ): vol.All(_text, vol.Length(min=1, msg="the address is empty")),
        vol.Optional(
            "builtin_port",
            default=1883,
            description=_form("Built-in broker port", "TCP port of the built-in broker"),
        ): _PORT,
        vol.Optional(
            "builtin_anonymous",
            default=True,
            description=_form(
                "Anonymous clients on localhost",
                "Let clients without credentials read (and send commands) when the built-in "
                "broker listens on 127.0.0.1 or ::1 only; any other address always requires "
                "the broker credentials",
            ),
        ): vol.Boolean(msg="expected true or false"),
        vol.Optional(
            "builtin_app_topics",
            default=DEFAULT_APP_TOPICS,
            description=_form(
                "Topics applications may publish",
                "Besides the downlink command topic, comma-separated topic filters that "
                "application users of the built-in broker may publish on",
            ),
        ): topic_filters,
        vol.Optional(
            "builtin_tls_port",
            default=0,
            description=_form(
                "Built-in broker TLS port", "Port of a TLS listener (e.g. 8883); 0 = none"
            ),
        ): vol.All(
            vol.Coerce(int, msg="expected a port number"),
            vol.Range(min=0, max=65535, msg="the port must be between 0 (none) and 65535"),
        ),
        vol.Optional(
            "builtin_tls_certfile",
            default="",
            description=_form(
                "TLS certificate file",
                "PEM certificate (chain) of the built-in broker's TLS listener",
            ),
        ): _text,
        vol.Optional(
            "builtin_tls_keyfile",
            default="",
            description=_form("TLS key file", "PEM private key of that certificate"),
        ): _text,
    }
)


def _check_builtin_tls(data: dict[str, Any]) -> dict[str, str]:
    """The TLS listener needs a distinct port and a certificate that loads with its key."""
    if not data["builtin_tls_port"]:
        return {}
    if data["builtin_tls_port"] == data["builtin_port"]:
        return {"builtin_tls_port": "the TLS port must differ from the built-in broker port"}
    errors = {}
    for field in ("builtin_tls_certfile", "builtin_tls_keyfile"):
        if not data[field]:
            errors[field] = "required for the TLS listener"
        elif not Path(data[field]).is_file():
            errors[field] = f"file not found: {data[field]}"
    if errors:
        return errors
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
            data["builtin_tls_certfile"], data["builtin_tls_keyfile"]
        )
    except (OSError, ssl.SSLError) as exc:
        return {"builtin_tls_certfile": f"cannot load this certificate with the key file: {exc}"}
    return {}


def _check_ca_file(path: str) -> str | None:
    file = Path(path)
    if not file.is_file():
        return f"file not found: {path}"
    try:
        ssl.create_default_context(cafile=str(file))
    except (OSError, ssl.SSLError) as exc:
        return f"not a readable PEM CA certificate file: {path} ({exc})"
    return None


async def async_validate(settings: dict[str, Any] | None) -> dict[str, str]:
    """Every problem with `settings` (raw or already validated) as field -> message.

    An empty dict means the settings can be saved and applied.
    """
    try:
        data = SETTINGS_SCHEMA(dict(settings or {}))
    except vol.MultipleInvalid as exc:
        return schema_errors(exc)
    errors: dict[str, str] = {}
    if data["broker"] == BROKER_EXTERNAL and not data["url"]:
        errors["url"] = "a broker URL is required when the external broker is used"
    if data["tls_ca_file"]:
        problem = await asyncio.to_thread(_check_ca_file, data["tls_ca_file"])
        if problem:
            errors["tls_ca_file"] = problem
    errors.update(await asyncio.to_thread(_check_builtin_tls, data))
    if data["password"] and not data["username"]:
        errors["username"] = "a password is set but the username is empty"
    problem = _own_topic_as_command(data)
    if problem:
        errors["downlink_command_topic"] = problem
    return errors


_OWN_TOPICS = {
    "downlink_status_topic": "downlink status topic",
    "fota_status_topic": "firmware update status topic",
    "uplink_topic": "uplink topic",
    "status_topic": "status topic",
}


def _own_topic_as_command(data: dict[str, Any]) -> str | None:
    """A topic the driver publishes on that its command subscription would also receive."""
    command = CommandTopic(data["downlink_command_topic"])
    for field, label in _OWN_TOPICS.items():
        value = data[field]
        if field == "status_topic":
            clash = value if command.serial(value) is not None else None
        else:
            own = TopicTemplate(value)
            if command.serial(own.example) is not None:
                clash = own.example
            elif own.may_render(command.example):
                clash = command.example
            else:
                clash = None
        if clash is not None:
            return (
                f"the command topic must differ from the {label} ({field}): the driver would "
                f"read its own messages, e.g. on {clash}, as commands"
            )
    return None


async def async_validated(settings: dict[str, Any] | None) -> dict[str, Any]:
    """`settings` with defaults applied, or SettingsError listing every problem."""
    return await validated_settings(settings, SETTINGS_SCHEMA, async_validate, DOMAIN)
