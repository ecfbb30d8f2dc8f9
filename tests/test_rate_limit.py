"""Rate limits on refused traffic: the token buckets, the CoAP gate under a real flood, 429 on HTTP.

The flood comes from another process (`python -m tests.test_rate_limit flood ...`)
on its own loopback address, 127.0.0.2, through one UDP socket, while enrolled
devices on 127.0.0.1 keep sending uplinks to the same driver.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import select
import socket
import statistics
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiocoap
import aiohttp
import cbor2
import pytest
from aiocoap.numbers.codes import Code
from aiocoap.numbers.types import Type

from driver_core.config import load_configuration
from driver_core.driver import Driver
from driver_core.events import EVENT_UPLINK
from driver_core.join_tokens import R1_LENGTH
from driver_core.oscore_context import wrap_kid_context
from driver_core.rate_limit import LOG_EVERY, TokenBuckets, Verdict, source_key
from driver_core.tokens import create_token
from driver_core.web.users import create_user
from tests.conftest import (
    UplinkLog,
    enrolled_session,
    make_device,
    session_for,
    started_driver,
    write_config,
)
from tests.test_config import error_of
from tests.web_fixtures import csrf_of, new_http

FLOOD_SOURCE = "127.0.0.2"
RX = cbor2.dumps({1: 87, 3: -71, 14: 2310})


# ---- token buckets, on a clock the test moves -------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_burst_then_refill_at_the_rate_never_above_the_burst() -> None:
    clock = Clock()
    buckets = TokenBuckets(2, 3, clock=clock)
    for _ in range(3):
        assert not buckets.exhausted("a")
        buckets.charge("a")
    assert buckets.exhausted("a")
    assert buckets.retry_after("a") == 1  # one token in 0.5 s
    assert not buckets.exhausted("b")  # other sources are not concerned
    clock.now = 0.5
    assert not buckets.exhausted("a")
    buckets.charge("a")
    assert buckets.exhausted("a")
    clock.now = 3600.0  # a long pause gives back the burst, no more
    for _ in range(3):
        assert not buckets.exhausted("a")
        buckets.charge("a")
    assert buckets.exhausted("a")


def test_buckets_are_an_lru_of_bounded_size() -> None:
    clock = Clock()
    buckets = TokenBuckets(1, 1, max_sources=3, clock=clock)
    for key in "abc":
        buckets.charge(key)
    buckets.charge("a")  # touched: now the most recent
    buckets.charge("d")  # evicts b, the least recently used
    assert len(buckets) == 3
    assert not buckets.exhausted("b")
    assert buckets.exhausted("a") and buckets.exhausted("c") and buckets.exhausted("d")


def test_rate_zero_turns_limiting_off() -> None:
    buckets = TokenBuckets(0, 1)
    for _ in range(100):
        buckets.charge("a")
    assert not buckets.enabled and not buckets.exhausted("a") and len(buckets) == 0


@pytest.mark.parametrize(
    ("host", "key"),
    [
        ("192.0.2.7", "192.0.2.7"),
        ("::ffff:192.0.2.7", "192.0.2.7"),
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:bbbb::9", "2001:db8:1:2::/64"),
        ("fe80::1%eth0", "fe80::/64"),
    ],
)
def test_sources_are_addresses_and_ipv6_slash_64s(host: str, key: str) -> None:
    assert source_key(host) == key


def test_settings_have_defaults_and_clear_errors(tmp_path: Path) -> None:
    (tmp_path / "configuration.yaml").write_text("coap:\nhttp:\n", encoding="utf-8")
    config = load_configuration(tmp_path, {})
    assert (config.coap["refusals_per_second"], config.coap["refusal_burst"]) == (20, 100)
    assert (config.http["auth_failures_per_minute"], config.http["auth_failure_burst"]) == (10, 20)
    (tmp_path / "configuration.yaml").write_text(
        "coap:\n  refusals_per_second: -1\n", encoding="utf-8"
    )
    assert error_of(tmp_path, {}) == (
        f"{tmp_path}/configuration.yaml:2: coap.refusals_per_second: value must be at least 0"
    )
    (tmp_path / "configuration.yaml").write_text(
        "http:\n  auth_failure_burst: 0\n", encoding="utf-8"
    )
    assert error_of(tmp_path, {}) == (
        f"{tmp_path}/configuration.yaml:2: http.auth_failure_burst: value must be at least 1"
    )


# ---- a driver with chosen limits ----------------------------------------------------------


@contextlib.asynccontextmanager
async def driver_with_limits(config_dir: Path, coap: str = "", http: str = "") -> AsyncIterator[Driver]:
    """A started driver whose coap/http sections get these extra (indented) lines."""
    write_config(config_dir, coap=coap, http=http)
    async with started_driver(config_dir) as driver:
        yield driver


@pytest.fixture
async def limited(tmp_path: Path) -> AsyncIterator[Driver]:
    """CoAP: 1 refusal/s, burst 5 (a few refusals use the budget up)."""
    async with driver_with_limits(
        tmp_path / "config", coap="  refusals_per_second: 1\n  refusal_burst: 5\n"
    ) as driver:
        yield driver


class Socket(asyncio.DatagramProtocol):
    """One UDP socket of a test client; collects what comes back."""

    def __init__(self) -> None:
        self.received: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: object) -> None:
        self.received.put_nowait(data)

    @classmethod
    async def open(cls, port: int, source: str = "127.0.0.1") -> tuple[asyncio.DatagramTransport, Socket]:
        loop = asyncio.get_running_loop()
        return await loop.create_datagram_endpoint(
            cls, local_addr=(source, 0), remote_addr=("127.0.0.1", port)
        )

    async def answer(self, timeout: float) -> aiocoap.Message | None:
        try:
            return aiocoap.Message.decode(await asyncio.wait_for(self.received.get(), timeout))
        except TimeoutError:
            return None


def encoded(message: aiocoap.Message, mtype: Type, mid: int, token: bytes = b"") -> bytes:
    """The datagram of `message` as a client sends it (raw codec use: set, not passed)."""
    message.mtype, message.mid, message.token = mtype, mid, token
    return message.encode()


def unprotected_rx(mid: int) -> bytes:
    return encoded(aiocoap.Message(code=Code.POST, uri_path=["rx"]), Type.CON, mid, b"t")


def unknown_kid_join(mid: int, kid: bytes) -> bytes:
    """JOIN step 1 shape (kid context R1, Partial IV, kid) from a device nobody enrolled."""
    kid_context = wrap_kid_context(os.urandom(R1_LENGTH))
    option = bytes([0x19, 0x01, len(kid_context)]) + kid_context + kid  # h, k, 1-byte PIV
    message = aiocoap.Message(code=Code.POST, oscore=option, payload=os.urandom(24))
    return encoded(message, Type.CON, mid, mid.to_bytes(2, "big"))


async def test_over_budget_refused_datagrams_get_no_answer_but_devices_behind_it_do(
    limited: Driver, caplog: pytest.LogCaptureFixture
) -> None:
    driver = limited
    sessions = []
    for index in range(1, 4):  # not in memory yet: each JOIN pays a token, and gets it back
        sessions.append(await enrolled_session(driver, make_device(f"A000000{index}", 17, index)))
        await sessions[-1].join("1.0.0", 17)
    session = sessions[0]
    transport, sock = await Socket.open(driver.coap_port)
    try:
        for mid in range(5):  # the burst: answered and refused as usual
            transport.sendto(unprotected_rx(mid))
            answer = await sock.answer(2.0)
            assert answer is not None and answer.mid == mid
            assert (answer.code, answer.payload) == (Code.UNAUTHORIZED, b"OSCORE required")
        transport.sendto(unprotected_rx(5))
        transport.sendto(b"\xff\x00junk")
        transport.sendto(unknown_kid_join(6, b"\x99\x99"))
        # The same address, an enrolled device: its context is cached, so it goes through.
        assert (await session.post("rx", RX)).code == Code.CHANGED
        assert await sock.answer(0.3) is None
    finally:
        transport.close()
    counts = driver.refusals.counts
    assert (counts["unprotected"], counts["rate_limited"]) == (5, 3)
    assert (counts["malformed_datagram"], counts["unknown_kid"]) == (0, 0)
    lines = [r.getMessage() for r in caplog.records if "reason=rate_limited" in r.getMessage()]
    assert lines == [
        "refused reason=rate_limited serial=- kid=- remote=127.0.0.1 detail=source 127.0.0.1 "
        "over its refusal budget (1/s, burst 5): 1 datagram(s) dropped unanswered since the last line"
    ]
    token = await create_token(driver.db, "prometheus")
    async with aiohttp.ClientSession() as http, http.get(
        f"http://127.0.0.1:{driver.api.port}/metrics", headers={"Authorization": f"Bearer {token}"}
    ) as response:
        text = await response.text()
    assert 'coap_driver_refused_requests_total{reason="rate_limited"} 3.0' in text
    assert 'coap_driver_refused_requests_total{reason="unprotected"} 5.0' in text


async def test_gate_guesses_refusals_without_io(limited: Driver) -> None:
    driver = limited
    gate = driver.coap_gate
    assert gate is not None
    device = make_device("A0000009", 17, 9)
    session = await enrolled_session(driver, device)
    await session.join("1.0.0", 17)
    outer, request_id = session.protect("rx", RX)
    outer.mtype, outer.mid, outer.token = Type.CON, 7, b"g"
    genuine = outer.encode()
    assert gate.would_be_refused(genuine) is False
    assert (await session.send_raw(outer, request_id)).code == Code.CHANGED
    assert gate.would_be_refused(genuine) is True  # now a replay
    assert gate.would_be_refused(unknown_kid_join(1, b"\x55")) is True
    assert gate.would_be_refused(unprotected_rx(2)) is True
    assert gate.would_be_refused(b"\x40") is True  # truncated header
    ping = encoded(aiocoap.Message(code=Code.EMPTY), Type.CON, 3)
    assert gate.verdict(ping) is Verdict.FOREIGN  # dropped only when the source is over budget
    ack = encoded(aiocoap.Message(code=Code.EMPTY), Type.ACK, 3)
    assert gate.verdict(ack) is Verdict.SERVE  # may acknowledge a separate response
    assert gate.verdict(b"\x40") is Verdict.UNDECODABLE
    join = session_for(driver, device)  # a cached device's JOIN: only the site can judge it
    assert (await join.join("1.0.0", 17)).code == Code.CHANGED


# ---- a flood from another process -----------------------------------------------------------


def flood(source: str, port: int, rate: int, seconds: float) -> None:
    """Send unknown-kid JOINs from one socket at `rate` per second, then count the answers.

    Prints "ready", then {"sent", "seconds"} once the flood is over, then {"answers": n}
    (requests answered so far) whenever n grows, until a line arrives on stdin.
    """
    count = int(rate * seconds)
    datagrams = [unknown_kid_join(i & 0xFFFF, os.urandom(6)) for i in range(count)]
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    answered: set[bytes] = set()  # tokens of the requests that got a response

    def drain() -> None:
        while True:
            try:
                answer = aiocoap.Message.decode(sock.recv(2048, socket.MSG_DONTWAIT))
            except BlockingIOError:
                return
            if answer.code != Code.EMPTY:  # not the empty ACK before a separate response
                answered.add(answer.token)

    print("ready", flush=True)
    started = time.perf_counter()
    sent = 0
    while sent < count:
        due = min(count, int((time.perf_counter() - started) * rate) + 1)
        while sent < due:
            sock.send(datagrams[sent])
            sent += 1
        drain()
        time.sleep(0.0005)
    print(json.dumps({"sent": sent, "seconds": time.perf_counter() - started}), flush=True)
    reported = -1
    while not select.select([sys.stdin], [], [], 0.01)[0]:
        drain()
        if len(answered) != reported:
            reported = len(answered)
            print(json.dumps({"answers": reported}), flush=True)
    sock.close()


def udp_drops(port: int) -> int:
    """Datagrams the kernel dropped on the driver's socket (its receive queue was full)."""
    drops = 0
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port:
                drops += int(fields[-1])
    return drops


async def rx_rounds(sessions: list, until: asyncio.Future) -> list[float]:
    """Every device sends uplinks one after the other, all devices at once, until `until` is done."""

    async def one(session) -> list[float]:
        took: list[float] = []
        while not until.done():
            started = time.perf_counter()
            answer = await session.post("rx", RX)
            took.append(time.perf_counter() - started)
            assert answer.protected and answer.code == Code.CHANGED
        return took

    return [t for times in await asyncio.gather(*(one(s) for s in sessions)) for t in times]


def summary(latencies: list[float]) -> str:
    ordered = sorted(latencies)
    p95 = ordered[int(len(ordered) * 0.95) - 1]
    return (
        f"n={len(ordered)} median={statistics.median(ordered) * 1000:.1f} ms "
        f"p95={p95 * 1000:.1f} ms max={ordered[-1] * 1000:.1f} ms"
    )


FLOOD_RATE = 5000  # datagrams per second
FLOOD_SECONDS = 4.0
DEVICES = 20


async def test_unknown_kid_flood_is_dropped_while_enrolled_devices_carry_on(tmp_path: Path) -> None:
    async with driver_with_limits(
        tmp_path / "config", coap="  refusals_per_second: 20\n  refusal_burst: 100\n"
    ) as driver:
        log = UplinkLog()
        driver.bus.listen(EVENT_UPLINK, log)
        flooder = None
        try:
            sessions = []
            for index in range(DEVICES):
                session = await enrolled_session(driver, make_device(f"B{index:07d}", 17, index + 1))
                await session.join("1.0.0", 17)
                sessions.append(session)
            quiet = await rx_rounds(sessions, until=asyncio.ensure_future(asyncio.sleep(FLOOD_SECONDS)))
            drops_before = udp_drops(driver.coap_port)
            flooder = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "tests.test_rate_limit", "flood", FLOOD_SOURCE,
                str(driver.coap_port), str(FLOOD_RATE), str(FLOOD_SECONDS),
                cwd=Path(__file__).resolve().parent.parent, stdout=asyncio.subprocess.PIPE,
                stdin=asyncio.subprocess.PIPE,
            )
            assert await flooder.stdout.readline() == b"ready\n"  # the flood starts now
            started = time.monotonic()
            finished = asyncio.ensure_future(flooder.stdout.readline())
            flooded = await rx_rounds(sessions, until=finished)
            report = json.loads(await finished)
            dropped_by_kernel = udp_drops(driver.coap_port) - drops_before
            counts = driver.refusals.counts
            deadline = time.monotonic() + 10
            while counts["unknown_kid"] + counts["rate_limited"] + dropped_by_kernel < report["sent"]:
                assert time.monotonic() < deadline, (dict(counts), report, dropped_by_kernel)
                await asyncio.sleep(0.05)  # the driver still works through its socket queue
            worked = time.monotonic() - started  # tokens came back for as long as the driver worked
            answers = 0
            async with asyncio.timeout(10):  # every refusal answered, and nothing else
                while answers < counts["unknown_kid"]:
                    answers = json.loads(await flooder.stdout.readline())["answers"]
            flooder.stdin.write(b"stop\n")
            await flooder.wait()
            print(
                f"\nflood: {report['sent']} unknown-kid JOINs in {report['seconds']:.2f} s "
                f"({report['sent'] / report['seconds']:.0f}/s), {answers} answered; "
                f"refusals unknown_kid={counts['unknown_kid']} rate_limited={counts['rate_limited']} "
                f"kernel drops={dropped_by_kernel}\n"
                f"rx without flood: {summary(quiet)}\nrx during flood:  {summary(flooded)}"
            )
            uplinks = DEVICES + len(quiet) + len(flooded)  # JOINs, then every rx
            assert len(await log.wait_for(uplinks)) == uplinks
            assert counts["unknown_kid"] + counts["rate_limited"] + dropped_by_kernel == report["sent"]
            # The burst, then 20 per second for as long as the flood was being worked on.
            assert counts["unknown_kid"] <= 100 + math.ceil(20 * worked)
            assert counts["rate_limited"] >= report["sent"] * 0.9
            assert answers == counts["unknown_kid"]  # a dropped datagram has no answer
            assert dropped_by_kernel == 0  # the enlarged receive queue held the flood
            # Every device kept being served during the flood (each exchange above got its 2.04);
            # how fast is a figure for bench/, not a wall-clock bound that a busy machine breaks.
            assert len(flooded) >= DEVICES
        finally:
            if flooder is not None and flooder.returncode is None:
                flooder.kill()  # the test failed half-way
                await flooder.wait()


# ---- forged MACs naming an enrolled kid ------------------------------------------------------


def forged_rx(mid: int, kid: bytes, seqno: int) -> bytes:
    """An /rx under the device's current context, as anyone can write it: the kid is in clear,
    the Partial IV fresh, the ciphertext random (the MAC cannot verify)."""
    option = bytes([0x0B]) + seqno.to_bytes(3, "big") + kid  # k, a 3-byte Partial IV
    message = aiocoap.Message(code=Code.POST, oscore=option, payload=os.urandom(24))
    return encoded(message, Type.CON, mid, mid.to_bytes(2, "big"))


FORGERS = [f"127.0.1.{n}" for n in range(1, 41)]  # 40 source addresses, 40 fresh source budgets


def forge(kid_hex: str, port: int, rate: int, seconds: float) -> None:
    """Send forged-MAC /rx requests naming `kid_hex` from 40 loopback addresses in turn, at
    `rate` per second, for `seconds` or until a line arrives on stdin; then report like
    `flood` ("ready", {"sent", "seconds"}, {"answers"} until the next line on stdin)."""
    kid = bytes.fromhex(kid_hex)
    count = int(rate * seconds)
    datagrams = [forged_rx(i & 0xFFFF, kid, 1_000_000 + i) for i in range(count)]
    sockets = []
    for source in FORGERS:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((source, 0))
        sock.connect(("127.0.0.1", port))
        sock.setblocking(False)
        sockets.append(sock)
    answered = 0

    def drain() -> None:
        nonlocal answered
        for sock in select.select(sockets, [], [], 0)[0]:
            while True:
                try:
                    sock.recv(2048)
                except BlockingIOError:
                    break
                answered += 1

    print("ready", flush=True)
    started = time.perf_counter()
    sent = 0
    while sent < count and not select.select([sys.stdin], [], [], 0)[0]:
        due = min(count, int((time.perf_counter() - started) * rate) + 1)
        while sent < due:
            sockets[sent % len(sockets)].send(datagrams[sent])
            sent += 1
        drain()
        time.sleep(0.0005)
    if sent < count:
        sys.stdin.readline()  # told to stop
    print(json.dumps({"sent": sent, "seconds": time.perf_counter() - started}), flush=True)
    reported = -1
    while not select.select([sys.stdin], [], [], 0.01)[0]:
        drain()
        if answered != reported:
            reported = answered
            print(json.dumps({"answers": reported}), flush=True)
    for sock in sockets:
        sock.close()


FORGE_RATE = 1500
FORGE_SECONDS = 20.0  # at most: the test stops the flood once the device is done
RATE, BURST = 20, 100  # the driver's refusal budget in this test


async def test_forged_macs_naming_an_enrolled_kid_are_verified_but_answered_within_a_budget(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Forgeries naming the kid of an enrolled device, from 40 addresses: each is verified (a
    valid MAC is always served), the first BURST and then RATE per second are answered 4.00
    and logged; the rest get no answer, a counter and one line per kid every LOG_EVERY s.
    Meanwhile the real device JOINs and sends an uplink."""
    caplog.set_level(logging.WARNING, logger="driver_core.refused")
    async with driver_with_limits(
        tmp_path / "config", coap=f"  refusals_per_second: {RATE}\n  refusal_burst: {BURST}\n"
    ) as driver:
        log = UplinkLog()
        driver.bus.listen(EVENT_UPLINK, log)
        device = make_device("C0000001", 17, 1)
        session = await enrolled_session(driver, device)
        await session.join("1.0.0", 17)  # the kid is cached, with a current context to forge under
        forger = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.test_rate_limit", "forge", session.kid.hex(),
            str(driver.coap_port), str(FORGE_RATE), str(FORGE_SECONDS),
            cwd=Path(__file__).resolve().parent.parent, stdout=asyncio.subprocess.PIPE,
            stdin=asyncio.subprocess.PIPE,
        )
        try:
            drops_before = udp_drops(driver.coap_port)
            assert await forger.stdout.readline() == b"ready\n"
            started = time.monotonic()
            finished = asyncio.ensure_future(forger.stdout.readline())
            await asyncio.sleep(0.5)  # well into the flood: the kid's budget is spent
            join_started = time.perf_counter()
            assert (await session.join("1.0.0", 17)).code == Code.CHANGED
            join_took = time.perf_counter() - join_started
            uplinks = 0
            while uplinks < 5 or time.perf_counter() - join_started < 2.5:  # the flood goes on
                rx = await session.post("rx", RX)
                assert rx.protected and rx.code == Code.CHANGED
                uplinks += 1
            flood_on = not finished.done()
            forger.stdin.write(b"stop\n")  # the flood ends here
            report = json.loads(await finished)
            counts = driver.refusals.counts
            unanswered = "decryption_failed_unanswered"
            deadline = time.monotonic() + 10

            def accounted() -> int:
                kernel = udp_drops(driver.coap_port) - drops_before  # its receive queue was full
                return counts["decryption_failed"] + counts[unanswered] + counts["rate_limited"] + kernel

            while accounted() < report["sent"]:
                assert time.monotonic() < deadline, (dict(counts), report)
                await asyncio.sleep(0.05)  # the driver still works through its socket queue
            elapsed = time.monotonic() - started
            dropped_by_kernel = udp_drops(driver.coap_port) - drops_before
            answers = 0
            async with asyncio.timeout(10):
                while answers < counts["decryption_failed"]:
                    answers = json.loads(await forger.stdout.readline())["answers"]
            forger.stdin.write(b"stop\n")
            await forger.wait()
        finally:
            if forger.returncode is None:
                forger.kill()
                await forger.wait()
        print(
            f"\nforged: {report['sent']} in {report['seconds']:.2f} s, {answers} answered; "
            f"refusals {dict(sorted(counts.items()))}; JOIN during the flood took {join_took * 1000:.0f} ms, "
            f"then {uplinks} uplinks; "
            f"all counted after {elapsed:.2f} s; kernel drops {dropped_by_kernel}"
        )
        assert flood_on, "the flood ended before the device was done"
        assert accounted() == report["sent"]
        # Answered: the kid's burst, then its rate for as long as the flood was being worked on.
        assert BURST <= answers == counts["decryption_failed"] <= BURST + math.ceil(RATE * elapsed)
        assert counts[unanswered] == report["sent"] - dropped_by_kernel - answers
        assert counts["rate_limited"] == 0  # nothing the gate could have foreseen
        lines = [
            r.getMessage() for r in caplog.records
            if r.levelno >= logging.WARNING and r.name == "driver_core.refused"
        ]
        summaries = [line for line in lines if f"reason={unanswered}" in line]
        intervals = math.ceil(elapsed / LOG_EVERY) + 1
        assert 1 <= len(summaries) <= intervals
        assert summaries[0].startswith(
            f"refused reason={unanswered} serial=C0000001 kid={session.kid.hex()} remote=- detail="
            f"kid {session.kid.hex()} or its sources over the decryption-failure budget "
            f"({RATE}/s, burst {BURST} each): "
        )
        assert len(lines) == answers + len(summaries)  # one line per answer, one per interval
        assert [e.message_type for e in await log.wait_for(2 + uplinks)] == ["join", "join"] + ["rx"] * uplinks
        token = await create_token(driver.db, "prometheus")
        async with aiohttp.ClientSession() as http, http.get(
            f"http://127.0.0.1:{driver.api.port}/metrics", headers={"Authorization": f"Bearer {token}"}
        ) as response:
            text = await response.text()
        assert f'coap_driver_refused_requests_total{{reason="{unanswered}"}} {counts[unanswered]:.1f}' in text
        assert join_took < 5.0  # generous: the figure to look at is printed above (bench/forged_flood.py)


async def test_a_source_over_its_budget_gets_no_answer_to_forgeries_its_valid_requests_do(
    limited: Driver,
) -> None:
    """Per source: after 5 refusals (the burst), a forgery naming an enrolled kid from that
    address is verified, counted and left unanswered; the device's own request is served."""
    driver = limited
    session = await enrolled_session(driver, make_device("C0000002", 17, 2))
    await session.join("1.0.0", 17)
    transport, sock = await Socket.open(driver.coap_port)
    try:
        for mid in range(5):
            transport.sendto(unprotected_rx(mid))
            assert (await sock.answer(2.0)).code == Code.UNAUTHORIZED
        transport.sendto(forged_rx(9, session.kid, 5000))
        assert (await session.post("rx", RX)).code == Code.CHANGED  # sent after the forgery
        assert await sock.answer(0.3) is None
    finally:
        transport.close()
    counts = driver.refusals.counts
    assert (counts["decryption_failed"], counts["decryption_failed_unanswered"]) == (0, 1)
    assert driver.coap_gate.kid_buckets.exhausted(session.kid.hex()) is False  # not the kid's fault


async def test_a_forged_join_step_1_costs_no_r2_and_no_answer_context(limited: Driver) -> None:
    """A forged step 1 naming an enrolled kid (R1 kid context, random ciphertext) fails
    verification before the driver issues an R2 or derives C2: those are for real devices."""
    driver = limited
    device = make_device("C0000003", 17, 3)
    session = await enrolled_session(driver, device)
    await session.join("1.0.0", 17)
    tokens = driver.credentials.tokens
    issued: list[bytes] = []
    real_issue = tokens.issue
    tokens.issue = lambda kid, now_ms=None: issued.append(kid) or real_issue(kid, now_ms)
    try:
        transport, sock = await Socket.open(driver.coap_port)
        try:
            kid_context = wrap_kid_context(os.urandom(R1_LENGTH))
            option = bytes([0x19, 0x01, len(kid_context)]) + kid_context + session.kid
            forged = aiocoap.Message(code=Code.POST, oscore=option, payload=os.urandom(24))
            transport.sendto(encoded(forged, Type.CON, 1, b"f1"))
            answer = await sock.answer(2.0)
        finally:
            transport.close()
        assert (answer.code, answer.payload) == (Code.BAD_REQUEST, b"Decryption failed")
        assert issued == []
        assert (await session_for(driver, device).join("1.0.0", 17)).code == Code.CHANGED
        assert issued == [session.kid]  # a real step 1 gets its R2
    finally:
        tokens.issue = real_issue


def test_take_spends_a_token_now_or_says_none_is_left() -> None:
    clock = Clock()
    buckets = TokenBuckets(1, 2, clock=clock)
    assert [buckets.take("k") for _ in range(3)] == [True, True, False]
    clock.now = 1.0
    assert [buckets.take("k") for _ in range(2)] == [True, False]
    assert all(TokenBuckets(0, 1).take("k") for _ in range(5))  # rate 0: limiting off


# ---- HTTP: failed authentications ----------------------------------------------------------


@pytest.fixture
async def http_limited(tmp_path: Path) -> AsyncIterator[Driver]:
    """HTTP: 6 failed authentications per minute, burst 3."""
    async with driver_with_limits(
        tmp_path / "config", http="  auth_failures_per_minute: 6\n  auth_failure_burst: 3\n"
    ) as driver:
        yield driver


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_bad_tokens_get_429_after_the_budget_good_tokens_never(http_limited: Driver) -> None:
    driver = http_limited
    origin = f"http://127.0.0.1:{driver.api.port}"
    token = await create_token(driver.db, "erp")
    devices = origin + "/api/v1/devices"
    async with aiohttp.ClientSession() as http:
        for _ in range(3):
            async with http.get(devices, headers=bearer("cdt_wrong")) as response:
                assert response.status == 401
        async with http.get(devices, headers=bearer("cdt_wrong")) as response:
            assert response.status == 429
            assert response.headers["Retry-After"] == "10"  # one failure back every 10 s
            assert await response.json() == {
                "error": "too_many_requests",
                "detail": "too many failed authentications from this address; retry in 10 s",
            }
        async with http.get(devices) as response:  # no token at all: refused without a lookup
            assert response.status == 429 and response.headers["Retry-After"] == "10"
        async with http.get(origin + "/metrics", headers=bearer("cdt_wrong")) as response:
            assert response.status == 429
        async with http.get(devices, headers=bearer(token)) as response:
            assert response.status == 200  # the authenticated client is unaffected
        async with http.get(origin + "/metrics", headers=bearer(token)) as response:
            assert response.status == 200
        async with http.get(origin + "/api/v1/openapi.json") as response:
            assert response.status == 200  # public: no token needed, nothing to throttle
    # Another address has its own budget.
    connector = aiohttp.TCPConnector(local_addr=(FLOOD_SOURCE, 0))
    async with (
        aiohttp.ClientSession(connector=connector) as other,
        other.get(devices, headers=bearer("cdt_wrong")) as response,
    ):
        assert response.status == 401


async def test_failed_logins_get_429_and_logged_in_users_carry_on(http_limited: Driver) -> None:
    driver = http_limited
    origin = f"http://127.0.0.1:{driver.api.port}"
    await create_user(driver.db, "admin", "correct horse battery")
    async with new_http() as user, new_http() as attacker:
        async with user.get(origin + "/login") as response:
            csrf = csrf_of(await response.text())
        login = {"csrf_token": csrf, "username": "admin", "password": "correct horse battery"}
        async with user.post(origin + "/login", data=login) as response:
            assert response.status == 200 and response.url.path == "/devices"
        async with attacker.get(origin + "/login") as response:
            csrf = csrf_of(await response.text())
        guess = {"csrf_token": csrf, "username": "admin", "password": "wrong guess!"}
        for _ in range(3):
            async with attacker.post(origin + "/login", data=guess) as response:
                assert response.status == 401
                csrf = csrf_of(await response.text())
                guess["csrf_token"] = csrf
        async with attacker.post(origin + "/login", data=guess) as response:
            assert response.status == 429
            assert response.headers["Retry-After"] == "10"
            assert await response.text() == (
                "Too many failed logins from this address. Try again in 10 seconds.\n"
            )
        right = {**guess, "password": "correct horse battery"}
        async with attacker.post(origin + "/login", data=right) as response:
            assert response.status == 429  # no password is checked until the budget is back
        async with user.get(origin + "/devices") as response:
            assert response.status == 200  # a logged-in session is unaffected


if __name__ == "__main__":  # the flooder process: flood SOURCE PORT RATE SECONDS
    if sys.argv[1:2] == ["flood"]:
        flood(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]))
    elif sys.argv[1:2] == ["forge"]:  # forge KID_HEX PORT RATE SECONDS
        forge(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]))
