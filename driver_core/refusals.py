"""Counting and logging refused requests: one log line per refusal, one counter per reason.

The line is structured: in the JSON log format it carries ``event: refused``,
``reason``, ``serial``, ``kid``, ``remote`` and ``detail`` as fields. Nothing
secret is known here (a kid travels in clear on the wire).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable

_LOGGER = logging.getLogger("driver_core.refused")

UNKNOWN_KID = "unknown_kid"
NO_CONTEXT = "no_security_context"
DECRYPTION_FAILED = "decryption_failed"
REPLAY = "replay"
MALFORMED_OSCORE = "malformed_oscore"
MALFORMED_DATAGRAM = "malformed_datagram"
UNPROTECTED = "unprotected"
UNKNOWN_RESOURCE = "unknown_resource"
OVERSIZED = "oversized_payload"
BAD_PAYLOAD = "bad_payload"
BAD_JOIN = "bad_join_payload"
STORAGE = "storage_unavailable"
JOIN_FIRST = "join_first"  # a data request under a context that exists only for the JOIN
# A datagram dropped unanswered: its source is over its refusal budget (driver_core/rate_limit.py).
RATE_LIMITED = "rate_limited"
# A request that failed verification, left unanswered: its kid or its source is over its budget of those.
DECRYPTION_FAILED_UNANSWERED = "decryption_failed_unanswered"


class Refusals:
    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        # Told the remote of every refusal that has one: the rate limiter charges its source.
        self.on_refusal: Callable[[object], None] | None = None
        # Told the remote of a request that looked refusable but was not (driver_core/rate_limit.py).
        self.on_cleared: Callable[[object], None] | None = None
        # Asked whether a failed verification is answered (driver_core/rate_limit.py).
        self.on_decryption_failure: Callable[[object, bytes, str | None], bool] | None = None

    def count(self, reason: str) -> None:
        """Count without a log line: a flood must not turn into a flood of log lines."""
        self.counts[reason] += 1

    def cleared(self, remote: object) -> None:
        """A request naming a kid the driver had not cached came from an enrolled device."""
        if self.on_cleared is not None:
            self.on_cleared(remote)

    def decryption_failed(self, remote: object, kid: bytes, serial: str | None) -> bool:
        """A request failed verification: recorded when answered; False: over budget, leave
        it unanswered (counted by the limiter, no line of its own)."""
        hook = self.on_decryption_failure
        if hook is not None and not hook(remote, kid, serial):
            return False
        self.record(DECRYPTION_FAILED, remote=remote, kid=kid, serial=serial)
        return True

    def record(
        self, reason: str, *, remote: object = None, kid: bytes | None = None, serial: str | None = None, detail: str = ""
    ) -> None:
        self.counts[reason] += 1
        if remote is not None and self.on_refusal is not None and reason != RATE_LIMITED:
            self.on_refusal(remote)
        kid_hex = kid.hex() if kid is not None else None
        where = str(remote) if remote is not None else None
        _LOGGER.warning(
            "refused reason=%s serial=%s kid=%s remote=%s%s",
            reason,
            serial or "-",
            kid_hex or "-",
            where or "-",
            f" detail={detail}" if detail else "",
            # The same facts as fields, for the JSON log format (driver_core/logs.py).
            extra={
                "event": "refused",
                "reason": reason,
                "serial": serial,
                "kid": kid_hex,
                "remote": where,
                "detail": detail or None,
            },
        )
