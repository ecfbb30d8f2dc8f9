"""CoAP latency while callback endpoints hang, answer in 2 s or fail (the figures behind
tests/test_faults.py::test_bad_callback_endpoints_do_not_hold_up_coap).

The test asserts counts and order; wall-clock percentiles depend on the machine and its
load, so they are measured here and recorded in docs/performance.md ("Faults").

    .venv/bin/python -m bench.fault_bench --uplinks-per-phase 10 --out /tmp/fault.json
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
from pathlib import Path
from typing import Any

from bench.common import report_header, write_results
from tests.http_helpers import http_endpoint
from tests.test_faults import Endpoints, percentile, run_callback_phases


def phase_figures(run: Any) -> dict[str, dict[str, float]]:
    """Per phase: uplinks, answers carrying a downlink, latency p50/p95/p99 in ms."""
    figures = {}
    for name, (start, end) in run.phases.items():
        part = run.fleet.between(start, end)
        latencies = [a.latency for a in part]
        figures[name] = {
            "uplinks": len(part),
            "with_downlink": sum(4 in a.body for a in part),
            **{f"p{int(q * 100)}_ms": round(percentile(latencies, q) * 1000, 1) for q in (0.5, 0.95, 0.99)},
        }
    return figures


async def measure(uplinks_per_phase: int) -> dict[str, Any]:
    served = Endpoints()
    async with http_endpoint("/{kind}", served.handle, shutdown_timeout=0.5) as port:
        served.port = port
        try:
            with tempfile.TemporaryDirectory(prefix="coap-fault-bench-") as tmp:
                run = await run_callback_phases(Path(tmp) / "config", served, uplinks_per_phase)
        finally:
            served.release.set()
    return {
        "phases": phase_figures(run),
        "callback_requests": dict(served.hits),
        "callbacks": run.callbacks,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--uplinks-per-phase", type=int, default=10,
                        help="uplinks answered per device in each phase (one per second)")
    parser.add_argument("--out", type=Path, default=None, help="JSON report file")
    args = parser.parse_args(argv)
    report = report_header(args, loopback=True)
    report |= asyncio.run(measure(args.uplinks_per_phase))
    report["machine"]["loadavg_at_end"] = os.getloadavg()
    for name, figures in report["phases"].items():
        print(
            f"{name:8} endpoints: {figures['uplinks']} uplinks, {figures['with_downlink']} answers "
            f"with a downlink, latency p50/p95/p99 {figures['p50_ms']}/{figures['p95_ms']}/"
            f"{figures['p99_ms']} ms"
        )
    print(f"callback requests {report['callback_requests']}; load average "
          f"{report['machine']['loadavg_at_start'][0]:.1f} at start, "
          f"{report['machine']['loadavg_at_end'][0]:.1f} at end")
    write_results(report, args.out, "fault")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
