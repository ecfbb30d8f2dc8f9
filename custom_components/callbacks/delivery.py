"""The callback worker: in order per downlink, concurrent across downlinks, durable.

Owed callbacks are read from the database (`store.py`), never taken from the
event itself, so the bus listener only wakes this worker and a restart
resumes whatever is still owed. Each downlink with owed callbacks gets its own
task that delivers them one after another (state 3 is never sent before
state 2 is delivered or has failed); a semaphore bounds the requests in
flight across all downlinks, and is held only while a request is in flight,
never while a task waits to retry, so a dead endpoint costs no capacity.
Delivery is at least once: a request cut off by a stop is sent again later.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver

from driver_core.callback_policy import CallbackPolicy
from driver_core.storage.health import first_line
from driver_core.timefmt import utcnow

from .config_flow import JITTER_FULL
from .sender import GuardedResolver, Outcome, callback_body, post_callback, shown_url
from .store import CallbackStore, PendingCallback

_LOGGER = logging.getLogger(__name__)

PAGE = 500  # rows read per query
POLL_S = 30.0  # full rescan without a wake-up: rows of other processes, anything missed
DB_RETRY_MIN_S = 0.5
DB_RETRY_MAX_S = 30.0


def backoff_delay(
    failures: int, settings: dict[str, Any], rng: random.Random | None = None
) -> float:
    """Exponential delay before retry number `failures`, with full jitter unless disabled."""
    exponent = min(failures - 1, 60)  # 2**60 s is already past any configured maximum
    delay = min(settings["backoff_max"], settings["backoff_initial"] * 2**exponent)
    if settings["jitter"] == JITTER_FULL:
        delay = (rng or random).uniform(0, delay)
    return delay


class CallbackDelivery:
    def __init__(
        self,
        store: CallbackStore,
        settings: dict[str, Any],
        on_change: Callable[[], None],
        policy: CallbackPolicy,
        resolver: AbstractResolver | None = None,
    ) -> None:
        """`resolver` answers the name lookups (the system's by default); the policy's
        refusals are applied to whatever it returns."""
        self._store = store
        self._settings = settings
        self._policy = policy
        self._resolver = resolver
        self._connector: aiohttp.TCPConnector | None = None
        self._on_change = on_change
        self._slots = asyncio.Semaphore(settings["max_concurrency"])
        self._session: aiohttp.ClientSession | None = None
        self._runner: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._cursor = 0  # highest event id read so far
        self._hint: int | None = None  # lowest id announced since the last read
        self._known: set[int] = set()  # ids queued or in flight
        # Ids finished while a read was running: that read may still return them as owed.
        self._finished_during_read: set[int] = set()
        self._queues: dict[int, list[PendingCallback]] = {}  # by downlink id, lowest id first
        self._tasks: dict[int, asyncio.Task[None]] = {}  # one per downlink being served
        self.delivered = 0
        self.failed = 0
        self.last_error: str | None = None

    # ---- control -----------------------------------------------------------------

    @property
    def pending(self) -> int:
        return len(self._known)

    @property
    def settings(self) -> dict[str, Any]:
        return self._settings

    @settings.setter
    def settings(self, settings: dict[str, Any]) -> None:
        """New settings apply from the next attempt; requests in flight finish as they are."""
        if settings["max_concurrency"] != self._settings["max_concurrency"]:
            self._slots = asyncio.Semaphore(settings["max_concurrency"])
        self._settings = settings

    @property
    def policy(self) -> CallbackPolicy:
        return self._policy

    @policy.setter
    def policy(self, policy: CallbackPolicy) -> None:
        """Applies to the next connection; cached lookups were filtered by the old one."""
        self._policy = policy
        if self._connector is not None:
            self._connector.clear_dns_cache()

    def start(self) -> None:
        resolver = GuardedResolver(lambda: self._policy, self._resolver)
        self._connector = aiohttp.TCPConnector(limit=0, resolver=resolver)
        self._session = aiohttp.ClientSession(connector=self._connector)
        self._runner = asyncio.create_task(self._run(), name="callbacks-reader")

    def notify(self, event_id: int | None = None) -> None:
        """A new owed callback is committed (called from the bus listener: no I/O here)."""
        if isinstance(event_id, int) and (self._hint is None or event_id < self._hint):
            self._hint = event_id
        self._wake.set()

    def offer(self, row: PendingCallback) -> None:
        """An owed callback just committed in this process: queue it at once.

        The table stays the source of truth: a read finds the row already
        known and skips it, and after a restart the row is read like any other.
        """
        self._enqueue(row)

    async def close(self) -> None:
        tasks = [task for task in (self._runner, *self._tasks.values()) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._runner = None
        self._tasks.clear()
        self._queues.clear()
        self._known.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None
            self._connector = None
        self._on_change()

    # ---- reading owed callbacks --------------------------------------------------

    async def _run(self) -> None:
        full = True
        while True:
            wait = POLL_S
            try:
                await self._read(0 if full else self._next_from())
            except Exception as exc:  # database down: keep what is queued, read again soon
                self._report_db_error("reading owed callbacks", exc)
                wait = DB_RETRY_MAX_S
            woken = False
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._wake.wait()
                    woken = True
            self._wake.clear()
            full = not woken

    def _next_from(self) -> int:
        """Read on from the cursor, or from an announced id below it (a late commit)."""
        start = self._cursor + 1
        if self._hint is not None:
            start = min(start, self._hint)
        self._hint = None
        return start

    async def _read(self, from_id: int) -> None:
        self._finished_during_read.clear()
        try:
            while True:
                rows = await self._store.pending(from_id, PAGE)
                for row in rows:
                    if row.id not in self._finished_during_read:
                        self._enqueue(row)
                if len(rows) < PAGE:
                    return
                from_id = rows[-1].id + 1
        finally:
            self._finished_during_read.clear()

    def _enqueue(self, row: PendingCallback) -> None:
        if row.id in self._known:
            return
        self._known.add(row.id)
        self._cursor = max(self._cursor, row.id)
        queue = self._queues.setdefault(row.downlink_id, [])
        serving = row.downlink_id in self._tasks
        bisect.insort(queue, row, lo=1 if serving and queue else 0)  # never ahead of one in flight
        if not serving:
            self._tasks[row.downlink_id] = asyncio.create_task(
                self._serve(row.downlink_id), name=f"callbacks-downlink-{row.downlink_id}"
            )
        self._on_change()

    # ---- delivering --------------------------------------------------------------

    async def _serve(self, downlink_id: int) -> None:
        """Deliver one downlink's owed callbacks strictly one after the other."""
        queue = self._queues[downlink_id]
        try:
            while queue:
                row = queue[0]
                try:
                    await self._deliver(row)
                except Exception:  # a bug: leave the rows owed, a full rescan retries them
                    _LOGGER.exception("Callback delivery for %s failed", row.command_id)
                    for dropped in queue:
                        self._known.discard(dropped.id)
                    queue.clear()
                    break
                queue.pop(0)
                self._known.discard(row.id)
                self._finished_during_read.add(row.id)
                self._on_change()
        finally:
            self._tasks.pop(downlink_id, None)
            if not queue:
                self._queues.pop(downlink_id, None)

    async def _deliver(self, row: PendingCallback) -> None:
        """Attempt until delivered or the retry budget (from the state change) is spent."""
        body = callback_body(row.command_id, row.state, row.at)
        attempts = row.attempts
        failures = 0
        while True:
            outcome = await self._attempt(row.callback_url, body)
            attempts += 1
            if outcome.delivered:
                await self._persist(self._store.mark_delivered, row.id, attempts)
                self.delivered += 1
                self._on_change()
                return
            failures += 1
            error = outcome.error or "unknown error"
            deadline = row.at + timedelta(seconds=self._settings["retry_for"])
            remaining = (deadline - utcnow()).total_seconds()
            if outcome.permanent or remaining <= 0:
                await self._persist(self._store.mark_failed, row.id, attempts, error)
                self.failed += 1
                self.last_error = f"{row.command_id} (status {row.state}): {error}"
                _LOGGER.warning(
                    "Callback of downlink %s (status %s) to %s failed after %d attempt(s): %s",
                    row.command_id, row.state, shown_url(row.callback_url), attempts, error,
                )
                self._on_change()
                return
            await self._persist(self._store.record_attempt, row.id, attempts, error)
            self.last_error = f"{row.command_id} (status {row.state}): {error}"  # once stored
            self._on_change()
            delay = min(backoff_delay(failures, self._settings), remaining)
            _LOGGER.debug(
                "Callback of %s to %s: %s; retry in %.1f s",
                row.command_id, shown_url(row.callback_url), error, delay,
            )
            await asyncio.sleep(delay)

    async def _attempt(self, url: str, body: bytes) -> Outcome:
        settings = self._settings
        assert self._session is not None
        async with self._slots:
            return await post_callback(
                self._session,
                url,
                body,
                timeout_s=settings["timeout"],
                hmac_secret=settings["hmac_secret"],
                verify_tls=settings["verify_tls"],
                policy=self._policy,
            )

    async def _persist(self, write: Callable[..., Awaitable[None]], *args: Any) -> None:
        """Write a result, waiting out a database outage (the result is never dropped)."""
        delay = DB_RETRY_MIN_S
        while True:
            try:
                await write(*args)
                return
            except Exception as exc:
                self._report_db_error("recording a callback result", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, DB_RETRY_MAX_S)

    def _report_db_error(self, doing: str, exc: Exception) -> None:
        message = f"database error while {doing}: {first_line(exc)}"
        if message != self.last_error:
            _LOGGER.warning("Callbacks: %s", message)
        self.last_error = message
        self._on_change()
