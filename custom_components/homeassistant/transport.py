"""The broker connection, borrowed from the mqtt integration.

Discovery goes to the broker the mqtt integration is connected to, over its
connection: one client, one last will (`coap-driver/status`), and a broker
switch in the mqtt settings moves Home Assistant's devices along with the
uplinks. The mqtt integration may be set up after this one, or replaced by a
settings change, so it is looked up on every use.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

DEFAULT_STATUS_TOPIC = "coap-driver/status"
DEFAULT_COMMAND_TOPIC = "application/COAP/device/{{serial}}/downlink"

MessageCallback = Callable[[str, bytes, bool], None]


class NotConnected(Exception):
    """No broker connection right now; the caller waits for the next one."""


class MqttTransport:
    """Publish, subscribe and connection events through the running mqtt integration."""

    def __init__(self, driver: Any, on_connect: Callable[[], None], on_change: Callable[[], None]):
        self._driver = driver
        self._on_connect = on_connect
        self._on_change = on_change  # the mqtt integration appeared or went away
        self._handle: Any = None
        self._detach: list[Callable[[], None]] = []
        self._subscriptions: dict[str, MessageCallback] = {}
        self._unsubscribe: dict[str, Callable[[], None]] = {}
        self._ready = False  # the connect listener ran for the current connection

    @property
    def mqtt(self) -> Any:
        """The running mqtt integration (attaching to it when it is new), or None."""
        manager = getattr(self._driver, "integrations", None)
        handle = manager.running.get("mqtt") if manager is not None else None
        if handle is not self._handle:
            self._attach(handle)
        return handle

    @property
    def connected(self) -> bool:
        """A connection whose connect listeners have run (so nothing is published twice)."""
        handle = self.mqtt
        if handle is None or not handle.status.get("connected"):
            self._ready = False
        return self._ready

    def _connected(self) -> None:
        self._ready = True
        self._on_connect()

    @property
    def settings(self) -> dict[str, Any]:
        handle = self.mqtt
        return handle.settings if handle is not None else {}

    @property
    def status_topic(self) -> str:
        return self.settings.get("status_topic") or DEFAULT_STATUS_TOPIC

    @property
    def command_topic(self) -> str:
        return self.settings.get("downlink_command_topic") or DEFAULT_COMMAND_TOPIC

    def _attach(self, handle: Any) -> None:
        self._detach_all()
        self._handle = handle
        self._ready = False
        if handle is not None:
            for topic_filter, callback in self._subscriptions.items():
                self._unsubscribe[topic_filter] = handle.subscribe(topic_filter, callback)
            # Called at once when the connection is already up.
            self._detach.append(handle.add_connect_listener(self._connected))
        self._on_change()

    def subscribe(self, topic_filter: str, callback: MessageCallback) -> None:
        """Keep `topic_filter` subscribed across reconnects and broker switches."""
        self._subscriptions[topic_filter] = callback
        handle = self.mqtt
        if handle is not None and topic_filter not in self._unsubscribe:
            self._unsubscribe[topic_filter] = handle.subscribe(topic_filter, callback)

    def unsubscribe(self, topic_filter: str) -> None:
        self._subscriptions.pop(topic_filter, None)
        remove = self._unsubscribe.pop(topic_filter, None)
        if remove is not None:
            remove()

    def _detach_all(self) -> None:
        for detach in [*self._detach, *self._unsubscribe.values()]:
            detach()
        self._detach = []
        self._unsubscribe = {}

    async def publish(self, topic: str, payload: bytes, *, retain: bool, qos: int = 1) -> None:
        handle = self.mqtt
        if handle is None:
            raise NotConnected("the mqtt integration is not running")
        try:
            await handle.publish(topic, payload, qos=qos, retain=retain)
        except Exception as exc:  # any failure means: not delivered on this connection
            raise NotConnected(str(exc) or type(exc).__name__) from exc

    def close(self) -> None:
        self._detach_all()
        self._handle = None
        self._subscriptions.clear()
