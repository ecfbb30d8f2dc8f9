"""Home Assistant integration: MQTT discovery of every enrolled device, its state and availability.

Every enrolled device becomes a Home Assistant device with one entity per
family entity, a button per command, a number/select/text per configuration,
a valve where the family has one, a last-downlink sensor, and its last seen /
join date. Nothing is configured on the Home Assistant side: it only needs its
MQTT integration on the same broker.

What is published (retained, over the mqtt integration's connection):
- `<prefix>/<component>/<unique_id>/config` for every entity (discovery.py);
- the device's state document on `state_topic` (state.py), after every uplink
  and downlink state change;
- the device's `availability_topic`: online until its expected transmission is
  missed by the grace margin (`devices.grace_minutes`).

Everything is published again when the connection is (re)established, when
Home Assistant announces `online` on `<prefix>/status`, and when settings
change; a removed device gets empty configs (Home Assistant deletes it).

Interface used by the driver core:
    integration = await async_setup(driver, settings)
    await integration.async_reload(settings)
    await integration.async_unload()
    integration.status -> {"enabled", "connected", "devices", "online", "published",
                           "republishing", "last_error"}
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Iterable
from datetime import timedelta
from importlib import metadata
from typing import Any

from driver_core.downlinks import ACKNOWLEDGED, DownlinkStateEvent
from driver_core.events import EVENT_DOWNLINK_STATE, EVENT_UPLINK
from driver_core.integration_base import SettingsError, WatchableStatus
from driver_core.tasks import cancel_and_wait
from driver_core.timefmt import utcnow
from driver_core.uplink import Uplink

from .config_flow import DOMAIN, SETTINGS_SCHEMA, async_validate, async_validated
from .discovery import DeviceDiscovery, DeviceRecord, Driver, Topics
from .fleet import (
    PAGE,
    by_serial,
    confirmed_settings,
    downlink_summary,
    enrolled_ids,
    fleet_stamp,
    latest_data,
    latest_downlinks,
    merge,
    pages,
)
from .state import (
    ONLINE,
    TX_INTERVAL_COMMAND,
    Deadlines,
    DocumentCache,
    StateDocument,
    Tracked,
)
from .transport import MqttTransport, NotConnected

__all__ = [
    "DOMAIN",
    "SETTINGS_SCHEMA",
    "HomeAssistantIntegration",
    "SettingsError",
    "async_setup",
    "async_validate",
]

_LOGGER = logging.getLogger(__name__)

WINDOW = 50  # publishes awaiting their acknowledgement at once
FLEET_CHECK_S = 5.0  # how often enrollments and removals made elsewhere are noticed
WATCH_S = 1.0  # how often the mqtt integration's presence and topics are looked at
MQTT_GRACE_S = 10.0  # the mqtt integration may be set up after this one
DEFAULT_GRACE_MINUTES = 15
EMPTY = b""


async def async_setup(driver: Any, settings: dict[str, Any] | None) -> HomeAssistantIntegration:
    """Validate `settings` and start publishing discovery. Raises SettingsError."""
    integration = HomeAssistantIntegration(driver, await async_validated(settings))
    integration.async_start()
    return integration


def _version() -> str:
    try:
        return metadata.version("coap-driver")
    except metadata.PackageNotFoundError:
        return "0"


class HomeAssistantIntegration(WatchableStatus):
    def __init__(self, driver: Any, settings: dict[str, Any]) -> None:
        self._driver = driver
        self._settings = settings
        self._transport = MqttTransport(driver, self._on_connect, self._wake)
        self._tracked: dict[str, Tracked] = {}
        self._by_id: dict[int, str] = {}
        self._docs = DocumentCache()
        self._deadlines = Deadlines()
        self._uplinks: list[Uplink] = []
        self._downlink_events: list[DownlinkStateEvent] = []
        self._dirty_configs: set[str] = set()
        self._dirty_states: set[str] = set()
        self._dirty_availability: set[str] = set()
        self._removed: dict[str, int] = {}  # serial -> hw_type
        self._clearing = False  # the removed devices' empty retained messages are on their way
        self._full = True  # everything must be (re)published
        self._clear_all = False  # disabled: remove every device from Home Assistant
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._unlisteners: list[Callable[[], None]] = []
        self._loaded = False
        self._fleet_stamp: tuple[int, int | None] | None = None
        self._used_topics: tuple[str, str] | None = None
        self.published = 0
        self.republishing = False
        self._last_error: str | None = None

    # ---- status --------------------------------------------------------------------

    @property
    def settings(self) -> dict[str, Any]:
        return dict(self._settings)

    @property
    def status(self) -> dict[str, Any]:
        return {
            "enabled": self._settings["enabled"],
            "connected": self._transport.connected,
            "devices": len(self._tracked),
            "online": sum(1 for t in self._tracked.values() if t.availability == ONLINE),
            "published": self.published,
            # Work still owed to the broker (removals included): "settled" means nothing is.
            "republishing": self.republishing or self._full or bool(self._removed) or self._clearing,
            "last_error": self._last_error,
        }

    def _error(self, message: str | None) -> None:
        if message != self._last_error and message is not None:
            _LOGGER.warning("Home Assistant discovery: %s", message)
        self._last_error = message
        self._changed()

    # ---- lifecycle -----------------------------------------------------------------

    def async_start(self) -> None:
        self._unlisteners = [
            self._driver.bus.listen(EVENT_UPLINK, self._on_uplink),
            self._driver.bus.listen(EVENT_DOWNLINK_STATE, self._on_downlink_state),
        ]
        self._transport.subscribe(self._ha_status_topic(), self._on_ha_status)
        self._task = asyncio.create_task(self._run(), name="homeassistant-discovery")

    async def async_unload(self) -> None:
        """Stop publishing; what is retained stays (Home Assistant keeps the devices)."""
        for unlisten in self._unlisteners:
            unlisten()
        self._unlisteners = []
        await cancel_and_wait(self._task)
        self._task = None
        self._transport.close()

    async def async_reload(self, settings: dict[str, Any] | None) -> None:
        """Apply new settings: what the old ones published and no longer applies is cleared.

        Raises SettingsError and keeps the current settings when they cannot apply.
        """
        new = await async_validated(settings)
        old = self._settings
        if new == old:
            return
        await cancel_and_wait(self._task)
        self._task = None
        leaving = old["enabled"] and not new["enabled"]
        moved = old["discovery_prefix"] != new["discovery_prefix"]
        topics_moved = any(old[key] != new[key] for key in ("state_topic", "availability_topic"))
        if old["enabled"] and (leaving or moved or topics_moved):
            try:  # under the old settings: Home Assistant forgets what they published
                await self._clear(configs=leaving or moved, states=leaving or topics_moved)
            except NotConnected as exc:
                self._error(f"could not clear the previous discovery topics: {exc}")
        if moved:
            self._transport.unsubscribe(self._ha_status_topic())
        self._settings = new
        if moved:
            self._transport.subscribe(self._ha_status_topic(), self._on_ha_status)
        self._full = True
        self._changed()
        self._task = asyncio.create_task(self._run(), name="homeassistant-discovery")

    # ---- events (synchronous listeners: queue and wake) --------------------------------

    def _wake(self) -> None:
        self._wakeup.set()

    def _on_connect(self) -> None:
        """A new broker connection: the broker may be another one, publish everything."""
        self._full = True
        self._wake()

    def _on_ha_status(self, topic: str, payload: bytes, retain: bool) -> None:
        if payload.strip() == b"online":
            _LOGGER.info("Home Assistant is online: publishing discovery again")
            self._full = True
            self._wake()

    def _on_uplink(self, uplink: Uplink) -> None:
        self._uplinks.append(uplink)
        self._wake()

    def _on_downlink_state(self, event: DownlinkStateEvent) -> None:
        self._downlink_events.append(event)
        self._wake()

    def _ha_status_topic(self) -> str:
        return f"{self._settings['discovery_prefix']}/status"

    # ---- topics and payload builders ---------------------------------------------------

    def _discovery(self) -> DeviceDiscovery:
        topics = Topics(
            prefix=self._settings["discovery_prefix"],
            state=self._settings["state_topic"],
            availability=self._settings["availability_topic"],
            driver_status=self._transport.status_topic,
            command=self._transport.command_topic,
        )
        return DeviceDiscovery(topics, Driver(self._driver_identifier(), _version()))

    @property
    def driver_identifier(self) -> str:
        """Identifier of the driver's own Home Assistant device (every device's via_device)."""
        return self._driver_identifier()

    def _driver_identifier(self) -> str:
        box = getattr(self._driver, "box", None)
        suffix = box.derive_key(b"homeassistant-driver-id")[:4].hex() if box is not None else "0"
        return f"coap_driver_{suffix}"

    def _grace(self) -> timedelta:
        config = getattr(self._driver, "config", None)
        minutes = DEFAULT_GRACE_MINUTES
        if config is not None and getattr(config, "devices", None):
            minutes = config.devices.get("grace_minutes", DEFAULT_GRACE_MINUTES)
        return timedelta(minutes=minutes)

    # ---- the worker ----------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        started = next_fleet_check = next_availability = loop.time()
        while True:
            try:
                if not self._loaded:
                    await self._load_fleet()
                if self._settings["enabled"]:
                    now = loop.time()
                    self._notice_topic_changes()
                    if now >= next_fleet_check:
                        next_fleet_check = now + FLEET_CHECK_S
                        await self._check_fleet()
                    await self._absorb_events()
                    if now >= next_availability:
                        next_availability = now + self._settings["availability_check"]
                        self._expire_availability()
                    if self._transport.connected:
                        if self._full:
                            await self._republish()
                        await self._flush()
                        self._error(None)
                    elif self._transport.mqtt is None and now - started > MQTT_GRACE_S:
                        self._error("the mqtt integration is not running: nothing is published")
                else:
                    self._uplinks.clear()
                    self._downlink_events.clear()
            except NotConnected:
                self._full = True  # the next connection gets everything again
            except Exception as exc:
                _LOGGER.exception("Home Assistant discovery failed; retrying")
                self._error(f"{type(exc).__name__}: {exc}")
            self._wakeup.clear()
            if self._pending_work():
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), WATCH_S)

    def _pending_work(self) -> bool:
        return bool(
            self._settings["enabled"]
            and self._transport.connected
            and (
                self._uplinks or self._downlink_events or self._dirty_states
                or self._dirty_configs or self._dirty_availability or self._removed or self._full
            )
        )

    def _notice_topic_changes(self) -> None:
        """A new command or status topic in the mqtt settings: discovery must name it."""
        topics = (self._transport.status_topic, self._transport.command_topic)
        if self._used_topics is not None and topics != self._used_topics:
            self._full = True
        self._used_topics = topics

    # ---- the fleet in memory ---------------------------------------------------------

    async def _load_fleet(self) -> None:
        self._tracked.clear()
        self._by_id.clear()
        self._fleet_stamp = await fleet_stamp(self._driver.db)
        async for page in pages(self._driver.db):
            for device in page:
                self._track(device)
        self._loaded = True
        self._changed()

    def _track(self, device: DeviceRecord) -> Tracked:
        tracked = Tracked.from_record(device)
        self._tracked[device.serial] = tracked
        self._by_id[device.device_id] = device.serial
        return tracked

    async def _check_fleet(self) -> None:
        """Notice enrollments and removals made by the API, the CLI or another instance."""
        stamp = await fleet_stamp(self._driver.db)
        if stamp == self._fleet_stamp:
            return
        self._fleet_stamp = stamp
        enrolled = await enrolled_ids(self._driver.db)
        for device_id, serial in list(self._by_id.items()):
            if enrolled.get(device_id, (None,))[0] != serial:
                tracked = self._tracked.pop(serial)
                del self._by_id[device_id]
                self._docs.pop(serial)
                self._dirty_states.discard(serial)
                self._dirty_configs.discard(serial)
                self._dirty_availability.discard(serial)
                self._removed[serial] = tracked.hw_type
        for device_id, (serial, _) in enrolled.items():
            if device_id not in self._by_id:
                device = await by_serial(self._driver.db, serial)
                if device is not None:
                    self._removed.pop(serial, None)
                    self._track(device)
                    self._dirty_configs.add(serial)
                    self._dirty_states.add(serial)
        self._changed()

    async def _tracked_for(self, serial: str) -> Tracked | None:
        tracked = self._tracked.get(serial)
        if tracked is None:  # enrolled since the last fleet check
            device = await by_serial(self._driver.db, serial)
            if device is None:
                return None
            self._removed.pop(serial, None)
            tracked = self._track(device)
            self._dirty_configs.add(serial)
        return tracked

    # ---- events -> dirty sets ---------------------------------------------------------

    async def _absorb_events(self) -> None:
        uplinks, self._uplinks = self._uplinks, []
        events, self._downlink_events = self._downlink_events, []
        grace = self._grace()
        for uplink in uplinks:
            tracked = await self._tracked_for(uplink.serial)
            if tracked is None:
                continue
            doc = await self._document(tracked)
            if uplink.message_type == "join":
                tracked.uplinks_since_join = 0
                tracked.join_date = uplink.join_date or uplink.rx_date
                firmware = uplink.data.get("firmware")
                if isinstance(firmware, str) and firmware != tracked.firmware:
                    tracked.firmware = firmware
                    self._dirty_configs.add(tracked.serial)  # sw_version of the device
            else:
                tracked.uplinks_since_join += 1
            tracked.last_seen = uplink.rx_date
            if uplink.message_type == "rx":
                doc.data.update(merge([uplink.data]))
            doc.firmware, doc.join_date, doc.last_seen = (
                tracked.firmware, tracked.join_date, tracked.last_seen,
            )
            self._schedule_availability(tracked, grace)
            self._dirty_states.add(tracked.serial)
        for event in events:
            tracked = await self._tracked_for(event.serial)
            if tracked is None:
                continue
            doc = await self._document(tracked)
            view = event.downlink
            doc.downlink = downlink_summary(
                view.command_id, view.command, view.parameter, event.state, event.at
            )
            if event.state == ACKNOWLEDGED and self._is_configuration(tracked, view.command):
                doc.config[view.command] = view.parameter
                if view.command == TX_INTERVAL_COMMAND and isinstance(view.parameter, int):
                    tracked.tx_interval = view.parameter
                    self._schedule_availability(tracked, grace)
            self._dirty_states.add(tracked.serial)

    def _is_configuration(self, tracked: Tracked, command: str) -> bool:
        family = self._driver.families.get(tracked.hw_type)
        spec = family.commands.get(command) if family is not None else None
        return spec is not None and spec.kind == "configuration"

    def _schedule_availability(self, tracked: Tracked, grace: timedelta) -> None:
        tracked.deadline = tracked.online_until(grace)
        if tracked.deadline is not None:
            self._deadlines.push(tracked.deadline, tracked.serial)

    def _expire_availability(self) -> None:
        now = utcnow()
        for serial in self._deadlines.due(now):
            tracked = self._tracked.get(serial)
            if tracked is None or tracked.deadline is None or tracked.deadline >= now:
                continue  # removed, or a newer deadline is queued
            tracked.deadline = None
            self._dirty_availability.add(serial)

    async def _document(self, tracked: Tracked) -> StateDocument:
        doc = self._docs.get(tracked.serial)
        if doc is None:
            doc = (await self._documents([tracked]))[tracked.serial]
        return doc

    async def _documents(self, devices: list[Tracked]) -> dict[str, StateDocument]:
        """State documents of `devices` from the cache, the rest rebuilt from the database."""
        docs = {}
        missing = []
        for tracked in devices:
            doc = self._docs.get(tracked.serial)
            if doc is None:
                missing.append(tracked)
            else:
                docs[tracked.serial] = doc
        if missing:
            ids = [tracked.device_id for tracked in missing]
            db = self._driver.db
            data = await latest_data(db, ids)
            confirmed = await confirmed_settings(db, ids)
            downlinks = await latest_downlinks(db, ids)
            for tracked in missing:
                settings = {
                    name: value
                    for name, value in confirmed.get(tracked.device_id, {}).items()
                    if self._is_configuration(tracked, name)
                }
                tx = settings.get(TX_INTERVAL_COMMAND)
                if tx is not None and isinstance(tx.parameter, int) and (
                    tracked.join_date is None or (tx.at and tx.at >= tracked.join_date)
                ):
                    tracked.tx_interval = tx.parameter  # confirmed since the last JOIN
                doc = StateDocument(
                    serial=tracked.serial,
                    hw_type=tracked.hw_type,
                    firmware=tracked.firmware,
                    join_date=tracked.join_date,
                    last_seen=tracked.last_seen,
                    data=data.get(tracked.device_id, {}),
                    config={name: value.parameter for name, value in settings.items()},
                    downlink=downlinks.get(tracked.device_id),
                )
                self._docs.put(doc)
                docs[tracked.serial] = doc
        return docs

    # ---- publishing ------------------------------------------------------------------

    async def _publish_all(self, messages: Iterable[tuple[str, bytes]]) -> None:
        """Publish retained, `WINDOW` at a time; raise NotConnected when the connection fails."""
        slots = asyncio.Semaphore(WINDOW)
        failures: list[BaseException] = []
        tasks: set[asyncio.Task[None]] = set()

        async def one(topic: str, payload: bytes) -> None:
            try:
                await self._transport.publish(topic, payload, retain=True)
                self.published += 1
            except BaseException as exc:
                failures.append(exc)
            finally:
                slots.release()

        try:
            for topic, payload in messages:
                await slots.acquire()
                if failures:
                    slots.release()
                    break
                task = asyncio.create_task(one(topic, payload))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
        if failures:
            raise NotConnected(str(failures[0]))
        self._changed()

    def _config_messages(
        self, discovery: DeviceDiscovery, tracked: Tracked, clear: bool = False
    ) -> list[tuple[str, bytes]]:
        family = self._driver.families.get(tracked.hw_type)
        if family is None:
            return []
        device = DeviceRecord(
            device_id=tracked.device_id, serial=tracked.serial, hw_type=tracked.hw_type,
            firmware=tracked.firmware,
        )
        return [
            (topic, EMPTY if clear else json_bytes(payload))
            for topic, payload in discovery.messages(family, device)
        ]

    @staticmethod
    def _state_message(discovery: DeviceDiscovery, doc: StateDocument) -> tuple[str, bytes]:
        return discovery.topics.for_device(discovery.topics.state, doc.serial), doc.payload()

    def _availability_message(
        self, discovery: DeviceDiscovery, tracked: Tracked, now: Any
    ) -> tuple[str, bytes]:
        grace = self._grace()
        tracked.availability = tracked.availability_at(now, grace)
        if tracked.availability == ONLINE and tracked.deadline is None:
            self._schedule_availability(tracked, grace)
        topic = discovery.topics.for_device(discovery.topics.availability, tracked.serial)
        return topic, tracked.availability.encode()

    async def _flush(self) -> None:
        """Publish what changed: removals, new configs, states and availability."""
        discovery = self._discovery()
        if self._removed:
            removed, self._removed = self._removed, {}
            messages: list[tuple[str, bytes]] = []
            for serial, hw_type in removed.items():
                gone = Tracked(0, serial, hw_type, None, None, None, 60, 0)
                messages += self._config_messages(discovery, gone, clear=True)
                messages += [
                    (discovery.topics.for_device(discovery.topics.state, serial), EMPTY),
                    (discovery.topics.for_device(discovery.topics.availability, serial), EMPTY),
                ]
            self._clearing = True
            try:
                await self._publish_all(messages)
            except NotConnected:
                self._removed.update(removed)
                raise
            finally:
                self._clearing = False
                self._changed()
        while self._dirty_configs or self._dirty_states or self._dirty_availability:
            configs, self._dirty_configs = self._dirty_configs, set()
            states, self._dirty_states = self._dirty_states, set()
            available, self._dirty_availability = self._dirty_availability, set()
            try:
                await self._publish_devices(discovery, configs, states, available - states)
            except NotConnected:
                self._dirty_configs |= configs
                self._dirty_states |= states
                self._dirty_availability |= available
                raise

    async def _publish_devices(
        self,
        discovery: DeviceDiscovery,
        configs: set[str],
        states: set[str],
        availability: Iterable[str] = (),
    ) -> None:
        """Configs, then state document + availability, then availability alone."""
        now = utcnow()
        everything = configs | states | set(availability)
        devices = [self._tracked[s] for s in sorted(everything) if s in self._tracked]
        for start in range(0, len(devices), PAGE):
            chunk = devices[start : start + PAGE]
            docs = await self._documents([t for t in chunk if t.serial in states])
            messages: list[tuple[str, bytes]] = []
            for tracked in chunk:
                if tracked.serial in configs:
                    messages += self._config_messages(discovery, tracked)
                if tracked.serial in states and not docs[tracked.serial].empty:
                    messages.append(self._state_message(discovery, docs[tracked.serial]))
                messages.append(self._availability_message(discovery, tracked, now))
            await self._publish_all(messages)

    async def _republish(self) -> None:
        """Everything, page by page, with live changes published between pages."""
        self._full = False
        self.republishing = True
        self._changed()
        try:
            discovery = self._discovery()
            await self._publish_all(
                (topic, json_bytes(payload)) for topic, payload in discovery.driver_messages()
            )
            serials = sorted(self._tracked, key=lambda s: self._tracked[s].device_id)
            for start in range(0, len(serials), PAGE):
                page = {s for s in serials[start : start + PAGE] if s in self._tracked}
                await self._publish_devices(discovery, page, page)
                await self._absorb_events()
                await self._flush()
        finally:
            self.republishing = False
            self._changed()

    async def _clear(self, configs: bool, states: bool) -> None:
        """Empty retained messages on this device's topics (configs remove the entities)."""
        if not self._loaded:
            await self._load_fleet()
        discovery = self._discovery()
        serials = list(self._tracked)
        topics = discovery.topics
        for start in range(0, len(serials), PAGE):
            messages: list[tuple[str, bytes]] = []
            for serial in serials[start : start + PAGE]:
                if configs:
                    messages += self._config_messages(discovery, self._tracked[serial], clear=True)
                if states:
                    messages += [
                        (topics.for_device(topics.state, serial), EMPTY),
                        (topics.for_device(topics.availability, serial), EMPTY),
                    ]
            await self._publish_all(messages)
        if configs:
            await self._publish_all((topic, EMPTY) for topic, _ in discovery.driver_messages())


def json_bytes(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
