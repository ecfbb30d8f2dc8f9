"""Per-device state for Home Assistant: the retained JSON document and the availability clock.

The document is what every discovered entity reads (`value_json.data.<field>`,
`value_json.config.<configuration>`, `value_json.downlink`, timestamps). Its
`data` merges the latest values of the device's recent data uplinks, so a
partial uplink never blanks an entity, and it is retained so Home Assistant
shows the values again after its own restart.

Availability follows driver_core.availability: a device is online until its
expected next transmission is missed by the grace margin. Deadlines sit in a
heap, so the periodic check costs only the devices that are actually due.
"""

from __future__ import annotations

import heapq
import json
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from driver_core import availability
from driver_core.timefmt import zulu_millis

from .discovery import DeviceRecord

ONLINE = "online"
OFFLINE = "offline"
TX_INTERVAL_COMMAND = "tx_interval"


@dataclass(slots=True)
class Tracked:
    """What is kept in memory for every enrolled device (small: the fleet can be large)."""

    device_id: int
    serial: str
    hw_type: int
    firmware: str | None
    join_date: datetime | None
    last_seen: datetime | None
    tx_interval: int
    uplinks_since_join: int
    availability: str | None = None  # last published
    deadline: datetime | None = None  # online until then

    @classmethod
    def from_record(cls, device: DeviceRecord) -> Tracked:
        return cls(
            device_id=device.device_id,
            serial=device.serial,
            hw_type=device.hw_type,
            firmware=device.firmware,
            join_date=device.join_date,
            last_seen=device.last_seen,
            tx_interval=device.tx_interval,
            uplinks_since_join=device.uplinks_since_join,
        )

    def availability_at(self, now: datetime, grace: timedelta) -> str:
        status = availability.status(
            now, self.last_seen, self.uplinks_since_join, self.tx_interval, grace
        )
        return ONLINE if status == "online" else OFFLINE

    def online_until(self, grace: timedelta) -> datetime | None:
        expected = availability.expected_next(
            self.last_seen, self.uplinks_since_join, self.tx_interval
        )
        return None if expected is None else expected + grace


@dataclass(slots=True)
class StateDocument:
    """The retained state of one device, as published."""

    serial: str
    hw_type: int
    firmware: str | None = None
    join_date: datetime | None = None
    last_seen: datetime | None = None
    data: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    downlink: dict[str, Any] | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "serial": self.serial,
            "hw_type": self.hw_type,
            "firmware": self.firmware,
            "join_date": zulu_millis(self.join_date),
            "last_seen": zulu_millis(self.last_seen),
            "data": self.data,
            "config": self.config,
            "downlink": self.downlink,
        }

    @property
    def empty(self) -> bool:
        """Nothing to show yet (never seen, no downlink): not published, so Home Assistant
        keeps such entities "unknown" instead of parsing empty timestamps."""
        return self.last_seen is None and self.downlink is None and not self.config and not self.data

    def payload(self) -> bytes:
        return json.dumps(self.as_json(), separators=(",", ":"), ensure_ascii=False).encode()


class DocumentCache:
    """The most recently used state documents (the rest are rebuilt from the database)."""

    def __init__(self, size: int = 10_000) -> None:
        self._size = size
        self._docs: OrderedDict[str, StateDocument] = OrderedDict()

    def get(self, serial: str) -> StateDocument | None:
        doc = self._docs.get(serial)
        if doc is not None:
            self._docs.move_to_end(serial)
        return doc

    def put(self, doc: StateDocument) -> None:
        self._docs[doc.serial] = doc
        self._docs.move_to_end(doc.serial)
        while len(self._docs) > self._size:
            self._docs.popitem(last=False)

    def pop(self, serial: str) -> None:
        self._docs.pop(serial, None)

    def clear(self) -> None:
        self._docs.clear()


class Deadlines:
    """Online devices by the moment they turn offline (a heap with lazy deletion)."""

    def __init__(self) -> None:
        self._heap: list[tuple[datetime, str]] = []

    def push(self, when: datetime, serial: str) -> None:
        heapq.heappush(self._heap, (when, serial))

    def due(self, now: datetime) -> list[str]:
        """Serials whose deadline passed (the caller checks they are still current)."""
        serials = []
        while self._heap and self._heap[0][0] < now:
            serials.append(heapq.heappop(self._heap)[1])
        return serials

    def clear(self) -> None:
        self._heap.clear()
