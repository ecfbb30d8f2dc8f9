"""The two timestamp spellings of the MQTT payload (see docs/mqtt.md).

`rx_date` is written like ``2025-09-04T06:45:36+00:00`` while `join_date` and
`last_seen` are written like ``2025-08-01T15:20:24.000Z``; users parse both, so
both are kept exactly as documented.
"""

from __future__ import annotations

from datetime import UTC, datetime


def utcnow() -> datetime:
    """Timezone-aware now, the only clock the driver reads."""
    return datetime.now(UTC)


def rx_date(moment: datetime) -> str:
    """``2025-09-04T06:45:36+00:00``: seconds precision, explicit offset."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S+00:00")


def zulu_millis(moment: datetime | None) -> str | None:
    """``2025-08-01T15:20:24.000Z``: millisecond precision, ``Z`` suffix."""
    if moment is None:
        return None
    moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
