"""What every benchmark script shares: the head of its report, its JSON file, and the
command pipe of its helper processes (MQTT subscriber, callback receiver)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any


def report_header(args: argparse.Namespace, **machine: Any) -> dict[str, Any]:
    """The start of a report: when, on what machine (and its load now), with which options.

    `machine` adds facts about the machine (e.g. loopback=True)."""
    return {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            **machine,
            "loadavg_at_start": os.getloadavg(),
        },
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }


def write_results(report: dict[str, Any], out: Path | None, name: str) -> Path:
    """Write the report as JSON to `out` (default /tmp/coap-<name>-<time>.json) and say where."""
    path = out or Path(f"/tmp/coap-{name}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
    print(f"\nresults written to {path}")
    return path


async def pipe_requests(conn: Connection) -> AsyncIterator[Any]:
    """In a helper process: every request the parent sends on `conn`, as it arrives.

    The pipe is watched by the event loop, so the process keeps serving (MQTT, HTTP)
    while it waits for the next request."""
    arrived = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_reader(conn.fileno(), arrived.set)
    try:
        while True:
            await arrived.wait()
            arrived.clear()
            while conn.poll():
                yield conn.recv()
    finally:
        loop.remove_reader(conn.fileno())
