"""A tiny in-process event bus: the core announces, integrations listen.

Listeners are plain callables run synchronously in the publisher's task; a
listener that needs I/O puts the event on its own queue. A failing listener is
logged and never disturbs the others or the CoAP path.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable
from typing import Any

_LOGGER = logging.getLogger(__name__)

EVENT_UPLINK = "uplink"
EVENT_DOWNLINK_STATE = "downlink_state"
EVENT_REFUSED = "refused"
EVENT_FOTA_STATE = "fota_state"  # driver_core.fota.service.FotaStateEvent

Listener = Callable[[Any], None]


class EventBus:
    def __init__(self) -> None:
        self._listeners: dict[str, list[Listener]] = defaultdict(list)

    def listen(self, event_type: str, listener: Listener) -> Callable[[], None]:
        """Register `listener`; returns a function that removes it again."""
        self._listeners[event_type].append(listener)

        def remove() -> None:
            if listener in self._listeners[event_type]:
                self._listeners[event_type].remove(listener)

        return remove

    def fire(self, event_type: str, event: Any) -> None:
        for listener in list(self._listeners.get(event_type, ())):
            try:
                listener(event)
            except Exception:  # a listener's bug must not break the device path
                _LOGGER.exception("Listener %r failed on %s event", listener, event_type)
