"""The built-in broker as the MQTT settings describe it: listeners, TLS and access policy.

Kept apart from the integration so that what the broker allows is read in one
place: the driver's own user may publish anywhere; application users (and
anonymous clients, on a loopback address only) may publish on the downlink
command topic and the extra filters of `builtin_app_topics`, and read anything.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from driver_core.broker import BrokerError, BuiltinBroker, TlsListener
from driver_core.broker_access import (
    DRIVER_USER,
    BrokerAccess,
    CredentialsError,
    CredentialStore,
    is_loopback,
)
from driver_core.storage.secretbox import SecretBox, SecretBoxError

from .config_flow import BROKER_BUILTIN, split_filters
from .topic import CommandTopic


def credential_store(driver: Any) -> CredentialStore:
    """The broker users of the driver's configuration directory (created on first use)."""
    try:
        box = getattr(driver, "box", None) or SecretBox.load_or_create(driver.config_dir)
        store = CredentialStore(driver.config_dir, box)
        store.ensure()
    except (CredentialsError, SecretBoxError) as exc:
        raise BrokerError(f"mqtt: {exc}") from None
    return store


def application_topics(settings: dict[str, Any]) -> list[str]:
    """Topic filters application users may publish on."""
    return [
        CommandTopic(settings["downlink_command_topic"]).filter,
        *split_filters(settings["builtin_app_topics"]),
    ]


def make_broker(
    store: CredentialStore,
    settings: dict[str, Any],
    current_settings: Callable[[], dict[str, Any]],
) -> BuiltinBroker:
    """The broker for `settings`; publish rights follow `current_settings()` live."""
    access = BrokerAccess(
        store,
        allow_anonymous=settings["builtin_anonymous"] and is_loopback(settings["builtin_host"]),
        writable=lambda: application_topics(current_settings()),
    )
    tls = None
    if settings["builtin_tls_port"]:
        tls = TlsListener(
            settings["builtin_tls_port"],
            settings["builtin_tls_certfile"],
            settings["builtin_tls_keyfile"],
        )
    return BuiltinBroker(settings["builtin_host"], settings["builtin_port"], access, tls)


def own_credentials(store: CredentialStore | None, settings: dict[str, Any]) -> tuple[str, str] | None:
    """The driver's username and password when it talks to its built-in broker."""
    if settings["broker"] != BROKER_BUILTIN or store is None:
        return None
    return DRIVER_USER, store.password(DRIVER_USER)


def ports(broker: BuiltinBroker) -> set[int]:
    return {broker.port} | ({broker.tls.port} if broker.tls else set())


def wanted_ports(settings: dict[str, Any]) -> set[int]:
    return {settings["builtin_port"]} | (
        {settings["builtin_tls_port"]} if settings["builtin_tls_port"] else set()
    )
