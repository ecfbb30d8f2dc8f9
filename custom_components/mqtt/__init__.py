"""MQTT integration: uplinks out, downlink states out, downlink commands in.

The core commits each uplink document to the outbox table and each downlink
state change to the downlink_events table before announcing them; this
integration only moves rows from those tables to the broker (uplink topic,
downlink status topic), so a broker outage, a restart or a settings change
never loses a message. It also subscribes to the command topic and hands each
command to the downlink queue; a refused one is reported on the status topic.

Interface used by the driver core:
    integration = await async_setup(driver, settings)
    await integration.async_reload(settings)
    await integration.async_drain(within)  # a clean stop: publish the outbox first
    await integration.async_unload()
    integration.status -> {"connected", "broker", "outbox", "published", "last_error"}
    integration.downlink_status -> {"subscribed", "subscription_error", "status_waiting",
        "status_published", "commands_accepted", "commands_rejected", "commands_ignored",
        "reports_published"}

Interface for other integrations sharing the connection (homeassistant):
    await integration.publish(topic, payload, qos=1, retain=False)  # MqttError if not connected
    remove = integration.subscribe(topic_filter, callback)  # callback(topic, payload, retain)
    remove = integration.add_connect_listener(listener)  # after every (re)connection
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from collections.abc import Callable
from typing import Any

import aiomqtt

from driver_core.broker import BrokerError, BuiltinBroker
from driver_core.cluster import EVENT_DOWNLINK_ROWS, EVENT_OUTBOX_ADOPTED
from driver_core.events import EVENT_DOWNLINK_STATE, EVENT_FOTA_STATE, EVENT_UPLINK
from driver_core.integration_base import SettingsError, WatchableStatus
from driver_core.timefmt import utcnow

from .builtin import credential_store, make_broker, own_credentials, ports, wanted_ports
from .commands import CommandReceiver, Refusal
from .config_flow import (
    BROKER_BUILTIN,
    SETTINGS_SCHEMA,
    async_validate,
    async_validated,
)
from .connection import (
    OFFLINE,
    ONLINE,
    builtin_key,
    connection_key,
    describe_error,
    endpoint,
    make_client,
    new_client_id,
)
from .outbox import Outbox
from .publisher import OutboxPublisher
from .status import BATCH as STATUS_BATCH
from .status import StatusPublisher, StatusStore, error_payload
from .topic import CommandTopic, TopicTemplate

__all__ = [
    "SETTINGS_SCHEMA",
    "BrokerError",
    "MqttIntegration",
    "SettingsError",
    "async_setup",
    "async_validate",
]

_LOGGER = logging.getLogger(__name__)
SHARED_SUBSCRIPTION_GROUP = "$share/coap-driver"  # cluster mode: one instance per command

MessageCallback = Callable[[str, bytes, bool], None]

DOMAIN = "mqtt"
WINDOW = 100  # publishes awaiting their acknowledgement at once
BACKOFF_MIN_S = 0.5
BACKOFF_MAX_S = 10.0
STOP_TIMEOUT_S = 8.0
STATUS_PUBLISH_TIMEOUT_S = 2.0
SUBSCRIBE_TIMEOUT_S = 10.0
REPORT_WINDOW = 20  # refusal reports awaiting their acknowledgement at once
SHARED_WINDOW = 50  # publishes of other integrations (publish()) awaiting their acknowledgement
INFLIGHT = WINDOW + STATUS_BATCH + REPORT_WINDOW + SHARED_WINDOW  # status never queues uplinks


async def async_setup(driver: Any, settings: dict[str, Any] | None) -> MqttIntegration:
    """Validate `settings`, start the built-in broker if chosen, connect and publish.

    Raises SettingsError (invalid settings) or BrokerError (built-in broker cannot start).
    """
    integration = MqttIntegration(driver, await async_validated(settings))
    await integration.async_start()
    return integration


class MqttIntegration(WatchableStatus):
    def __init__(self, driver: Any, settings: dict[str, Any]) -> None:
        self._driver = driver
        self._settings = settings
        self._client_id = new_client_id(settings)
        self._broker: BuiltinBroker | None = None
        self._broker_key: tuple[Any, ...] | None = None
        self._credentials = None  # the built-in broker's users (CredentialStore), once started
        self._publisher = OutboxPublisher(
            Outbox(driver.db),
            TopicTemplate(settings["uplink_topic"]),
            settings["qos"],
            window=WINDOW,
            on_change=self._changed,
            on_error=self._report_error,
        )
        self._status_store = StatusStore(driver.db)
        self._status = StatusPublisher(
            self._status_store,
            TopicTemplate(settings["downlink_status_topic"]),
            settings["qos"],
            on_change=self._changed,
            on_error=self._report_error,
        )
        # A core without a downlink queue (tests of the uplink path) gets no subscription.
        queue = getattr(driver, "downlinks", None)
        self._receiver: CommandReceiver | None = None
        if queue is not None:
            self._receiver = CommandReceiver(
                queue,
                CommandTopic(settings["downlink_command_topic"]),
                lambda: (self._status.topic, self._publisher.topic),
                on_change=self._changed,
            )
        self._runner: asyncio.Task[None] | None = None
        self._stop_consuming: Callable[[], None] = lambda: None
        self._stop = asyncio.Event()
        self._unlisteners: list[Callable[[], None]] = []
        self._fota_topic = TopicTemplate(settings["fota_status_topic"])
        self._fota_tasks: set[asyncio.Task[None]] = set()
        self._connected = False
        self._last_error: str | None = None
        self._reload_lock = asyncio.Lock()
        self._client: aiomqtt.Client | None = None
        self._subscribed: tuple[str, int] | None = None
        self._subscription_error: str | None = None
        self._subscription_lock = asyncio.Lock()
        self._reports: set[asyncio.Task[None]] = set()
        self._report_slots = asyncio.Semaphore(REPORT_WINDOW)
        self.reports_published = 0
        # Other integrations (homeassistant) sharing this connection: see publish()/subscribe().
        self._shared_filters: dict[str, list[MessageCallback]] = {}
        self._connect_listeners: list[Callable[[], None]] = []
        self._session_ready = False  # connected, subscribed, connect listeners called
        self._shared_tasks: set[asyncio.Task[None]] = set()

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

    @property
    def downlink_status(self) -> dict[str, Any]:
        """The downlink side: command subscription, status messages, commands received."""
        receiver = self._receiver
        return {
            "subscribed": self._subscribed[0] if self._subscribed else None,
            "subscription_error": self._subscription_error,
            "status_waiting": self._status.waiting,
            "status_published": self._status.published,
            "commands_accepted": receiver.accepted if receiver else 0,
            "commands_rejected": receiver.rejected if receiver else 0,
            "commands_ignored": receiver.ignored if receiver else 0,
            "reports_published": self.reports_published,
        }

    def _report_error(self, message: str | None) -> None:
        self._last_error = message
        self._changed()

    async def async_wait_downlink_status(
        self, predicate: Callable[[dict[str, Any]], bool], within: float = 10.0
    ) -> dict[str, Any]:
        """Wait until `predicate(downlink_status)` holds (web panel, CLI, tests)."""
        async with asyncio.timeout(within):
            while not predicate(status := self.downlink_status):
                if self._change is None:
                    self._change = asyncio.Event()
                await self._change.wait()
        return status

    # ---- lifecycle ---------------------------------------------------------------

    async def async_start(self) -> None:
        if self._settings["broker"] == BROKER_BUILTIN and getattr(self._driver, "cluster", None):
            raise SettingsError(
                "broker: several driver instances (cluster) need one external broker they all "
                "use; set broker: external and url"
            )
        if self._settings["broker"] == BROKER_BUILTIN:
            self._broker = await self._start_builtin(self._settings)
        writer = getattr(self._driver, "writer", None)  # tests of the uplink path have none
        # From here on the writer fills the outbox for us (nothing is kept for nobody).
        self._stop_consuming = writer.add_outbox_consumer(DOMAIN) if writer else lambda: None
        try:
            await self._publisher.start()
            await self._status.start()
        except BaseException:
            self._stop_consuming()
            if self._broker is not None:
                await self._broker.stop()
                self._broker = None
            raise
        self._unlisteners = [
            self._driver.bus.listen(EVENT_UPLINK, self._on_uplink),
            self._driver.bus.listen(EVENT_DOWNLINK_STATE, self._on_downlink_state),
            # Cluster mode: rows committed by other instances, adopted or to lead.
            self._driver.bus.listen(EVENT_DOWNLINK_ROWS, self._on_downlink_state),
            self._driver.bus.listen(EVENT_OUTBOX_ADOPTED, lambda _count: self._publisher.notify()),
            self._driver.bus.listen(EVENT_FOTA_STATE, self._on_fota_state),
        ]
        self._start_runner()

    async def async_unload(self) -> None:
        self._stop_consuming()
        for unlisten in self._unlisteners:
            unlisten()
        self._unlisteners = []
        for task in list(self._fota_tasks):
            task.cancel()
        await self._stop_runner()
        await self._publisher.close()
        if self._broker is not None:
            await self._broker.stop()
            self._broker = None

    async def async_drain(self, within: float) -> None:
        """A clean stop of the driver: publish until the outbox is empty, at most `within` s.

        Called once no more uplinks can arrive; what is left stays in the table and is
        published after the next start.
        """
        if self._publisher.waiting:
            _LOGGER.info(
                "Stopping: publishing %d MQTT outbox row(s), up to %s s", self._publisher.waiting, within
            )
        try:
            await self.async_wait_status(lambda status: status["outbox"] == 0, within)
        except TimeoutError:
            _LOGGER.warning(
                "Stopping: %d MQTT outbox row(s) not published within %s s; they go out after "
                "the next start", self._publisher.waiting, within,
            )

    async def async_reload(self, settings: dict[str, Any] | None) -> None:
        """Apply new settings live: topic and QoS at the next publish, a broker by reconnecting.

        Raises SettingsError or BrokerError and keeps running as before when they cannot apply.
        """
        new = await async_validated(settings)
        async with self._reload_lock:
            old = self._settings
            topic = TopicTemplate(new["uplink_topic"])
            status_topic = TopicTemplate(new["downlink_status_topic"])
            command_topic = CommandTopic(new["downlink_command_topic"])
            if connection_key(new) == connection_key(old):
                self._settings = new
            else:
                await self._switch(old, new)
            self._publisher.topic = topic
            self._publisher.qos = new["qos"]
            self._status.topic = status_topic
            self._status.qos = new["qos"]
            self._fota_topic = TopicTemplate(new["fota_status_topic"])
            if self._receiver is not None:
                self._receiver.topic = command_topic
            self._changed()
        await self._sync_subscription()  # a new command topic or QoS applies on the live connection

    async def _switch(self, old: dict[str, Any], new: dict[str, Any]) -> None:
        """Reconnect with `new`, starting or stopping the built-in broker as needed."""
        want_builtin = new["broker"] == BROKER_BUILTIN
        same_broker = (
            self._broker is not None and want_builtin and self._broker_key == builtin_key(new)
        )
        port_reused = (
            self._broker is not None and want_builtin and bool(ports(self._broker) & wanted_ports(new))
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
        try:
            self._credentials = credential_store(self._driver)
            broker = make_broker(self._credentials, settings, lambda: self._settings)
            await broker.start()
        except BrokerError as exc:
            self._report_error(str(exc))
            raise
        self._broker_key = builtin_key(settings)
        return broker

    def _on_uplink(self, uplink: Any) -> None:
        self._publisher.notify(uplink)
        self._changed()

    def _on_downlink_state(self, event: Any) -> None:
        self._status.notify()
        self._changed()

    def _on_fota_state(self, event: Any) -> None:
        """A firmware update changed state or progressed: publish it (best effort, not queued).

        Not kept in the outbox: a status missed while disconnected is superseded by the
        next one, and the REST API has the current state.
        """
        try:
            topic = self._fota_topic.render_for(event.serial, str(event.hw_type))
        except (ValueError, KeyError, TypeError) as exc:
            _LOGGER.error("Firmware status topic gives no valid topic for %s: %s", event.serial, exc)
            return
        payload = json.dumps(event.as_json(), separators=(",", ":")).encode()
        task = asyncio.create_task(self._publish_fota(topic, payload))
        self._fota_tasks.add(task)
        task.add_done_callback(self._fota_tasks.discard)

    async def _publish_fota(self, topic: str, payload: bytes) -> None:
        try:
            await self.publish(topic, payload, qos=self._settings["qos"], retain=False)
        except (aiomqtt.MqttError, TimeoutError) as exc:
            _LOGGER.debug("MQTT: firmware status on %s not published: %s", topic, exc)

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
                credentials = own_credentials(self._credentials, settings)
                async with make_client(settings, self._client_id, INFLIGHT, credentials) as client:
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

    async def _session(
        self, client: aiomqtt.Client, settings: dict[str, Any], stop: asyncio.Event
    ) -> None:
        """One connection: announce online, subscribe to commands, publish both tables,
        announce offline on a clean stop."""
        status_topic = settings["status_topic"]
        await client.publish(status_topic, ONLINE, qos=1, retain=True)
        self._client = client
        try:
            await self._sync_subscription(on_connect=True)
            for topic_filter in list(self._shared_filters):
                await client.subscribe(topic_filter, qos=1, timeout=SUBSCRIBE_TIMEOUT_S)
            self._session_ready = True
            for listener in list(self._connect_listeners):
                self._call_listener(listener)
            publishing = asyncio.create_task(self._publisher.run(client, stop))
            statuses = asyncio.create_task(self._status.run(client, stop))
            receiving = asyncio.create_task(self._receive(client))
            tasks = (publishing, statuses, receiving)
            try:
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                if stop.is_set():  # both publishers drain what is on the wire
                    await asyncio.wait((publishing, statuses), timeout=STOP_TIMEOUT_S - 2)
            finally:
                for task in (*tasks, *self._reports):
                    task.cancel()
                results = await asyncio.gather(*tasks, *self._reports, return_exceptions=True)
        finally:
            self._client = None
            self._session_ready = False
            self._subscribed = None
            self._changed()
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

    # ---- commands ----------------------------------------------------------------

    def _wanted_subscription(self) -> tuple[str, int] | None:
        if self._receiver is None:
            return None
        topic_filter = self._receiver.topic.filter
        if getattr(self._driver, "cluster", None) is not None:
            # Several instances: a shared subscription hands each command to one of them.
            topic_filter = f"{SHARED_SUBSCRIPTION_GROUP}/{topic_filter}"
        return topic_filter, self._settings["qos"]

    async def _sync_subscription(self, on_connect: bool = False) -> None:
        """Make the live subscription match the command topic and QoS of the settings.

        At connect time a failure raises (the connection is retried); on a live
        change it is logged and the next reconnect subscribes again.
        """
        async with self._subscription_lock:
            client, current = self._client, self._subscribed
            wanted = self._wanted_subscription()
            if client is None or wanted == current:
                return
            try:
                if current is not None and (wanted is None or wanted[0] != current[0]):
                    await client.unsubscribe(current[0], timeout=SUBSCRIBE_TIMEOUT_S)
                    self._subscribed = None
                if wanted is not None:
                    granted = await client.subscribe(
                        wanted[0], qos=wanted[1], timeout=SUBSCRIBE_TIMEOUT_S
                    )
                    if any(int(getattr(code, "value", code)) >= 0x80 for code in granted):
                        self._subscription_error = (
                            f"the broker refused the subscription to {wanted[0]} "
                            "(check the broker's access rules for downlink_command_topic)"
                        )
                        _LOGGER.error("MQTT: %s", self._subscription_error)
                        return
                    _LOGGER.info("Receiving downlink commands on %s", wanted[0])
                self._subscribed = wanted
                self._subscription_error = None
            except (aiomqtt.MqttError, TimeoutError) as exc:
                if on_connect:
                    raise
                _LOGGER.warning("MQTT: cannot change the command subscription now: %s", exc)
            finally:
                self._changed()

    async def _receive(self, client: aiomqtt.Client) -> None:
        """Handle command messages until the connection drops (then raise MqttError)."""
        async for message in client.messages:
            payload = message.payload
            if isinstance(payload, str):
                payload = payload.encode()
            elif not isinstance(payload, bytes | bytearray):
                payload = b"" if payload is None else str(payload).encode()
            if self._shared_filters:
                self._deliver_shared(message.topic, bytes(payload), message.retain)
            receiver = self._receiver
            if receiver is None:
                continue
            try:
                refusal = await receiver.handle(str(message.topic), bytes(payload), message.retain)
                if refusal is not None:
                    await self._report(client, refusal)
            except aiomqtt.MqttError:
                raise
            except Exception:  # a bug must cost one message, never the connection
                _LOGGER.exception("MQTT: handling a command message on %s failed", message.topic)

    async def _report(self, client: aiomqtt.Client, refusal: Refusal) -> None:
        """Publish a refusal on the device's status topic without waiting for its ack."""
        hw_type = None
        if self._status.topic.uses_hw_type:
            with contextlib.suppress(Exception):  # unknown device or no database: no hw_type
                hw_type = await self._status_store.hw_type(refusal.serial)
        topic = self._status.topic_for(refusal.serial, hw_type)
        payload = error_payload(refusal.command_id, refusal.error, refusal.detail, utcnow())
        await self._report_slots.acquire()
        task = asyncio.create_task(self._publish_report(client, topic, payload))
        self._reports.add(task)
        task.add_done_callback(self._reports.discard)

    async def _publish_report(self, client: aiomqtt.Client, topic: str, payload: bytes) -> None:
        try:
            await client.publish(topic, payload, qos=self._status.qos)
        except (aiomqtt.MqttError, TimeoutError) as exc:
            _LOGGER.warning("MQTT: could not report a refused command on %s: %s", topic, exc)
        else:
            self.reports_published += 1
            self._changed()
        finally:
            self._report_slots.release()

    # ---- the connection shared with other integrations ------------------------------

    async def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> None:
        """Publish on the current connection (for other integrations, e.g. homeassistant).

        Raises aiomqtt.MqttError when there is no connection or it fails before the
        broker's acknowledgement: the caller publishes again after the next connect
        (see add_connect_listener).
        """
        client = self._client
        if client is None:
            raise aiomqtt.MqttError("not connected to the MQTT broker")
        await client.publish(topic, payload, qos=qos, retain=retain, timeout=SUBSCRIBE_TIMEOUT_S)

    def add_connect_listener(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Call `listener()` after every (re)connection (the broker may be a new one), and at
        once when a connection is already up.

        Returns a function removing the listener.
        """
        self._connect_listeners.append(listener)
        if self._session_ready:
            self._call_listener(listener)

        def remove() -> None:
            if listener in self._connect_listeners:
                self._connect_listeners.remove(listener)

        return remove

    @staticmethod
    def _call_listener(listener: Callable[[], None]) -> None:
        try:
            listener()
        except Exception:
            _LOGGER.exception("MQTT: a connect listener failed")

    def subscribe(self, topic_filter: str, callback: MessageCallback) -> Callable[[], None]:
        """Deliver messages matching `topic_filter` to `callback(topic, payload, retain)`.

        The subscription (QoS 1) survives reconnects and broker switches. The
        callback runs in the receiving task: it must be quick and must not raise.
        Returns a function removing the subscription.
        """
        callbacks = self._shared_filters.setdefault(topic_filter, [])
        callbacks.append(callback)
        if len(callbacks) == 1:
            self._shared_change(topic_filter, subscribe=True)

        def remove() -> None:
            current = self._shared_filters.get(topic_filter, [])
            if callback in current:
                current.remove(callback)
            if not current and topic_filter in self._shared_filters:
                del self._shared_filters[topic_filter]
                self._shared_change(topic_filter, subscribe=False)

        return remove

    def _shared_change(self, topic_filter: str, subscribe: bool) -> None:
        """(Un)subscribe on the live connection; the next connection does it anyway."""
        client = self._client
        if client is None:
            return

        async def change() -> None:
            try:
                if subscribe:
                    await client.subscribe(topic_filter, qos=1, timeout=SUBSCRIBE_TIMEOUT_S)
                else:
                    await client.unsubscribe(topic_filter, timeout=SUBSCRIBE_TIMEOUT_S)
            except (aiomqtt.MqttError, TimeoutError) as exc:
                _LOGGER.warning("MQTT: cannot change the subscription to %s now: %s", topic_filter, exc)

        task = asyncio.create_task(change())
        self._shared_tasks.add(task)
        task.add_done_callback(self._shared_tasks.discard)

    def _deliver_shared(self, topic: aiomqtt.Topic, payload: bytes, retain: bool) -> None:
        for topic_filter, callbacks in list(self._shared_filters.items()):
            if not topic.matches(topic_filter):
                continue
            for callback in list(callbacks):
                try:
                    callback(str(topic), payload, retain)
                except Exception:
                    _LOGGER.exception("MQTT: a subscriber of %s failed", topic_filter)
