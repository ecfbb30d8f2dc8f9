"""The memoized address helpers give aiocoap's own strings and answers."""

from __future__ import annotations

import socket

import pytest
from aiocoap.transports import udp6

from driver_core import aiocoap_tuning


class Interface:  # UDP6EndpointAddress keeps a weak reference to its message interface
    pass


INTERFACE = Interface()


def address(local: str, index: int) -> udp6.UDP6EndpointAddress:
    pktinfo = udp6._in6_pktinfo.pack(socket.inet_pton(socket.AF_INET6, local), index)
    return udp6.UDP6EndpointAddress(("::ffff:192.0.2.7", 40000, 0, 0), INTERFACE, pktinfo=pktinfo)


@pytest.mark.parametrize(
    ("local", "index", "shown", "multicast"),
    [
        ("::ffff:127.0.0.1", 0, "127.0.0.1", False),
        ("2001:db8::0:1", 0, "2001:db8::1", False),
        ("ff02::fd", 1, "ff02::fd%" + socket.if_indextoname(1), True),
        ("::ffff:224.0.1.187", 0, "224.0.1.187", True),
    ],
)
def test_repr_and_multicast_check_are_unchanged(local, index, shown, multicast):
    aiocoap_tuning.install()
    aiocoap_tuning.install()  # twice is harmless
    for _ in range(2):  # computed, then from the cache
        remote = address(local, index)
        assert repr(remote) == f"<UDP6EndpointAddress 192.0.2.7:40000 (locally {shown})>"
        assert remote.is_multicast_locally is multicast
        assert remote.hostinfo == "192.0.2.7:40000"
