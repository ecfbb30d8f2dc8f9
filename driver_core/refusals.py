"""Counting and logging refused requests: one log line per refusal, one counter per reason.

The line is structured: in the JSON log format it carries ``event: refused``,
``reason``, ``serial``, ``kid``, ``remote`` and ``detail`` as fields. Nothing
secret is known here (a kid travels in clear on the wire).
"""

from __future__ import annotations

import logging
from collections import Counter

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


class Refusals:
    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def record(
        self, reason: str, *, remote: object = None, kid: bytes | None = None, serial: str | None = None, detail: str = ""
    ) -> None:
        self.counts[reason] += 1
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


class UnparsableDatagramCounter(logging.Filter):
    """aiocoap drops undecodable datagrams with a log line; count them as refusals."""

    def __init__(self, refusals: Refusals) -> None:
        super().__init__()
        self._refusals = refusals

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == "Ignoring unparsable message from %s":
            self._refusals.record(MALFORMED_DATAGRAM, remote=record.args[0] if record.args else None)
            return False  # our own line replaces aiocoap's
        return True
