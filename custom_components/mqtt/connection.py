"""Where and how to connect: settings -> aiomqtt client, and errors a user can act on."""

from __future__ import annotations

import logging
import ssl
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiomqtt

from .config_flow import BROKER_BUILTIN, DEFAULT_PORTS

ONLINE = b"online"
OFFLINE = b"offline"
KEEPALIVE_S = 30
CONNECT_TIMEOUT_S = 10.0

# paho logs every lost socket at ERROR; the integration reports those itself
# (status last_error and one warning), so paho's own lines are opt-in.
PAHO_LOGGER = logging.getLogger(__name__.rsplit(".", 1)[0] + ".paho")
PAHO_LOGGER.setLevel(logging.CRITICAL)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """The broker to talk to, resolved from the settings."""

    host: str
    port: int
    tls: bool
    label: str  # "builtin" or the URL, never with credentials

    @property
    def address(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def endpoint(settings: dict[str, Any]) -> Endpoint:
    if settings["broker"] == BROKER_BUILTIN:
        host = settings["builtin_host"]
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        return Endpoint(host, settings["builtin_port"], False, BROKER_BUILTIN)
    parts = urlsplit(settings["url"])
    port = parts.port or DEFAULT_PORTS[parts.scheme]
    return Endpoint(parts.hostname or "", port, parts.scheme == "mqtts", settings["url"])


def connection_key(settings: dict[str, Any]) -> tuple[Any, ...]:
    """Settings that need a new connection when they change (topic and QoS do not)."""
    return tuple(
        settings[key]
        for key in (
            "broker", "url", "username", "password", "tls_ca_file", "tls_insecure",
            "client_id", "status_topic", *BUILTIN_KEYS,
        )
    )


# Settings the built-in broker is started with: a change restarts it.
BUILTIN_KEYS = (
    "builtin_host", "builtin_port", "builtin_anonymous",
    "builtin_tls_port", "builtin_tls_certfile", "builtin_tls_keyfile",
)


def builtin_key(settings: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(settings[key] for key in BUILTIN_KEYS)


def tls_context(settings: dict[str, Any]) -> ssl.SSLContext:
    """Verify the broker certificate (system CAs or tls_ca_file) unless told not to."""
    try:
        context = ssl.create_default_context(cafile=settings["tls_ca_file"] or None)
    except (OSError, ssl.SSLError) as exc:
        raise ConnectionSetupError(
            f"mqtt.tls_ca_file: cannot load {settings['tls_ca_file']}: {exc}"
        ) from None
    if settings["tls_insecure"]:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class ConnectionSetupError(Exception):
    """The settings do not allow even trying to connect."""


def make_client(
    settings: dict[str, Any],
    client_id: str,
    window: int,
    credentials: tuple[str, str] | None = None,
) -> aiomqtt.Client:
    """A client for the broker of `settings`; `credentials` (the driver's own user on the
    built-in broker) replace the username and password settings."""
    target = endpoint(settings)
    username, password = credentials or (settings["username"], settings["password"])
    client = aiomqtt.Client(
        target.host,
        target.port,
        username=username or None,
        password=password or None,
        identifier=client_id,
        logger=PAHO_LOGGER,
        will=aiomqtt.Will(settings["status_topic"], OFFLINE, qos=1, retain=True),
        keepalive=KEEPALIVE_S,
        timeout=CONNECT_TIMEOUT_S,
        max_inflight_messages=window,
        tls_context=tls_context(settings) if target.tls else None,
    )
    # aiomqtt warns above 10 pending publishes; the pipeline keeps `window` on purpose.
    client.pending_calls_threshold = window + 10
    return client


def new_client_id(settings: dict[str, Any]) -> str:
    return settings["client_id"] or f"coap-driver-{uuid.uuid4().hex[:8]}"


def describe_error(exc: BaseException, settings: dict[str, Any]) -> str:
    """One line saying what went wrong and which setting to look at."""
    target = endpoint(settings)
    text = str(exc)
    if isinstance(exc, ConnectionSetupError):
        return text
    if "CERTIFICATE_VERIFY_FAILED" in text:
        reason = text.split("certificate verify failed:", 1)[-1].split("(_ssl")[0].strip()
        return (
            f"TLS certificate of {target.address} not trusted ({reason}); "
            "set mqtt.tls_ca_file to the CA that signed it"
        )
    if "SSL" in text or "TLS" in text:
        return f"TLS handshake with {target.address} failed: {text}"
    if "Connection refused" in text:
        return f"cannot connect to {target.address}: connection refused (is the broker running?)"
    lowered = text.lower()
    if "not authorized" in lowered or "bad user name or password" in lowered:
        return f"{target.address} refused the credentials (check mqtt.username and mqtt.password)"
    if "timed out" in lowered or isinstance(exc, TimeoutError):
        return f"no answer from {target.address} (timed out)"
    if "disconnected" in lowered:
        return f"lost the connection to {target.address}"
    if isinstance(exc, aiomqtt.MqttError):
        return f"MQTT connection to {target.address} failed: {text or type(exc).__name__}"
    return f"MQTT connection to {target.address} failed: {type(exc).__name__}: {text}"
