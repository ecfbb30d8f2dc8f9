"""A bounded CoAP deduplication store for the device listener (driver_core.coap_transport).

aiocoap keeps, for every request, the (remote, message id) key, a timer and the
whole response Message for EXCHANGE_LIFETIME (247 s) so a retransmitted CON
gets the same answer (OSCORE needs that: reprocessing it would be a replay).
A firmware campaign answers hundreds of 1 KiB blocks per second, each from a
new port: measured about 3.4 KiB per block, i.e. memory growing with image
size x devices (200 devices x 256 KiB: ~175 MiB) until the entries expire.

This store keeps what a retransmission needs, and no more:

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


class ResponseCache:
    """The listener's memory of recent CON requests and the datagrams that answered them.

    A key is (host, port << 16 | message id) with one shared string per host,
    its value the expiry time: about 200 bytes per request, no timer, no
    address object.
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
        self._keys: OrderedDict[tuple[str, int], float] = OrderedDict()  # key -> expiry
        self._stored: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._hosts: dict[str, str] = {}
        self.bytes = 0
        self.duplicates = 0

    def __len__(self) -> int:
        return len(self._keys)

    def _key(self, host: str, port: int, mid: int) -> tuple[str, int]:
        return (self._hosts.setdefault(host, host), (port << 16) | mid)

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

    def lookup(self, host: str, port: int, mid: int) -> tuple[bool, bytes | None]:
        """(duplicate?, the answer to send again if kept); a new request is remembered."""
        now = self._clock()
        self._expire(now)
        key = self._key(host, port, mid)
        if key in self._keys:
            self.duplicates += 1
            return True, self._stored.get(key)
        self._keys[key] = now + self.lifetime
        return False, None

    def remember(self, host: str, port: int, mid: int, datagram: bytes) -> None:
        """Keep the answer to a CON request for its retransmissions."""
        key = self._key(host, port, mid)
        if key not in self._keys or key in self._stored:
            return
        self._stored[key] = datagram
        self.bytes += len(datagram)
        while self.bytes > self.max_bytes and self._stored:
            _, old = self._stored.popitem(last=False)
            self.bytes -= len(old)
