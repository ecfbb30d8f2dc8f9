"""JOIN latency of a real device while forged-MAC requests naming its kid flood the driver.

The kid travels in clear, so anyone can send requests naming it; each one must
still be verified (a valid MAC is always served), but past the kid's and the
source's decryption-failure budget it gets neither an answer nor a log line of
its own (driver_core/rate_limit.py, `CoapGate.answers_decryption_failure`).

The forger is `tests.test_rate_limit forge`: its own process, 40 loopback
source addresses, a fixed rate for a fixed time. The driver and the device run
in this process (the driver as the tests start it: SQLite, no MQTT). During the
flood the device JOINs again and again (and sends one /rx after each JOIN);
the report gives the JOIN latencies and what the forger got back.

    .venv/bin/python -m bench.forged_flood --rate 2000,5000,10000 --duration 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import report_header, write_results
from tests.conftest import enrolled_session, make_device, started_driver, write_config
from tests.test_rate_limit import udp_drops

ROOT = Path(__file__).resolve().parent.parent


async def one_rate(rate: int, duration: float, budget: tuple[int, int]) -> dict[str, Any]:
    """Flood at `rate`/s for `duration` s with a fresh driver; JOIN + /rx in a loop meanwhile."""
    per_second, burst = budget
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "config"
        write_config(config, coap=f"  refusals_per_second: {per_second}\n  refusal_burst: {burst}\n")
        async with started_driver(config) as driver:
            session = await enrolled_session(driver, make_device("D0000001", 17, 1))
            await session.join("1.0.0", 17)
            drops_before = udp_drops(driver.coap_port)
            forger = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "tests.test_rate_limit", "forge", session.kid.hex(),
                str(driver.coap_port), str(rate), str(duration),
                cwd=ROOT, stdout=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.PIPE,
            )
            try:
                assert await forger.stdout.readline() == b"ready\n"
                finished = asyncio.ensure_future(forger.stdout.readline())
                joins: list[float] = []
                failures = 0
                while not finished.done():
                    started = time.perf_counter()
                    try:
                        await session.join("1.0.0", 17)
                        joins.append(time.perf_counter() - started)
                        await session.post("rx", b"\xa1\x01\x18\x57")
                    except Exception as exc:  # a timeout is a result here, not a crash
                        failures += 1
                        print(f"  JOIN failed: {exc}")
                sent = json.loads(await finished)
                await asyncio.sleep(1.0)  # the last answers
                forger.stdin.write(b"stop\n")
                answers = 0
                async for line in forger.stdout:
                    answers = json.loads(line).get("answers", answers)
                await forger.wait()
            finally:
                if forger.returncode is None:
                    forger.kill()
                    await forger.wait()
            counts = dict(driver.refusals.counts)
            kernel = udp_drops(driver.coap_port) - drops_before
    ordered = sorted(joins) or [float("nan")]
    return {
        "rate": rate,
        "sent": sent["sent"],
        "seconds": round(sent["seconds"], 2),
        "answers_to_forger": answers,
        "refusals": counts,
        "kernel_drops": kernel,
        "joins": len(joins),
        "join_failures": failures,
        "join_ms": {
            "median": round(statistics.median(ordered) * 1000, 1),
            "p95": round(ordered[max(0, int(len(ordered) * 0.95) - 1)] * 1000, 1),
            "max": round(ordered[-1] * 1000, 1),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", default="2000,5000", help="forged datagrams per second, comma-separated")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of flood per rate")
    parser.add_argument("--budget", default="20,100", help="refusals_per_second,refusal_burst")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    per_second, burst = (int(v) for v in args.budget.split(","))
    report = report_header(args, loopback=True)
    report["results"] = []
    print(f"{'rate/s':>7} {'sent':>7} {'answered':>8} {'unanswered':>10} {'kernel':>7} "
          f"{'JOINs':>5} {'fail':>4} {'median ms':>9} {'p95 ms':>7} {'max ms':>7}")
    for rate in (int(r) for r in args.rate.split(",")):
        result = asyncio.run(one_rate(rate, args.duration, (per_second, burst)))
        report["results"].append(result)
        refusals, join = result["refusals"], result["join_ms"]
        print(f"{rate:>7} {result['sent']:>7} {result['answers_to_forger']:>8} "
              f"{refusals.get('decryption_failed_unanswered', 0):>10} {result['kernel_drops']:>7} "
              f"{result['joins']:>5} {result['join_failures']:>4} {join['median']:>9} {join['p95']:>7} "
              f"{join['max']:>7}")
    write_results(report, args.out, "forged-flood")


if __name__ == "__main__":
    main()
