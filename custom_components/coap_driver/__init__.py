"""coap-driver for Home Assistant: schedule and cancel downlinks, follow their states.

The devices themselves come from the driver's MQTT discovery (Home Assistant's
MQTT integration creates them). This integration adds what discovery cannot:

- services `coap_driver.schedule_downlink` / `coap_driver.cancel_downlink`,
  calling the driver's REST API with the token given in the config flow;
- the event `coap_driver_downlink`, fired for every message on the driver's
  downlink status topic (state changes and refused commands), received through
  Home Assistant's own MQTT subscription: pushed, no polling.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import voluptuous as vol
from homeassistant.components import mqtt
from homeassistant.config_entries import ConfigEntry
from homeassistant.core import (
    HomeAssistant,
    ServiceCall,
    ServiceResponse,
    SupportsResponse,
    callback,
)
from homeassistant.exceptions import HomeAssistantError, ServiceValidationError
from homeassistant.helpers import config_validation as cv
from homeassistant.helpers import device_registry as dr
from homeassistant.helpers.aiohttp_client import async_get_clientsession

from .api import DriverApi, DriverApiError
from .const import (
    ATTR_COMMAND,
    ATTR_COMMAND_ID,
    ATTR_DEVICE_ID,
    ATTR_PARAMETER,
    ATTR_SERIAL,
    CONF_STATUS_TOPIC,
    CONF_TOKEN,
    CONF_URL,
    DOMAIN,
    EVENT_DOWNLINK,
    IDENTIFIER_PREFIX,
    SERVICE_CANCEL,
    SERVICE_SCHEDULE,
)

_LOGGER = logging.getLogger(__name__)

SCHEDULE_SCHEMA = vol.All(
    vol.Schema(
        {
            vol.Exclusive(ATTR_DEVICE_ID, "device"): vol.Any(cv.string, [cv.string]),
            vol.Exclusive(ATTR_SERIAL, "device"): cv.string,
            vol.Required(ATTR_COMMAND): cv.string,
            vol.Optional(ATTR_PARAMETER): vol.Any(None, int, float, cv.string),
            vol.Optional(ATTR_COMMAND_ID): vol.All(cv.string, vol.Length(min=1, max=128)),
        }
    ),
    cv.has_at_least_one_key(ATTR_DEVICE_ID, ATTR_SERIAL),
)
CANCEL_SCHEMA = vol.Schema({vol.Required(ATTR_COMMAND_ID): cv.string})


def serial_of_device(hass: HomeAssistant, device_id: str) -> str:
    """The driver serial of a Home Assistant device created by the driver's discovery."""
    device = dr.async_get(hass).async_get(device_id)
    if device is None:
        raise ServiceValidationError(f"unknown device {device_id}")
    for domain, identifier in device.identifiers:
        if domain == "mqtt" and identifier.startswith(IDENTIFIER_PREFIX):
            return identifier[len(IDENTIFIER_PREFIX) :]
    raise ServiceValidationError(f"{device.name} is not a device of coap-driver")


def _number(value: Any) -> Any:
    """Whole floats (30.0 from a number selector) become integers, as the driver expects."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _api(hass: HomeAssistant) -> DriverApi:
    entries = hass.data.get(DOMAIN, {})
    if not entries:
        raise HomeAssistantError("coap-driver is not configured")
    return next(iter(entries.values()))["api"]


async def _schedule(hass: HomeAssistant, call: ServiceCall) -> ServiceResponse:
    if ATTR_SERIAL in call.data:
        serials = [call.data[ATTR_SERIAL]]
    else:
        ids = call.data[ATTR_DEVICE_ID]
        serials = [serial_of_device(hass, i) for i in ([ids] if isinstance(ids, str) else ids)]
    if len(serials) > 1 and call.data.get(ATTR_COMMAND_ID):
        raise ServiceValidationError("a command_id can only be given for a single device")
    downlinks = []
    for serial in serials:
        try:
            downlinks.append(
                await _api(hass).schedule(
                    serial,
                    call.data[ATTR_COMMAND],
                    _number(call.data.get(ATTR_PARAMETER)),
                    call.data.get(ATTR_COMMAND_ID),
                )
            )
        except DriverApiError as exc:
            if exc.status is not None and 400 <= exc.status < 500:
                raise ServiceValidationError(f"{serial}: {exc}") from exc
            raise HomeAssistantError(f"{serial}: {exc}") from exc
    return {"downlinks": downlinks}


async def _cancel(hass: HomeAssistant, call: ServiceCall) -> ServiceResponse:
    try:
        return await _api(hass).cancel(call.data[ATTR_COMMAND_ID])
    except DriverApiError as exc:
        if exc.status is not None and 400 <= exc.status < 500:
            raise ServiceValidationError(str(exc)) from exc
        raise HomeAssistantError(str(exc)) from exc


def _register_services(hass: HomeAssistant) -> None:
    if hass.services.has_service(DOMAIN, SERVICE_SCHEDULE):
        return

    async def schedule(call: ServiceCall) -> ServiceResponse:
        return await _schedule(hass, call)

    async def cancel(call: ServiceCall) -> ServiceResponse:
        return await _cancel(hass, call)

    hass.services.async_register(
        DOMAIN, SERVICE_SCHEDULE, schedule, SCHEDULE_SCHEMA, SupportsResponse.OPTIONAL
    )
    hass.services.async_register(
        DOMAIN, SERVICE_CANCEL, cancel, CANCEL_SCHEMA, SupportsResponse.OPTIONAL
    )


async def async_setup_entry(hass: HomeAssistant, entry: ConfigEntry) -> bool:
    api = DriverApi(async_get_clientsession(hass), entry.data[CONF_URL], entry.data[CONF_TOKEN])

    @callback
    def status_received(msg: mqtt.ReceiveMessage) -> None:
        try:
            payload = json.loads(msg.payload)
        except ValueError:
            _LOGGER.warning("Ignoring a downlink status that is not JSON on %s", msg.topic)
            return
        if not isinstance(payload, dict):
            return
        hass.bus.async_fire(EVENT_DOWNLINK, {**payload, "topic": msg.topic})

    if not await mqtt.async_wait_for_mqtt_client(hass):
        _LOGGER.error("MQTT is not available: downlink state events will not be fired")
        unsubscribe = None
    else:
        unsubscribe = await mqtt.async_subscribe(
            hass, entry.data[CONF_STATUS_TOPIC], status_received, qos=1
        )
    hass.data.setdefault(DOMAIN, {})[entry.entry_id] = {"api": api, "unsubscribe": unsubscribe}
    _register_services(hass)
    return True


async def async_unload_entry(hass: HomeAssistant, entry: ConfigEntry) -> bool:
    stored = hass.data.get(DOMAIN, {}).pop(entry.entry_id, None)
    if stored and stored["unsubscribe"] is not None:
        stored["unsubscribe"]()
    if not hass.data.get(DOMAIN):
        hass.services.async_remove(DOMAIN, SERVICE_SCHEDULE)
        hass.services.async_remove(DOMAIN, SERVICE_CANCEL)
    return True
