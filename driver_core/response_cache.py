"""A bounded CoAP deduplication store for the device listener (driver_core.coap_transport).

aiocoap keeps, for every request, the (remote, message id) key, a timer and the
whole response Message for EXCHANGE_LIFETIME (247 s) so a retransmitted CON
gets the same answer (OSCORE needs that: reprocessing it would be a replay).
A firmware campaign answers hundreds of 1 KiB blocks per second, each from a
new port: measured about 3.4 KiB per block, i.e. memory growing with image
size x devices (200 devices x 256 KiB: ~175 MiB) until the entries expire.

This store keeps what a retransmission needs, and no more:

* a retransmission is the same message again, so it matches exactly: same
  address, port and message id, same token and same OSCORE option (hence the
  same kid and Partial IV). Any other request is new, even with the same
  address, port and message id: behind a carrier-grade NAT many devices share
  an address and ports are reused, and a random message id then repeats
  within the lifetime (birthday bound; 200 devices x 256 blocks hit it);
* keys live `lifetime` seconds (default 60: a device retransmits a CON for at
  most MAX_TRANSMIT_SPAN = 45 s, and it uses a new port, hence new keys,
  for every new exchange); they expire in arrival order, without timers;
* responses are kept as their encoded datagram (about 1.1 KiB for a block)
  within a byte budget; past it the oldest are dropped, and a retransmission
  of such a request is ignored like an unanswered one (the device times out
  and asks again in a new exchange);
* only piggybacked answers exist (the listener sends no separate responses).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

DEFAULT_LIFETIME = 60.0
DEFAULT_MAX_BYTES = 4 * 1024 * 1024
DEFAULT_MAX_KEYS = 200_000


# (host, port << 16 | message id, token, OSCORE option or None): what a retransmission repeats.
Key = tuple[str, int, bytes, bytes | None]


class ResponseCache:
    """The listener's memory of recent CON requests and the datagrams that answered them.

    A key (`key()`) holds one shared string per host and the request's token
    and OSCORE option as decoded; its value is the expiry time: about 300
    bytes per request, no timer, no address object.
    """

    def __init__(
        self,
        lifetime: float = DEFAULT_LIFETIME,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_keys: int = DEFAULT_MAX_KEYS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.lifetime = lifetime
        self.max_bytes = max_bytes
        self.max_keys = max_keys
        self._clock = clock
        self._keys: OrderedDict[Key, float] = OrderedDict()  # key -> expiry
        self._stored: OrderedDict[Key, bytes] = OrderedDict()
        self._hosts: dict[str, str] = {}
        self.bytes = 0
        self.duplicates = 0

    def __len__(self) -> int:
        return len(self._keys)

    def key(self, host: str, port: int, mid: int, token: bytes, oscore: bytes | None) -> Key:
        """What a retransmission of this request repeats exactly (`oscore`: the raw option value)."""
        return (self._hosts.setdefault(host, host), (port << 16) | mid, token, oscore)

    def _expire(self, now: float) -> None:
        keys = self._keys
        while keys:
            key, expires = next(iter(keys.items()))
            if expires > now and len(keys) <= self.max_keys:
                break
            del keys[key]
            stored = self._stored.pop(key, None)
            if stored is not None:
                self.bytes -= len(stored)
        if not keys:
            self._hosts.clear()

    def lookup(self, key: Key) -> tuple[bool, bytes | None]:
        """(duplicate?, the answer to send again if kept); a new request is remembered."""
        now = self._clock()
        self._expire(now)
        if key in self._keys:
            self.duplicates += 1
            return True, self._stored.get(key)
        self._keys[key] = now + self.lifetime
        return False, None

    def remember(self, key: Key, datagram: bytes) -> None:
        """Keep the answer to a CON request for its retransmissions."""
        if key not in self._keys or key in self._stored:
            return
        self._stored[key] = datagram
        self.bytes += len(datagram)
        while self.bytes > self.max_bytes and self._stored:
            _, old = self._stored.popitem(last=False)
            self.bytes -= len(old)
