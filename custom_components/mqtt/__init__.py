"""MQTT integration: publishes every uplink document on the uplink topic.

The core commits each document to the outbox table before announcing the
uplink; this integration only moves rows from that table to the broker, so a
broker outage, a restart or a settings change never loses a message.

Interface used by the driver core:
    integration = await async_setup(driver, settings)
    await integration.async_reload(settings)
    await integration.async_unload()
    integration.status -> {"connected", "broker", "outbox", "published", "last_error"}
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable
from typing import Any

import aiomqtt

from driver_core.broker import BrokerError, BuiltinBroker
from driver_core.events import EVENT_UPLINK

from .config_flow import (
    BROKER_BUILTIN,
    SETTINGS_SCHEMA,
    SettingsError,
    async_validate,
    async_validated,
)
from .connection import (
    OFFLINE,
    ONLINE,
    connection_key,
    describe_error,
    endpoint,
    make_client,
    new_client_id,
)
from .outbox import Outbox
from .publisher import OutboxPublisher
from .topic import TopicTemplate

__all__ = [
    "SETTINGS_SCHEMA",
    "BrokerError",
    "MqttIntegration",
    "SettingsError",
    "async_setup",
    "async_validate",
]

_LOGGER = logging.getLogger(__name__)

DOMAIN = "mqtt"
WINDOW = 100  # publishes awaiting their acknowledgement at once
BACKOFF_MIN_S = 0.5
BACKOFF_MAX_S = 10.0
STOP_TIMEOUT_S = 8.0
STATUS_PUBLISH_TIMEOUT_S = 2.0


async def async_setup(driver: Any, settings: dict[str, Any] | None) -> MqttIntegration:
    """Validate `settings`, start the built-in broker if chosen, connect and publish.

    Raises SettingsError (invalid settings) or BrokerError (built-in broker cannot start).
    """
    integration = MqttIntegration(driver, await async_validated(settings))
    await integration.async_start()
    return integration


class MqttIntegration:
    def __init__(self, driver: Any, settings: dict[str, Any]) -> None:
        self._driver = driver
        self._settings = settings
        self._client_id = new_client_id(settings)
        self._broker: BuiltinBroker | None = None
        self._publisher = OutboxPublisher(
            Outbox(driver.db),
            TopicTemplate(settings["uplink_topic"]),
            settings["qos"],
            window=WINDOW,
            on_change=self._changed,
            on_error=self._report_error,
        )
        self._runner: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._unlisten: Callable[[], None] | None = None
        self._connected = False
        self._last_error: str | None = None
        self._change = asyncio.Event()
        self._reload_lock = asyncio.Lock()

    # ---- status ------------------------------------------------------------------

    @property
    def settings(self) -> dict[str, Any]:
        return dict(self._settings)

    @property
    def status(self) -> dict[str, Any]:
        return {
            "connected": self._connected,
            "broker": endpoint(self._settings).label,
            "outbox": self._publisher.waiting,
            "published": self._publisher.published,
            "last_error": self._last_error,
        }

    def _changed(self) -> None:
        change, self._change = self._change, asyncio.Event()
        change.set()

    def _report_error(self, message: str | None) -> None:
        self._last_error = message
        self._changed()

    async def async_wait_status(
        self, predicate: Callable[[dict[str, Any]], bool], within: float = 10.0
    ) -> dict[str, Any]:
        """Wait until `predicate(status)` holds (for the web panel, the CLI and tests)."""
        async with asyncio.timeout(within):
            while not predicate(status := self.status):
                await self._change.wait()
        return status

    # ---- lifecycle ---------------------------------------------------------------

    async def async_start(self) -> None:
        if self._settings["broker"] == BROKER_BUILTIN:
            self._broker = await self._start_builtin(self._settings)
        try:
            await self._publisher.start()
        except BaseException:
            if self._broker is not None:
                await self._broker.stop()
                self._broker = None
            raise
        self._unlisten = self._driver.bus.listen(EVENT_UPLINK, self._on_uplink)
        self._start_runner()

    async def async_unload(self) -> None:
        if self._unlisten is not None:
            self._unlisten()
            self._unlisten = None
        await self._stop_runner()
        await self._publisher.close()
        if self._broker is not None:
            await self._broker.stop()
            self._broker = None

    async def async_reload(self, settings: dict[str, Any] | None) -> None:
        """Apply new settings live: topic and QoS at the next publish, a broker by reconnecting.

        Raises SettingsError or BrokerError and keeps running as before when they cannot apply.
        """
        new = await async_validated(settings)
        async with self._reload_lock:
            old = self._settings
            topic = TopicTemplate(new["uplink_topic"])
            if connection_key(new) == connection_key(old):
                self._settings = new
                self._publisher.topic = topic
                self._publisher.qos = new["qos"]
                self._changed()
                return
            await self._switch(old, new)
            self._publisher.topic = topic
            self._publisher.qos = new["qos"]
            self._changed()

    async def _switch(self, old: dict[str, Any], new: dict[str, Any]) -> None:
        """Reconnect with `new`, starting or stopping the built-in broker as needed."""
        want_builtin = new["broker"] == BROKER_BUILTIN
        same_broker = (
            self._broker is not None
            and want_builtin
            and (self._broker.host, self._broker.port) == (new["builtin_host"], new["builtin_port"])
        )
        port_reused = (
            self._broker is not None and want_builtin and self._broker.port == new["builtin_port"]
        )
        fresh: BuiltinBroker | None = None
        if want_builtin and not same_broker and not port_reused:
            fresh = await self._start_builtin(new)  # fails before anything is torn down
        await self._stop_runner()
        if self._broker is not None and not same_broker:
            await self._broker.stop()
            self._broker = None
        if want_builtin and not same_broker and port_reused:
            try:
                fresh = await self._start_builtin(new)
            except BrokerError:
                self._broker = await self._start_builtin(old)
                self._start_runner()
                raise
        if fresh is not None:
            self._broker = fresh
        if new["client_id"] != old["client_id"]:
            self._client_id = new_client_id(new)
        self._settings = new
        self._connected = False
        self._last_error = None
        self._start_runner()

    async def _start_builtin(self, settings: dict[str, Any]) -> BuiltinBroker:
        broker = BuiltinBroker(settings["builtin_host"], settings["builtin_port"])
        try:
            await broker.start()
        except BrokerError as exc:
            self._report_error(str(exc))
            raise
        return broker

    def _on_uplink(self, uplink: Any) -> None:
        self._publisher.notify()
        self._changed()

    def _start_runner(self) -> None:
        self._stop = asyncio.Event()
        self._runner = asyncio.create_task(
            self._run(dict(self._settings), self._stop), name="mqtt-connection"
        )

    async def _stop_runner(self) -> None:
        runner, self._runner = self._runner, None
        if runner is None:
            return
        self._stop.set()
        try:
            await asyncio.wait_for(asyncio.shield(runner), STOP_TIMEOUT_S)
        except TimeoutError:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
        except Exception:  # the runner never raises on purpose; keep unload going
            _LOGGER.exception("MQTT connection task failed")
        self._connected = False
        self._changed()

    # ---- connection --------------------------------------------------------------

    async def _run(self, settings: dict[str, Any], stop: asyncio.Event) -> None:
        """Stay connected to the broker of `settings` until `stop`, reconnecting with backoff."""
        backoff = BACKOFF_MIN_S
        while not stop.is_set():
            try:
                async with make_client(settings, self._client_id, WINDOW) as client:
                    self._connected = True
                    self._last_error = None
                    self._changed()
                    _LOGGER.info("Connected to MQTT broker %s", endpoint(settings).address)
                    backoff = BACKOFF_MIN_S
                    await self._session(client, settings, stop)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                message = describe_error(exc, settings)
                if message != self._last_error:
                    _LOGGER.warning("MQTT: %s", message)
                self._connected = False
                self._last_error = message
                self._changed()
            self._connected = False
            self._changed()
            if stop.is_set():
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), backoff * (1 + random.random() / 5))
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    async def _session(self, client: aiomqtt.Client, settings: dict[str, Any], stop: asyncio.Event) -> None:
        """One connection: announce online, publish the outbox, announce offline on a clean stop."""
        status_topic = settings["status_topic"]
        await client.publish(status_topic, ONLINE, qos=1, retain=True)
        publishing = asyncio.create_task(self._publisher.run(client, stop))
        watching = asyncio.create_task(_until_disconnected(client))
        try:
            await asyncio.wait({publishing, watching}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (publishing, watching):
                task.cancel()
            results = await asyncio.gather(publishing, watching, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException) and not isinstance(
                result, asyncio.CancelledError
            ):
                raise result
        if stop.is_set():
            with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
                await client.publish(
                    status_topic, OFFLINE, qos=1, retain=True, timeout=STATUS_PUBLISH_TIMEOUT_S
                )


async def _until_disconnected(client: aiomqtt.Client) -> None:
    """Raises MqttError when the connection drops (the driver subscribes to nothing)."""
    async for _message in client.messages:
        pass
