"""The device side of PROTOCOL.md: CoAP CON over UDP and the B.2 JOIN, for the simulator and tests.

Every exchange uses a fresh UDP socket (a new source port), as NB-IoT devices
do after NAT rebinding, so the driver's indifference to addresses is exercised
all the time. Retransmission follows RFC 7252 §4.2 with a configurable ACK
timeout so tests can run fast.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
from dataclasses import dataclass
from typing import Any

import aiocoap
import cbor2
from aiocoap import oscore
from aiocoap.numbers.codes import Code
from aiocoap.numbers.types import Type

from .join_tokens import R1_LENGTH, R3_LENGTH
from .oscore_context import DRIVER_SENDER_ID, PairwiseContext, unwrap_kid_context, wrap_kid_context

CBOR = 60


class ExchangeTimeout(Exception):
    """No answer after all retransmissions."""


class JoinRefused(Exception):
    def __init__(self, step: int, code: Code, payload: bytes) -> None:
        super().__init__(f"JOIN step {step} refused: {code} {payload.decode(errors='replace')}")
        self.code = code
        self.payload = payload


class _Receiver(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.queue.put_nowait(data)


@dataclass
class CoapTiming:
    ack_timeout: float = 2.0
    ack_random_factor: float = 1.5
    max_retransmit: int = 4


async def exchange(
    host: str, port: int, request: aiocoap.Message, timing: CoapTiming | None = None
) -> aiocoap.Message:
    """Send `request` as CON from a new source port; return the response (piggybacked or separate)."""
    timing = timing or CoapTiming()
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    transport, receiver = await loop.create_datagram_endpoint(
        _Receiver, remote_addr=(host, port), family=family
    )
    try:
        request.mtype = Type.CON
        request.mid = random.randrange(0x10000)
        request.token = os.urandom(4)
        datagram = request.encode()
        timeout = timing.ack_timeout * random.uniform(1.0, timing.ack_random_factor)
        for attempt in range(timing.max_retransmit + 1):
            transport.sendto(datagram)
            deadline = loop.time() + timeout
            while (remaining := deadline - loop.time()) > 0:
                try:
                    data = await asyncio.wait_for(receiver.queue.get(), remaining)
                except TimeoutError:
                    break
                try:
                    answer = aiocoap.Message.decode(data)
                except aiocoap.error.UnparsableMessage:
                    continue
                if answer.mtype == Type.ACK and answer.mid == request.mid:
                    if answer.code != Code.EMPTY:
                        return answer
                    deadline = loop.time() + 60  # separate response follows
                elif answer.token == request.token and answer.mtype in (Type.CON, Type.NON):
                    if answer.mtype == Type.CON:
                        ack = aiocoap.Message(mtype=Type.ACK, mid=answer.mid, code=Code.EMPTY)
                        transport.sendto(ack.encode())
                    return answer
            timeout *= 2
            del attempt
        raise ExchangeTimeout(f"no answer from {host}:{port} after {timing.max_retransmit} retransmissions")
    finally:
        transport.close()


@dataclass
class Answer:
    """A device's view of a driver answer."""

    code: Code
    protected: bool
    body: dict[Any, Any]
    payload: bytes


class DeviceSession:
    """One device: its pre-shared keys and, after JOIN, its current OSCORE context."""

    def __init__(
        self,
        kid: bytes,
        master_secret: bytes,
        master_salt: bytes,
        host: str,
        port: int,
        timing: CoapTiming | None = None,
        kid_context_style: str = "absent",  # after JOIN: absent | raw | wrapped
    ) -> None:
        self.kid = kid
        self.master_secret = master_secret
        self.master_salt = master_salt
        self.host = host
        self.port = port
        self.timing = timing
        self.kid_context_style = kid_context_style
        self.context: PairwiseContext | None = None

    def _context(self, id_context: bytes, check_kid_context: bool = True) -> PairwiseContext:
        context = PairwiseContext(
            sender_id=self.kid,
            recipient_id=DRIVER_SENDER_ID,
            id_context=id_context,
            master_secret=self.master_secret,
            master_salt=self.master_salt,
        )
        context.check_kid_context = check_kid_context
        return context

    async def join(self, firmware: str, hw_type: int, reset_cause: int | None = None) -> Answer:
        """RFC 8613 B.2 from the device side; on success the new context is current."""
        body = {1: firmware, 2: hw_type}
        if reset_cause is not None:
            body[3] = reset_cause
        payload = cbor2.dumps(body)
        r1 = os.urandom(R1_LENGTH)
        c1 = self._context(r1)
        request = aiocoap.Message(code=Code.POST, uri_path=["join"], payload=payload, content_format=CBOR)
        outer, request_id = c1.protect(request, kid_context=wrap_kid_context(r1))
        response = await exchange(self.host, self.port, outer, self.timing)
        if response.opt.oscore is None:
            raise JoinRefused(1, response.code, response.payload)
        _, _, unprotected, _ = oscore.CanUnprotect._uncompress(response.opt.oscore, response.payload)
        r2 = unwrap_kid_context(unprotected.get(oscore.COSE_KID_CONTEXT, b""))
        if r2 is None:
            raise JoinRefused(1, response.code, b"answer #1 without kid context R2")
        c2 = self._context(r2 + r1, check_kid_context=False)
        inner, _ = c2.unprotect(response, request_id)
        if inner.code != Code.UNAUTHORIZED:
            raise JoinRefused(1, inner.code, inner.payload)
        r3 = os.urandom(R3_LENGTH)
        c3 = self._context(r2 + r3)
        request = aiocoap.Message(code=Code.POST, uri_path=["join"], payload=payload, content_format=CBOR)
        outer, request_id = c3.protect(request, kid_context=wrap_kid_context(r2 + r3))
        response = await exchange(self.host, self.port, outer, self.timing)
        answer = self._open(response, request_id, c3)
        if answer.code != Code.CHANGED:
            raise JoinRefused(3, answer.code, answer.payload)
        self.context = c3
        return answer

    def protect(self, path: str, payload: bytes, code: Code = Code.POST) -> tuple[aiocoap.Message, Any]:
        """A protected request under the current context (public so tests can replay it)."""
        assert self.context is not None, "join first"
        request = aiocoap.Message(code=code, uri_path=path.split("/"), payload=payload)
        if payload:
            request.opt.content_format = CBOR
        style = self.kid_context_style
        kid_context: bytes | bool = False
        if style == "raw":
            kid_context = self.context.id_context
        elif style == "wrapped":
            kid_context = wrap_kid_context(self.context.id_context)
        return self.context.protect(request, kid_context=kid_context)

    async def post(self, path: str, payload: bytes) -> Answer:
        outer, request_id = self.protect(path, payload)
        response = await exchange(self.host, self.port, outer, self.timing)
        return self._open(response, request_id, self.context)

    async def send_raw(self, outer: aiocoap.Message, request_id: Any) -> Answer:
        response = await exchange(self.host, self.port, outer, self.timing)
        return self._open(response, request_id, self.context)

    @staticmethod
    def _open(response: aiocoap.Message, request_id: Any, context: PairwiseContext | None) -> Answer:
        if response.opt.oscore is None or context is None:
            return Answer(response.code, False, {}, response.payload)
        inner, _ = context.unprotect(response, request_id)
        body: dict[Any, Any] = {}
        if inner.payload and inner.opt.content_format == CBOR:
            decoded = cbor2.loads(inner.payload)
            if isinstance(decoded, dict):
                body = decoded
        return Answer(inner.code, True, body, inner.payload)
