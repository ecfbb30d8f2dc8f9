"""The serving commands' event loop and garbage collector settings (driver_core.runtime)."""

from __future__ import annotations

import asyncio
import gc

import uvloop

from driver_core import runtime


def test_run_uses_uvloop_and_returns_the_result():
    async def loop_kind() -> str:
        return type(asyncio.get_running_loop()).__module__

    assert runtime.run(loop_kind()) == "uvloop"


def test_garbage_collector_is_tuned_and_startup_objects_frozen():
    saved = gc.get_threshold()
    try:
        runtime.tune_garbage_collector()
        assert gc.get_threshold() == (20_000, 20, 20)
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*saved)
    assert isinstance(uvloop.new_event_loop(), asyncio.AbstractEventLoop)
