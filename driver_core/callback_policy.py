"""Where downlink callbacks may be posted: refuses the driver's own host and local networks.

A callback URL is chosen by whoever schedules a downlink (REST API, MQTT
command topic), so without a policy the driver would POST wherever it is told:
to itself, to other services on its loopback interface, to the cloud metadata
service on 169.254.169.254 (server-side request forgery). The policy is
applied twice: when a downlink is scheduled (the URL's host, if it is an
address or a loopback name) and when the callback connects (every address the
host name resolves to, see custom_components/callbacks/sender.py), so a name
that resolves to a refused address is refused too.

Private networks (10/8, 172.16/12, 192.168/16, fc00::/7) stay allowed: a
receiver on the LAN is normal. ``allowed_networks`` lifts the default
refusals, ``denied_networks`` adds refusals (and wins over allowed), and the
driver's own TCP listeners are always refused: posting to itself is never
meaningful and would spend its failed-authentication budget.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from yarl import URL

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

ALLOWED_SETTING = "callbacks.allowed_networks"
DENIED_SETTING = "callbacks.denied_networks"

# Refused unless allowed_networks lists them (IPv4-mapped IPv6 is checked as IPv4).
DEFAULT_REFUSED: tuple[tuple[IPNetwork, str], ...] = tuple(
    (ipaddress.ip_network(network), kind)
    for network, kind in (
        ("0.0.0.0/8", "unspecified, reaches this host"),
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local, e.g. a cloud metadata service"),
        ("224.0.0.0/4", "multicast"),
        ("::/128", "unspecified, reaches this host"),
        ("::1/128", "loopback"),
        ("fe80::/10", "link-local"),
        ("ff00::/8", "multicast"),
    )
)
# Names that always mean this host (RFC 6761), as the resolver would return them.
LOOPBACK_NAMES = ("localhost",)
LOOPBACK_ADDRESSES = (ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1"))


def _no_listeners() -> Mapping[int, str]:
    return {}


def plain(address: IPAddress) -> IPAddress:
    """An IPv4-mapped IPv6 address (::ffff:127.0.0.1) as the IPv4 address it reaches."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def is_this_host(address: IPAddress) -> bool:
    """Whether `address` belongs to this machine: only a local address can be bound.

    A bind is a local check (no packet is sent), so it also covers the addresses
    of every interface when a listener is bound to 0.0.0.0 or ::.
    """
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((str(address), 0))
        except OSError:
            return False
    return True


def static_addresses(host: str) -> list[IPAddress] | None:
    """The addresses `host` stands for without asking DNS, or None for a real name.

    Covers literal addresses in every form the system resolver accepts
    (127.1, 0x7f000001, ::ffff:7f00:1) and the loopback names.
    """
    name = host.rstrip(".").lower()
    if name in LOOPBACK_NAMES or name.endswith(".localhost"):
        return list(LOOPBACK_ADDRESSES)
    try:
        infos = socket.getaddrinfo(name, None, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
    except (OSError, UnicodeError, ValueError):
        return None
    return [ipaddress.ip_address(info[4][0].split("%", 1)[0]) for info in infos]


def parse_networks(values: Sequence[str]) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(value) for value in values)


@dataclass(frozen=True, slots=True)
class CallbackPolicy:
    """The destinations callbacks may reach; `own_listeners` gives {TCP port: name} of the driver."""

    allowed: tuple[IPNetwork, ...] = ()
    denied: tuple[IPNetwork, ...] = ()
    own_listeners: Callable[[], Mapping[int, str]] = field(default=_no_listeners, compare=False)

    @classmethod
    def from_settings(
        cls, settings: Mapping[str, Any], own_listeners: Callable[[], Mapping[int, str]]
    ) -> CallbackPolicy:
        return cls(
            parse_networks(settings.get("allowed_networks") or ()),
            parse_networks(settings.get("denied_networks") or ()),
            own_listeners,
        )

    def address_refusal(self, address: IPAddress, port: int, host: str) -> str | None:
        """Why a callback may not connect to `address`:`port` (None: it may)."""
        address = plain(address)
        shown = host if host == str(address) else f"{host} ({address})"
        name = self.own_listeners().get(port)
        if name is not None and is_this_host(address):
            return (
                f"callback_url: {shown} port {port} is the driver's own {name} listener; "
                "callbacks are never posted to the driver itself, whatever "
                f"{ALLOWED_SETTING} says"
            )
        for network in self.denied:
            if address in network:
                return f"callback_url: {shown} is in {network}, which {DENIED_SETTING} refuses"
        if any(address in network for network in self.allowed):
            return None
        for network, kind in DEFAULT_REFUSED:
            if address in network:
                return (
                    f"callback_url: {shown} is in {network} ({kind}), which callbacks refuse "
                    f"by default; to allow it, add {network} to {ALLOWED_SETTING}"
                )
        return None

    def url_refusal(self, url: str) -> str | None:
        """Why `url` is refused before any DNS lookup (None: allowed, or only DNS can tell).

        A URL the policy cannot parse is left to the URL checks that report it.
        """
        try:
            parsed = URL(url)
            host, port = parsed.host, parsed.port
        except (ValueError, TypeError):
            return None
        if not host or port is None:
            return None
        addresses = static_addresses(host)
        if not addresses:
            return None
        refusals = [self.address_refusal(address, port, host) for address in addresses]
        if all(refusals):
            return refusals[0]
        return None


def driver_listeners(driver: Any) -> dict[int, str]:
    """{port: name} of the driver's TCP listeners: its HTTP server and its built-in broker.

    The CoAP listener is UDP: an HTTP request cannot reach it, so it is not listed.
    """
    listeners: dict[int, str] = {}
    api = getattr(driver, "api", None)
    config = getattr(driver, "config", None)
    http_port = getattr(api, "port", 0) or (config.http["port"] if config is not None else 0)
    if http_port:
        listeners[http_port] = "HTTP"
    integrations = getattr(driver, "integrations", None)
    if integrations is not None and "mqtt" in getattr(integrations, "running", {}):
        mqtt = integrations.settings("mqtt")
        if mqtt.get("broker") == "builtin":
            listeners[mqtt["builtin_port"]] = "MQTT"
            if mqtt.get("builtin_tls_port"):
                listeners[mqtt["builtin_tls_port"]] = "MQTT TLS"
    return listeners
