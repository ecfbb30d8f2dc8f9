"""Deduplication and message matching over real UDP: what is a retransmission, and what is not.

Many devices behind one carrier-grade NAT share an address, and ports are reused: two
different requests can arrive from the same (address, port) with the same message id
within the response cache's lifetime. Only an exact retransmission (same token, same
OSCORE option: same kid and Partial IV) may get the cached answer.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiocoap
import cbor2
import pytest
from aiocoap.numbers.codes import Code
from aiocoap.numbers.types import Type

from driver_core.device_client import CoapTiming, DeviceSession, exchange
from driver_core.driver import Driver
from tests.conftest import make_device

RX = cbor2.dumps({1: 87})
MID = 0x5150


class _Inbox(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.queue.put_nowait(data)


async def _socket(driver: Driver) -> tuple[asyncio.DatagramTransport, _Inbox]:
    loop = asyncio.get_running_loop()
    return await loop.create_datagram_endpoint(_Inbox, remote_addr=("127.0.0.1", driver.coap_port))


def _con(session: DeviceSession, token: bytes) -> tuple[aiocoap.Message, Any]:
    """A protected /rx CON with the shared message id and the given token."""
    outer, request_id = session.protect("rx", RX)
    outer.mtype, outer.mid, outer.token = Type.CON, MID, token
    return outer, request_id


async def _ask(transport: asyncio.DatagramTransport, inbox: _Inbox, data: bytes) -> bytes:
    transport.sendto(data)
    return await asyncio.wait_for(inbox.queue.get(), 5)


async def test_same_port_and_message_id_with_another_token_or_oscore_is_a_new_request(
    running_driver: Driver, uplinks, enroll
):
    first = await enroll(make_device("D0000001", 17, 41))
    second = await enroll(make_device("D0000002", 17, 42))
    await first.join("1.0.0", 17)
    await second.join("1.0.0", 17)
    await uplinks.wait_for(2)
    cache = running_driver.coap_listener.cache
    transport, inbox = await _socket(running_driver)
    try:
        a1, a1_id = _con(first, b"t1")
        a1_data = a1.encode()
        a1_answer = await _ask(transport, inbox, a1_data)
        opened = DeviceSession._open(aiocoap.Message.decode(a1_answer), a1_id, first.context)
        assert opened.code == Code.CHANGED

        # The same device, the same token, a new Partial IV: a new request.
        a2, a2_id = _con(first, b"t1")
        answer = aiocoap.Message.decode(await _ask(transport, inbox, a2.encode()))
        assert (answer.mtype, answer.mid, answer.token) == (Type.ACK, MID, b"t1")
        assert DeviceSession._open(answer, a2_id, first.context).code == Code.CHANGED

        # Another device (another kid), another token: a new request.
        b1, b1_id = _con(second, b"t2")
        b1_data = b1.encode()
        b1_answer = await _ask(transport, inbox, b1_data)
        answer = aiocoap.Message.decode(b1_answer)
        assert (answer.mtype, answer.mid, answer.token) == (Type.ACK, MID, b"t2")
        assert DeviceSession._open(answer, b1_id, second.context).code == Code.CHANGED

        # The first request's OSCORE option under a new token: new, hence an OSCORE replay.
        replays = running_driver.refusals.counts["replay"]
        a1.token = b"t3"
        answer = aiocoap.Message.decode(await _ask(transport, inbox, a1.encode()))
        assert (answer.mtype, answer.mid, answer.token) == (Type.ACK, MID, b"t3")
        assert (answer.code, answer.payload) == (Code.UNAUTHORIZED, b"Replay detected")
        assert running_driver.refusals.counts["replay"] == replays + 1

        # An exact retransmission: the very datagram again, not handled a second time.
        duplicates = cache.duplicates
        assert await _ask(transport, inbox, b1_data) == b1_answer
        assert cache.duplicates == duplicates + 1
        assert running_driver.refusals.counts["replay"] == replays + 1
    finally:
        transport.close()
    assert [u.message_type for u in await uplinks.wait_for(5)] == ["join", "join", "rx", "rx", "rx"]
    assert len(uplinks.items) == 5


class _Impostor(asyncio.DatagramProtocol):
    """Answers each request first with an ACK of another exchange (`stray`), then with its own."""

    def __init__(self, stray: str) -> None:
        self.stray = stray
        self.requests: list[aiocoap.Message] = []
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        request = aiocoap.Message.decode(data)
        self.requests.append(request)
        if self.stray == "same-mid-other-token":
            self._ack(request.mid, b"\xee\xee\xee\xee", b"other", addr)
        else:
            self._ack((request.mid + 1) & 0xFFFF, request.token, b"other", addr)
        self._ack(request.mid, request.token, b"mine", addr)

    def _ack(self, mid: int, token: bytes, payload: bytes, addr: Any) -> None:
        answer = aiocoap.Message(code=Code.CONTENT, payload=payload)
        answer.mtype, answer.mid, answer.token = Type.ACK, mid, token
        self.transport.sendto(answer.encode(), addr)  # type: ignore[union-attr]


@pytest.mark.parametrize("stray", ["same-mid-other-token", "same-token-other-mid"])
async def test_the_device_client_waits_for_the_answer_matching_token_and_message_id(stray: str):
    loop = asyncio.get_running_loop()
    transport, server = await loop.create_datagram_endpoint(
        lambda: _Impostor(stray), local_addr=("127.0.0.1", 0)
    )
    port = transport.get_extra_info("sockname")[1]
    try:
        request = aiocoap.Message(code=Code.GET, uri_path=["x"])
        answer = await exchange("127.0.0.1", port, request, CoapTiming(ack_timeout=5.0))
    finally:
        transport.close()
    assert (answer.code, answer.payload) == (Code.CONTENT, b"mine")
    assert len(server.requests) == 1  # it kept waiting: no retransmission was needed


def _reserved(mtype: Type, tkl: int, mid: int) -> bytes:
    """A POST /rx whose header announces a reserved token length (RFC 7252 §3: 9-15)."""
    return bytes([0x40 | mtype << 4 | tkl, 0x02]) + mid.to_bytes(2, "big") + bytes(range(tkl)) + b"\xb2rx"


@pytest.mark.parametrize("tkl", [9, 15])
async def test_a_reserved_token_length_is_a_format_error(running_driver: Driver, tkl: int):
    """A CON gets a RST, a NON nothing; both are counted as malformed, nothing is refused as unprotected."""
    counts = running_driver.refusals.counts
    transport, inbox = await _socket(running_driver)
    try:
        reset = aiocoap.Message.decode(await _ask(transport, inbox, _reserved(Type.CON, tkl, 0x0A0B)))
        assert (reset.mtype, reset.mid, reset.code, reset.token) == (Type.RST, 0x0A0B, Code.EMPTY, b"")
        assert counts["malformed_datagram"] == 1

        transport.sendto(_reserved(Type.NON, tkl, 0x0C0D))
        request = aiocoap.Message(code=Code.POST, uri_path=["rx"], payload=b"\xa0")
        request.mtype, request.mid, request.token = Type.NON, 0x0E0F, b"ok"
        answer = aiocoap.Message.decode(await _ask(transport, inbox, request.encode()))
        assert (answer.token, answer.code) == (b"ok", Code.UNAUTHORIZED)  # the NON got no answer
        assert counts["malformed_datagram"] == 2
        assert counts["unprotected"] == 1  # the well-formed NON only
    finally:
        transport.close()
