"""A bounded CoAP deduplication store for the server (replaces aiocoap's per-message one).

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
* CON responses (separate responses) are not stored: aiocoap cannot resend
  them through the deduplication path anyway.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import aiocoap
from aiocoap.message import Direction
from aiocoap.numbers.types import Type

DEFAULT_LIFETIME = 60.0
DEFAULT_MAX_BYTES = 4 * 1024 * 1024
DEFAULT_MAX_KEYS = 200_000


class ResponseCache:
    """Installed on an aiocoap MessageManager; see `install`.

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
        self._stored: OrderedDict[tuple[str, int], tuple[bytes, Any]] = OrderedDict()
        self._hosts: dict[str, str] = {}
        self.bytes = 0
        self.duplicates = 0
        self._manager: Any = None

    def __len__(self) -> int:
        return len(self._keys)

    def install(self, manager: Any) -> None:
        """Replace `manager`'s deduplication (aiocoap 0.4 MessageManager) with this cache."""
        self._manager = manager
        manager._deduplicate_message = self.deduplicate
        manager._store_response_for_duplicates = self.store

    def _key(self, message: aiocoap.Message) -> tuple[str, int]:
        remote = message.remote
        sockaddr = getattr(remote, "sockaddr", None)
        if sockaddr is None:  # not UDP: fall back to the address object itself
            return (remote, message.mid)  # type: ignore[return-value]
        host = self._hosts.setdefault(sockaddr[0], sockaddr[0])
        return (host, (sockaddr[1] << 16) | message.mid)

    def _expire(self, now: float) -> None:
        keys = self._keys
        while keys:
            key, expires = next(iter(keys.items()))
            if expires > now and len(keys) <= self.max_keys:
                break
            del keys[key]
            stored = self._stored.pop(key, None)
            if stored is not None:
                self.bytes -= len(stored[0])
        if not keys:
            self._hosts.clear()

    def deduplicate(self, message: aiocoap.Message) -> bool:
        """True for a duplicate (answered again when its response is kept)."""
        now = self._clock()
        self._expire(now)
        key = self._key(message)
        if key in self._keys:
            self.duplicates += 1
            stored = self._stored.get(key)
            if message.mtype is Type.CON and stored is not None:
                again = aiocoap.Message.decode(stored[0], stored[1])
                again.direction = Direction.OUTGOING  # decode() marks it incoming; encode() refuses that
                self._manager._send_via_transport(again)
            return True
        self._keys[key] = now + self.lifetime
        return False

    def store(self, message: aiocoap.Message) -> None:
        """Keep an outgoing response for retransmissions of the request it answers."""
        if message.mtype is Type.CON:
            return
        key = self._key(message)
        if key not in self._keys or key in self._stored:
            return
        datagram = message.encode()
        self._stored[key] = (datagram, message.remote)
        self.bytes += len(datagram)
        while self.bytes > self.max_bytes and self._stored:
            _, (old, _remote) = self._stored.popitem(last=False)
            self.bytes -= len(old)


def install_response_cache(context: aiocoap.Context, **options: Any) -> ResponseCache | None:
    """Install a ResponseCache on the UDP message manager of a server context."""
    for tokens in context.request_interfaces:
        manager = getattr(tokens, "token_interface", None)
        if manager is not None and hasattr(manager, "_deduplicate_message"):
            cache = ResponseCache(**options)
            cache.install(manager)
            return cache
    return None
