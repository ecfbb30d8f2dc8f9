"""End-to-end uplink benchmark: load generator -> driver -> Mosquitto -> subscriber.

Three processes share the machine: the driver (its own process, SQLite or
PostgreSQL, external broker = the machine's Mosquitto at QoS 1 on a unique
topic prefix), an aiomqtt subscriber, and this process, which enrolls the
fleet, runs the load generator and samples the driver's CPU and RSS. The
same generator then saturates a bare aiocoap server (the baseline).

    python -m bench.uplink_bench --rate 250,500,1000,2000 --duration 20
    python -m bench.uplink_bench --join-storm 10000
    python -m bench.uplink_bench --database postgresql+asyncpg://root@127.0.0.1/test

Prints a table and writes every figure as JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import psutil

from bench.common import pipe_requests, report_header, write_results
from bench.loadgen import (
    TIMEOUT,
    JoinResult,
    LoadGenerator,
    UdpPool,
    bench_fleet,
    family_sampler,
    percentile,
    virtual_devices,
)
from bench.spy import PySpy, report, summarize

ROOT = Path(__file__).resolve().parent.parent
BROKER_HOST, BROKER_PORT = "127.0.0.1", 1883
CHANGED = 68  # 2.04 as an integer code
READY_TIMEOUT_S = 120.0


# --- processes -------------------------------------------------------------------------------


@dataclass
class Child:
    process: subprocess.Popen
    port: int
    startup_s: float
    log: Path
    http_port: int = 0

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self, timeout: float = 60.0) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_child(argv: list[str], ready_file: Path, log: Path) -> Child:
    """Start a server process and wait until it writes its port (and start-up time) to `ready_file`."""
    ready_file.unlink(missing_ok=True)
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, *argv, "--ready-file", str(ready_file)], cwd=ROOT, stdout=out, stderr=out
        )
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not ready_file.exists() or not ready_file.read_text().strip():
        if process.poll() is not None:
            raise SystemExit(f"{argv[1]} exited with status {process.returncode}; see {log}")
        if time.monotonic() > deadline:
            process.kill()
            raise SystemExit(f"{argv[1]} not ready after {READY_TIMEOUT_S:.0f} s; see {log}")
        time.sleep(0.05)
    fields = ready_file.read_text().split()
    startup = float(fields[1]) if len(fields) > 1 else 0.0
    return Child(process, int(fields[0]), startup, log, int(fields[2]) if len(fields) > 2 else 0)


class Sampler:
    """CPU time and peak RSS of a process over a window (100 % = one core)."""

    def __init__(self, pid: int | None) -> None:
        self.proc = psutil.Process(pid) if pid else None
        self.rss_max = 0
        self._task: asyncio.Task[None] | None = None
        self._cpu0 = 0.0
        self._t0 = 0.0
        self.cpu_percent: float | None = None
        self.window_s = 0.0

    def _cpu(self) -> float:
        times = self.proc.cpu_times()
        return times.user + times.system

    def begin(self) -> None:
        if self.proc is None:
            return
        self._cpu0, self._t0 = self._cpu(), time.monotonic()
        self.rss_max = self.proc.memory_info().rss
        self._task = asyncio.create_task(self._sample())

    async def _sample(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            with contextlib.suppress(psutil.Error):
                self.rss_max = max(self.rss_max, self.proc.memory_info().rss)

    def end(self) -> None:
        if self.proc is None:
            return
        if self._task is not None:
            self._task.cancel()
        with contextlib.suppress(psutil.Error):
            self.rss_max = max(self.rss_max, self.proc.memory_info().rss)
            self.window_s = time.monotonic() - self._t0
            self.cpu_percent = 100 * (self._cpu() - self._cpu0) / max(1e-9, self.window_s)


def mosquitto_pid() -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int(Path("/run/mosquitto/mosquitto.pid").read_text().strip())
    return None


# --- subscriber process -------------------------------------------------------------------------


def subscriber_main(prefix: str, qos: int, conn: Connection) -> None:
    """Collect every uplink of `prefix`; report receipt times per sequence number."""
    asyncio.run(_subscribe(prefix, qos, conn))


async def _subscribe(prefix: str, qos: int, conn: Connection) -> None:
    import aiomqtt

    first: dict[int, float] = {}
    duplicates = 0
    counts: dict[str, int] = {}

    async with aiomqtt.Client(BROKER_HOST, BROKER_PORT, identifier=f"{prefix}-sub") as client:
        await client.subscribe(f"{prefix}/#", qos=qos)
        conn.send("ready")

        async def consume() -> None:
            nonlocal duplicates
            async for message in client.messages:
                now = time.time()
                try:
                    document = json.loads(message.payload)
                    kind = document["message_type"]
                except (ValueError, KeyError, TypeError):
                    continue  # the retained status topic
                counts[kind] = counts.get(kind, 0) + 1
                if kind != "rx":
                    continue
                seq = int(document["data"]["unknown"]["99"])
                if seq in first:
                    duplicates += 1
                else:
                    first[seq] = now

        consumer = asyncio.create_task(consume())
        async for request in pipe_requests(conn):
            if request[0] == "counts":
                conn.send(dict(counts))
                continue
            # ("drain", kind, expected, idle_s, cap_s): wait for `expected` distinct
            # uplinks of `kind` (or no progress for idle_s), then report.
            _, kind, expected, idle_s, cap_s = request

            def progress(kind: str = kind) -> int:
                return len(first) if kind == "rx" else counts.get(kind, 0)

            deadline = time.monotonic() + cap_s
            last, last_change = progress(), time.monotonic()
            while progress() < expected and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
                if progress() != last:
                    last, last_change = progress(), time.monotonic()
                elif time.monotonic() - last_change > idle_s:
                    break
            consumer.cancel()
            conn.send({"first": first, "duplicates": duplicates, "counts": counts})
            return


class Subscriber:
    def __init__(self, prefix: str, qos: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child_conn = ctx.Pipe()
        self.process = ctx.Process(target=subscriber_main, args=(prefix, qos, child_conn), daemon=True)

    def start(self) -> Subscriber:
        self.process.start()
        if not self.conn.poll(30) or self.conn.recv() != "ready":
            raise SystemExit("the MQTT subscriber could not subscribe on 127.0.0.1:1883 (is Mosquitto running?)")
        return self

    def counts(self) -> dict[str, int]:
        self.conn.send(("counts",))
        return self.conn.recv()

    def drain(self, kind: str, expected: int, idle_s: float = 10.0, cap_s: float = 120.0) -> dict[str, Any]:
        """Wait for `expected` uplinks of `kind` (rx: distinct sequence numbers); stop the subscriber."""
        self.conn.send(("drain", kind, expected, idle_s, cap_s))
        result = self.conn.recv()
        self.process.join(10)
        return result


# --- the driver's configuration and fleet --------------------------------------------------------


def write_driver_config(config_dir: Path, database_url: str, prefix: str, qos: int, extra: str = "") -> None:
    """The bench driver's configuration.yaml: ports chosen by the OS, so runs never collide."""
    config_dir.mkdir(parents=True, exist_ok=True)
    (config_dir / "configuration.yaml").write_text(
        "coap:\n  host: 127.0.0.1\n  port: 0\n"
        "http:\n  host: 127.0.0.1\n  port: 0\n"
        f"database:\n  url: {database_url}\n"
        "logger:\n  default: warning\n"
        "mqtt:\n  broker: external\n  url: mqtt://127.0.0.1:1883\n"
        f"  qos: {qos}\n  uplink_topic: '{prefix}/{{{{serial}}}}'\n"
        f"  status_topic: '{prefix}/status'\n  client_id: '{prefix}-driver'\n" + extra,
        encoding="utf-8",
    )


async def enroll(config_dir: Path, count: int) -> float:
    """Enroll the bench fleet through the driver's own CSV import; returns seconds taken."""
    from driver_core.driver import Driver
    from driver_core.enrollment import import_csv, write_devices_csv
    from driver_core.storage.db import Database
    from driver_core.storage.secretbox import SecretBox

    driver = Driver(config_dir)
    config = driver.load()
    db = Database(config.database["url"])
    await db.start()
    began = time.perf_counter()
    try:
        box = SecretBox.load_or_create(driver.config_dir)
        fleet = bench_fleet(count)
        for start in range(0, count, 20_000):
            report = await import_csv(db, box, write_devices_csv(fleet[start : start + 20_000]), driver.families)
            if report.errors:
                raise SystemExit(f"enrollment failed: {report.errors[:3]}")
    finally:
        await db.stop()
    return time.perf_counter() - began


@contextlib.asynccontextmanager
async def database_for_run(url: str | None, workdir: Path) -> AsyncIterator[str]:
    """SQLite in the work directory, or a fresh uniquely named PostgreSQL database dropped afterwards."""
    if not url:
        yield f"sqlite+aiosqlite:///{workdir / 'bench.db'}"
        return
    import asyncpg
    from sqlalchemy.engine import make_url

    admin = make_url(url)
    name = f"coap_bench_{uuid.uuid4().hex[:10]}"
    dsn = admin.set(drivername="postgresql").render_as_string(hide_password=False)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    try:
        yield admin.set(database=name).render_as_string(hide_password=False)
    finally:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()


def families() -> dict[int, Any]:
    from driver_core.driver import load_components

    return load_components(Path("/nonexistent"))[0]


# --- runs --------------------------------------------------------------------------------------


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 2)


def join_figures(joins: JoinResult, driver_cpu: Sampler) -> dict[str, Any]:
    """The JOIN phase in a report: outcome, rate, latency, and the driver's CPU over it."""
    return {
        "count": joins.count,
        "ok": joins.ok,
        "failed": joins.failed,
        "errors": joins.errors,
        "seconds": round(joins.seconds, 2),
        "per_s": round(joins.ok / max(1e-9, joins.seconds), 1),
        "latency_ms": {"p50": _ms(percentile(joins.durations, 0.5)), "p99": _ms(percentile(joins.durations, 0.99))},
        "driver_cpu_percent": round(driver_cpu.cpu_percent or 0, 1),
    }


def summarize_rx(
    gen: LoadGenerator, received: dict[str, Any], offered: float | None, pool_before: dict[str, int]
) -> dict[str, Any]:
    record = gen.record
    sent = len(record.sent_at)
    outcomes: dict[str, int] = {}
    for code in record.outcome:
        key = "timeout" if code == TIMEOUT else ("pending" if code == 0 else f"{code >> 5}.{code & 31:02d}")
        outcomes[key] = outcomes.get(key, 0) + 1
    first: dict[int, float] = received["first"]
    latencies = [first[seq] - record.sent_at[seq] for seq in first if seq < sent]
    rtts = [rtt for rtt, code in zip(record.rtt, record.outcome, strict=True) if code > 0]
    last = max(first.values(), default=record.started)
    window = max(1e-9, record.stopped - record.started)
    acked = sum(1 for code in record.outcome if code == CHANGED)
    return {
        "offered_per_s": offered,
        "sent": sent,
        "sent_per_s": round(sent / window, 1),
        "coap_outcomes": outcomes,
        "coap_rtt_ms": {"p50": _ms(percentile(rtts, 0.5)), "p99": _ms(percentile(rtts, 0.99))},
        "received_unique": len(first),
        "duplicates": received["duplicates"],
        "lost": sent - len(first),
        "lost_after_ack": sum(1 for seq, code in enumerate(record.outcome) if code == CHANGED and seq not in first),
        "acked": acked,
        "e2e_per_s": round(len(first) / max(1e-9, last - record.started), 1),
        "latency_ms": {
            "p50": _ms(percentile(latencies, 0.5)),
            "p99": _ms(percentile(latencies, 0.99)),
            "max": _ms(max(latencies, default=None)),
        },
        "pool": {k: v - pool_before.get(k, 0) for k, v in asdict(gen.pool.stats).items()},
    }


@dataclass
class RunOptions:
    devices: int
    duration: float
    sockets: int
    join_concurrency: int
    database: str | None
    qos: int
    profile: Path | None
    sample: Path | None = None
    inflight: int | None = None
    py_spy: Path | None = None
    cluster: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


async def driver_run(options: RunOptions, rate: float | None, join_storm: int | None = None) -> dict[str, Any]:
    """One fresh driver (new database): enroll, JOIN everything, then the /rx load."""
    workdir = Path(tempfile.mkdtemp(prefix="coap-bench-"))
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    count = join_storm or options.devices
    result: dict[str, Any] = {"devices": count, "topic_prefix": prefix}
    try:
        async with database_for_run(options.database, workdir) as database_url:
            result["database"] = database_url.split("://")[0]
            config_dir = workdir / "config"
            write_driver_config(
                config_dir, database_url, prefix, options.qos,
                extra="cluster: true\n" if options.cluster else "",
            )
            result["enroll_s"] = round(await enroll(config_dir, count), 2)
            subscriber = Subscriber(prefix, options.qos).start()
            argv = ["-m", "bench.driver_runner", str(config_dir)]
            if options.profile:
                argv += ["--profile", str(options.profile)]
            if options.sample:
                argv += ["--sample", str(options.sample)]
            driver = start_child(argv, workdir / "ready", workdir / "driver.log")
            result["driver_startup_s"] = driver.startup_s
            try:
                result.update(await _drive(options, driver, subscriber, rate, count, join_storm is not None))
            finally:
                driver.stop()
                result["driver_log_tail"] = driver.log.read_text(errors="replace")[-2000:]
                stats = workdir / "ready.stats"
                if stats.exists():
                    result["driver_stats"] = json.loads(stats.read_text())
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return result


async def _drive(
    options: RunOptions, driver: Child, subscriber: Subscriber, rate: float | None, count: int, storm: bool
) -> dict[str, Any]:
    sample = family_sampler(families())
    devices = virtual_devices(bench_fleet(count), sample)
    pool = await UdpPool("127.0.0.1", driver.port, options.sockets).open()
    gen = LoadGenerator(pool, devices)
    out: dict[str, Any] = {}
    driver_cpu, me = Sampler(driver.pid), Sampler(os.getpid())
    try:
        spy = PySpy(driver.pid, options.py_spy).start() if options.py_spy and storm else None
        driver_cpu.begin(), me.begin()
        joins = await gen.join_all(options.join_concurrency)
        driver_cpu.end(), me.end()
        if spy is not None:
            spy.stop()
            out["py_spy"] = write_spy_report(options.py_spy, spy.rate, joins.ok, driver_cpu)
        out["join"] = join_figures(joins, driver_cpu) | {
            "driver_rss_mb": round(driver_cpu.rss_max / 2**20, 1),
            "generator_cpu_percent": round(me.cpu_percent or 0, 1),
        }
        if storm:
            received = await asyncio.to_thread(subscriber.drain, "join", joins.ok)
            out["join"]["published"] = received["counts"].get("join", 0)
            return out
        pool_before = asdict(pool.stats)  # the /rx phase alone, without the JOINs
        mosq = Sampler(mosquitto_pid())
        driver_cpu, me = Sampler(driver.pid), Sampler(os.getpid())
        spy = PySpy(driver.pid, options.py_spy).start() if options.py_spy else None
        for sampler in (driver_cpu, me, mosq):
            sampler.begin()
        if options.inflight:
            await gen.run_closed(options.inflight, options.duration)
        else:
            await gen.run_rate(rate, options.duration)
        for sampler in (driver_cpu, me, mosq):
            sampler.end()
        if spy is not None:
            spy.stop()
            out["py_spy"] = write_spy_report(options.py_spy, spy.rate, len(gen.record.sent_at), driver_cpu)
        await gen.drain(60)
        acked = sum(1 for code in gen.record.outcome if code == CHANGED)
        received = await asyncio.to_thread(subscriber.drain, "rx", acked)
        out["rx"] = summarize_rx(gen, received, rate, pool_before)
        out["rx"]["mode"] = f"closed loop, {options.inflight} in flight" if options.inflight else "open loop"
        out["published_joins"] = received["counts"].get("join", 0)
        out["driver_cpu_percent"] = round(driver_cpu.cpu_percent or 0, 1)
        out["driver_rss_mb"] = round(driver_cpu.rss_max / 2**20, 1)
        out["generator_cpu_percent"] = round(me.cpu_percent or 0, 1)
        out["mosquitto_cpu_percent"] = None if mosq.cpu_percent is None else round(mosq.cpu_percent, 1)
    finally:
        await pool.close()
    return out


def write_spy_report(raw: Path, rate: int, units: int, cpu: Sampler) -> dict[str, Any]:
    """Summarize py-spy's samples next to the raw file (`<raw>.txt`); µs per JOIN or uplink."""
    summary = summarize(raw, rate)
    text = report(summary, per=max(1, units))
    cpu_s = (cpu.cpu_percent or 0) / 100 * max(1e-9, cpu.window_s)
    text = (
        f"driver process CPU over the window: {cpu_s:.2f} s = {1e6 * cpu_s / max(1, units):.0f} µs per unit "
        "(Python under the GIL below, plus C with the GIL released: SQLite, syscalls, crypto)\n" + text
    )
    path = raw.with_name(raw.name + ".txt")
    path.write_text(text, encoding="utf-8")
    return {
        "raw": str(raw),
        "report": str(path),
        "units": units,
        "process_cpu_us_per_unit": round(1e6 * cpu_s / max(1, units), 1),
        "gil_cpu_us_per_unit": round(1e6 * summary.seconds(summary.samples) / max(1, units), 1),
        "by_layer_us_per_unit": {
            name: round(1e6 * summary.seconds(n) / max(1, units), 1) for name, n in summary.by_layer.most_common()
        },
        "by_component_us_per_unit": {
            name: round(1e6 * summary.seconds(n) / max(1, units), 1) for name, n in summary.by_component.most_common()
        },
    }


async def baseline_run(options: RunOptions, inflight: int, duration: float) -> dict[str, Any]:
    """Saturate the bare aiocoap server with plain POST /rx (same generator, same payloads)."""
    workdir = Path(tempfile.mkdtemp(prefix="coap-baseline-"))
    server = start_child(["-m", "bench.baseline_server"], workdir / "ready", workdir / "baseline.log")
    try:
        devices = virtual_devices(bench_fleet(options.devices), family_sampler(families()))
        pool = await UdpPool("127.0.0.1", server.port, options.sockets).open()
        gen = LoadGenerator(pool, devices)
        cpu, me = Sampler(server.pid), Sampler(os.getpid())
        cpu.begin(), me.begin()
        await gen.run_closed(inflight, duration, plain=True)
        cpu.end(), me.end()
        await gen.drain(30)
        record = gen.record
        ok = sum(1 for code in record.outcome if code == CHANGED)
        rtts = [rtt for rtt, code in zip(record.rtt, record.outcome, strict=True) if code > 0]
        await pool.close()
        return {
            "mode": f"closed loop, {inflight} in flight, plain CoAP",
            "requests": len(record.sent_at),
            "ok": ok,
            "requests_per_s": round(ok / max(1e-9, record.stopped - record.started), 1),
            "rtt_ms": {"p50": _ms(percentile(rtts, 0.5)), "p99": _ms(percentile(rtts, 0.99))},
            "server_cpu_percent": round(cpu.cpu_percent or 0, 1),
            "server_rss_mb": round(cpu.rss_max / 2**20, 1),
            "generator_cpu_percent": round(me.cpu_percent or 0, 1),
        }
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


# --- report ---------------------------------------------------------------------------------


def print_table(report: dict[str, Any]) -> None:
    base = report.get("baseline")
    if base:
        print(
            f"\nbaseline (bare aiocoap, {base['mode']}): {base['requests_per_s']:.0f} req/s, "
            f"rtt p50 {base['rtt_ms']['p50']} ms p99 {base['rtt_ms']['p99']} ms, "
            f"server CPU {base['server_cpu_percent']} %"
        )
    runs = report.get("runs", [])
    if runs:
        header = (
            f"{'offered/s':>9} {'sent/s':>8} {'e2e/s':>8} {'x base':>6} {'p50 ms':>8} {'p99 ms':>8} "
            f"{'lost':>6} {'dup':>5} {'coap err':>8} {'sep.resp':>8} {'drv CPU%':>8} {'drv RSS MB':>10} {'gen CPU%':>8} "
            f"{'mosq CPU%':>9}  ok"
        )
        print("\n" + header + "\n" + "-" * len(header))
        for run in runs:
            rx = run["rx"]
            errors = sum(v for k, v in rx["coap_outcomes"].items() if k != "2.04")
            ratio = f"{rx['e2e_per_s'] / base['requests_per_s']:.2f}" if base else "-"
            print(
                f"{rx['offered_per_s'] or '-':>9} {rx['sent_per_s']:>8.0f} {rx['e2e_per_s']:>8.0f} {ratio:>6} "
                f"{rx['latency_ms']['p50'] or '-':>8} {rx['latency_ms']['p99'] or '-':>8} {rx['lost']:>6} "
                f"{rx['duplicates']:>5} {errors:>8} {rx['pool']['separate_responses']:>8} {run['driver_cpu_percent']:>8} {run['driver_rss_mb']:>10} "
                f"{run['generator_cpu_percent']:>8} {run['mosquitto_cpu_percent'] or '-':>9}  "
                f"{'PASS' if run['meets_target'] else 'no'}"
            )
        for run in runs:
            join = run["join"]
            print(
                f"  {run['devices']} devices ({run['database']}): JOIN {join['ok']}/{join['count']} in "
                f"{join['seconds']} s ({join['per_s']}/s), driver start-up {run['driver_startup_s']} s"
            )
    storm = report.get("join_storm")
    if storm:
        join = storm["join"]
        print(
            f"\nJOIN storm: {join['ok']}/{join['count']} devices in {join['seconds']} s ({join['per_s']}/s), "
            f"p50 {join['latency_ms']['p50']} ms p99 {join['latency_ms']['p99']} ms, failed {join['failed']}, "
            f"published {join['published']}, driver CPU {join['driver_cpu_percent']} % RSS "
            f"{join['driver_rss_mb']} MB, enroll {storm['enroll_s']} s, start-up {storm['driver_startup_s']} s"
        )


def meets_target(run: dict[str, Any]) -> bool:
    """Issue 7: zero loss, zero duplicates, p99 <= 100 ms, every answer piggybacked."""
    rx = run["rx"]
    p99 = rx["latency_ms"]["p99"]
    return (
        rx["lost"] == 0
        and rx["duplicates"] == 0
        and p99 is not None
        and p99 <= 100
        and rx["pool"]["separate_responses"] == 0
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="End-to-end uplink benchmark of coap-driver")
    parser.add_argument("--rate", default="1000", help="uplinks/s offered; a comma list runs each in turn")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of /rx load per rate")
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--inflight", type=int, help="closed loop with this many requests in flight instead of --rate")
    parser.add_argument("--database", help="postgresql+asyncpg://user@host/db (a fresh database is created in it)")
    parser.add_argument("--qos", type=int, default=1, choices=(0, 1, 2))
    parser.add_argument(
        "--cluster", action="store_true",
        help="run the driver with cluster: true (needs --database): the shared-state checks' cost",
    )
    parser.add_argument("--sockets", type=int, default=16, help="UDP sockets of the generator")
    parser.add_argument("--join-concurrency", type=int, default=100)
    parser.add_argument("--join-storm", type=int, metavar="N", help="only measure how long N devices take to JOIN")
    parser.add_argument("--baseline-duration", type=float, default=10.0)
    parser.add_argument("--baseline-inflight", type=int, default=64)
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--profile", type=Path, help="cProfile the driver's steady state into this file")
    parser.add_argument("--sample", type=Path, help="stack-sample every driver thread into this text file")
    parser.add_argument(
        "--py-spy", type=Path, metavar="RAW",
        help="py-spy --gil the driver during the measured phase into RAW, summary in RAW.txt",
    )
    parser.add_argument("--out", type=Path, help="JSON results file (default /tmp/coap-bench-<time>.json)")
    args = parser.parse_args(argv)
    try:
        args.rates = [float(r) for r in args.rate.split(",") if r.strip()]
    except ValueError:
        parser.error(f"--rate: {args.rate!r} is not a number or a comma-separated list of numbers")
    if any(r <= 0 for r in args.rates) or args.duration <= 0 or args.devices <= 0:
        parser.error("--rate, --duration and --devices must be positive")
    return args


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    options = RunOptions(
        devices=args.devices,
        duration=args.duration,
        sockets=args.sockets,
        join_concurrency=args.join_concurrency,
        database=args.database,
        qos=args.qos,
        profile=args.profile,
        sample=args.sample,
        inflight=args.inflight,
        py_spy=args.py_spy,
        cluster=args.cluster,
    )
    if args.cluster and not args.database:
        raise SystemExit("--cluster needs --database postgresql+asyncpg://...")
    report = report_header(args, loopback=True)
    if args.join_storm:
        storm = await driver_run(options, None, join_storm=args.join_storm)
        storm.pop("driver_log_tail", None)
        report["join_storm"] = storm
        report["machine"]["loadavg_at_end"] = os.getloadavg()
        return report
    if not args.no_baseline:
        report["baseline"] = await baseline_run(options, args.baseline_inflight, args.baseline_duration)
    report["runs"] = []
    for rate in [None] if args.inflight else args.rates:
        run = await driver_run(options, rate)
        run["meets_target"] = meets_target(run)
        if run["rx"]["lost"] == 0 and not run["rx"]["duplicates"]:
            run.pop("driver_log_tail", None)
        report["runs"].append(run)
        print(f"... rate {rate}: e2e {run['rx']['e2e_per_s']}/s, lost {run['rx']['lost']}", flush=True)
    report["machine"]["loadavg_at_end"] = os.getloadavg()
    passing = [r["rx"]["offered_per_s"] for r in report["runs"] if r["meets_target"] and r["rx"]["offered_per_s"]]
    report["highest_rate_meeting_target"] = max(passing, default=None)
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = asyncio.run(main_async(args))
    print_table(report)
    write_results(report, args.out, "bench")
    return 0


if __name__ == "__main__":
    sys.exit(main())
