"""Stateless R2 values for the B.2 JOIN (RFC 8613 B.2.1).

R2 = S2 ‖ HMAC(K, kid ‖ S2)[:8] with S2 = issue time in ms (6 bytes) ‖ 2 random
bytes. The driver keeps no state between JOIN steps 2 and 3; any instance
sharing K can finish a JOIN another one started. The timestamp lets the driver
refuse R2 values that are stale or older than the device's current context, so
a recorded step-3 message can never bring back a superseded context.
"""

from __future__ import annotations

import hmac
import os
import time

R2_LENGTH = 16
R1_LENGTH = 8
R3_LENGTH = 8
R2_LIFETIME_MS = 300_000
_RANDOM_DRAW = 4096  # bytes read from os.urandom at once (2,048 R2 values)


class JoinTokens:
    def __init__(self, key: bytes, lifetime_ms: int = R2_LIFETIME_MS) -> None:
        self._key = key
        self._lifetime_ms = lifetime_ms
        self._random = b""
        self._random_at = 0

    def _random2(self) -> bytes:
        """Two bytes from the OS's CSPRNG, read in blocks: in a JOIN storm a getrandom call
        per R2 releases the GIL and waits to get it back from the database threads."""
        if self._random_at + 2 > len(self._random):
            self._random, self._random_at = os.urandom(_RANDOM_DRAW), 0
        at = self._random_at
        self._random_at = at + 2
        return self._random[at : at + 2]

    def _mac(self, kid: bytes, s2: bytes) -> bytes:
        return hmac.digest(self._key, bytes([len(kid)]) + kid + s2, "sha256")[:8]

    def issue(self, kid: bytes, now_ms: int | None = None) -> bytes:
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        s2 = now_ms.to_bytes(6, "big") + self._random2()
        return s2 + self._mac(kid, s2)

    def verify(self, kid: bytes, r2: bytes, now_ms: int | None = None) -> int | None:
        """The issue time (ms) of a genuine, fresh R2 for this kid, else None."""
        if len(r2) != R2_LENGTH:
            return None
        s2, mac = r2[:8], r2[8:]
        if not hmac.compare_digest(mac, self._mac(kid, s2)):
            return None
        issued_ms = int.from_bytes(s2[:6], "big")
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        if not 0 <= now_ms - issued_ms <= self._lifetime_ms:
            return None
        return issued_ms
