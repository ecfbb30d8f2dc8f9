"""The device side of PROTOCOL.md: CoAP CON over UDP and the B.2 JOIN, for the simulator and tests.

Every exchange uses a fresh UDP socket (a new source port), as NB-IoT devices
do after NAT rebinding, so the driver's indifference to addresses is exercised
all the time. Retransmission follows RFC 7252 §4.2 with a configurable ACK
timeout so tests can run fast; `loss` drops datagrams (both directions) to
simulate a poor radio link. `download()` fetches a firmware image block by
block (GET /fota/<version>, inner Block2) and verifies Size2, ETag and SHA-256.
"""

from __future__ import annotations

import asyncio
import hashlib
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
    host: str,
    port: int,
    request: aiocoap.Message,
    timing: CoapTiming | None = None,
    loss: float = 0.0,
) -> aiocoap.Message:
    """Send `request` as CON from a new source port; return the response (piggybacked or separate).

    `loss` is the probability that any one datagram, sent or received, is lost.
    """
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
            if not (loss and random.random() < loss):
                transport.sendto(datagram)
            deadline = loop.time() + timeout
            while (remaining := deadline - loop.time()) > 0:
                try:
                    data = await asyncio.wait_for(receiver.queue.get(), remaining)
                except TimeoutError:
                    break
                if loss and random.random() < loss:
                    continue
                try:
                    answer = aiocoap.Message.decode(data)
                except aiocoap.error.UnparsableMessage:
                    continue
                # RFC 7252 §5.3.2: the ACK matches by message id, the response by token. A
                # port reused from another exchange can bring that exchange's late answer.
                if answer.mtype == Type.ACK and answer.mid == request.mid:
                    if answer.code == Code.EMPTY:
                        deadline = loop.time() + 60  # separate response follows
                    elif answer.token == request.token:
                        return answer
                elif answer.token == request.token and answer.mtype in (Type.CON, Type.NON):
                    if answer.mtype == Type.CON:
                        ack = aiocoap.Message(code=Code.EMPTY)
                        ack.mtype, ack.mid = Type.ACK, answer.mid  # raw codec use: set, not passed
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
        loss: float = 0.0,  # probability that a datagram is lost (simulated radio link)
    ) -> None:
        self.kid = kid
        self.master_secret = master_secret
        self.master_salt = master_salt
        self.host = host
        self.port = port
        self.timing = timing
        self.kid_context_style = kid_context_style
        self.loss = loss
        self.context: PairwiseContext | None = None

    async def _exchange(self, outer: aiocoap.Message) -> aiocoap.Message:
        if self.loss:
            return await exchange(self.host, self.port, outer, self.timing, loss=self.loss)
        return await exchange(self.host, self.port, outer, self.timing)

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
        response = await self._exchange(outer)
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
        response = await self._exchange(outer)
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
        return self.protect_message(request)

    def protect_message(self, request: aiocoap.Message) -> tuple[aiocoap.Message, Any]:
        """Protect a prepared inner request (any code and options) under the current context."""
        assert self.context is not None, "join first"
        style = self.kid_context_style
        kid_context: bytes | bool = False
        if style == "raw":
            kid_context = self.context.id_context
        elif style == "wrapped":
            kid_context = wrap_kid_context(self.context.id_context)
        return self.context.protect(request, kid_context=kid_context)

    async def post(self, path: str, payload: bytes) -> Answer:
        outer, request_id = self.protect(path, payload)
        response = await self._exchange(outer)
        return self._open(response, request_id, self.context)

    async def send_raw(self, outer: aiocoap.Message, request_id: Any) -> Answer:
        response = await self._exchange(outer)
        return self._open(response, request_id, self.context)

    async def request_inner(self, request: aiocoap.Message) -> tuple[aiocoap.Message, bool]:
        """One protected exchange; the inner response with its options (False: unprotected)."""
        outer, request_id = self.protect_message(request)
        response = await self._exchange(outer)
        if response.opt.oscore is None or self.context is None:
            return response, False
        inner, _ = self.context.unprotect(response, request_id)
        return inner, True

    async def download(
        self,
        version: str,
        szx: int = 6,
        *,
        sha256: bytes | None = None,
        size: int | None = None,
        keep: bool = True,
        retries: int = 8,
    ) -> DownloadResult:
        """GET /fota/<version> block by block; raises DownloadError (ImageMismatch if it does not verify)."""
        download = FirmwareDownload(self, version, szx, sha256=sha256, size=size, keep=keep)
        return await download.run(retries=retries)

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


class DownloadError(Exception):
    """The driver refused a block (`code`), or the image changed during the download."""

    def __init__(self, message: str, code: Code | None = None, protected: bool = True) -> None:
        super().__init__(message)
        self.code = code
        self.protected = protected  # False: the driver did not know the context (join again)


class ImageMismatch(DownloadError):
    """The image is complete but its size or SHA-256 is not what was offered."""

    def __init__(self, message: str, sha256: str) -> None:
        super().__init__(message)
        self.sha256 = sha256


@dataclass
class DownloadResult:
    version: str
    size: int
    sha256: str  # hex, of the bytes received
    etag: bytes
    block_size: int
    requests: int  # blocks fetched (exchanges that got a block)
    data: bytes | None  # None unless kept


class FirmwareDownload:
    """A firmware download that can stop after any block and resume later.

    Blocks are fetched in order, so the SHA-256 is computed on the fly and the
    image need not be kept (`keep=False`: constant memory, like a device writing
    to flash). The first answer fixes the block size (the driver may answer
    smaller than asked), the ETag and the size; every later block must repeat
    them, and the device sends the ETag along so a replaced image is refused.
    """

    def __init__(
        self,
        session: DeviceSession,
        version: str,
        szx: int = 6,
        *,
        sha256: bytes | None = None,
        size: int | None = None,
        keep: bool = True,
    ) -> None:
        self.session = session
        self.version = version
        self.szx = szx
        self.expected_sha256 = sha256
        self.expected_size = size
        self.size: int | None = None
        self.etag: bytes | None = None
        self.received = 0
        self.requests = 0
        self.done = False
        self._hash = hashlib.sha256()
        self._data: bytearray | None = bytearray() if keep else None

    @property
    def block_size(self) -> int:
        return 1 << (self.szx + 4)

    def _request(self) -> aiocoap.Message:
        number = self.received // self.block_size
        request = aiocoap.Message(
            code=Code.GET, uri_path=["fota", self.version], block2=(number, False, self.szx)
        )
        if self.etag is not None:
            request.opt.etags = (self.etag,)
        return request

    async def fetch_next(self) -> bool:
        """Fetch the next block; True once the last one is in. ExchangeTimeout passes through."""
        if self.done:
            return True
        inner, protected = await self.session.request_inner(self._request())
        where = f"GET /fota/{self.version} at byte {self.received}"
        if not protected or inner.code != Code.CONTENT:
            text = inner.payload.decode(errors="replace")
            raise DownloadError(f"{where}: {inner.code} {text}".rstrip(), inner.code, protected)
        block2, size2, etag = inner.opt.block2, inner.opt.size2, inner.opt.etag
        if block2 is None or size2 is None or etag is None:
            raise DownloadError(f"{where}: answer without Block2, Size2 or ETag")
        if block2.size_exponent > self.szx:
            raise DownloadError(f"{where}: the driver answered bigger blocks than asked")
        if self.etag is None:
            self.etag, self.size = etag, size2
            if self.expected_size is not None and size2 != self.expected_size:
                raise ImageMismatch(f"Size2 {size2} differs from the offered {self.expected_size}", "")
        elif etag != self.etag or size2 != self.size:
            raise DownloadError(f"{where}: the image changed (ETag {etag.hex()}, Size2 {size2})")
        self.szx = block2.size_exponent
        if block2.start != self.received:
            raise DownloadError(f"{where}: got the block starting at {block2.start}")
        payload = inner.payload
        expected = min(self.block_size, self.size - self.received)
        if len(payload) != expected or block2.more != (self.received + expected < self.size):
            raise DownloadError(f"{where}: a block of {len(payload)} bytes (expected {expected})")
        self._hash.update(payload)
        if self._data is not None:
            self._data.extend(payload)
        self.received += len(payload)
        self.requests += 1
        self.done = not block2.more
        return self.done

    async def run(self, max_blocks: int | None = None, retries: int = 8) -> DownloadResult:
        """Fetch until complete (or `max_blocks` more); a block whose exchange times out is
        asked again, up to `retries` times in a row."""
        fetched = 0
        failures = 0
        while not self.done and (max_blocks is None or fetched < max_blocks):
            try:
                await self.fetch_next()
            except ExchangeTimeout:
                failures += 1
                if failures > retries:
                    raise
                continue
            failures = 0
            fetched += 1
        return self.result() if self.done else self.partial()

    def partial(self) -> DownloadResult:
        return DownloadResult(
            self.version, self.size or 0, "", self.etag or b"", self.block_size, self.requests, None
        )

    def result(self) -> DownloadResult:
        """The verified image: size = Size2, SHA-256 starts with the ETag and equals the offer."""
        assert self.done and self.size is not None and self.etag is not None
        digest = self._hash.digest()
        if self.received != self.size:
            raise ImageMismatch(f"received {self.received} bytes, Size2 says {self.size}", digest.hex())
        if self.expected_sha256 is not None and digest != self.expected_sha256:
            raise ImageMismatch(
                f"SHA-256 {digest.hex()} differs from the offered {self.expected_sha256.hex()}",
                digest.hex(),
            )
        if digest[: len(self.etag)] != self.etag:
            raise ImageMismatch(f"SHA-256 {digest.hex()} does not match the ETag", digest.hex())
        data = bytes(self._data) if self._data is not None else None
        return DownloadResult(
            self.version, self.size, digest.hex(), self.etag, self.block_size, self.requests, data
        )
