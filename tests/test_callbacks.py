"""The callbacks integration against real HTTP servers and real databases.

Each test starts aiohttp servers on free loopback ports, writes downlinks and
their state-change rows the way the core does (row committed, then the event
fired on the bus) and checks what the servers receive and what is recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import random
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import voluptuous as vol
from aiohttp import web
from sqlalchemy import select

from custom_components.callbacks import (
    SETTINGS_SCHEMA,
    CallbacksIntegration,
    SettingsError,
    async_setup,
    async_validate,
)
from custom_components.callbacks.delivery import backoff_delay
from custom_components.callbacks.sender import shown_url
from custom_components.callbacks.store import CallbackStore
from driver_core.components import builtin_components_dir, import_integration, read_manifest
from driver_core.driver import Driver
from driver_core.enrollment import DeviceInput, add_device
from driver_core.events import EVENT_DOWNLINK_STATE, EventBus
from driver_core.integrations import SettingsError as IntegrationSettingsError
from driver_core.storage.db import Database
from driver_core.storage.models import Downlink, DownlinkEvent
from driver_core.storage.secretbox import SecretBox
from driver_core.timefmt import utcnow
from tests.conftest import write_config
from tests.http_helpers import http_endpoint
from tests.mqtt_helpers import integration_starter, make_tls_files

# The documented example: 2025-09-05T12:59:29.7Z is unix 1757077169 (seconds, truncated).
EXAMPLE_ID = "0219dfb3-00a8-40e6-90ea-1f83e807e885"
EXAMPLE_AT = datetime(2025, 9, 5, 12, 59, 29, 700000, tzinfo=UTC)
EXAMPLE_BODY = f'{{"command_id":"{EXAMPLE_ID}","status":3,"timestamp":1757077169}}'
# sha256=HMAC-SHA256("s3cret", EXAMPLE_BODY), also checked with `openssl dgst -sha256 -hmac`.
EXAMPLE_SIGNATURE = "sha256=21a3fe9a35f62ea3682236438f0fc7ea81698872a031396c82e13f78e5005e79"

FAST = {"backoff_initial": 0.05, "backoff_max": 0.2, "jitter": "none"}
# The receivers listen on loopback, which callbacks refuse unless allowed (callback_policy.py).
LOOPBACK = {"allowed_networks": ["127.0.0.0/8"]}


# ---- a callback receiver ----------------------------------------------------------------


@dataclass
class Received:
    path: str
    body: bytes
    headers: dict[str, str]
    at: float  # time.monotonic() on arrival

    @property
    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Receiver:
    """A real HTTP server; `plan[path]` lists the answers to give in turn (then 200).

    An answer is a status code or "hang" (never answers until the test ends).
    """

    requests: list[Received] = field(default_factory=list)
    plan: dict[str, list[int | str]] = field(default_factory=dict)
    port: int = 0
    _grew: asyncio.Event = field(default_factory=asyncio.Event)
    _release: asyncio.Event = field(default_factory=asyncio.Event)

    scheme: str = "http"

    def url(self, path: str) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}{path}"

    def bodies(self, path: str) -> list[Any]:
        return [r.json for r in self.requests if r.path == path]

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append(
            Received(request.path, await request.read(), dict(request.headers), time.monotonic())
        )
        self._grew.set()
        answers = self.plan.get(request.path) or [200]
        answer = answers.pop(0) if len(answers) > 1 or answers[0] == "hang" else answers[0]
        if answer == "hang":
            await self._release.wait()
            answer = 200
        return web.Response(status=int(answer), text="ok")

    async def wait_for(self, count: int, path: str | None = None, within: float = 10.0) -> None:
        async with asyncio.timeout(within):
            while len([r for r in self.requests if path is None or r.path == path]) < count:
                self._grew.clear()
                await self._grew.wait()


@contextlib.asynccontextmanager
async def serve(ssl_context: ssl.SSLContext | None = None) -> AsyncIterator[Receiver]:
    rec = Receiver(scheme="https" if ssl_context else "http")
    async with http_endpoint(
        "/{tail:.*}", rec.handle, ssl_context=ssl_context, shutdown_timeout=0.5
    ) as port:
        rec.port = port
        try:
            yield rec
        finally:
            rec._release.set()  # before the server closes: no request left hanging


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with serve() as rec:
        yield rec


@pytest.fixture
async def tls_receiver(tmp_path: Path) -> AsyncIterator[Receiver]:
    """HTTPS with a certificate from a private CA the system does not trust."""
    files = make_tls_files(tmp_path / "tls")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(files.server_cert, files.server_key)
    async with serve(context) as rec:
        yield rec


@pytest.fixture
def refused_url() -> Iterator[str]:
    """A port bound but not listening: every connection is refused."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/cb"
    finally:
        sock.close()


# ---- a stand-in core ----------------------------------------------------------------------


@dataclass
class StateEvent:
    """What the core fires on EVENT_DOWNLINK_STATE after committing the row."""

    event_id: int
    command_id: str
    serial: str
    state: int
    at: datetime
    callback_url: str | None
    downlink_row_id: int | None = None  # set by the real core: the callback is sent from the event


class Core:
    """The parts of the driver the integration sees (bus, db, config_dir), plus the writes
    the downlink core makes: a downlink row, then one event row per state change."""

    def __init__(self, db: Database, config_dir: Path) -> None:
        self.bus = EventBus()
        self.db = db
        self.config_dir = config_dir
        self._device_id: int | None = None

    async def device_id(self) -> int:
        if self._device_id is None:
            box = SecretBox.load_or_create(self.config_dir)
            device = DeviceInput("A0000001", 17, b"\xa0\x01", bytes(range(16)), bytes(8))
            self._device_id = (await add_device(self.db, box, device)).id
        return self._device_id

    async def downlink(self, command_id: str, callback_url: str | None) -> Downlink:
        now = utcnow()
        row = Downlink(
            command_id=command_id, device_id=await self.device_id(), command="reboot", code=1,
            parameter=1, state=0, callback_url=callback_url, inserted_at=now, updated_at=now,
        )
        async with self.db.session() as session, session.begin():
            session.add(row)
        return row

    async def change(
        self,
        downlink: Downlink,
        state: int,
        at: datetime | None = None,
        *,
        fire: bool = True,
        with_row_id: bool = False,
    ) -> StateEvent:
        at = at or utcnow()
        async with self.db.session() as session, session.begin():
            row = DownlinkEvent(
                downlink_id=downlink.id, command_id=downlink.command_id, serial="A0000001",
                state=state, at=at, callback_url=downlink.callback_url, callback_attempts=0,
            )
            session.add(row)
            await session.flush()
            event = StateEvent(
                row.id, downlink.command_id, "A0000001", state, at, downlink.callback_url,
                downlink.id if with_row_id else None,
            )
        if fire:
            self.bus.fire(EVENT_DOWNLINK_STATE, event)
        return event

    async def events(self, command_id: str) -> list[tuple[int, str | None, int, str | None]]:
        """(state, callback_status, callback_attempts, callback_error) in order."""
        async with self.db.session() as session:
            rows = await session.execute(
                select(
                    DownlinkEvent.state, DownlinkEvent.callback_status,
                    DownlinkEvent.callback_attempts, DownlinkEvent.callback_error,
                )
                .where(DownlinkEvent.command_id == command_id)
                .order_by(DownlinkEvent.id)
            )
            return [tuple(r) for r in rows.all()]


@pytest.fixture
async def core(tmp_path: Path, sqlite_url: str) -> AsyncIterator[Core]:
    db = Database(sqlite_url)
    await db.start()
    try:
        yield Core(db, tmp_path / "config")
    finally:
        await db.stop()


@pytest.fixture
async def any_core(tmp_path: Path, database: Database) -> Core:
    """The same tests on SQLite and on PostgreSQL."""
    return Core(database, tmp_path / "config")


Setup = Callable[..., Awaitable[CallbacksIntegration]]


@pytest.fixture
async def setup() -> AsyncIterator[Setup]:
    """`await setup(core, **settings)`; every integration is unloaded after the test."""
    async with integration_starter(async_setup) as start:

        async def start_with_loopback(core: Any, **settings: Any) -> CallbacksIntegration:
            return await start(core, **{**LOOPBACK, **settings})

        yield start_with_loopback


def body(command_id: str, state: int, at: datetime) -> dict[str, Any]:
    return {"command_id": command_id, "status": state, "timestamp": int(at.timestamp())}


# ---- delivery -----------------------------------------------------------------------------


async def test_every_state_change_in_order_per_downlink(
    any_core: Core, setup: Setup, receiver: Receiver
) -> None:
    integration = await setup(any_core)
    downlinks = [await any_core.downlink(f"cmd-{n}", receiver.url(f"/cb/{n}")) for n in range(3)]
    expected: dict[int, list[dict]] = {n: [] for n in range(3)}
    for state in (0, 2, 3):  # interleaved across downlinks, as devices wake up
        for n, downlink in enumerate(downlinks):
            event = await any_core.change(downlink, state)
            expected[n].append(body(f"cmd-{n}", state, event.at))
    await integration.async_wait_status(lambda s: s["delivered"] == 9)
    for n in range(3):
        assert receiver.bodies(f"/cb/{n}") == expected[n]
        assert await any_core.events(f"cmd-{n}") == [
            (0, "delivered", 1, None), (2, "delivered", 1, None), (3, "delivered", 1, None),
        ]
    request = receiver.requests[0]
    assert request.headers["Content-Type"] == "application/json"
    assert "X-Coap-Driver-Signature" not in request.headers
    assert integration.status == {"pending": 0, "delivered": 9, "failed": 0, "last_error": None}


async def test_body_is_exactly_the_documented_json(
    core: Core, setup: Setup, receiver: Receiver
) -> None:
    await setup(core, hmac_secret="s3cret")
    downlink = await core.downlink(EXAMPLE_ID, receiver.url("/hook"))
    before = int(time.time())
    await core.change(downlink, 3, EXAMPLE_AT)
    await receiver.wait_for(1)
    request = receiver.requests[0]
    assert request.body.decode() == EXAMPLE_BODY
    assert request.headers["X-Coap-Driver-Signature"] == EXAMPLE_SIGNATURE
    assert before <= int(request.headers["X-Coap-Driver-Timestamp"]) <= int(time.time())


async def test_hmac_signature_matches_the_raw_body(
    core: Core, setup: Setup, receiver: Receiver
) -> None:
    secret = "päss wörd "  # kept byte for byte: no trimming, UTF-8
    integration = await setup(core, hmac_secret=secret)
    downlink = await core.downlink("signed", receiver.url("/hook"))
    await core.change(downlink, 2)
    await integration.async_wait_status(lambda s: s["delivered"] == 1)
    request = receiver.requests[0]
    digest = hmac.new(secret.encode(), request.body, hashlib.sha256).hexdigest()
    assert request.headers["X-Coap-Driver-Signature"] == f"sha256={digest}"


async def test_reload_applies_a_new_secret(core: Core, setup: Setup, receiver: Receiver) -> None:
    integration = await setup(core)
    downlink = await core.downlink("live", receiver.url("/hook"))
    await core.change(downlink, 0)
    await integration.async_wait_status(lambda s: s["delivered"] == 1)
    await integration.async_reload({**LOOPBACK, "hmac_secret": "new-secret"})
    assert integration.settings["hmac_secret"] == "new-secret"
    await core.change(downlink, 2)
    await integration.async_wait_status(lambda s: s["delivered"] == 2)
    first, second = receiver.requests
    assert "X-Coap-Driver-Signature" not in first.headers
    digest = hmac.new(b"new-secret", second.body, hashlib.sha256).hexdigest()
    assert second.headers["X-Coap-Driver-Signature"] == f"sha256={digest}"


async def test_failing_endpoint_is_retried_in_order_until_delivered(
    core: Core, setup: Setup, receiver: Receiver
) -> None:
    integration = await setup(core, **FAST)
    receiver.plan["/flaky"] = [500, 500, 200]
    downlink = await core.downlink("flaky", receiver.url("/flaky"))
    sent = await core.change(downlink, 2)
    acked = await core.change(downlink, 3)  # must wait until state 2 is delivered
    await integration.async_wait_status(lambda s: s["delivered"] == 2)
    assert receiver.bodies("/flaky") == [
        body("flaky", 2, sent.at), body("flaky", 2, sent.at), body("flaky", 2, sent.at),
        body("flaky", 3, acked.at),
    ]
    assert await core.events("flaky") == [(2, "delivered", 3, None), (3, "delivered", 1, None)]
    times = [r.at for r in receiver.requests]
    assert times[1] - times[0] >= 0.05  # backoff_initial
    assert times[2] - times[1] >= 0.1  # doubled
    assert integration.status == {
        "pending": 0, "delivered": 2, "failed": 0, "last_error": "flaky (status 2): HTTP 500",
    }


async def test_dead_endpoint_fails_after_the_budget(
    core: Core, setup: Setup, refused_url: str, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    integration = await setup(core, retry_for=0.3, **FAST)
    dead = await core.downlink("dead", refused_url)
    started = time.monotonic()
    await core.change(dead, 2)
    await core.change(dead, 5)
    await integration.async_wait_status(lambda s: s["failed"] == 2)
    assert time.monotonic() - started >= 0.3
    events = await core.events("dead")
    assert [(state, status, error) for state, status, _, error in events] == [
        (2, "failed", "connection refused"), (5, "failed", "connection refused"),
    ]
    assert events[0][2] >= 3  # tried again and again within 0.3 s
    assert integration.status["last_error"] == "dead (status 5): connection refused"
    failures = [
        r for r in caplog.records
        if r.levelno >= logging.WARNING and r.name.startswith("custom_components.callbacks")
    ]
    assert [r.getMessage() for r in failures] == [
        f"Callback of downlink dead (status {state}) to {refused_url} failed after "
        f"{attempts} attempt(s): connection refused"
        for state, _, attempts, _ in events
    ]


async def test_http_error_until_the_budget_is_spent(
    core: Core, setup: Setup, receiver: Receiver
) -> None:
    integration = await setup(core, retry_for=0.2, **FAST)
    receiver.plan["/broken"] = [503]
    downlink = await core.downlink("broken", receiver.url("/broken"))
    await core.change(downlink, 2)
    await integration.async_wait_status(lambda s: s["failed"] == 1)
    [(state, status, attempts, error)] = await core.events("broken")
    assert (state, status, error) == (2, "failed", "HTTP 503")
    assert attempts == len(receiver.requests) >= 2


async def test_zero_budget_means_a_single_attempt(
    core: Core, setup: Setup, receiver: Receiver
) -> None:
    integration = await setup(core, retry_for=0)
    receiver.plan["/once"] = [302]  # a redirect is not a delivery
    downlink = await core.downlink("once", receiver.url("/once"))
    await core.change(downlink, 1)
    await integration.async_wait_status(lambda s: s["failed"] == 1)
    assert await core.events("once") == [(1, "failed", 1, "HTTP 302")]
    assert len(receiver.requests) == 1


async def test_unusable_url_fails_at_once(core: Core, setup: Setup) -> None:
    integration = await setup(core)
    downlink = await core.downlink("ftp", "ftp://files.example.com/cb")
    await core.change(downlink, 0)
    await integration.async_wait_status(lambda s: s["failed"] == 1)
    assert await core.events("ftp") == [(
        0, "failed", 1,
        "invalid callback URL 'ftp://files.example.com/cb': only http:// and https:// are supported",
    )]


async def test_tls_certificate_is_verified_unless_disabled(
    core: Core, setup: Setup, tls_receiver: Receiver
) -> None:
    strict = await setup(core, retry_for=0)
    downlink = await core.downlink("tls", tls_receiver.url("/secure"))
    await core.change(downlink, 0)
    await strict.async_wait_status(lambda s: s["failed"] == 1)
    [(state, status, attempts, error)] = await core.events("tls")
    assert (state, status, attempts, tls_receiver.requests) == (0, "failed", 1, [])
    assert error.startswith("TLS certificate of 127.0.0.1 not accepted: ")
    assert "certificate verify failed" in error
    await strict.async_reload({**LOOPBACK, "retry_for": 0, "verify_tls": False})
    event = await core.change(downlink, 2)
    await strict.async_wait_status(lambda s: s["delivered"] == 1)
    assert tls_receiver.bodies("/secure") == [body("tls", 2, event.at)]


def test_urls_in_logs_hide_credentials_and_query() -> None:
    assert shown_url("https://user:pw@hooks.example.com:8443/cb?token=abc#x") == (
        "https://hooks.example.com:8443/cb"
    )
    assert shown_url("http://[bad/cb") == "<invalid URL>"


def test_backoff_doubles_up_to_the_maximum_with_full_jitter_below_it() -> None:
    exact = {"backoff_initial": 0.5, "backoff_max": 3, "jitter": "none"}
    assert [backoff_delay(n, exact) for n in range(1, 7)] == [0.5, 1, 2, 3, 3, 3]
    assert backoff_delay(10_000, exact) == 3  # no overflow after days of retries
    rng = random.Random(7)
    jittered = [backoff_delay(n, {**exact, "jitter": "full"}, rng) for n in range(1, 200)]
    assert all(0 <= d <= min(3, 0.5 * 2 ** (n - 1)) for n, d in enumerate(jittered, 1))
    assert len(set(jittered)) == len(jittered)  # spread out, not one fixed value


async def test_unknown_host_is_reported_by_name(core: Core, setup: Setup) -> None:
    integration = await setup(core, retry_for=0)
    downlink = await core.downlink("nxdomain", "http://callbacks.host.invalid/cb")
    await core.change(downlink, 0)
    await integration.async_wait_status(lambda s: s["failed"] == 1)
    assert await core.events("nxdomain") == [
        (0, "failed", 1, "cannot resolve host callbacks.host.invalid")
    ]


async def test_hanging_endpoint_does_not_delay_other_downlinks(
    core: Core, setup: Setup, receiver: Receiver
) -> None:
    timeout = 1.5
    integration = await setup(core, timeout=timeout, retry_for=0)
    receiver.plan["/slow"] = ["hang"]
    slow = await core.downlink("slow", receiver.url("/slow"))
    healthy = await core.downlink("healthy", receiver.url("/healthy"))
    started = time.monotonic()
    await core.change(slow, 2)
    await receiver.wait_for(1, "/slow")  # the slow request is in flight ...
    await core.change(healthy, 2)  # returns although the slow request still hangs
    await receiver.wait_for(1, "/healthy")  # ... and the healthy one still arrives
    assert receiver.requests[1].at - started < timeout
    await integration.async_wait_status(lambda s: s["delivered"] == 1)
    assert integration.status["pending"] == 1  # the slow one is still in flight
    await integration.async_wait_status(lambda s: s["failed"] == 1, within=timeout + 5)
    assert time.monotonic() - started >= timeout
    assert await core.events("slow") == [(2, "failed", 1, "timeout after 1.5 s")]
    assert await core.events("healthy") == [(2, "delivered", 1, None)]


async def test_concurrency_limit_queues_requests_across_downlinks(
    core: Core, setup: Setup, receiver: Receiver
) -> None:
    integration = await setup(core, max_concurrency=1, timeout=0.5, retry_for=0)
    receiver.plan["/slow"] = ["hang"]
    slow = await core.downlink("slow", receiver.url("/slow"))
    other = await core.downlink("other", receiver.url("/other"))
    await core.change(slow, 2)
    await receiver.wait_for(1, "/slow")
    await core.change(other, 2)
    await integration.async_wait_status(lambda s: s["delivered"] == 1 and s["failed"] == 1)
    slow_request, other_request = receiver.requests
    assert other_request.at - slow_request.at >= 0.5  # waited for the only slot


async def test_events_without_callback_url_are_not_sent(
    core: Core, setup: Setup, receiver: Receiver
) -> None:
    integration = await setup(core)
    silent = await core.downlink("silent", None)
    loud = await core.downlink("loud", receiver.url("/loud"))
    await core.change(silent, 0)
    event = await core.change(loud, 0)
    await integration.async_wait_status(lambda s: s["delivered"] == 1)
    assert [r.json for r in receiver.requests] == [body("loud", 0, event.at)]
    assert await core.events("silent") == [(0, None, 0, None)]


async def test_restart_resumes_owed_callbacks(
    any_core: Core, setup: Setup, receiver: Receiver
) -> None:
    settings = {"backoff_initial": 60, "jitter": "none"}  # no retry before the restart
    first = await setup(any_core, **settings)
    receiver.plan["/cb"] = [503, 200]
    downlink = await any_core.downlink("resume", receiver.url("/cb"))
    sent = await any_core.change(downlink, 2)
    await first.async_wait_status(lambda s: s["last_error"] == "resume (status 2): HTTP 503")
    assert await any_core.events("resume") == [(2, None, 1, "HTTP 503")]  # owed, tried once
    await first.async_unload()
    acked = await any_core.change(downlink, 3)  # while the integration is stopped
    second = await setup(any_core, **settings)
    await second.async_wait_status(lambda s: s["delivered"] == 2)
    assert receiver.bodies("/cb") == [
        body("resume", 2, sent.at), body("resume", 2, sent.at), body("resume", 3, acked.at),
    ]
    assert await any_core.events("resume") == [(2, "delivered", 2, None), (3, "delivered", 1, None)]


async def test_late_commit_below_the_read_position_is_delivered(
    tmp_path: Path, postgres_url: str, setup: Setup, receiver: Receiver
) -> None:
    """On PostgreSQL a row can commit after a row with a higher id: its event still counts."""
    db = Database(postgres_url)
    await db.start()
    try:
        core = Core(db, tmp_path / "config")
        integration = await setup(core)
        early = await core.downlink("early", receiver.url("/early"))
        late = await core.downlink("late", receiver.url("/late"))
        async with db.session() as session, session.begin():
            row = DownlinkEvent(
                downlink_id=early.id, command_id="early", serial="A0000001", state=2,
                at=utcnow(), callback_url=early.callback_url, callback_attempts=0,
            )
            session.add(row)
            await session.flush()  # id taken, not committed yet
            await core.change(late, 2)  # higher id, committed and read first
            await integration.async_wait_status(lambda s: s["delivered"] == 1)
        core.bus.fire(
            EVENT_DOWNLINK_STATE,
            StateEvent(row.id, "early", "A0000001", 2, row.at, early.callback_url),
        )
        await integration.async_wait_status(lambda s: s["delivered"] == 2, within=5)
        assert [r.path for r in receiver.requests] == ["/late", "/early"]
    finally:
        await db.stop()


async def test_a_change_committed_here_is_sent_from_its_event_without_a_read(
    core: Core, setup: Setup, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The core's events carry the downlink row: the callback goes out even while the
    table cannot be read, and is then marked delivered in it."""
    integration = await setup(core)
    downlink = await core.downlink("direct", receiver.url("/cb"))

    async def unreadable(self: CallbackStore, from_id: int, limit: int) -> list[Any]:
        raise OSError("reads are broken")

    monkeypatch.setattr(CallbackStore, "pending", unreadable)
    first = await core.change(downlink, 2, with_row_id=True)
    second = await core.change(downlink, 3, with_row_id=True)
    await integration.async_wait_status(lambda s: s["delivered"] == 2)
    assert receiver.bodies("/cb") == [body("direct", 2, first.at), body("direct", 3, second.at)]
    assert await core.events("direct") == [(2, "delivered", 1, None), (3, "delivered", 1, None)]


async def test_unload_with_a_request_in_flight(
    core: Core, setup: Setup, receiver: Receiver
) -> None:
    integration = await setup(core)
    receiver.plan["/slow"] = ["hang"]
    downlink = await core.downlink("cut", receiver.url("/slow"))
    await core.change(downlink, 2)
    await receiver.wait_for(1)
    async with asyncio.timeout(2):
        await integration.async_unload()
    assert await core.events("cut") == [(2, None, 0, None)]  # still owed: sent again at start


async def test_runs_inside_the_driver(tmp_path: Path, receiver: Receiver) -> None:
    """Loaded by the real driver from configuration.yaml; settings saved live are checked."""
    config_dir = tmp_path / "config"
    write_config(config_dir, extra="callbacks:\n  timeout: 2\n  allowed_networks: [127.0.0.0/8]\n")
    driver = Driver(config_dir)
    await driver.start()
    try:
        integration = driver.integrations.running["callbacks"]
        assert integration.settings["timeout"] == 2.0
        core = Core(driver.db, config_dir)
        core.bus = driver.bus
        downlink = await core.downlink("in-driver", receiver.url("/cb"))
        event = await core.change(downlink, 0)
        await integration.async_wait_status(lambda s: s["delivered"] == 1)
        assert receiver.bodies("/cb") == [body("in-driver", 0, event.at)]
        with pytest.raises(IntegrationSettingsError) as info:
            await driver.integrations.save("callbacks", {"backoff_initial": 5, "backoff_max": 1})
        assert info.value.errors == {
            "backoff_max": "backoff_max (1 s) must be at least backoff_initial (5 s)"
        }
    finally:
        await driver.stop()


# ---- settings -----------------------------------------------------------------------------


def test_defaults() -> None:
    assert SETTINGS_SCHEMA({}) == {
        "timeout": 5.0,
        "retry_for": 3600.0,
        "backoff_initial": 1.0,
        "backoff_max": 300.0,
        "jitter": "full",
        "max_concurrency": 50,
        "hmac_secret": "",
        "verify_tls": True,
        "allowed_networks": [],
        "denied_networks": [],
    }


def test_form_metadata_comes_with_the_schema() -> None:
    fields = {str(key): key.description for key in SETTINGS_SCHEMA.schema}
    assert fields["hmac_secret"]["secret"] is True
    assert fields["jitter"]["options"] == {"full": "Full jitter", "none": "No jitter"}
    assert all(meta["label"] and meta["help"] for meta in fields.values())


def test_fractions_and_text_numbers_are_accepted() -> None:
    settings = SETTINGS_SCHEMA(
        {"timeout": "0.25", "retry_for": 0, "max_concurrency": "7", "hmac_secret": None,
         "verify_tls": "off"}
    )
    assert (settings["timeout"], settings["retry_for"], settings["max_concurrency"]) == (
        0.25, 0.0, 7,
    )
    assert (settings["hmac_secret"], settings["verify_tls"]) == ("", False)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"timeout": 0}, "timeout must be more than 0 seconds for dictionary value @ data['timeout']"),
        ({"timeout": "soon"}, "timeout must be a number of seconds for dictionary value @ data['timeout']"),
        ({"timeout": True}, "timeout must be a number of seconds for dictionary value @ data['timeout']"),
        ({"timeout": "nan"}, "timeout must be a number of seconds for dictionary value @ data['timeout']"),
        ({"timeout": 601}, "timeout must be at most 600 seconds for dictionary value @ data['timeout']"),
        ({"retry_for": -1}, "retry_for must be 0 or more seconds for dictionary value @ data['retry_for']"),
        ({"retry_for": 1e9}, "retry_for must be at most 2.592e+06 seconds for dictionary value @ data['retry_for']"),
        ({"backoff_initial": 0}, "backoff_initial must be more than 0 seconds for dictionary value @ data['backoff_initial']"),
        ({"backoff_max": -5}, "backoff_max must be more than 0 seconds for dictionary value @ data['backoff_max']"),
        ({"jitter": "half"}, "jitter must be full or none for dictionary value @ data['jitter']"),
        ({"max_concurrency": 0}, "max_concurrency must be a whole number from 1 to 1000 for dictionary value @ data['max_concurrency']"),
        ({"max_concurrency": 2.5}, "max_concurrency must be a whole number from 1 to 1000 for dictionary value @ data['max_concurrency']"),
        ({"hmac_secret": 1234}, "the HMAC secret must be text for dictionary value @ data['hmac_secret']"),
        ({"verify_tls": "maybe"}, "expected true or false for dictionary value @ data['verify_tls']"),
        ({"retries": 3}, "extra keys not allowed @ data['retries']"),
    ],
)
def test_schema_messages(settings: dict, message: str) -> None:
    with pytest.raises(vol.MultipleInvalid) as info:
        SETTINGS_SCHEMA(settings)
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("settings", "errors"),
    [
        ({"backoff_initial": 10, "backoff_max": 2},
         {"backoff_max": "backoff_max (2 s) must be at least backoff_initial (10 s)"}),
        ({"timeout": -1, "jitter": "x"},
         {"timeout": "timeout must be more than 0 seconds", "jitter": "jitter must be full or none"}),
        ({"backoff_initial": 0.5, "backoff_max": 0.5}, {}),
        ({}, {}),
        (None, {}),
    ],
)
async def test_async_validate(settings: dict | None, errors: dict) -> None:
    assert await async_validate(settings) == errors


async def test_invalid_settings_refused_at_setup_and_reload(core: Core, setup: Setup) -> None:
    with pytest.raises(SettingsError) as info:
        await async_setup(core, {"timeout": 0, "jitter": "x"})
    assert str(info.value) == (
        "callbacks.timeout: timeout must be more than 0 seconds; "
        "callbacks.jitter: jitter must be full or none"
    )
    integration = await setup(core, timeout=2)
    with pytest.raises(SettingsError) as info:
        await integration.async_reload({"backoff_initial": 5, "backoff_max": 1})
    assert info.value.errors == {"backoff_max": "backoff_max (1 s) must be at least backoff_initial (5 s)"}
    assert integration.settings["timeout"] == 2.0  # unchanged
    assert integration.settings["backoff_initial"] == 1.0


def test_manifest_and_loader() -> None:
    manifest = read_manifest(builtin_components_dir() / "callbacks")
    assert (manifest.domain, manifest.name, manifest.type, manifest.requirements) == (
        "callbacks", "Downlink callbacks", "integration", [],
    )
    module = import_integration(manifest)
    assert module.async_setup is async_setup
    assert module.config_flow.SETTINGS_SCHEMA is SETTINGS_SCHEMA
