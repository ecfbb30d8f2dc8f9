"""py-spy around a benchmark phase, and a per-layer summary of where the driver's CPU goes.

cProfile sees only the event-loop thread and inflates cheap calls; the stack
sampler of `driver_runner` cannot tell a thread that runs from one that waits
for the GIL. `py-spy record --gil` samples, from outside the process, only the
thread that holds the GIL, so each sample is Python-level CPU time wherever it
runs (loop, SQLite writer thread, aiosqlite thread). Time spent in C with the
GIL released (SQLite itself, syscalls) is not in the samples; compare with the
process CPU time measured alongside.

    python -m bench.spy /tmp/driver.raw --per 12000   # summarize: µs per uplink by layer
"""

from __future__ import annotations

import argparse
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

# py-spy shows paths relative to their package root: "driver_core/writer.py", "aiocoap/oscore.py",
# and the integrations as "callbacks/delivery.py", "mqtt/status.py" (hence the " (" anchors, so
# that "paho/mqtt/client.py" is not taken for the MQTT integration).
# Layers, tried on each frame from the leaf outwards; the first frame that matches names the
# layer. Generic helpers (logging, copy, enum, json, cbor2, ipaddress...) match nothing, so
# their time goes to whoever called them.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("OSCORE (aiocoap oscore + crypto)", ("aiocoap/oscore.py", "oscore_context.py", "cryptography/")),
    ("device lookup / JOIN (security.py)", ("driver_core/security.py", "join_tokens.py")),
    ("family decode", ("driver_core/family/", " (vidi_", "custom_components/vidi_")),
    ("downlink queue", ("driver_core/downlinks.py",)),
    ("callbacks (integration, aiohttp client)", (" (callbacks/", "custom_components/callbacks/", "aiohttp/")),
    ("event bus + other integrations", ("driver_core/events.py", " (homeassistant/")),
    ("MQTT publish (publisher, aiomqtt, paho)", (" (mqtt/", "custom_components/mqtt/", "aiomqtt/", "paho/")),
    ("database (writer, SQLAlchemy, sqlite3)", ("driver_core/writer.py", "storage/db.py", "sqlalchemy/",
                                                "aiosqlite/", "sqlite3/", "greenlet")),
    ("driver resources (coap_server, metrics)", ("driver_core/coap_server.py", "driver_core/metrics.py",
                                                 "driver_core/uplink.py", "driver_core/timefmt.py",
                                                 "driver_core/refusals.py")),
    ("CoAP message layer (aiocoap)", ("aiocoap/", "driver_core/response_cache.py")),
    ("asyncio event loop", ("asyncio/", "selectors.py")),
    ("threads / executor", ("threading.py", "concurrent/futures/", "queue.py")),
)
# Components: the innermost frame of the driver's own code (or an integration) says who asked
# for the work, whatever library then did it; samples without one go to the library layer.
COMPONENTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("callbacks integration", (" (callbacks/", "custom_components/callbacks/")),
    ("MQTT integration", (" (mqtt/", "custom_components/mqtt/")),
    ("other integrations", (" (vidi_", " (homeassistant/", "custom_components/")),
    ("writer (group commit)", ("driver_core/writer.py", "driver_core/storage/")),
    ("downlink queue", ("driver_core/downlinks.py",)),
    ("device lookup / JOIN", ("driver_core/security.py", "driver_core/batch_loader.py", "join_tokens.py",
                              "oscore_context.py")),
    ("family decode", ("driver_core/family/",)),
    ("CoAP resources (driver)", ("driver_core/coap_server.py", "driver_core/metrics.py", "driver_core/uplink.py",
                                 "driver_core/rate_limit.py", "driver_core/response_cache.py")),
    ("event bus", ("driver_core/events.py",)),
    ("other driver code", ("driver_core/",)),
)
OTHER = "other"
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


@dataclass
class Summary:
    samples: int
    rate: float
    by_layer: Counter[str]
    by_component: Counter[str]
    by_thread: Counter[str]
    self_time: Counter[str]
    inclusive: Counter[str]

    def seconds(self, samples: int) -> float:
        return samples / self.rate


def layer_of(frames: list[str]) -> str:
    for frame in reversed(frames):
        for name, patterns in LAYERS:
            if any(pattern in frame for pattern in patterns):
                return name
    return OTHER


def component_of(frames: list[str]) -> str:
    for frame in reversed(frames):
        for name, patterns in COMPONENTS:
            if any(pattern in frame for pattern in patterns):
                return name
    return "no driver frame: " + layer_of(frames)


def _function(frame: str) -> str:
    match = _FRAME.match(frame)
    if not match:
        return frame
    return f"{match['func']} ({match['file']})"


def summarize(raw: Path, rate: float) -> Summary:
    """Read py-spy's raw (collapsed) output, recorded with --threads."""
    by_layer: Counter[str] = Counter()
    by_component: Counter[str] = Counter()
    by_thread: Counter[str] = Counter()
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        thread = frames[0].split(": ", 1)[-1] if frames[0].startswith("thread (") else "?"
        frames = frames[1:] if frames[0].startswith("thread (") else frames
        if not frames:
            continue
        total += count
        by_thread[re.sub(r"_\d+$", "", thread)] += count
        by_layer[layer_of(frames)] += count
        by_component[component_of(frames)] += count
        self_time[_function(frames[-1])] += count
        for function in {_function(frame) for frame in frames}:
            inclusive[function] += count
    return Summary(total, rate, by_layer, by_component, by_thread, self_time, inclusive)


def report(summary: Summary, per: int | None = None, top: int = 25) -> str:
    """A text report; with `per` (e.g. the number of uplinks) every line also shows µs per unit."""

    def line(samples: int, name: str) -> str:
        seconds = summary.seconds(samples)
        share = 100 * samples / max(1, summary.samples)
        unit = f" {1e6 * seconds / per:8.1f} µs/unit" if per else ""
        return f"  {seconds:7.2f} s {share:5.1f} %{unit}  {name}"

    out = [f"{summary.samples} samples holding the GIL at {summary.rate:g}/s = "
           f"{summary.seconds(summary.samples):.2f} s of Python CPU" + (f", {per} units" if per else "")]
    out.append("\nby thread")
    out += [line(n, name) for name, n in summary.by_thread.most_common()]
    out.append("\nby layer (first frame from the leaf that belongs to a known layer)")
    out += [line(n, name) for name, n in summary.by_layer.most_common()]
    out.append("\nby component (innermost frame of the driver's own code: who asked for the work)")
    out += [line(n, name) for name, n in summary.by_component.most_common()]
    out.append("\nself (leaf function)")
    out += [line(n, name) for name, n in summary.self_time.most_common(top)]
    out.append("\ninclusive")
    out += [line(n, name) for name, n in summary.inclusive.most_common(top * 2)]
    return "\n".join(out) + "\n"


class PySpy:
    """`py-spy record --gil --threads` on a process until stop()."""

    def __init__(self, pid: int, out: Path, rate: int = 250) -> None:
        self.pid, self.out, self.rate = pid, out, rate
        self._process: subprocess.Popen[bytes] | None = None

    @staticmethod
    def executable() -> str:
        found = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        if not Path(found).exists():
            raise SystemExit("py-spy is not installed: .venv/bin/pip install py-spy")
        return found

    def start(self) -> PySpy:
        self._process = subprocess.Popen(
            [self.executable(), "record", "--pid", str(self.pid), "--output", str(self.out),
             "--format", "raw", "--gil", "--threads", "--rate", str(self.rate)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        return self

    def stop(self) -> None:
        if self._process is None:
            return
        self._process.send_signal(signal.SIGINT)
        try:
            _, err = self._process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self._process.kill()
            _, err = self._process.communicate()
        if not self.out.exists():
            raise SystemExit(f"py-spy wrote nothing: {err.decode(errors='replace').strip()[-300:]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Summarize a py-spy raw file by layer")
    parser.add_argument("raw", type=Path)
    parser.add_argument("--rate", type=float, default=250, help="the sampling rate py-spy used")
    parser.add_argument("--per", type=int, help="divide by this many units (uplinks, JOINs)")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    if not args.raw.is_file():
        parser.error(f"{args.raw}: no such file")
    print(report(summarize(args.raw, args.rate), args.per, args.top), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
