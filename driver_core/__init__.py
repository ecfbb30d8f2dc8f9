"""coap-driver: CoAP/OSCORE battery devices to MQTT, REST and Home Assistant."""

__version__ = "0.1.0"
