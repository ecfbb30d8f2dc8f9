"""BatchLoader: concurrent misses share one query; nothing is read before it was asked for."""

from __future__ import annotations

import asyncio

import pytest

from driver_core.batch_loader import BatchLoader


class Table:
    """A stand-in for the database: records each batch, answers when released."""

    def __init__(self, rows: dict[str, int]) -> None:
        self.rows = rows
        self.batches: list[list[str]] = []
        self.release = asyncio.Event()
        self.reading = asyncio.Event()  # set once a batch has been asked for
        self.fail: Exception | None = None

    async def load_many(self, keys: list[str]) -> dict[str, int]:
        self.batches.append(list(keys))
        self.reading.set()
        found = {key: self.rows[key] for key in keys if key in self.rows}  # read when asked
        await self.release.wait()
        if self.fail is not None:
            raise self.fail
        return found


async def test_concurrent_loads_share_one_batch_and_missing_keys_are_none():
    table = Table({"a": 1, "b": 2})
    loader = BatchLoader(table.load_many)
    waiting = [asyncio.create_task(loader.load(key)) for key in ("a", "b", "a", "zz")]
    await table.reading.wait()
    table.release.set()
    assert await asyncio.gather(*waiting) == [1, 2, 1, None]
    assert table.batches == [["a", "b", "zz"]]
    assert (loader.batches, loader.loaded) == (1, 3)


async def test_a_key_asked_for_during_a_read_waits_for_the_next_batch():
    table = Table({"a": 1})
    loader = BatchLoader(table.load_many, linger=0)
    first = asyncio.create_task(loader.load("a"))
    await table.reading.wait()
    table.rows["a"] = 5  # changed after the first read began
    second = asyncio.create_task(loader.load("a"))
    # Tasks run in the order they were woken: the second load asks for "a" before the read
    # of the first batch (woken by the release below) goes on.
    table.release.set()
    assert await first == 1
    assert await second == 5
    assert table.batches == [["a"], ["a"]]


async def test_a_failed_read_fails_its_waiters_and_the_next_batch_still_runs():
    table = Table({"a": 1})
    loader = BatchLoader(table.load_many, linger=0)
    table.fail = OSError("database gone")
    table.release.set()
    with pytest.raises(OSError, match="database gone"):
        await loader.load("a")
    table.fail = None
    assert await loader.load("a") == 1


async def test_a_cancelled_waiter_does_not_cancel_the_others():
    table = Table({"a": 1})
    loader = BatchLoader(table.load_many)
    impatient = asyncio.create_task(loader.load("a"))
    patient = asyncio.create_task(loader.load("a"))
    await table.reading.wait()  # both are waiting for the batch now
    impatient.cancel()
    table.release.set()
    assert await patient == 1
    assert impatient.cancelled()


class Linger:
    """Stands in for the loader's linger sleep: records it, ends when the test says so."""

    def __init__(self) -> None:
        self.asked: list[float] = []
        self.lingering = asyncio.Event()
        self.end = asyncio.Event()

    async def __call__(self, seconds: float) -> None:
        self.asked.append(seconds)
        self.lingering.set()
        await self.end.wait()


async def test_misses_in_a_busy_period_linger_to_gather_a_batch():
    table = Table({f"k{i}": i for i in range(10)})
    table.release.set()
    linger = Linger()
    loader = BatchLoader(table.load_many, linger=0.05, busy_window=10, sleep=linger)
    assert await loader.load("k0") == 0
    assert linger.asked == []  # isolated: read at once
    first = asyncio.create_task(loader.load("k1"))
    await linger.lingering.wait()  # the next misses join the same batch
    rest = [asyncio.create_task(loader.load(f"k{i}")) for i in range(2, 6)]
    linger.end.set()  # wakes the loader after the misses above have asked
    assert await asyncio.gather(first, *rest) == [1, 2, 3, 4, 5]
    assert table.batches == [["k0"], ["k1", "k2", "k3", "k4", "k5"]]
    assert linger.asked == [0.05]
