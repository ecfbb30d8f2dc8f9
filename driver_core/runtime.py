"""How the driver process runs its event loop: uvloop when installed, a calmer garbage collector.

Both matter for the latency tail, not only for throughput (docs/performance.md):

* CPython's default thresholds (700, 10, 10) start a young collection every
  700 allocations, and every 100th one walks the whole heap: the device
  cache, the OSCORE contexts, SQLAlchemy's caches. At 2,000 uplinks/s those
  full walks were the p99 (161 ms -> 45 ms with the thresholds below, same run).
* uvloop (libuv) runs the same asyncio code with about 5 % less CPU per
  uplink and 20 % more JOINs per second on the benchmark machine.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

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
