"""How the driver process runs its event loop: uvloop when installed, a calmer garbage collector.

Both matter for the latency tail, not only for throughput (docs/performance.md):

* CPython's default thresholds (700, 10, 10) start a young collection every
  700 allocations, and every 100th one walks the whole heap: the device
  cache, the OSCORE contexts, SQLAlchemy's caches. At 2,000 uplinks/s those
  full walks were the p99 (161 ms -> 45 ms with the thresholds below, same run).
* uvloop (libuv) runs the same asyncio code with about 5 % less CPU per
  uplink and 20 % more JOINs per second on the benchmark machine.

`StopSignals` turns SIGTERM and SIGINT into the driver's clean stop (docs/operations.md).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
_LOGGER = logging.getLogger(__name__)

# Young collections every 20,000 net allocations, a full one after 400 of them.
GC_THRESHOLDS = (20_000, 20, 20)


def tune_garbage_collector() -> None:
    """Collect less often; objects made before this call are never walked again."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def run(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run(main)`, on uvloop when it is installed."""
    try:
        import uvloop
    except ImportError:  # not on this platform: the standard loop does the same work
        return asyncio.run(main)
    return uvloop.run(main)


class StopSignals:
    """SIGTERM (systemd, Docker, Kubernetes) and SIGINT (Ctrl-C) ask for the same clean stop.

    The first one sets `requested`; a second one during the stop calls `on_again` (the
    driver then skips what it was still waiting for). Installed on the running loop, so the
    handlers run as ordinary callbacks, never inside the code they interrupt.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.requested = asyncio.Event()
        self.on_again: Callable[[], None] = lambda: None
        self._loop: asyncio.AbstractEventLoop | None = None

    def install(self) -> None:
        self._loop = asyncio.get_running_loop()
        for signum in self.SIGNALS:
            self._loop.add_signal_handler(signum, self._received, signum)

    def remove(self) -> None:
        loop, self._loop = self._loop, None
        if loop is not None:
            for signum in self.SIGNALS:
                loop.remove_signal_handler(signum)

    def _received(self, signum: signal.Signals) -> None:
        name = signal.Signals(signum).name
        if not self.requested.is_set():
            _LOGGER.info("Received %s: stopping cleanly (send it again to stop at once)", name)
            self.requested.set()
            return
        _LOGGER.warning("Received %s again: stopping at once", name)
        self.on_again()
