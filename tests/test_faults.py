"""Faults injected into a running driver under load (issue 7, "Faults").

Real parts only: devices on loopback UDP (OSCORE, a new source port per
exchange), private Mosquitto processes or the machine's one, a PostgreSQL
database per test, SQLite files (one on a 16 MB tmpfs), real HTTP callback
endpoints, and for the crash test a driver in a process of its own killed
with SIGKILL.

Each device's uplinks carry its own counter n (`open_count`, key 11 of the
VIDI Open Close family), so the stored history and the MQTT messages are
checked exactly: nothing lost, nothing twice, per-device order kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import re
import socket
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiocoap
import aiohttp
import asyncpg
import cbor2
import pytest
from aiocoap.numbers.codes import Code
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select, text

from driver_core.device_client import CoapTiming, DeviceSession, ExchangeTimeout, exchange
from driver_core.downlinks import SENT, UNACKNOWLEDGED, DownlinkQueue, wire_id
from driver_core.driver import Driver, load_components
from driver_core.enrollment import DeviceInput, add_device
from driver_core.events import EventBus
from driver_core.storage.db import Database, mask_url
from driver_core.storage.models import Device, Downlink, OutboxMessage, UplinkRecord
from driver_core.storage.secretbox import SecretBox
from driver_core.timefmt import zulu_millis
from driver_core.tokens import create_token
from driver_core.web import users_cli
from tests.conftest import make_device, started_driver, write_config
from tests.driver_process import DriverProcess
from tests.http_helpers import http_endpoint
from tests.mqtt_helpers import SYSTEM_BROKER_PORT, Collector, Mosquitto, wait_until
from tests.storage_fixtures import _admin_connection
from tests.web_fixtures import WebClient, new_http

HW_TYPE = 14  # VIDI Open Close: key 11 is `open_count`, an unsigned counter
# Answers come back in milliseconds here; a request lost to a killed driver is
# sent again after about 0.5, 1 and 2 s before the device gives up.
TIMING = CoapTiming(ack_timeout=0.5, max_retransmit=2)
ADMIN, PASSWORD = "admin", "correct horse battery"


def rx_payload(n: int) -> bytes:
    return cbor2.dumps({11: n})


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


# ---- devices under load ---------------------------------------------------------------------


@dataclass
class Attempt:
    """One exchange of one device: what it sent and what came back."""

    serial: str
    n: int
    started: float  # time.monotonic()
    latency: float
    code: Code | None  # None: no answer at all after every retransmission
    body: dict[Any, Any]
    outer: aiocoap.Message  # the protected datagram as sent (for replays)

    @property
    def answered(self) -> float:
        return self.started + self.latency


@dataclass
class Fleet:
    """Devices sending POST /rx on a timer, n = 0, 1, 2... per device."""

    sessions: dict[str, DeviceSession]
    attempts: list[Attempt] = field(default_factory=list)
    next_n: dict[str, int] = field(default_factory=dict)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _progress: asyncio.Event = field(default_factory=asyncio.Event)

    def start(self, interval: float, *, retry_same: bool = False) -> None:
        """Each device sends one uplink per `interval` (staggered). With `retry_same` an
        uplink not answered 2.04 is sent again (same n, new sequence number), as a device
        keeps a measurement until the driver has it."""
        self._stop.clear()
        count = len(self.sessions)
        for index, (serial, session) in enumerate(self.sessions.items()):
            self._tasks.append(asyncio.create_task(
                self._run(serial, session, interval, interval * index / count, retry_same)
            ))

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        self._tasks.clear()

    async def send(self, serial: str, n: int) -> Attempt:
        session = self.sessions[serial]
        outer, request_id = session.protect("rx", rx_payload(n))
        started = time.monotonic()
        try:
            answer = await session.send_raw(outer, request_id)
            code, body = answer.code, answer.body
        except ExchangeTimeout:
            code, body = None, {}
        attempt = Attempt(serial, n, started, time.monotonic() - started, code, body, outer)
        self.attempts.append(attempt)
        self._progress.set()
        return attempt

    async def _run(
        self, serial: str, session: DeviceSession, interval: float, offset: float, retry_same: bool
    ) -> None:
        await asyncio.sleep(offset)
        n = self.next_n.setdefault(serial, 0)
        while not self._stop.is_set():
            began = time.monotonic()
            attempt = await self.send(serial, n)
            if attempt.code == Code.CHANGED or not retry_same:
                n += 1
                self.next_n[serial] = n
            # A timer, like a device's: an exchange that took long is not made up for.
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - began)))

    async def wait(self, predicate: Callable[[], bool], within: float, what: str) -> None:
        """Until `predicate()` holds, checked after every exchange."""
        try:
            async with asyncio.timeout(within):
                while not predicate():
                    self._progress.clear()
                    await self._progress.wait()
        except TimeoutError:
            raise AssertionError(f"timed out after {within} s waiting for {what}") from None

    async def wait_all_acknowledged_after(self, moment: float, count: int, within: float) -> None:
        """Until every device had `count` uplinks answered 2.04 that it sent after `moment`."""

        def done() -> bool:
            fresh = Counter(
                a.serial for a in self.attempts if a.started >= moment and a.code == Code.CHANGED
            )
            return all(fresh[serial] >= count for serial in self.sessions)

        await self.wait(done, within, f"{count} acknowledged uplinks from every device")

    def acknowledged(self) -> set[tuple[str, int]]:
        return {(a.serial, a.n) for a in self.attempts if a.code == Code.CHANGED}

    def count(self, code: Code, since: float = 0.0) -> int:
        return sum(a.code == code and a.started >= since for a in self.attempts)

    def between(self, start: float, end: float) -> list[Attempt]:
        return [a for a in self.attempts if start <= a.started < end]

    def first_success_after(self, moment: float) -> float:
        """Seconds from `moment` to the first 2.04 of an uplink sent after it."""
        return min(
            a.answered for a in self.attempts if a.started >= moment and a.code == Code.CHANGED
        ) - moment


def codes(attempts: list[Attempt]) -> dict[str, int]:
    return dict(Counter("no answer" if a.code is None else str(a.code) for a in attempts))


def device_session(device: DeviceInput, port: int) -> DeviceSession:
    return DeviceSession(
        device.sender_id, device.master_secret, device.master_salt, "127.0.0.1", port, timing=TIMING
    )


def fleet_devices(count: int, prefix: str, first: int = 1) -> list[DeviceInput]:
    """Devices with distinct keys (sender id A0xx from `first`)."""
    return [make_device(f"{prefix}{i:06d}", HW_TYPE, i) for i in range(first, first + count)]


async def enroll_fleet(
    driver: Driver, count: int, prefix: str, *, first: int = 1
) -> dict[str, DeviceSession]:
    """`count` devices enrolled on `driver` and JOINed: their sessions by serial."""
    sessions = {}
    for device in fleet_devices(count, prefix, first):
        await add_device(driver.db, driver.box, device)
        sessions[device.serial] = device_session(device, driver.coap_port)
    await join_all(sessions)
    return sessions


async def join_all(sessions: dict[str, DeviceSession]) -> None:
    answers = await asyncio.gather(*(s.join("1.0.0", HW_TYPE) for s in sessions.values()))
    assert {a.code for a in answers} == {Code.CHANGED}


async def stored_rx(db: Any) -> list[tuple[str, int]]:
    """(serial, n) of every stored /rx uplink, in the order they were stored."""
    async with db.session() as session:
        rows = await session.execute(
            select(Device.serial, UplinkRecord.data)
            .join(Device, Device.id == UplinkRecord.device_id)
            .where(UplinkRecord.message_type == "rx")
            .order_by(UplinkRecord.id)
        )
        return [(serial, data["open_count"]) for serial, data in rows.all()]


def in_device_order(items: list[tuple[str, int]]) -> bool:
    """Per device, n strictly increases along `items`."""
    last: dict[str, int] = {}
    for serial, n in items:
        if n <= last.get(serial, -1):
            return False
        last[serial] = n
    return True


def contiguous(stored: list[tuple[str, int]], serials: list[str]) -> bool:
    """Every device's stored n are exactly 0, 1, 2... in order: no gap, no repeat."""
    return all(
        [n for s, n in stored if s == serial] == list(range(sum(s == serial for s, _ in stored)))
        for serial in serials
    )


class MqttRx:
    """The /rx documents a Collector received, split into first copies and repeats.

    `update()` reads only what arrived since the last call, so it can be polled.
    """

    def __init__(self, collector: Collector) -> None:
        self._collector = collector
        self._read = 0
        self._mids: dict[tuple[str, int], set[int]] = {}
        self.first: list[tuple[str, int]] = []  # arrival order, one per distinct uplink
        self.resent_by_broker = 0  # a delivery the broker repeated to the subscriber (same packet id)
        self.resent_by_driver: list[tuple[str, int]] = []  # published again (another packet id)

    def update(self) -> MqttRx:
        messages = self._collector.messages
        for message in messages[self._read:]:
            document = json.loads(message.payload)
            if document.get("message_type") != "rx":
                continue
            key = (document["serial"], document["data"]["open_count"])
            mids = self._mids.get(key)
            if mids is None:
                self._mids[key] = {message.mid}
                self.first.append(key)
            elif message.mid in mids:
                self.resent_by_broker += 1  # our PUBACK did not reach the stopping broker
            else:
                mids.add(message.mid)
                self.resent_by_driver.append(key)
        self._read = len(messages)
        return self

    async def wait_for(self, count: int, within: float) -> MqttRx:
        """Until `count` distinct uplinks have arrived."""
        await wait_until(lambda: len(self.update().first) >= count, within, f"{count} uplinks on MQTT")
        return self


# ---- what an operator sees: /metrics, the Status page, the log --------------------------------


@dataclass
class Operator:
    driver: Driver
    http: aiohttp.ClientSession
    web: WebClient
    token: str

    @classmethod
    @contextlib.asynccontextmanager
    async def login(cls, driver: Driver) -> AsyncIterator[Operator]:
        """A Prometheus token and a logged-in admin, made while the database takes writes."""
        token = await create_token(driver.db, f"prometheus-{uuid.uuid4().hex[:6]}")
        await users_cli.create_user(driver.db, ADMIN, PASSWORD)
        assert driver.api is not None
        async with new_http() as http:
            web_client = WebClient(f"http://127.0.0.1:{driver.api.port}", http)
            page = await web_client.login(ADMIN, PASSWORD)
            assert page.status == 200
            yield cls(driver, http, web_client, token)

    async def metrics(self) -> dict[tuple[str, tuple], float]:
        async with self.http.get(
            self.web.base + "/metrics", headers={"Authorization": f"Bearer {self.token}"}
        ) as response:
            assert response.status == 200
            body = await response.text()
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(body)
            for sample in family.samples
        }

    async def storage_seen(self) -> tuple[float, float, float, str, str, int]:
        """(writable, write failures, storage refusals) from /metrics; the Status page's
        database badge and last error; the status code of the health check."""
        samples = await self.metrics()
        async with self.http.get(self.web.base + "/ops/health") as response:
            health_status = response.status
        page = await self.web.get("/status")
        assert page.status == 200
        card = page.text.split('id="storage"', 1)[1].split("</section>", 1)[0]
        badge = re.search(r'class="badge [^"]+">([^<]+)<', card)
        error = re.search(r'id="storage-error">([^<]*)<', card)
        assert badge is not None and error is not None
        return (
            samples[("coap_driver_storage_writable", ())],
            samples[("coap_driver_storage_write_failures_total", ())],
            samples[("coap_driver_refused_requests_total", (("reason", "storage_unavailable"),))],
            badge.group(1),
            error.group(1),
            health_status,
        )


def storage_lines(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    return [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "driver_core.storage"]


# ---- a private broker that keeps everything across restarts ------------------------------------


@dataclass
class KeepingBroker:
    """A private Mosquitto with persistence and no queue limit, and a persistent subscriber to
    app/+/up: what the driver published is delivered even across a broker restart or kill."""

    mosquitto: Mosquitto
    collector: Collector

    @property
    def driver_config(self) -> str:
        """The driver's mqtt section: this broker, uplinks on app/<serial>/up."""
        return (
            f"mqtt:\n  broker: external\n  url: {self.mosquitto.url}\n"
            "  uplink_topic: 'app/{{serial}}/up'\n"
        )


@pytest.fixture
async def keeping_broker(tmp_path: Path) -> AsyncIterator[KeepingBroker]:
    options = ("max_queued_messages 0",)
    async with Mosquitto(tmp_path / "mq", persistence=True, options=options) as mosquitto:
        collector = await Collector(
            mosquitto.port, "app/+/up", persistent=True, client_id=f"sub-{uuid.uuid4().hex[:8]}"
        ).start()
        try:
            yield KeepingBroker(mosquitto, collector)
        finally:
            await collector.stop()


# ---- 1. MQTT broker stopped for a minute under load -------------------------------------------

OUTAGE_S = 60.0


@pytest.mark.timeout(200)
async def test_broker_stopped_for_a_minute_under_load(
    tmp_path: Path, keeping_broker: KeepingBroker
) -> None:
    """20 devices send every 0.5 s before, during and after a 60 s stop of the external
    broker; afterwards every uplink has arrived once, in each device's order."""
    mosquitto, collector = keeping_broker.mosquitto, keeping_broker.collector
    config_dir = tmp_path / "config"
    write_config(config_dir, extra=keeping_broker.driver_config)
    driver = Driver(config_dir)
    await driver.start()
    fleet: Fleet | None = None
    try:
        mqtt = driver.integrations.running["mqtt"]
        await mqtt.async_wait_status(lambda s: s["connected"])
        fleet = Fleet(await enroll_fleet(driver, 20, "M"))
        fleet.start(interval=0.5)
        await fleet.wait(lambda: len(fleet.acknowledged()) >= 100, 30, "100 uplinks before the stop")
        await wait_until(lambda: len(collector.messages) >= 80, 10, "uplinks published")

        await mosquitto.stop()
        stopped = time.monotonic()
        await mqtt.async_wait_status(lambda s: not s["connected"])
        deepest = 0
        while time.monotonic() - stopped < OUTAGE_S:  # uplinks keep coming; nothing goes out
            await asyncio.sleep(1.0)
            deepest = max(deepest, mqtt.status["outbox"])
        assert not mqtt.status["connected"]
        await mosquitto.start()
        started = time.monotonic()
        await mqtt.async_wait_status(lambda s: s["connected"], within=20)
        reconnected = time.monotonic()
        await fleet.wait(lambda: fleet.count(Code.CHANGED, since=reconnected) >= 100, 30,
                         "100 uplinks after the broker is back")
        await fleet.stop()
        acknowledged = fleet.acknowledged()
        received = await MqttRx(collector).wait_for(len(acknowledged), within=60)
        drained = time.monotonic()
        await mqtt.async_wait_status(lambda s: s["outbox"] == 0, within=20)

        before = fleet.between(0, stopped)
        during = fleet.between(stopped, started)
        after = fleet.between(started, float("inf"))
        received.update()
        latency = {
            name: (percentile([a.latency for a in part], 0.5), percentile([a.latency for a in part], 0.99))
            for name, part in (("before", before), ("during", during), ("after", after))
        }
        print(
            f"\nbroker stopped {started - stopped:.1f} s; {len(during)} uplinks sent meanwhile "
            f"({codes(during)}), outbox up to {deepest}; driver reconnected "
            f"{reconnected - started:.1f} s after the broker restart, every uplink on MQTT "
            f"{drained - started:.1f} s after it; {len(acknowledged)} uplinks in all, "
            f"{len(collector.messages)} MQTT messages: {received.resent_by_broker} repeated by the "
            f"broker to the subscriber, {len(received.resent_by_driver)} published twice by the driver; "
            "latency p50/p99: " + ", ".join(f"{k} {ms(v[0])}/{ms(v[1])}" for k, v in latency.items())
        )
        assert codes(fleet.attempts) == {str(Code.CHANGED): len(fleet.attempts)}
        assert len(during) >= 20 * OUTAGE_S / 0.5 * 0.9
        assert deepest >= len(during) * 0.9
        stored = await stored_rx(driver.db)
        assert sorted(stored) == sorted(acknowledged)
        assert sorted(received.first) == sorted(acknowledged)  # every uplink arrived
        assert received.resent_by_driver == []  # ... once
        assert in_device_order(received.first)  # ... in each device's order
        assert await outbox_rows(driver.db) == 0
    finally:
        if fleet is not None:
            await fleet.stop()
        await driver.stop()


async def outbox_rows(db: Any) -> int:
    async with db.session() as session:
        return int(await session.scalar(select(func.count()).select_from(OutboxMessage)) or 0)


# ---- 2. database connection lost and restored -------------------------------------------------


@dataclass
class PgAdmin:
    """Our own connection to the admin database, to cut the driver's database off."""

    conn: asyncpg.Connection
    database: str

    async def terminate(self) -> int:
        """Terminate every connection to the database but ours; how many there were."""
        killed = await self.conn.fetch(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = $1 AND pid <> pg_backend_pid()",
            self.database,
        )
        return len(killed)

    async def cut(self) -> int:
        """Refuse new connections, terminate the open ones (the driver's)."""
        await self.conn.execute(f'ALTER DATABASE "{self.database}" ALLOW_CONNECTIONS false')
        return await self.terminate()

    async def reconnect(self) -> None:
        await self.conn.execute(f'ALTER DATABASE "{self.database}" ALLOW_CONNECTIONS true')

    async def read_only(self, on: bool) -> None:
        setting = "SET default_transaction_read_only = on" if on else "RESET default_transaction_read_only"
        await self.conn.execute(f'ALTER DATABASE "{self.database}" {setting}')


@pytest.fixture
async def pg_admin(postgres_url: str) -> AsyncIterator[PgAdmin]:
    conn, _ = await _admin_connection()
    admin = PgAdmin(conn, postgres_url.rsplit("/", 1)[1])
    try:
        yield admin
    finally:
        await admin.reconnect()  # the database is dropped WITH (FORCE) after the test
        await admin.read_only(False)
        await conn.close()


async def test_database_connection_lost_and_restored(
    tmp_path: Path, postgres_url: str, pg_admin: PgAdmin, caplog: pytest.LogCaptureFixture
) -> None:
    """The driver's PostgreSQL connections are terminated and refused (until 100 uplinks were
    answered 5.03, about a second) while 10 devices send 10 uplinks/s each and publish through
    the machine's Mosquitto."""
    caplog.set_level(logging.INFO)
    prefix = f"coap-driver-faults/{uuid.uuid4().hex}"
    config_dir = tmp_path / "config"
    write_config(
        config_dir, database_url=postgres_url,
        extra=f"mqtt:\n  broker: external\n  url: mqtt://127.0.0.1:{SYSTEM_BROKER_PORT}\n"
        f"  uplink_topic: '{prefix}/up/{{{{serial}}}}'\n  status_topic: '{prefix}/status'\n",
    )
    collector = await Collector(SYSTEM_BROKER_PORT, f"{prefix}/up/+").start()
    try:
        async with started_driver(config_dir) as driver:
            fleet = Fleet(await enroll_fleet(driver, 10, "P"))
            fleet.start(interval=0.1, retry_same=True)
            await fleet.wait(lambda: len(fleet.acknowledged()) >= 50, 20, "50 uplinks before the fault")

            killed = await pg_admin.cut()
            cut = time.monotonic()
            await fleet.wait(  # the devices keep sending, and retrying
                lambda: fleet.count(Code.SERVICE_UNAVAILABLE, since=cut) >= 100, 30, "100 answers 5.03"
            )
            refusing = driver.db.health.as_json()
            await pg_admin.reconnect()
            restored = time.monotonic()
            await fleet.wait_all_acknowledged_after(restored, 3, within=20)
            await fleet.stop()
            during = fleet.between(cut, restored)
            recovered_in = fleet.first_success_after(restored)
            stored = await stored_rx(driver.db)
            received = await MqttRx(collector).wait_for(len(stored), within=20)
            mqtt = driver.integrations.running["mqtt"]
            await mqtt.async_wait_status(lambda s: s["outbox"] == 0, within=20)
        received.update()
    finally:
        await collector.stop()

    print(
        f"\n{killed} connections terminated; database refused for {restored - cut:.1f} s; "
        f"{len(during)} uplinks meanwhile: {codes(during)}; first 2.04 {ms(recovered_in)} after "
        f"the database came back; {len(stored)} stored, {len(received.first)} on MQTT"
    )
    assert killed >= 1
    assert set(codes(fleet.attempts)) == {str(Code.CHANGED), str(Code.SERVICE_UNAVAILABLE)}
    assert codes(during).get(str(Code.SERVICE_UNAVAILABLE), 0) >= 100  # answered, never dropped
    assert len(stored) == len(set(stored))
    assert set(stored) == fleet.acknowledged()  # nothing acknowledged is lost, nothing refused kept
    assert contiguous(stored, list(fleet.sessions))  # every refused uplink stored on a retry
    assert received.first == stored and received.resent_by_driver == []
    assert recovered_in < 1.0
    log = storage_lines(caplog)
    assert refusing["writable"] is False
    assert refusing["last_error"] == (
        f'database "{pg_admin.database}" is not currently accepting connections'
    )
    assert [level for level, _ in log] == ["ERROR", "WARNING"]
    assert "refuses writes" in log[0][1] and "takes writes again" in log[1][1]


async def test_every_request_during_a_database_outage_gets_503(
    tmp_path: Path, postgres_url: str, pg_admin: PgAdmin
) -> None:
    config_dir = tmp_path / "config"
    write_config(config_dir, database_url=postgres_url)
    async with started_driver(config_dir) as driver:
        sessions = await enroll_fleet(driver, 2, "U")
        cold, queued = sessions
        await driver.downlinks.schedule(queued, "clear_alarms")  # its requests read the queue
        driver.credentials.forget(sessions[cold].kid)  # as after a restart or cache eviction
        await pg_admin.cut()
        fleet = Fleet(sessions)
        answers = {serial: (await fleet.send(serial, 0)).code for serial in sessions}
        await pg_admin.reconnect()
        after = {serial: (await fleet.send(serial, 0)).code for serial in sessions}
    assert answers == {cold: Code.SERVICE_UNAVAILABLE, queued: Code.SERVICE_UNAVAILABLE}
    assert after == {cold: Code.CHANGED, queued: Code.CHANGED}


async def test_refused_uplinks_leave_no_trace_in_the_device_state(
    tmp_path: Path, postgres_url: str, pg_admin: PgAdmin
) -> None:
    config_dir = tmp_path / "config"
    write_config(config_dir, database_url=postgres_url)
    async with started_driver(config_dir) as driver:
        driver.writer.add_outbox_consumer("test")  # no MQTT here: keep the documents to read
        fleet = Fleet(await enroll_fleet(driver, 1, "T"))
        (serial,) = fleet.sessions
        assert (await fleet.send(serial, 0)).code == Code.CHANGED
        await pg_admin.cut()
        refused = [(await fleet.send(serial, 1)).code for _ in range(5)]
        await pg_admin.reconnect()
        assert (await fleet.send(serial, 1)).code == Code.CHANGED
        async with driver.db.session() as session:
            since_join = await session.scalar(select(Device.uplinks_since_join))
            received = (await session.scalars(
                select(UplinkRecord.received_at).order_by(UplinkRecord.id)
            )).all()
            documents = [json.loads(d) for d in (await session.scalars(
                select(OutboxMessage.document).order_by(OutboxMessage.id)
            )).all()]
    assert refused == [Code.SERVICE_UNAVAILABLE] * 5
    assert since_join == 2  # the two stored uplinks, not the five refused ones
    assert documents[-1]["last_seen"] == zulu_millis(received[-2])  # the previous stored one


# ---- 3. the driver killed with SIGKILL under load ---------------------------------------------


async def outbox_is_empty(db: Any) -> bool:
    return await outbox_rows(db) == 0


@pytest.mark.timeout(150)
async def test_driver_killed_under_load_and_restarted(
    tmp_path: Path, keeping_broker: KeepingBroker
) -> None:
    """A driver process with 10 devices sending 10 uplinks/s, each with 40 queued downlinks,
    gets SIGKILL and is started again on the same configuration.

    MQTT is at least once across the kill (docs/mqtt.md): documents the broker acknowledged
    in the last moments, whose outbox rows were not deleted yet, go out again (1 to 8 of
    about 290 in our runs). Everything else is exact.
    """
    collector = keeping_broker.collector
    config_dir = tmp_path / "config"
    url = f"sqlite+aiosqlite:///{config_dir / 'coap-driver.db'}"
    write_config(
        config_dir, database_url=url, coap_port=free_udp_port(), extra=keeping_broker.driver_config
    )
    devices = fleet_devices(10, "K")
    db = Database(url)  # the test's own connection to the driver's SQLite file
    await db.start()
    process = DriverProcess(config_dir, tmp_path / "driver.log")
    fleet: Fleet | None = None
    try:
        box = SecretBox.load_or_create(config_dir)
        families, _ = load_components(config_dir)
        queue = DownlinkQueue(db, EventBus(), families)
        for device in devices:
            await add_device(db, box, device)
            for _ in range(40):
                await queue.schedule(device.serial, "clear_alarms")
        await process.start()
        first_start = process.started_in
        fleet = Fleet({d.serial: device_session(d, process.coap_port) for d in devices})
        await join_all(fleet.sessions)
        fleet.start(interval=0.1)
        await fleet.wait(lambda: len(fleet.acknowledged()) >= 150, 30, "150 uplinks before the kill")

        await process.kill()
        killed = time.monotonic()
        await process.start()
        restarted = time.monotonic()
        await fleet.wait_all_acknowledged_after(restarted, 10, within=30)
        await fleet.stop()
        back_in = fleet.first_success_after(killed)

        # A replay of the last datagram each device had accepted before the kill.
        replays = []
        for serial in fleet.sessions:
            last = max(
                (a for a in fleet.attempts
                 if a.serial == serial and a.code == Code.CHANGED and a.answered < killed),
                key=lambda a: a.n,
            )
            replays.append(await exchange("127.0.0.1", process.coap_port, last.outer, TIMING))
        stored = await stored_rx(db)
        await wait_until(lambda: outbox_is_empty(db), 30, "the outbox drained")
        received = await MqttRx(collector).wait_for(len(stored), within=30)
        async with db.session() as session:
            states = dict((await session.execute(select(Downlink.id, Downlink.state))).all())
            joins = await session.scalar(
                select(func.count()).select_from(UplinkRecord).where(UplinkRecord.message_type == "join")
            )
        await process.stop()
    finally:
        if fleet is not None:
            await fleet.stop()
        await process.kill()
        await db.stop()

    acknowledged = fleet.acknowledged()
    unanswered = [a for a in fleet.attempts if a.code != Code.CHANGED]
    received.update()
    delivered = [a for a in fleet.attempts if 4 in a.body]  # answers carrying a downlink
    wire_ids = [a.body[4][0] for a in delivered]
    by_wire_id = {wire_id(row_id): state for row_id, state in states.items()}
    print(
        f"\nfirst start {first_start:.2f} s, restart {process.started_in:.2f} s; first 2.04 "
        f"{back_in:.2f} s after the kill; {len(acknowledged)} uplinks acknowledged, "
        f"{len(unanswered)} not ({codes(unanswered)}), "
        f"{len(set(stored) - acknowledged)} of those stored anyway; "
        f"{len(delivered)} downlinks delivered, {sum(a.answered < killed for a in delivered)} "
        f"before the kill; MQTT: {len(received.first)} uplinks, {len(received.resent_by_driver)} "
        f"published again after the restart, {received.resent_by_broker} repeated by the broker"
    )
    assert acknowledged <= set(stored)  # every 2.04 is in the history ...
    assert len(stored) == len(set(stored))
    assert set(stored) - acknowledged <= {(a.serial, a.n) for a in unanswered}
    assert sorted(received.first) == sorted(stored)  # ... and on MQTT
    assert in_device_order(received.first)
    # At least once: what the broker acknowledged just before the kill, while its outbox
    # rows waited to be deleted (in batches, within 50 ms), is published again.
    assert set(received.resent_by_driver) <= {(a.serial, a.n) for a in fleet.attempts if a.started < killed}
    assert len(wire_ids) == len(set(wire_ids))  # no downlink delivered twice
    assert {by_wire_id[i] for i in wire_ids} <= {SENT, UNACKNOWLEDGED}
    assert joins == len(devices)  # no device joined again: the contexts survived
    assert [(r.code, r.payload) for r in replays] == [(Code.UNAUTHORIZED, b"Replay detected")] * len(devices)


# ---- 4. callback endpoints slow, failing, hanging ----------------------------------------------


@dataclass
class Endpoints:
    """A real HTTP server with three callback endpoints: /hang never answers (until the
    test ends), /slow answers 200 after 2 s, /fail answers 500 at once; /ok answers 200."""

    port: int = 0
    hits: Counter[str] = field(default_factory=Counter)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    _hit: asyncio.Event = field(default_factory=asyncio.Event)

    def url(self, kind: str) -> str:
        return f"http://127.0.0.1:{self.port}/{kind}"

    async def handle(self, request: web.Request) -> web.Response:
        kind = request.match_info["kind"]
        self.hits[kind] += 1
        self._hit.set()
        await request.read()
        if kind == "hang":
            await self.release.wait()
        elif kind == "slow":
            await asyncio.sleep(2.0)  # the scenario: an endpoint that takes 2 s to answer
        return web.Response(status=500 if kind == "fail" else 200)

    async def wait_hits(self, at_least: dict[str, int], within: float) -> None:
        """Until each endpoint in `at_least` was requested at least that many times."""
        async with asyncio.timeout(within):
            while any(self.hits[kind] < count for kind, count in at_least.items()):
                self._hit.clear()
                await self._hit.wait()


@pytest.fixture
async def endpoints() -> AsyncIterator[Endpoints]:
    served = Endpoints()
    async with http_endpoint("/{kind}", served.handle, shutdown_timeout=0.5) as port:
        served.port = port
        try:
            yield served
        finally:
            served.release.set()  # before the server closes: /hang answers


BAD_KINDS = ("hang", "slow", "fail")
CALLBACK_DEVICES = 50
DOWNLINKS_PER_PHASE = 4  # per device
CALLBACKS_CONFIG = (
    "callbacks:\n  timeout: 60\n  retry_for: 60\n  backoff_initial: 0.1\n"
    "  backoff_max: 0.4\n  jitter: none\n"
    "  allowed_networks: [127.0.0.0/8]\n"  # the endpoints listen on loopback
)


@dataclass
class CallbackPhases:
    """What `run_callback_phases` saw: the fleet's exchanges, each phase's [start, end),
    the downlinks scheduled per device (wire ids, in order) and the callbacks' status."""

    fleet: Fleet
    phases: dict[str, tuple[float, float]]
    scheduled: dict[str, list[int]]
    callbacks: dict[str, Any]
    stored: list[tuple[str, int]]


async def run_callback_phases(
    config_dir: Path, endpoints: Endpoints, uplinks_per_phase: int, within: float = 60.0
) -> CallbackPhases:
    """50 devices send one uplink per second; each answer carries a downlink whose state
    changes are POSTed to a callback endpoint: first a healthy one ("healthy" phase), then
    one that hangs, answers in 2 s, or fails ("bad" phase). A phase begins when its downlinks
    are being queued and lasts until every device had `uplinks_per_phase` (at least 4) uplinks
    answered 2.04 after they were; then the run waits until every bad endpoint was requested
    once per device sent to it. Used by bench/fault_bench.py."""
    write_config(config_dir, extra=CALLBACKS_CONFIG)
    async with started_driver(config_dir) as driver:
        fleet = Fleet(await enroll_fleet(driver, CALLBACK_DEVICES, "C"))
        scheduled: dict[str, list[int]] = {serial: [] for serial in fleet.sessions}

        async def phase(kind_of: Callable[[int], str]) -> tuple[float, float]:
            began = time.monotonic()  # the first downlinks go out while the rest are queued
            for index, serial in enumerate(fleet.sessions):
                for _ in range(DOWNLINKS_PER_PHASE):
                    view, _ = await driver.downlinks.schedule(
                        serial, "clear_alarms", callback_url=endpoints.url(kind_of(index))
                    )
                    scheduled[serial].append(wire_id(view.downlink_id))
            # Each device's next four answers carry its four downlinks (one each).
            await fleet.wait_all_acknowledged_after(time.monotonic(), uplinks_per_phase, within)
            return began, time.monotonic()

        fleet.start(interval=1.0)
        try:
            healthy = await phase(lambda index: "ok")
            bad = await phase(lambda index: BAD_KINDS[index % 3])
            per_kind = Counter(BAD_KINDS[index % 3] for index in range(CALLBACK_DEVICES))
            await endpoints.wait_hits(dict(per_kind), within)
        finally:
            await fleet.stop()
        callbacks = driver.integrations.running["callbacks"].status
        stored = await stored_rx(driver.db)
    return CallbackPhases(fleet, {"healthy": healthy, "bad": bad}, scheduled, callbacks, stored)


def delivered_wire_ids(fleet: Fleet) -> dict[str, list[int]]:
    """Per device, the wire ids of the downlinks its answers carried, in answer order."""
    delivered: dict[str, list[int]] = {serial: [] for serial in fleet.sessions}
    for attempt in sorted(fleet.attempts, key=lambda a: a.answered):
        if 4 in attempt.body:
            delivered[attempt.serial].append(attempt.body[4][0])
    return delivered


async def test_bad_callback_endpoints_do_not_hold_up_coap(tmp_path: Path, endpoints: Endpoints) -> None:
    """While callback endpoints hang, answer in 2 s or fail, every uplink is still answered 2.04
    and stored once, in order, and every downlink is delivered once, in the order it was queued.
    (The latency figures of this scenario: bench/fault_bench.py, docs/performance.md.)"""
    run = await run_callback_phases(tmp_path / "config", endpoints, uplinks_per_phase=6)
    fleet = run.fleet
    assert codes(fleet.attempts) == {str(Code.CHANGED): len(fleet.attempts)}
    assert sorted(run.stored) == sorted(fleet.acknowledged())  # every 2.04 stored ...
    assert contiguous(run.stored, list(fleet.sessions))  # ... once, in each device's order
    # Each downlink is carried by one answer, in the order its device's downlinks were queued.
    assert delivered_wire_ids(fleet) == run.scheduled
    assert all(len(ids) == 2 * DOWNLINKS_PER_PHASE for ids in run.scheduled.values())
    assert min(endpoints.hits[kind] for kind in BAD_KINDS) >= 16
    assert endpoints.hits["ok"] >= CALLBACK_DEVICES * DOWNLINKS_PER_PHASE
    assert run.callbacks["pending"] >= 17  # the hanging ones are still owed
    assert run.callbacks["last_error"].endswith("HTTP 500")


# ---- 5. disk full, read-only storage -----------------------------------------------------------

TMPFS_SIZE = "16m"


@dataclass
class StorageFault:
    """How to make the driver's database refuse writes, and how to stop it."""

    database_url: str
    inject: Callable[[Driver], Awaitable[None]]
    remove: Callable[[Driver], Awaitable[None]]
    error: str  # the database's own words, as the driver shows them
    first_error_varies: bool = False  # the first failure may have other words than `error`


@contextlib.contextmanager
def tmpfs(mount_point: Path) -> Iterator[None]:
    """A 16 MB tmpfs (needs root, or CAP_SYS_ADMIN): a disk that really fills up."""
    mount_point.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE},mode=0700", "tmpfs", str(mount_point)],
        capture_output=True, text=True, check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); page_limit covers disk full")
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=True)


def fill_up(directory: Path) -> int:
    """Write files until the file system has no byte left; how many bytes that took."""
    written = 0
    for name, size in (("filler", 1 << 16), ("filler-tail", 512)):
        fd = os.open(directory / name, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            while True:
                written += os.write(fd, b"\0" * size)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
        finally:
            os.close(fd)
    return written


def sqlite_pragma(statement: str) -> Callable[[Driver], Awaitable[None]]:
    """Run a PRAGMA on the connection the driver writes with (its writer thread)."""

    async def run(driver: Driver) -> None:
        await driver.db.run_write(lambda session: session.execute(text(statement)).all())

    return run


@pytest.fixture(params=["tmpfs", "page_limit", "read_only"])
def storage_fault(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StorageFault]:
    """tmpfs: SQLite on a 16 MB tmpfs filled to the last byte, then the filler deleted.
    page_limit: SQLite's max_page_count set to the file's current size on the driver's
    writer connection (the same SQLITE_FULL, without a mount).
    read_only: PostgreSQL with default_transaction_read_only set on the database and the
    driver's connections terminated; removed with RESET alone (old connections stay as they are).
    """
    if request.param == "tmpfs":
        disk = tmp_path / "small-disk"
        with tmpfs(disk):

            async def full(driver: Driver) -> None:
                await asyncio.to_thread(fill_up, disk)

            async def freed(driver: Driver) -> None:
                for name in ("filler", "filler-tail"):
                    (disk / name).unlink()

            yield StorageFault(
                f"sqlite+aiosqlite:///{disk / 'coap-driver.db'}", full, freed, "database or disk is full"
            )
    elif request.param == "page_limit":
        yield StorageFault(
            request.getfixturevalue("sqlite_url"),
            sqlite_pragma("PRAGMA max_page_count = 1"),  # clamped to the pages in use
            sqlite_pragma("PRAGMA max_page_count = 1073741823"),
            "database or disk is full",
        )
    else:
        admin: PgAdmin = request.getfixturevalue("pg_admin")

        async def read_only(driver: Driver) -> None:
            await admin.read_only(True)
            await admin.terminate()

        async def writable(driver: Driver) -> None:
            await admin.read_only(False)

        yield StorageFault(
            request.getfixturevalue("postgres_url"), read_only, writable,
            "cannot execute INSERT in a read-only transaction",
            first_error_varies=True,  # the first write fails on a terminated connection
        )


async def test_storage_refusing_writes_is_reported_and_answered_503(
    tmp_path: Path, storage_fault: StorageFault, caplog: pytest.LogCaptureFixture
) -> None:
    """10 devices send 10 uplinks/s while the database refuses writes, then takes them again."""
    caplog.set_level(logging.INFO)
    config_dir = tmp_path / "config"
    write_config(config_dir, database_url=storage_fault.database_url)
    async with started_driver(config_dir) as driver, Operator.login(driver) as operator:
        fleet = Fleet(await enroll_fleet(driver, 10, "F"))
        fleet.start(interval=0.1, retry_same=True)
        await fleet.wait(lambda: len(fleet.acknowledged()) >= 50, 20, "50 uplinks before the fault")
        healthy = await operator.storage_seen()

        await storage_fault.inject(driver)
        injected = time.monotonic()
        await fleet.wait(
            lambda: fleet.count(Code.SERVICE_UNAVAILABLE, since=injected) >= 50, 20, "50 answers 5.03"
        )
        await fleet.wait(  # the devices keep trying
            lambda: len(fleet.between(injected, float("inf"))) >= 100, 20, "100 uplinks in the fault"
        )
        failing = await operator.storage_seen()
        await storage_fault.remove(driver)
        removed = time.monotonic()
        await fleet.wait_all_acknowledged_after(removed, 3, within=20)
        await fleet.stop()
        recovered = await operator.storage_seen()
        stored = await stored_rx(driver.db)
        health = driver.db.health.as_json()

    during = fleet.between(injected, removed)
    print(
        f"\n{len(during)} uplinks during the fault: {codes(during)}; first 2.04 "
        f"{ms(fleet.first_success_after(removed))} after it was removed; "
        f"{health['failures']} failed writes; seen while failing: {failing}"
    )
    assert set(codes(fleet.attempts)) == {str(Code.CHANGED), str(Code.SERVICE_UNAVAILABLE)}
    assert set(stored) == fleet.acknowledged() and len(stored) == len(set(stored))
    assert contiguous(stored, list(fleet.sessions))
    assert healthy == (1.0, 0.0, 0.0, "Taking writes", "—", 200)
    writable, failures, refused, badge, error, health_status = failing
    assert (writable, badge, error, health_status) == (0.0, "Refusing writes", storage_fault.error, 503)
    assert failures >= 50 and refused >= 50 and len(during) >= 100
    writable, failures_after, refused_after, badge, error, health_status = recovered
    assert (writable, badge, error, health_status) == (1.0, "Taking writes", storage_fault.error, 200)
    assert failures_after == health["failures"] >= failures and refused_after >= refused
    log = storage_lines(caplog)
    first = re.fullmatch(
        f"Database {re.escape(mask_url(storage_fault.database_url))} refuses writes: (.+); "
        "devices are answered 5.03 \\(retry later\\) until it takes writes again",
        log[0][1],
    )
    assert log[0][0] == "ERROR" and first is not None
    assert storage_fault.first_error_varies or first.group(1) == storage_fault.error
    assert log[-1][0] == "WARNING"
    assert log[-1][1].startswith(f"Database {mask_url(storage_fault.database_url)} takes writes again, after ")
