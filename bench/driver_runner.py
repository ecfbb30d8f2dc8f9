"""Run the real driver in its own process for a benchmark, optionally under cProfile.

Writes the bound CoAP port to ``--ready-file`` once the listener is up and the
MQTT integration is connected, then runs until SIGTERM/SIGINT and stops
cleanly (so a profile is written). ``--profile FILE`` profiles only the
steady state (after start-up), which is what the hot-spot list is about.
cProfile sees only the event-loop thread; ``--sample FILE`` adds a wall-clock
stack sampler over every thread (aiosqlite runs SQLite in its own thread), a
small stand-in for py-spy, and writes the hottest stacks as text.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import logging
import signal
import sys
import threading
import time
from collections import Counter
from pathlib import Path

from bench.baseline_server import write_ready
from driver_core import runtime
from driver_core.driver import Driver

# Leaf frames (file:function:line) where a thread waits for work rather than doing it.
IDLE_LEAVES = (
    "selectors.py:select:",
    "threading.py:wait:",
    "queue.py:get:",
    "threading.py:_wait_for_tstate_lock:",
    "aiosqlite/core.py:_connection_worker_thread:59",
    "concurrent/futures/thread.py:_worker:81",
)


class StackSampler(threading.Thread):
    """Every `interval` s, record each thread's stack; report self and inclusive shares."""

    def __init__(self, interval: float = 0.002) -> None:
        super().__init__(daemon=True, name="stack-sampler")
        self.interval = interval
        self.stacks: Counter[tuple[str, tuple[str, ...]]] = Counter()
        self.samples = 0
        self._halt = threading.Event()

    def run(self) -> None:
        me = threading.get_ident()
        names = {}
        while not self._halt.wait(self.interval):
            frames = sys._current_frames()
            for ident, frame in frames.items():
                if ident == me:
                    continue
                if ident not in names:
                    names[ident] = _thread_kind(
                        next((t.name for t in threading.enumerate() if t.ident == ident), str(ident))
                    )
                code = frame.f_code
                stack = [f"{_short(code.co_filename)}:{code.co_name}:{frame.f_lineno}"]
                frame = frame.f_back
                while frame is not None and len(stack) < 60:
                    code = frame.f_code
                    stack.append(f"{_short(code.co_filename)}:{code.co_name}")
                    frame = frame.f_back
                self.stacks[(names[ident], tuple(stack))] += 1
            self.samples += 1

    def stop(self) -> None:
        self._halt.set()
        self.join()

    def report(self, top: int = 40) -> str:
        """Shares in % of wall time: 100 % = one thread busy there the whole run."""
        ticks = max(1, self.samples)
        lines = [
            f"{self.samples} ticks every {self.interval * 1000:.0f} ms; figures are % of wall time "
            "(100 % = one thread busy all the time; threads of a kind are summed)"
        ]
        busy: Counter[str] = Counter()
        leaf: Counter[tuple[str, str]] = Counter()
        inclusive: Counter[tuple[str, str]] = Counter()
        for (thread, stack), count in self.stacks.items():
            if stack[0].startswith(IDLE_LEAVES):
                continue
            busy[thread] += count
            leaf[(thread, " < ".join(stack[:4]))] += count
            for name in set(stack[1:]) | {stack[0].rsplit(":", 1)[0]}:
                inclusive[(thread, name)] += count
        lines.append("\nbusy per thread kind")
        for thread, count in busy.most_common():
            lines.append(f"  {100 * count / ticks:6.1f} %  {thread}")
        lines.append("\nself (leaf frame < callers)")
        for (thread, name), count in leaf.most_common(top):
            lines.append(f"  {100 * count / ticks:6.1f} %  {thread:<10} {name}")
        lines.append("\ninclusive (anywhere in the stack)")
        for (thread, name), count in inclusive.most_common(top * 2):
            lines.append(f"  {100 * count / ticks:6.1f} %  {thread:<10} {name}")
        return "\n".join(lines) + "\n"


def _thread_kind(name: str) -> str:
    if "_connection_worker_thread" in name:
        return "aiosqlite"
    if name.startswith("asyncio_"):
        return "executor"
    return "loop" if name == "MainThread" else name


def _short(filename: str) -> str:
    for marker in ("site-packages/", "/work/main/", "lib/python3.11/"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename


async def run(config_dir: Path, ready_file: Path, profile: Path | None, sample: Path | None = None) -> None:
    began = time.perf_counter()
    driver = Driver(config_dir)
    driver.load()
    await driver.start()
    try:
        mqtt = driver.integrations.running.get("mqtt") if driver.integrations else None
        if mqtt is not None:
            await mqtt.async_wait_status(lambda status: status["connected"], within=15)
        startup = time.perf_counter() - began
        profiler = cProfile.Profile() if profile else None
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        sampler = StackSampler() if sample else None
        http_port = driver.api.port if driver.api is not None else 0
        write_ready(ready_file, f"{driver.coap_port} {startup:.3f} {http_port}")
        if profiler is not None:
            profiler.enable()
        if sampler is not None:
            sampler.start()
        await stop.wait()
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(str(profile))
        if sampler is not None:
            sampler.stop()
            write_ready(sample, sampler.report())
        write_ready(ready_file.with_name(ready_file.name + ".stats"), json.dumps(driver_stats(driver)))
    finally:
        await driver.stop()


def driver_stats(driver: Driver) -> dict[str, int | None]:
    """Counters that explain a run: how well cache misses and writes were batched."""
    loads = getattr(driver.credentials, "_loads", None)
    return {
        "device_load_batches": getattr(loads, "batches", None),
        "devices_loaded": getattr(loads, "loaded", None),
        "write_batches": getattr(driver.writer, "batches", None),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config_dir", type=Path)
    parser.add_argument("--ready-file", type=Path, required=True)
    parser.add_argument("--profile", type=Path, help="write a cProfile of the steady state here")
    parser.add_argument("--sample", type=Path, help="write a wall-clock stack sample report here")
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args()
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    runtime.tune_garbage_collector()  # as `coap-driver run` does
    runtime.run(run(args.config_dir, args.ready_file, args.profile, args.sample))


if __name__ == "__main__":
    main()
