"""Outbox -> broker: one ordered pipeline with a bounded window of in-flight publishes.

Rows are handed to the MQTT client strictly in id order (the client sends them
in that order on one connection), up to `window` wait for their acknowledgement
at once, and acknowledged rows are deleted in batches. Nothing is deleted
before the broker has it, so a lost connection only means "send again what is
still in the table" (at-least-once, order kept).

Fresh uplinks are published from the committed event itself (it carries the
row id and the stored JSON), so the hot path reads nothing back; the table is
scanned when a connection starts and every few seconds, which also catches
rows committed by another process or late.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from .outbox import Outbox, OutboxRow
from .topic import DEFAULT_UPLINK_TOPIC, TopicTemplate

_LOGGER = logging.getLogger(__name__)

PAGE = 500  # new rows read per query
DELETE_BATCH = 200  # acked rows deleted per statement once that many are waiting
DELETE_DELAY_S = 0.05  # ...or after this long
IDLE_POLL_S = 5.0  # safety net: look at the table even without an uplink event
DRAIN_S = 5.0  # on a clean stop, how long in-flight publishes may still complete
DB_RETRY_S = 2.0


async def first_of(*waitables: asyncio.Event | asyncio.Future[Any], wait_s: float | None) -> None:
    """Return when any event is set or future done, or after `wait_s` seconds (None: no limit)."""
    waiters = [asyncio.ensure_future(w.wait()) for w in waitables if isinstance(w, asyncio.Event)]
    futures = [w for w in waitables if not isinstance(w, asyncio.Event)]
    try:
        await asyncio.wait([*waiters, *futures], timeout=wait_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)


class OutboxPublisher:
    """Publishes outbox rows; `topic` and `qos` may be swapped at any time (reload)."""

    def __init__(
        self,
        outbox: Outbox,
        topic: TopicTemplate,
        qos: int,
        *,
        window: int = 100,
        on_change: Callable[[], None] = lambda: None,
        on_error: Callable[[str | None], None] = lambda message: None,
    ) -> None:
        self.outbox = outbox
        self.topic = topic
        self.qos = qos
        self.window = window
        self.waiting = 0  # rows in the table: exact when known, else counted along
        # Bumped by every count along (notify, flush): a table scan that overlapped one of
        # them read an older snapshot and must not overwrite `waiting` with it.
        self._counted = 0
        self.published = 0
        self._on_change = on_change
        self._on_error = on_error
        self._wakeup = asyncio.Event()
        self._inflight: set[int] = set()
        self._acked: list[int] = []
        self._acked_set: set[int] = set()
        self._ack_event = asyncio.Event()
        self._flush_lock = asyncio.Lock()
        self._deleter: asyncio.Task[None] | None = None
        self._fallback_topic = TopicTemplate(DEFAULT_UPLINK_TOPIC)
        self._fresh: deque[OutboxRow] = deque()  # committed rows announced by events
        self._high = 0  # highest id handed to the client since the last table scan
        self._next_scan = 0.0  # monotonic time of the next table scan

    # ---- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        self.waiting = await self.outbox.count()
        self._deleter = asyncio.create_task(self._delete_loop(), name="mqtt-outbox-delete")

    async def close(self) -> None:
        if self._deleter is not None:
            self._deleter.cancel()
            await asyncio.gather(self._deleter, return_exceptions=True)
            self._deleter = None
        with contextlib.suppress(Exception):
            await self.flush()

    def notify(self, uplink: Any = None) -> None:
        """A new row was committed (uplink event): publish it without reading it back."""
        self.waiting += 1
        self._counted += 1
        outbox_id = getattr(uplink, "outbox_id", None)
        document = getattr(uplink, "document_json", None)
        if outbox_id is not None and document is not None:
            self._fresh.append(OutboxRow(outbox_id, uplink.serial, document))
        else:
            self._next_scan = 0.0  # unknown row: look at the table
        self._wakeup.set()

    # ---- publishing ------------------------------------------------------------

    async def run(self, client: Any, stop: asyncio.Event) -> None:
        """Publish until `stop` is set (then drain and return) or a publish fails (raise)."""
        await self.flush()  # acked rows must be gone before the table is read again
        loop = asyncio.get_running_loop()
        failure: asyncio.Future[None] = loop.create_future()
        window = asyncio.Semaphore(self.window)
        tasks: set[asyncio.Task[None]] = set()
        self._next_scan = 0.0  # a new connection starts from the table
        try:
            while not stop.is_set():
                self._wakeup.clear()
                rows = await self._next_rows(stop, failure)
                if rows is None:
                    continue
                if not rows:
                    wait_s = max(0.0, min(IDLE_POLL_S, self._next_scan - time.monotonic()))
                    await first_of(self._wakeup, stop, failure, wait_s=wait_s)
                    if failure.done():
                        failure.result()
                    continue
                for row in rows:
                    await window.acquire()
                    if failure.done():
                        failure.result()
                    if stop.is_set():
                        window.release()
                        break
                    self._inflight.add(row.id)
                    task = asyncio.create_task(
                        self._publish(client, row, self._topic_for(row), window, failure)
                    )
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
            if tasks:  # clean stop: let what is on the wire be acknowledged
                await asyncio.wait(tasks, timeout=DRAIN_S)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._inflight.clear()
            if failure.done() and stop.is_set():
                failure.exception()  # retrieved: a failure while stopping changes nothing
            with contextlib.suppress(Exception):
                await self.flush()

    async def _next_rows(
        self, stop: asyncio.Event, failure: asyncio.Future[None]
    ) -> list[OutboxRow] | None:
        """Fresh rows from events, or a table scan when one is due (start, timer, gaps)."""
        if time.monotonic() >= self._next_scan:
            rows = await self._read_page(stop, failure)
            if rows is None:
                return None
            if len(rows) < PAGE:  # the scan saw everything committed so far
                self._next_scan = time.monotonic() + IDLE_POLL_S
            if rows:
                self._high = max(self._high, rows[-1].id)
            return rows
        fresh = []
        while self._fresh:
            row = self._fresh.popleft()
            if row.id > self._high:
                fresh.append(row)
                self._high = row.id
        return fresh

    async def _read_page(
        self, stop: asyncio.Event, failure: asyncio.Future[None]
    ) -> list[OutboxRow] | None:
        """The oldest rows not on the wire nor acked; None after a database error."""
        skip = self._inflight | self._acked_set  # taken before reading: see flush()
        limit = len(skip) + PAGE
        counted = self._counted
        try:
            rows = await self.outbox.oldest(limit)
        except Exception as exc:  # a database hiccup must not drop the MQTT connection
            _LOGGER.warning("Cannot read the MQTT outbox: %s", exc)
            self._on_error(f"cannot read the MQTT outbox: {exc}")
            await first_of(stop, failure, wait_s=DB_RETRY_S)
            if failure.done():
                failure.result()
            return None
        if len(rows) < limit and counted == self._counted:
            self.waiting = len(rows)
            self._on_change()
        return [row for row in rows if row.id not in skip]

    def _topic_for(self, row: OutboxRow) -> str:
        try:
            return self.topic.render(row.serial, row.document)
        except (ValueError, KeyError, TypeError) as exc:
            _LOGGER.error(
                "Uplink topic template gives no valid topic for %s (%s); using %s",
                row.serial, exc, DEFAULT_UPLINK_TOPIC,
            )
            return self._fallback_topic.render(row.serial)

    async def _publish(
        self,
        client: Any,
        row: OutboxRow,
        topic: str,
        window: asyncio.Semaphore,
        failure: asyncio.Future[None],
    ) -> None:
        try:
            await client.publish(topic, row.document.encode(), qos=self.qos)
        except Exception as exc:
            if not failure.done():
                failure.set_exception(exc)
            return
        finally:
            self._inflight.discard(row.id)
            window.release()
        self._acked.append(row.id)
        self._acked_set.add(row.id)
        self.published += 1
        self._ack_event.set()

    # ---- deleting what the broker has --------------------------------------------

    async def _delete_loop(self) -> None:
        while True:
            await self._ack_event.wait()
            if len(self._acked) < DELETE_BATCH:
                await asyncio.sleep(DELETE_DELAY_S)  # let a batch gather
            if not await self.flush():
                await asyncio.sleep(DB_RETRY_S)

    async def flush(self) -> bool:
        """Delete every acked row now; False when the database refused."""
        async with self._flush_lock:
            self._ack_event.clear()
            batch = self._acked[:]
            if not batch:
                return True
            try:
                removed = await self.outbox.delete(batch)
            except Exception as exc:
                _LOGGER.warning("Cannot delete delivered rows from the MQTT outbox: %s", exc)
                self._on_error(f"cannot delete delivered rows from the MQTT outbox: {exc}")
                self._ack_event.set()
                return False
            # Only now may these ids be read as "waiting" again (they no longer exist).
            del self._acked[: len(batch)]
            self._acked_set.difference_update(batch)
            self.waiting = max(0, self.waiting - removed)
            self._counted += 1
            self._on_change()
            return True
