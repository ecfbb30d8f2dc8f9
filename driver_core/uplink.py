"""The uplink event and its MQTT document (payload version 2)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from .timefmt import rx_date, zulu_millis

PAYLOAD_PROTOCOL = 2


@dataclass(slots=True)
class Uplink:
    """One accepted device request, as every integration sees it."""

    serial: str
    hw_type: int
    message_type: str  # the CoAP resource: join, rx, ack, fota
    rx_date: datetime
    join_date: datetime | None
    last_seen: datetime | None  # the previous uplink, before this one
    data: dict[str, Any] = field(default_factory=dict)
    outbox_id: int | None = None  # row of the durable outbox holding the document
    document_json: str | None = None  # the document as stored in that row

    def document(self) -> dict[str, Any]:
        """The JSON object published on the uplink topic, field for field as documented."""
        return {
            "protocol": PAYLOAD_PROTOCOL,
            "rx_date": rx_date(self.rx_date),
            "hw_type": str(self.hw_type),
            "message_type": self.message_type,
            "serial": self.serial,
            "join_date": zulu_millis(self.join_date),
            "last_seen": zulu_millis(self.last_seen),
            "data": self.data,
        }
