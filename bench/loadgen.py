"""A light CoAP/OSCORE load generator: many virtual devices over a few UDP sockets.

One aiocoap context per device would cost a socket, tasks and timers per
device; a fleet benchmark needs thousands of devices in a process that leaves
most of a 2-core machine to the driver. So requests are encoded with aiocoap's
message codec and OSCORE primitives (`PairwiseContext.protect/unprotect`) and
sent over a small pool of raw asyncio UDP sockets; answers are matched to
requests by token. Confirmable retransmission follows RFC 7252 §4.2 with one
periodic sweep instead of a timer per request.

Each /rx payload is the family's sample map plus an unknown key 99 carrying a
run-wide sequence number: the driver publishes it under ``data.unknown["99"]``,
so an MQTT subscriber can match every uplink to its send time and detect loss
and duplicates.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import os
import random
import socket
import struct
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiocoap
import cbor2
from aiocoap import oscore
from aiocoap.numbers.codes import Code
from aiocoap.numbers.types import Type

from driver_core.enrollment import DeviceInput
from driver_core.join_tokens import R1_LENGTH, R3_LENGTH
from driver_core.oscore_context import (
    DRIVER_SENDER_ID,
    PairwiseContext,
    unwrap_kid_context,
    wrap_kid_context,
)

CBOR = 60
MARKER_KEY = 99  # unknown to every family: published under data.unknown["99"]
_MARKER_KEY_CBOR = cbor2.dumps(MARKER_KEY)
_CON, _NON, _ACK = 0, 1, 2
TIMEOUT = -1  # outcome of a request that got no answer after every retransmission
PENDING = 0
DEFAULT_HW_TYPES = (17, 24, 28)  # one hw_type of each built-in family


# --- the virtual fleet ---------------------------------------------------------------------


def bench_device(index: int, hw_types: Sequence[int] = DEFAULT_HW_TYPES, seed: str = "bench") -> DeviceInput:
    """Credentials derived from the index, so every process can rebuild the fleet without files."""
    digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    return DeviceInput(
        serial=f"B{index:07d}",
        hw_type=hw_types[index % len(hw_types)],
        sender_id=b"\xbe" + index.to_bytes(3, "big"),
        master_secret=digest[:16],
        master_salt=digest[16:24],
    )


def bench_fleet(count: int, hw_types: Sequence[int] = DEFAULT_HW_TYPES) -> list[DeviceInput]:
    return [bench_device(i, hw_types) for i in range(count)]


@dataclass(slots=True, eq=False)
class VirtualDevice:
    """One device: credentials, current OSCORE context and a pre-encoded /rx body."""

    enrollment: DeviceInput
    body_items: bytes = b""  # CBOR map items of the sample values, without the map header
    item_count: int = 0
    context: PairwiseContext | None = None

    def set_sample(self, values: dict[Any, Any]) -> None:
        encoded = cbor2.dumps({k: v for k, v in values.items() if k != MARKER_KEY})
        header = encoded[0]
        if not 0xA0 <= header <= 0xB6:
            raise ValueError("sample map too large for the fast marker path")
        self.item_count = header - 0xA0
        self.body_items = encoded[1:]

    def payload(self, seq: int) -> bytes:
        """The sample map with key 99 = `seq`, built without re-encoding the map."""
        return bytes([0xA0 + self.item_count + 1]) + self.body_items + _MARKER_KEY_CBOR + cbor2.dumps(seq)

    def new_context(self, id_context: bytes, check_kid_context: bool = True) -> PairwiseContext:
        device = self.enrollment
        context = PairwiseContext(
            sender_id=device.sender_id,
            recipient_id=DRIVER_SENDER_ID,
            id_context=id_context,
            master_secret=device.master_secret,
            master_salt=device.master_salt,
        )
        context.check_kid_context = check_kid_context
        return context


def virtual_devices(
    enrollments: Iterable[DeviceInput], sample: Callable[[DeviceInput], dict[Any, Any]] | None = None
) -> list[VirtualDevice]:
    devices = []
    for enrollment in enrollments:
        device = VirtualDevice(enrollment)
        device.set_sample(sample(enrollment) if sample else {1: 1})
        devices.append(device)
    return devices


def family_sampler(families: dict[int, Any], seed: int = 1) -> Callable[[DeviceInput], dict[Any, Any]]:
    """Realistic /rx maps: the family's own simulated values, encoded by the family codec."""
    rng = random.Random(seed)

    def sample(device: DeviceInput) -> dict[Any, Any]:
        family = families[device.hw_type]
        return cbor2.loads(family.encode(device.hw_type, family.sample_values(device.hw_type, rng)))

    return sample


# --- UDP transport shared by every device ---------------------------------------------------


class ExchangeTimeout(Exception):
    pass


@dataclass(slots=True, eq=False)
class _Pending:
    future: asyncio.Future[aiocoap.Message]
    datagram: bytes
    socket: _Socket
    mid: int
    deadline: float
    timeout: float
    attempts: int = 0
    separate: bool = False  # an empty ACK came: the answer follows as a separate response


class _Socket(asyncio.DatagramProtocol):
    def __init__(self, pool: UdpPool, index: int) -> None:
        self.pool = pool
        self.index = index
        self.transport: asyncio.DatagramTransport | None = None
        self.next_mid = random.randrange(0x10000)
        self.by_mid: dict[int, bytes] = {}

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.pool.received(self, data)

    def error_received(self, exc: Exception) -> None:
        self.pool.stats.socket_errors += 1


@dataclass
class PoolStats:
    sent: int = 0
    retransmissions: int = 0
    separate_responses: int = 0
    stray_answers: int = 0  # answers to requests already answered or given up
    socket_errors: int = 0
    timeouts: int = 0


class UdpPool:
    """A few connected UDP sockets; requests are CON, answers matched by token.

    Message IDs are per socket, so with S sockets S x 65536 requests fit in
    aiocoap's 247 s deduplication lifetime before an ID repeats.
    """

    def __init__(
        self, host: str, port: int, sockets: int = 16, ack_timeout: float = 2.0, max_retransmit: int = 4
    ) -> None:
        self.host, self.port = host, port
        self.socket_count = sockets
        self.ack_timeout = ack_timeout
        self.max_retransmit = max_retransmit
        self.sockets: list[_Socket] = []
        self.pending: dict[bytes, _Pending] = {}
        self.stats = PoolStats()
        self._next_socket = 0
        self._token = random.randrange(1 << 62)
        self._sweeper: asyncio.Task[None] | None = None

    async def open(self) -> UdpPool:
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        for index in range(self.socket_count):
            _, protocol = await loop.create_datagram_endpoint(
                lambda index=index: _Socket(self, index), remote_addr=(self.host, self.port), family=family
            )
            sock = protocol.transport.get_extra_info("socket")
            for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                sock.setsockopt(socket.SOL_SOCKET, option, 4 << 20)
            self.sockets.append(protocol)
        self._sweeper = asyncio.create_task(self._sweep())
        return self

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        for pending in self.pending.values():
            if not pending.future.done():
                pending.future.set_exception(ExchangeTimeout("pool closed"))
        self.pending.clear()
        for sock in self.sockets:
            if sock.transport is not None:
                sock.transport.close()

    def request(self, message: aiocoap.Message) -> asyncio.Future[aiocoap.Message]:
        """Send `message` as CON; the future gets the answer (piggybacked or separate)."""
        sock = self.sockets[self._next_socket]
        self._next_socket = (self._next_socket + 1) % len(self.sockets)
        mid = sock.next_mid
        sock.next_mid = (mid + 1) & 0xFFFF
        self._token += 1
        token = struct.pack(">Q", self._token)
        message.mtype = Type.CON
        message.mid = mid
        message.token = token
        datagram = message.encode()
        loop = asyncio.get_running_loop()
        timeout = self.ack_timeout * random.uniform(1.0, 1.5)
        future = loop.create_future()
        self.pending[token] = _Pending(future, datagram, sock, mid, loop.time() + timeout, timeout)
        sock.by_mid[mid] = token
        sock.transport.sendto(datagram)
        self.stats.sent += 1
        return future

    def received(self, sock: _Socket, data: bytes) -> None:
        if len(data) < 4:
            return
        mtype = (data[0] >> 4) & 0x03
        mid = (data[2] << 8) | data[3]
        if mtype == _ACK and data[1] == 0:  # empty ACK: a separate response follows
            token = sock.by_mid.get(mid)
            pending = self.pending.get(token) if token is not None else None
            if pending is not None and not pending.separate:
                pending.separate = True
                pending.deadline = asyncio.get_running_loop().time() + 60
                self.stats.separate_responses += 1
            return
        tkl = data[0] & 0x0F
        token = data[4 : 4 + tkl]
        if mtype == _CON:  # a separate response: acknowledge it
            sock.transport.sendto(bytes([0x60, 0, data[2], data[3]]))
        pending = self.pending.pop(token, None)
        if pending is None:
            self.stats.stray_answers += 1
            return
        pending.socket.by_mid.pop(pending.mid, None)
        try:
            answer = aiocoap.Message.decode(data)
        except Exception as exc:  # noqa: BLE001 - a broken answer fails this request only
            pending.future.set_exception(exc)
            return
        if not pending.future.done():
            pending.future.set_result(answer)

    async def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(0.05)
            now = loop.time()
            expired = [(t, p) for t, p in self.pending.items() if p.deadline <= now]
            for token, pending in expired:
                if pending.separate or pending.attempts >= self.max_retransmit:
                    del self.pending[token]
                    pending.socket.by_mid.pop(pending.mid, None)
                    self.stats.timeouts += 1
                    if not pending.future.done():
                        pending.future.set_exception(ExchangeTimeout("no answer"))
                    continue
                pending.attempts += 1
                pending.timeout *= 2
                pending.deadline = now + pending.timeout
                pending.socket.transport.sendto(pending.datagram)
                self.stats.retransmissions += 1


# --- the generator ---------------------------------------------------------------------------


class JoinFailed(Exception):
    pass


@dataclass
class JoinResult:
    count: int
    ok: int
    failed: int
    seconds: float
    durations: list[float]
    errors: dict[str, int]


@dataclass
class RxRecord:
    """Per-sequence-number outcome of an /rx run (indexes are sequence numbers)."""

    sent_at: list[float] = field(default_factory=list)  # wall clock of the first transmission
    rtt: list[float] = field(default_factory=list)  # CoAP round trip (0 when unanswered)
    outcome: list[int] = field(default_factory=list)  # inner response code, TIMEOUT, or PENDING
    started: float = 0.0
    stopped: float = 0.0  # when the last request was sent


class LoadGenerator:
    def __init__(self, pool: UdpPool, devices: Sequence[VirtualDevice], firmware: str = "1.0.0") -> None:
        self.pool = pool
        self.devices = devices
        self.firmware = firmware
        self.record = RxRecord()
        self._inflight = 0
        self._drained = asyncio.Event()
        self._closed_loop_until = 0.0
        self._plain = False

    # -- JOIN (RFC 8613 B.2, device side) --------------------------------------------------
    async def join(self, device: VirtualDevice) -> None:
        enrollment = device.enrollment
        payload = cbor2.dumps({1: self.firmware, 2: enrollment.hw_type, 3: 1})
        r1 = os.urandom(R1_LENGTH)
        c1 = device.new_context(r1)
        request = aiocoap.Message(code=Code.POST, uri_path=["join"], payload=payload, content_format=CBOR)
        outer, request_id = c1.protect(request, kid_context=wrap_kid_context(r1))
        response = await self.pool.request(outer)
        if response.opt.oscore is None:
            raise JoinFailed(f"step 1: {response.code}")
        _, _, unprotected, _ = oscore.CanUnprotect._uncompress(response.opt.oscore, response.payload)
        r2 = unwrap_kid_context(unprotected.get(oscore.COSE_KID_CONTEXT, b""))
        if r2 is None:
            raise JoinFailed("step 1: no R2")
        c2 = device.new_context(r2 + r1, check_kid_context=False)
        inner, _ = c2.unprotect(response, request_id)
        if inner.code != Code.UNAUTHORIZED:
            raise JoinFailed(f"step 1: inner {inner.code}")
        r3 = os.urandom(R3_LENGTH)
        c3 = device.new_context(r2 + r3)
        request = aiocoap.Message(code=Code.POST, uri_path=["join"], payload=payload, content_format=CBOR)
        outer, request_id = c3.protect(request, kid_context=wrap_kid_context(r2 + r3))
        response = await self.pool.request(outer)
        if response.opt.oscore is None:
            raise JoinFailed(f"step 3: {response.code}")
        inner, _ = c3.unprotect(response, request_id)
        if inner.code != Code.CHANGED:
            raise JoinFailed(f"step 3: inner {inner.code}")
        device.context = c3

    async def join_all(self, concurrency: int = 100, devices: Sequence[VirtualDevice] | None = None) -> JoinResult:
        """JOIN every device with at most `concurrency` JOINs in flight."""
        todo = list(devices if devices is not None else self.devices)
        durations: list[float] = []
        errors: dict[str, int] = {}
        iterator = iter(todo)

        async def worker() -> None:
            for device in iterator:
                began = time.perf_counter()
                try:
                    await self.join(device)
                except (JoinFailed, ExchangeTimeout, oscore.ProtectionInvalid) as exc:
                    key = f"{type(exc).__name__}: {exc}"[:80]
                    errors[key] = errors.get(key, 0) + 1
                    continue
                durations.append(time.perf_counter() - began)

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(max(1, min(concurrency, len(todo))))))
        seconds = time.perf_counter() - began
        return JoinResult(len(todo), len(durations), len(todo) - len(durations), seconds, durations, errors)

    # -- /rx load ---------------------------------------------------------------------------
    def send_rx(self, seq: int) -> None:
        device = self.devices[seq % len(self.devices)]
        message = aiocoap.Message(
            code=Code.POST, uri_path=("rx",), payload=device.payload(seq), content_format=CBOR
        )
        if self._plain:
            outer, request_id = message, None
        else:
            outer, request_id = device.context.protect(message, kid_context=False)
        record = self.record
        record.sent_at.append(time.time())
        record.rtt.append(0.0)
        record.outcome.append(PENDING)
        self._inflight += 1
        future = self.pool.request(outer)
        future.add_done_callback(lambda f: self._rx_done(f, seq, device, request_id))

    def _rx_done(self, future: asyncio.Future[aiocoap.Message], seq: int, device, request_id) -> None:
        record = self.record
        record.rtt[seq] = time.time() - record.sent_at[seq]
        exc = future.exception()
        if exc is not None:
            record.outcome[seq] = TIMEOUT
        else:
            answer = future.result()
            code = answer.code
            if not self._plain and answer.opt.oscore is not None:
                try:
                    inner, _ = device.context.unprotect(answer, request_id)
                    code = inner.code
                except oscore.ProtectionInvalid:
                    code = Code.BAD_GATEWAY
            record.outcome[seq] = int(code)
        self._inflight -= 1
        if self._closed_loop_until and time.monotonic() < self._closed_loop_until:
            self.send_rx(len(record.sent_at))
        elif self._inflight == 0:
            self._drained.set()

    async def run_rate(self, rate: float, duration: float, *, plain: bool = False) -> RxRecord:
        """Open loop: send /rx at `rate` per second for `duration` seconds, round robin over devices."""
        self._plain = plain
        loop = asyncio.get_running_loop()
        self.record.started = time.time()
        start = loop.time()
        sent = 0
        total = int(rate * duration)
        while sent < total:
            due = min(total, int((loop.time() - start) * rate) + 1)
            while sent < due:
                self.send_rx(sent)
                sent += 1
            await asyncio.sleep(0.002)
        self.record.stopped = time.time()
        return self.record

    async def run_closed(self, inflight: int, duration: float, *, plain: bool = False) -> RxRecord:
        """Closed loop: keep `inflight` requests outstanding for `duration` seconds (saturation)."""
        self._plain = plain
        self.record.started = time.time()
        self._closed_loop_until = time.monotonic() + duration
        for _ in range(inflight):
            self.send_rx(len(self.record.sent_at))
        await asyncio.sleep(duration)
        self._closed_loop_until = 0.0
        self.record.stopped = time.time()
        return self.record

    async def drain(self, within: float) -> None:
        """Wait (at most `within` s) for every request to be answered or given up."""
        if self._inflight == 0:
            return
        self._drained.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._drained.wait(), within)


def percentile(values: Sequence[float], fraction: float) -> float | None:
    """Nearest-rank percentile of `values` (None when empty)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, math.ceil(fraction * len(ordered)) - 1))
    return ordered[rank]
