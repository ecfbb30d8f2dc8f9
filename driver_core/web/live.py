"""Live updates for a device page: server-sent events fed by the driver's event bus.

The bus calls listeners synchronously in the CoAP path, so a listener only puts
the event on each interested stream's bounded queue. A stream that falls behind
is closed; the browser's EventSource reconnects and the page reloads what it
missed. On shutdown every stream ends so the HTTP server stops at once.
"""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from driver_core.downlinks import DownlinkStateEvent
from driver_core.events import EVENT_DOWNLINK_STATE, EVENT_FOTA_STATE, EVENT_UPLINK, EventBus
from driver_core.uplink import Uplink

QUEUE_SIZE = 256
HEARTBEAT_S = 15.0
RETRY_MS = 2000


class Stream:
    def __init__(self, serial: str) -> None:
        self.serial = serial
        self.queue: asyncio.Queue[tuple[str, Any] | None] = asyncio.Queue(QUEUE_SIZE)

    def put(self, item: tuple[str, Any] | None) -> None:
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:  # too slow a reader: end it, the browser reconnects
            while not self.queue.empty():
                self.queue.get_nowait()
            self.queue.put_nowait(None)


class LiveHub:
    def __init__(self, bus: EventBus) -> None:
        self._streams: set[Stream] = set()
        self._unlisten: list[Callable[[], None]] = [
            bus.listen(EVENT_UPLINK, self._on_uplink),
            bus.listen(EVENT_DOWNLINK_STATE, self._on_downlink),
            bus.listen(EVENT_FOTA_STATE, self._on_fota),
        ]

    def _send(self, serial: str, item: tuple[str, Any]) -> None:
        for stream in self._streams:
            if stream.serial == serial:
                stream.put(item)

    def _on_uplink(self, uplink: Uplink) -> None:
        self._send(uplink.serial, ("uplink", uplink))

    def _on_downlink(self, event: DownlinkStateEvent) -> None:
        self._send(event.serial, ("downlink", event.downlink))

    def _on_fota(self, event: Any) -> None:  # driver_core.fota.FotaStateEvent
        self._send(event.serial, ("fota", event))

    def open(self, serial: str) -> Stream:
        stream = Stream(serial)
        self._streams.add(stream)
        return stream

    def close(self, stream: Stream) -> None:
        self._streams.discard(stream)

    @property
    def count(self) -> int:
        return len(self._streams)

    async def shutdown(self, _app: web.Application | None = None) -> None:
        for stream in list(self._streams):
            stream.put(None)

    async def cleanup(self, _app: web.Application | None = None) -> None:
        for unlisten in self._unlisten:
            unlisten()
        self._unlisten.clear()


def sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def serve(
    request: web.Request,
    hub: LiveHub,
    serial: str,
    render: Callable[[str, Any], dict[str, Any] | None | Awaitable[dict[str, Any] | None]],
) -> web.StreamResponse:
    """Stream ``render(kind, event)`` (plain or awaitable) for the events of ``serial`` until the client leaves."""
    stream = hub.open(serial)  # before the headers: nothing after "open" is missed
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-store",
            "X-Accel-Buffering": "no",
            "X-Content-Type-Options": "nosniff",
        }
    )
    try:
        await response.prepare(request)
        await response.write(f"retry: {RETRY_MS}\n: connected\n\n".encode())
        while True:
            try:
                item = await asyncio.wait_for(stream.queue.get(), HEARTBEAT_S)
            except TimeoutError:
                await response.write(b": keep-alive\n\n")
                continue
            if item is None:
                break
            data = render(*item)
            if inspect.isawaitable(data):  # e.g. the firmware status, read again on change
                data = await data
            if data is not None:
                await response.write(sse(item[0], data))
    except (ConnectionResetError, ConnectionError):
        pass
    finally:
        hub.close(stream)
    return response
