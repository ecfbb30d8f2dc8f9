"""The transmission scheme turned into online / late / offline."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from driver_core.availability import expected_next, status

SEEN = datetime(2025, 9, 4, 6, 0, tzinfo=UTC)
GRACE = timedelta(minutes=15)


def test_first_three_transmissions_are_five_minutes_apart_then_tx_interval():
    assert expected_next(SEEN, 0, 60) == SEEN + timedelta(minutes=5)
    assert expected_next(SEEN, 2, 60) == SEEN + timedelta(minutes=5)
    assert expected_next(SEEN, 3, 60) == SEEN + timedelta(minutes=60)
    assert expected_next(None, 3, 60) is None


@pytest.mark.parametrize(
    ("minutes_after", "expected"),
    [(0, "online"), (75, "online"), (76, "late"), (195, "late"), (196, "offline")],
)
def test_status_from_the_expected_transmission_and_grace(minutes_after, expected):
    now = SEEN + timedelta(minutes=minutes_after)
    assert status(now, SEEN, 5, 60, GRACE) == expected


def test_never_seen():
    assert status(SEEN, None, 0, 60, GRACE) == "never_seen"
