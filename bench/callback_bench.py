"""Callback latency: from the device's /ack answer to the callback POST at the client's server.

Issue 7: a callback POST within 100 ms (p99) of the device's acknowledgement.
The run

1. enrolls N devices, starts the real driver with the callbacks integration
   and JOINs every device;
2. queues one downlink per device (`clear_alarms`) through the REST API, with
   a callback URL on a local aiohttp receiver in its own process, and waits
   until the N "pending" (state 0) callbacks have arrived;
3. sends one /rx per device at `--rate` (each answer carries the downlink:
   state 2, "sent"), then one /ack per device at `--rate` (state 3);
4. matches every callback to the device-side moment it belongs to: state 2 to
   the /rx answer, state 3 to the /ack answer and to the moment the /ack left
   the device (wall clock, same machine). A callback may arrive before the
   device has its answer: the state changes once it is committed, and the
   answer follows. When answers are late (a saturated driver), "after the
   /ack was sent" is the figure that still means something.

    python -m bench.callback_bench --devices 2000 --rate 200
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
import uuid
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import aiocoap
import cbor2
from aiocoap.numbers.codes import Code

from bench.common import pipe_requests, report_header, write_results
from bench.loadgen import (
    LoadGenerator,
    UdpPool,
    VirtualDevice,
    bench_fleet,
    family_sampler,
    percentile,
    virtual_devices,
)
from bench.spy import PySpy
from bench.uplink_bench import (
    Sampler,
    _ms,
    enroll,
    families,
    start_child,
    write_driver_config,
    write_spy_report,
)

CBOR = 60
COMMAND = "clear_alarms"  # every built-in family has it, without a parameter


# --- the callback receiver (own process) --------------------------------------------------------


def receiver_main(conn: Connection) -> None:
    asyncio.run(_receive(conn))


async def _receive(conn: Connection) -> None:
    from aiohttp import web

    arrivals: dict[str, dict[int, float]] = {}
    duplicates = 0

    async def callback(request: web.Request) -> web.Response:
        nonlocal duplicates
        now = time.time()
        body = await request.json()
        seen = arrivals.setdefault(body["command_id"], {})
        if body["status"] in seen:
            duplicates += 1
        else:
            seen[body["status"]] = now
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/cb", callback)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    conn.send(port)
    async for request in pipe_requests(conn):
        if request[0] == "count":  # ("count", status): callbacks of that status so far
            conn.send(sum(1 for seen in arrivals.values() if request[1] in seen))
        elif request[0] == "report":
            conn.send({"arrivals": arrivals, "duplicates": duplicates})
            await runner.cleanup()
            return


class Receiver:
    def __init__(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=receiver_main, args=(child,), daemon=True)

    def start(self) -> Receiver:
        self.process.start()
        if not self.conn.poll(30):
            raise SystemExit("the callback receiver did not start")
        self.port = self.conn.recv()
        return self

    def count(self, status: int) -> int:
        self.conn.send(("count", status))
        return self.conn.recv()

    async def wait_for(self, status: int, expected: int, within: float) -> int:
        deadline = time.monotonic() + within
        while True:
            count = await asyncio.to_thread(self.count, status)
            if count >= expected or time.monotonic() > deadline:
                return count
            await asyncio.sleep(0.1)

    def report(self) -> dict[str, Any]:
        self.conn.send(("report",))
        result = self.conn.recv()
        self.process.join(10)
        return result


# --- downlinks and device requests ----------------------------------------------------------------


async def create_api_token(config_dir: Path) -> str:
    """A REST API token, stored before the driver starts (as `coap-driver token create` does)."""
    from driver_core.driver import Driver
    from driver_core.storage.db import Database
    from driver_core.tokens import create_token

    config = Driver(config_dir).load()
    db = Database(config.database["url"])
    await db.start()
    try:
        return await create_token(db, "bench")
    finally:
        await db.stop()


async def schedule_downlinks(http_port: int, token: str, serials: list[str], url: str) -> dict[str, Any]:
    """Queue one downlink per device through the REST API, as a client would."""
    import aiohttp

    api = f"http://127.0.0.1:{http_port}/api/v1"
    headers = {"Authorization": f"Bearer {token}"}
    began = time.perf_counter()
    statuses: dict[int, int] = {}
    async with aiohttp.ClientSession(headers=headers) as session:
        semaphore = asyncio.Semaphore(20)

        async def one(serial: str) -> None:
            body = {"command": COMMAND, "command_id": f"cb-{serial}", "callback_url": url}
            async with semaphore, session.post(f"{api}/devices/{serial}/downlinks", json=body) as response:
                statuses[response.status] = statuses.get(response.status, 0) + 1

        await asyncio.gather(*(one(serial) for serial in serials))
    return {"seconds": round(time.perf_counter() - began, 2), "http_statuses": statuses}


async def post(
    pool: UdpPool, device: VirtualDevice, path: str, payload: bytes
) -> tuple[int, Any, float, float]:
    """One protected POST: (inner code, decoded CBOR answer or None, wall time sent, wall time answered)."""
    message = aiocoap.Message(code=Code.POST, uri_path=(path,), payload=payload, content_format=CBOR)
    outer, request_id = device.context.protect(message, kid_context=False)
    sent = time.time()
    answer = await pool.request(outer)
    answered = time.time()
    inner, _ = device.context.unprotect(answer, request_id)
    body = cbor2.loads(inner.payload) if inner.payload else None
    return int(inner.code), body, sent, answered


async def paced(rate: float, items: list[Any], send) -> list[Any]:
    """Call `send(item)` for each item at `rate` per second; gather the results (exceptions kept)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    tasks = []
    for index, item in enumerate(items):
        delay = start + index / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(send(item)))
    return await asyncio.gather(*tasks, return_exceptions=True)


def latencies(arrivals: dict[str, dict[int, float]], moments: dict[str, float], status: int) -> dict[str, Any]:
    values = [arrivals[cid][status] - at for cid, at in moments.items() if status in arrivals.get(cid, {})]
    return {
        "count": len(values),
        "missing": len(moments) - len(values),
        "p50_ms": _ms(percentile(values, 0.5)),
        "p99_ms": _ms(percentile(values, 0.99)),
        "max_ms": _ms(max(values, default=None)),
    }


async def drive(
    args: argparse.Namespace, port: int, http_port: int, token: str, driver_pid: int, receiver: Receiver
) -> dict[str, Any]:
    devices = virtual_devices(bench_fleet(args.devices), family_sampler(families()))
    pool = await UdpPool("127.0.0.1", port, 16).open()
    gen = LoadGenerator(pool, devices)
    out: dict[str, Any] = {}
    try:
        joins = await gen.join_all(100)
        out["join"] = {"ok": joins.ok, "failed": joins.failed, "seconds": round(joins.seconds, 2)}
        url = f"http://127.0.0.1:{receiver.port}/cb"
        serials = [device.enrollment.serial for device in devices]
        out["schedule"] = await schedule_downlinks(http_port, token, serials, url)
        out["pending_callbacks"] = await receiver.wait_for(0, args.devices, 60)

        rx_at: dict[str, float] = {}
        wire_ids: dict[str, int] = {}

        async def rx(device: VirtualDevice) -> None:
            code, body, _, at = await post(pool, device, "rx", device.payload(0))
            if code == Code.CHANGED and isinstance(body, dict) and 4 in body:
                rx_at[f"cb-{device.enrollment.serial}"] = at
                wire_ids[device.enrollment.serial] = body[4][0]

        cpu = Sampler(driver_pid)
        spy = PySpy(driver_pid, args.py_spy).start() if args.py_spy else None
        cpu.begin()
        results = await paced(args.rate, devices, rx)
        out["rx"] = {"sent": len(devices), "carried_downlink": len(rx_at), "errors": _errors(results)}
        await receiver.wait_for(2, len(rx_at), 60)

        ack_at: dict[str, float] = {}
        ack_sent: dict[str, float] = {}

        async def ack(device: VirtualDevice) -> None:
            serial = device.enrollment.serial
            if serial not in wire_ids:
                return
            code, _, sent, at = await post(pool, device, "ack", cbor2.dumps([wire_ids[serial], 0]))
            if code == Code.CHANGED:
                ack_at[f"cb-{serial}"] = at
                ack_sent[f"cb-{serial}"] = sent

        results = await paced(args.rate, devices, ack)
        cpu.end()
        if spy is not None:
            spy.stop()
            out["py_spy"] = write_spy_report(args.py_spy, spy.rate, 2 * len(devices), cpu)
        out["ack"] = {"sent": len(wire_ids), "answered_2_04": len(ack_at), "errors": _errors(results)}
        await receiver.wait_for(3, len(ack_at), 60)
        out["driver_cpu_percent"] = round(cpu.cpu_percent or 0, 1)
        out["separate_responses"] = pool.stats.separate_responses
    finally:
        await pool.close()
    report = receiver.report()
    out["callback_after_rx_answer_state_2"] = latencies(report["arrivals"], rx_at, 2)
    out["callback_after_ack_answer_state_3"] = latencies(report["arrivals"], ack_at, 3)
    out["callback_after_ack_sent_state_3"] = latencies(report["arrivals"], ack_sent, 3)
    out["duplicate_callbacks"] = report["duplicates"]
    return out


def _errors(results: list[Any]) -> dict[str, int]:
    errors: dict[str, int] = {}
    for result in results:
        if isinstance(result, BaseException):
            key = f"{type(result).__name__}: {result}"[:80]
            errors[key] = errors.get(key, 0) + 1
    return errors


def run(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="coap-callbacks-"))
    report = report_header(args)
    receiver = Receiver().start()
    try:
        config_dir = workdir / "config"
        prefix = f"cbbench-{uuid.uuid4().hex[:8]}"
        write_driver_config(
            config_dir, f"sqlite+aiosqlite:///{workdir / 'bench.db'}", prefix, 1,
            extra=f"callbacks:\n  max_concurrency: {args.max_concurrency}\n"
            "  allowed_networks: [127.0.0.0/8]\n",  # the receiver listens on loopback
        )
        report["enroll_s"] = round(asyncio.run(enroll(config_dir, args.devices)), 2)
        token = asyncio.run(create_api_token(config_dir))
        driver = start_child(["-m", "bench.driver_runner", str(config_dir)], workdir / "ready", workdir / "driver.log")
        try:
            report.update(asyncio.run(drive(args, driver.port, driver.http_port, token, driver.pid, receiver)))
        finally:
            driver.stop()
            report["driver_log_tail"] = driver.log.read_text(errors="replace")[-1500:]
    finally:
        with contextlib.suppress(Exception):
            receiver.process.kill()
        shutil.rmtree(workdir, ignore_errors=True)
    report["machine"]["loadavg_at_end"] = os.getloadavg()
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Callback latency after the device's /ack")
    parser.add_argument("--devices", type=int, default=2000, help="devices, one downlink each")
    parser.add_argument("--rate", type=float, default=200.0, help="/rx and then /ack per second")
    parser.add_argument("--max-concurrency", type=int, default=50, help="callbacks integration setting")
    parser.add_argument("--out", type=Path, help="JSON results file (default /tmp/coap-callbacks-<time>.json)")
    parser.add_argument("--py-spy", type=Path, metavar="RAW", help="py-spy the driver during /rx and /ack")
    args = parser.parse_args(argv)
    if args.devices <= 0 or args.rate <= 0 or args.max_concurrency <= 0:
        parser.error("--devices, --rate and --max-concurrency must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = run(args)
    for key in ("callback_after_rx_answer_state_2", "callback_after_ack_answer_state_3", "callback_after_ack_sent_state_3"):
        figures = report[key]
        print(
            f"{key}: {figures['count']} callbacks, p50 {figures['p50_ms']} ms, p99 {figures['p99_ms']} ms, "
            f"max {figures['max_ms']} ms, missing {figures['missing']}"
        )
    print(
        f"rx {report['rx']}, ack {report['ack']}, duplicates {report['duplicate_callbacks']}, "
        f"driver CPU {report['driver_cpu_percent']} %, separate responses {report['separate_responses']}"
    )
    write_results(report, args.out, "callbacks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
