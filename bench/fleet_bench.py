"""A large enrolled fleet: enrollment time, driver start-up time and RSS, then traffic on a subset.

Issue 7 asks for 1,000,000 enrolled devices with the driver under 1 GB of RSS
and up in 10 s. This benchmark

1. enrolls the fleet through the driver's own `enrollment.enroll_devices`
   (validated rows, Fernet-encrypted secrets, multi-row INSERTs), split over
   worker processes because the encryption is CPU-bound (2 Fernet tokens per
   device); with ``--keep DIR`` the enrolled configuration is kept and reused;
2. starts the real driver (`bench.driver_runner`) and records its start-up
   time and RSS;
3. JOINs a random subset, sends /rx at a fixed rate over it (checked end to end
   on MQTT like `uplink_bench`), and records RSS again, with the device cache
   filled by the subset; RSS per cached device is derived from the two figures.

    python -m bench.fleet_bench --devices 1000000 --keep /tmp/coap-fleet-1m
    python -m bench.fleet_bench --devices 1000000 --keep /tmp/coap-fleet-1m --subset 20000 --rate 500
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import psutil

from bench.common import report_header, write_results
from bench.loadgen import LoadGenerator, UdpPool, bench_device, family_sampler, virtual_devices
from bench.uplink_bench import (
    CHANGED,
    Sampler,
    Subscriber,
    families,
    join_figures,
    start_child,
    summarize_rx,
    write_driver_config,
)

FLEET_MARKER = "fleet.json"  # in the kept directory: how many devices it holds


# --- enrollment ----------------------------------------------------------------------------------


def _enroll_range(config_dir: str, start: int, stop: int) -> tuple[int, list[str]]:
    """Worker process: enroll devices [start, stop) through the driver's enrollment code."""
    return asyncio.run(_enroll_range_async(Path(config_dir), start, stop))


async def _enroll_range_async(config_dir: Path, start: int, stop: int) -> tuple[int, list[str]]:
    from driver_core.driver import Driver
    from driver_core.enrollment import BULK_CHUNK, enroll_devices
    from driver_core.storage.db import Database
    from driver_core.storage.secretbox import SecretBox

    driver = Driver(config_dir)
    config = driver.load()
    db = Database(config.database["url"])
    await db.start()
    box = SecretBox.load_or_create(driver.config_dir)
    added, errors = 0, []
    try:
        for first in range(start, stop, BULK_CHUNK):
            chunk = [(i + 2, bench_device(i)) for i in range(first, min(stop, first + BULK_CHUNK))]
            report = await enroll_devices(db, box, chunk)
            added += len(report.added)
            errors += [f"line {line}: {message}" for line, message in report.errors[:3]]
    finally:
        await db.stop()
    return added, errors


async def prepare_schema(config_dir: Path) -> None:
    """Migrate the database and create the key file once, before the workers race for them."""
    from driver_core.driver import Driver
    from driver_core.storage.db import Database
    from driver_core.storage.secretbox import SecretBox

    driver = Driver(config_dir)
    config = driver.load()
    SecretBox.load_or_create(driver.config_dir)
    db = Database(config.database["url"])
    await db.start()
    await db.stop()


def enroll_fleet(config_dir: Path, count: int, workers: int) -> dict[str, Any]:
    asyncio.run(prepare_schema(config_dir))
    began = time.perf_counter()
    step = -(-count // workers)
    ranges = [(str(config_dir), lo, min(count, lo + step)) for lo in range(0, count, step)]
    with multiprocessing.get_context("spawn").Pool(len(ranges)) as pool:
        results = pool.starmap(_enroll_range, ranges)
    seconds = time.perf_counter() - began
    added = sum(n for n, _ in results)
    errors = [e for _, errs in results for e in errs]
    if added != count:
        raise SystemExit(f"enrolled {added} of {count} devices: {errors[:3]}")
    return {"devices": added, "seconds": round(seconds, 1), "per_s": round(added / seconds), "workers": workers}


# --- the run --------------------------------------------------------------------------------------


def rss_mb(pid: int) -> float:
    return round(psutil.Process(pid).memory_info().rss / 2**20, 1)


async def traffic(
    port: int, driver_pid: int, subscriber: Subscriber, indexes: list[int], args: argparse.Namespace
) -> dict[str, Any]:
    sample = family_sampler(families())
    devices = virtual_devices([bench_device(i) for i in indexes], sample)
    pool = await UdpPool("127.0.0.1", port, args.sockets).open()
    gen = LoadGenerator(pool, devices)
    out: dict[str, Any] = {}
    try:
        cpu = Sampler(driver_pid)
        cpu.begin()
        joins = await gen.join_all(args.join_concurrency)
        cpu.end()
        out["join"] = join_figures(joins, cpu)
        out["rss_after_joins_mb"] = rss_mb(driver_pid)
        pool_before = {k: v for k, v in vars(pool.stats).items()}
        cpu = Sampler(driver_pid)
        cpu.begin()
        await gen.run_rate(args.rate, args.duration)
        cpu.end()
        await gen.drain(60)
        acked = sum(1 for code in gen.record.outcome if code == CHANGED)
        received = await asyncio.to_thread(subscriber.drain, "rx", acked)
        out["rx"] = summarize_rx(gen, received, args.rate, pool_before)
        out["rx_driver_cpu_percent"] = round(cpu.cpu_percent or 0, 1)
        out["peak_rss_mb"] = round(cpu.rss_max / 2**20, 1)
        out["rss_after_uplinks_mb"] = rss_mb(driver_pid)
    finally:
        await pool.close()
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    keep: Path | None = args.keep
    workdir = keep or Path(tempfile.mkdtemp(prefix="coap-fleet-"))
    config_dir = workdir / "config"
    prefix = f"fleet-{uuid.uuid4().hex[:8]}"
    report = report_header(args)
    try:
        marker = workdir / FLEET_MARKER
        reuse = keep is not None and marker.exists() and json.loads(marker.read_text()).get("devices") == args.devices
        # The configuration is rewritten on every run (fresh topic prefix); the database stays.
        write_driver_config(config_dir, f"sqlite+aiosqlite:///{workdir / 'fleet.db'}", prefix, 1)
        if reuse:
            report["enroll"] = json.loads(marker.read_text())["enroll"] | {"reused": True}
        else:
            for stale in workdir.glob("fleet.db*"):
                stale.unlink()
            report["enroll"] = enroll_fleet(config_dir, args.devices, args.workers)
            marker.write_text(json.dumps({"devices": args.devices, "enroll": report["enroll"]}))
        report["database_mb"] = round((workdir / "fleet.db").stat().st_size / 2**20, 1)
        print(f"... {args.devices} devices enrolled ({report['enroll']}); starting the driver", flush=True)

        subscriber = Subscriber(prefix, 1).start()
        argv = ["-m", "bench.driver_runner", str(config_dir)]
        began = time.perf_counter()
        driver = start_child(argv, workdir / "ready", workdir / "driver.log")
        report["driver_startup_s"] = driver.startup_s  # inside the driver: Driver.start() + MQTT connected
        report["driver_ready_wall_s"] = round(time.perf_counter() - began, 2)  # process start included
        report["rss_after_start_mb"] = rss_mb(driver.pid)
        try:
            rng = random.Random(args.seed)
            indexes = rng.sample(range(args.devices), min(args.subset, args.devices))
            report.update(asyncio.run(traffic(driver.port, driver.pid, subscriber, indexes, args)))
        finally:
            driver.stop()
            stats = workdir / "ready.stats"
            if stats.exists():
                report["driver_stats"] = json.loads(stats.read_text())
            report["driver_log_tail"] = driver.log.read_text(errors="replace")[-1500:]
        cached = max(1, args.subset)
        report["rss_per_cached_device_kb"] = round(
            (report["rss_after_uplinks_mb"] - report["rss_after_start_mb"]) * 1024 / cached, 2
        )
        report["machine"]["loadavg_at_end"] = os.getloadavg()
    finally:
        if keep is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return report


def print_report(report: dict[str, Any]) -> None:
    enroll = report["enroll"]
    print(
        f"\nfleet: {enroll['devices']} devices, enrolled in {enroll['seconds']} s"
        f"{' (reused)' if enroll.get('reused') else ''}, database {report['database_mb']} MB"
    )
    print(
        f"driver start-up {report['driver_startup_s']} s (process to ready {report['driver_ready_wall_s']} s), "
        f"RSS after start {report['rss_after_start_mb']} MB"
    )
    join, rx = report["join"], report["rx"]
    print(
        f"JOIN of {join['count']} random devices: {join['ok']} ok in {join['seconds']} s ({join['per_s']}/s); "
        f"RSS {report['rss_after_joins_mb']} MB"
    )
    print(
        f"/rx {rx['offered_per_s']}/s for {rx['sent']} uplinks: e2e {rx['e2e_per_s']}/s, "
        f"p50 {rx['latency_ms']['p50']} ms p99 {rx['latency_ms']['p99']} ms, lost {rx['lost']}, dup {rx['duplicates']}; "
        f"RSS after {report['rss_after_uplinks_mb']} MB (peak {report['peak_rss_mb']} MB), "
        f"{report['rss_per_cached_device_kb']} KB per cached device"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Large-fleet benchmark of coap-driver")
    parser.add_argument("--devices", type=int, default=1_000_000)
    parser.add_argument("--workers", type=int, default=2, help="enrollment processes (Fernet is CPU-bound)")
    parser.add_argument("--keep", type=Path, help="keep (and reuse) the enrolled fleet in this directory")
    parser.add_argument("--subset", type=int, default=10_000, help="random devices that JOIN and send /rx")
    parser.add_argument("--rate", type=float, default=500.0, help="/rx per second over the subset")
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--join-concurrency", type=int, default=100)
    parser.add_argument("--sockets", type=int, default=16)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path, help="JSON results file (default /tmp/coap-fleet-<time>.json)")
    args = parser.parse_args(argv)
    if args.devices <= 0 or args.subset <= 0 or args.workers <= 0 or args.rate <= 0 or args.duration <= 0:
        parser.error("--devices, --subset, --workers, --rate and --duration must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = run(args)
    print_report(report)
    write_results(report, args.out, "fleet")
    return 0


if __name__ == "__main__":
    sys.exit(main())
