"""Constants of the coap-driver Home Assistant integration."""

from __future__ import annotations

DOMAIN = "coap_driver"

CONF_URL = "url"
CONF_TOKEN = "token"
CONF_STATUS_TOPIC = "status_topic"

DEFAULT_URL = "http://127.0.0.1:8080"
# The driver's downlink status topic (mqtt.downlink_status_topic) with + in place of the serial.
DEFAULT_STATUS_TOPIC = "application/COAP/device/+/downlink/status"

# Fired on every downlink state change (and refused command) the driver reports.
EVENT_DOWNLINK = f"{DOMAIN}_downlink"

SERVICE_SCHEDULE = "schedule_downlink"
SERVICE_CANCEL = "cancel_downlink"

ATTR_DEVICE_ID = "device_id"
ATTR_SERIAL = "serial"
ATTR_COMMAND = "command"
ATTR_PARAMETER = "parameter"
ATTR_COMMAND_ID = "command_id"

# The identifier prefix of devices discovered from the driver (driver side: discovery.py).
IDENTIFIER_PREFIX = "coap_driver_"
MANUFACTURER = "VIDI"
TIMEOUT_S = 10
