"""Memoize the pure address-formatting helpers of aiocoap's UDP transport.

aiocoap names the task of every request after the request's repr
("Rendering for %r", "OSCORE response rendering for %r"), eagerly, and the
repr of a UDP remote parses its IP address with `ipaddress` and asks the
kernel for the interface name (`if_indextoname`, a syscall that releases the
GIL); every response also parses the local address again to check it was not
a multicast request. py-spy put that at about 140 µs of CPU per request on the benchmark VM,
more than OSCORE. The helpers depend only on their arguments, and devices come
from a limited set of addresses (carrier NATs, one local address), so a
bounded cache returns the same strings without the work.
"""

from __future__ import annotations

import functools
import ipaddress
import socket

from aiocoap.transports import udp6

CACHE_SIZE = 4096


@functools.lru_cache(maxsize=CACHE_SIZE)
def _interface_name(index: int) -> str:
    try:
        return "%" + socket.if_indextoname(index)
    except Exception as exc:  # noqa: BLE001 - the same text aiocoap shows
        return f"%{index}({exc})"


def install() -> None:
    """Patch `UDP6EndpointAddress` once; the strings it produces are unchanged."""
    address = udp6.UDP6EndpointAddress
    if getattr(address, "_coap_driver_tuned", False):
        return
    strip = functools.lru_cache(maxsize=CACHE_SIZE)(address._strip_v4mapped)
    address._strip_v4mapped = staticmethod(strip)

    def _repr_pktinfo(self: udp6.UDP6EndpointAddress) -> str:
        addr, interface = udp6._in6_pktinfo.unpack_from(self.pktinfo)
        return strip(addr) + (_interface_name(interface) if interface else "")

    @functools.lru_cache(maxsize=CACHE_SIZE)
    def multicast_locally(pktinfo: bytes) -> bool:
        addr, _interface = udp6._in6_pktinfo.unpack_from(pktinfo)
        return ipaddress.ip_address(strip(addr)).is_multicast

    address._repr_pktinfo = _repr_pktinfo
    # Asked for every response (never answer a multicast request with a unicast error).
    address.is_multicast_locally = property(lambda self: multicast_locally(self.pktinfo))
    address._coap_driver_tuned = True
