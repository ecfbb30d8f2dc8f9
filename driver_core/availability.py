"""When a device should speak next, and whether it is online, late or offline.

The transmission scheme (PROTOCOL.md): after a JOIN, three /rx about 5 minutes
apart, then one every tx_interval. A device is *online* until its expected
transmission is missed by the grace margin, *late* while it has missed less
than two further intervals, then *offline*.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Literal

FIRST_INTERVAL = timedelta(minutes=5)
FIRST_TRANSMISSIONS = 3
LATE_INTERVALS = 2

Status = Literal["online", "late", "offline", "never_seen"]


def next_interval(uplinks_since_join: int, tx_interval_minutes: int) -> timedelta:
    if uplinks_since_join < FIRST_TRANSMISSIONS:
        return FIRST_INTERVAL
    return timedelta(minutes=tx_interval_minutes)


def expected_next(
    last_seen: datetime | None, uplinks_since_join: int, tx_interval_minutes: int
) -> datetime | None:
    if last_seen is None:
        return None
    return last_seen + next_interval(uplinks_since_join, tx_interval_minutes)


def status(
    now: datetime,
    last_seen: datetime | None,
    uplinks_since_join: int,
    tx_interval_minutes: int,
    grace: timedelta,
) -> Status:
    expected = expected_next(last_seen, uplinks_since_join, tx_interval_minutes)
    if expected is None:
        return "never_seen"
    deadline = expected + grace
    if now <= deadline:
        return "online"
    if now <= deadline + LATE_INTERVALS * timedelta(minutes=tx_interval_minutes):
        return "late"
    return "offline"
