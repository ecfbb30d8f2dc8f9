"""Coalesce concurrent single-key loads into one batched query.

A JOIN storm brings hundreds of unknown kids per second, each needing its
device row before aiocoap can pick a context. One session per kid costs a
pooled connection (or a new one: the pool's overflow is opened and closed
again), several thread hops and a query; one query for every kid waiting at
that moment costs the same as one. While a batch is being read, new keys wait
for the next batch, so a load never returns a row read before it was asked for.

Under a steady stream of misses each batch would hold only the one or two keys
that arrived while the previous query ran; so when the previous batch ended
less than `busy_window` ago, the next one lingers `linger` seconds to gather
more. An isolated miss is read at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Hashable, Mapping
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class BatchLoader(Generic[K, V]):
    """`await loader.load(key)`: the value `load_many` returns for key, or None when it has none."""

    def __init__(
        self,
        load_many: Callable[[list[K]], Awaitable[Mapping[K, V]]],
        max_batch: int = 500,
        linger: float = 0.002,
        busy_window: float = 0.05,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        """`sleep` is how the loader lingers (a test passes one it can watch and end)."""
        self._load_many = load_many
        self._sleep = sleep
        self._max_batch = max_batch
        self._linger = linger
        self._busy_window = busy_window
        self._last_end = -1e9
        self._waiting: dict[K, asyncio.Future[V | None]] = {}
        self._runner: asyncio.Task[None] | None = None
        self.batches = 0  # queries made, for tests and benchmarks
        self.loaded = 0  # keys asked for in those queries

    async def load(self, key: K) -> V | None:
        future = self._waiting.get(key)
        if future is None:
            future = asyncio.get_running_loop().create_future()
            self._waiting[key] = future
            if self._runner is None or self._runner.done():
                self._runner = asyncio.create_task(self._run(), name="batch-loader")
        # Shielded: a cancelled caller must not cancel the result other callers share.
        return await asyncio.shield(future)

    async def _run(self) -> None:
        while self._waiting:
            busy = time.monotonic() - self._last_end < self._busy_window
            if busy and self._linger > 0 and len(self._waiting) < self._max_batch:
                await self._sleep(self._linger)
            keys = list(self._waiting)[: self._max_batch]
            futures = {key: self._waiting.pop(key) for key in keys}
            self.batches += 1
            self.loaded += len(keys)
            try:
                found = await self._load_many(keys)
                self._last_end = time.monotonic()
            except BaseException as exc:
                self._last_end = time.monotonic()
                for future in futures.values():
                    if not future.done():
                        future.set_exception(exc if isinstance(exc, Exception) else RuntimeError(str(exc)))
                if not isinstance(exc, Exception):
                    self._fail_waiting(exc)
                    raise
                continue
            for key, future in futures.items():
                if not future.done():
                    future.set_result(found.get(key))

    def _fail_waiting(self, exc: BaseException) -> None:
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(RuntimeError(f"loader stopped: {exc!r}"))
        self._waiting.clear()
