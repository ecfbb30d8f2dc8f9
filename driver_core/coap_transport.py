"""The devices' UDP listener: CoAP messages in, piggybacked answers out.

aiocoap's server stack (message manager, token manager, pipes, a task per
layer) costs more CPU per request than OSCORE and the whole driver logic
together, and it answers a slow handler with an empty ACK plus a separate
response, which a sleeping NB-IoT device misses. Devices send one CON request
at a time and expect the answer in the ACK, so this listener does just that:

* decode with aiocoap's codec (`Message.decode`), once, also for the rate
  limiter's verdict;
* deduplicate CON requests with the bounded `ResponseCache`: an exact
  retransmission (same address, port, message id, token and OSCORE option)
  gets the very datagram sent before, or nothing while the first transmission
  is still being handled; anything else is a new request;
* render through the site (`DeviceSite`: OSCORE and the resources) and send
  the answer piggybacked in the ACK however long it took; a NON request gets
  a NON answer; a CON ping gets a RST; responses and stray ACKs are ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import random
import socket
from typing import TYPE_CHECKING, Any

import aiocoap
from aiocoap import error
from aiocoap.numbers.codes import Code
from aiocoap.numbers.types import Type

from . import refusals as why
from .response_cache import Key, ResponseCache

if TYPE_CHECKING:
    from .rate_limit import CoapGate
    from .refusals import Refusals

_LOGGER = logging.getLogger(__name__)
# The kernel receive queue: the default (about 200 KiB, some 250 small datagrams)
# overflows during a 50 ms pause of the event loop under a flood, dropping device
# datagrams with the flood's. Linux caps the value at net.core.rmem_max.
RECEIVE_BUFFER = 2 * 1024 * 1024
# RFC 7252 §3: token lengths 9-15 are reserved, a message format error (aiocoap decodes them).
MAX_TOKEN_LENGTH = 8


class UdpRemote:
    """A device's address as the site and the refusal log see it (IPv4-mapped shown as IPv4)."""

    __slots__ = ("sockaddr", "host", "port")

    def __init__(self, sockaddr: tuple[Any, ...]) -> None:
        self.sockaddr = sockaddr
        host = sockaddr[0]
        self.host = host[7:] if host.startswith("::ffff:") and "." in host else host
        self.port = sockaddr[1]

    def __str__(self) -> str:
        return f"{self.host}:{self.port}" if ":" not in self.host else f"[{self.host}]:{self.port}"

    __repr__ = __str__


class OneShotPipe:
    """What a site's `render_to_pipe` needs: the request, and a place for its one answer."""

    __slots__ = ("request", "response")

    def __init__(self, request: aiocoap.Message) -> None:
        self.request = request
        self.response: aiocoap.Message | None = None

    def add_response(self, response: aiocoap.Message, is_last: bool = True) -> None:
        self.response = response


class CoapListener(asyncio.DatagramProtocol):
    """Serves `site.render_to_pipe` on one UDP socket (see the module docstring)."""

    def __init__(
        self, site: Any, refusals: Refusals, cache: ResponseCache | None = None
    ) -> None:
        self._site = site
        self._refusals = refusals
        self.cache = cache or ResponseCache()
        self.gate: CoapGate | None = None  # set by the driver once the limiter exists
        self.transport: asyncio.DatagramTransport | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._next_mid = random.randrange(0x10000)

    @property
    def port(self) -> int:
        assert self.transport is not None
        return self.transport.get_extra_info("socket").getsockname()[1]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def error_received(self, exc: Exception) -> None:  # ICMP unreachable after an answer: nothing to do
        _LOGGER.debug("UDP error: %s", exc)

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        remote = UdpRemote(addr)
        message = _decode(data, remote)
        if self.gate is not None and not self.gate.admit(message, remote.host):
            return
        if message is None:
            self._refusals.record(why.MALFORMED_DATAGRAM, remote=remote)
            if _is_con_with_reserved_token_length(data):  # RFC 7252 §4.2: reject a CON with a RST
                self._reset(int.from_bytes(data[2:4], "big"), addr)
            return
        if not message.code.is_request():
            if message.mtype is Type.CON:  # a ping, or a response we never asked for
                self._reset(message.mid, addr)
            return
        key: Key | None = None
        if message.mtype is Type.CON:
            key = self.cache.key(remote.host, remote.port, message.mid, message.token, message.opt.oscore)
            duplicate, answer = self.cache.lookup(key)
            if duplicate:
                if answer is not None:
                    self.transport.sendto(answer, addr)  # type: ignore[union-attr]
                return
        elif message.mtype is not Type.NON:
            return  # an ACK or RST cannot carry a request
        task = asyncio.get_running_loop().create_task(self._serve(message, remote, key))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, request: aiocoap.Message, remote: UdpRemote, key: Key | None) -> None:
        """Render `request` and send its answer; a CON's (`key`: its cache key) is kept for retransmissions."""
        pipe = OneShotPipe(request)
        try:
            await self._site.render_to_pipe(pipe)
            response = pipe.response
        except error.RenderableError as exc:
            response = exc.to_message()
        except Exception:
            _LOGGER.exception("Handling a request from %s failed", remote)
            response = aiocoap.Message(code=Code.INTERNAL_SERVER_ERROR)
        if response is None:
            return
        response.token = request.token
        if request.mtype is Type.CON:
            response.mtype, response.mid = Type.ACK, request.mid
        else:
            response.mtype, response.mid = Type.NON, self._mid()
        datagram = self._send(response, remote.sockaddr)
        if datagram is not None and key is not None:
            self.cache.remember(key, datagram)

    def _reset(self, mid: int, addr: tuple[Any, ...]) -> None:
        reset = aiocoap.Message(code=Code.EMPTY)
        reset.mtype, reset.mid = Type.RST, mid
        self._send(reset, addr)

    def _mid(self) -> int:
        self._next_mid = (self._next_mid + 1) & 0xFFFF
        return self._next_mid

    def _send(self, message: aiocoap.Message, addr: tuple[Any, ...]) -> bytes | None:
        try:
            datagram = message.encode()
        except Exception:
            _LOGGER.exception("An answer could not be encoded: %r", message)
            return None
        if self.transport is not None:
            self.transport.sendto(datagram, addr)
        return datagram

    async def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def drain(self, within: float) -> int:
        """The clean stop: take no more datagrams, let the requests being handled commit and
        send their answers (up to `within` s), then close. Returns how many were cut short.

        The socket stays open for the answers; a protocol that ignores datagrams takes this
        listener's place (uvloop's UDP transport has no pause_reading).
        """
        if self.transport is not None:
            self.transport.set_protocol(asyncio.DatagramProtocol())
        pending: set[asyncio.Task[None]] = set()
        try:
            if self._tasks:
                _, pending = await asyncio.wait(list(self._tasks), timeout=within)
        finally:  # also when a second signal cancels the wait
            await self.close()
        return len(pending)


def _decode(data: bytes, remote: UdpRemote) -> aiocoap.Message | None:
    """The message in `data`, or None for a format error (also a reserved token length)."""
    if data and data[0] & 0x0F > MAX_TOKEN_LENGTH:
        return None
    try:
        return aiocoap.Message.decode(data, remote)
    except Exception:  # the codec raises more than one type on hostile input
        return None


def _is_con_with_reserved_token_length(data: bytes) -> bool:
    """A CoAP version 1 CON header (4 bytes) whose token length is reserved."""
    return len(data) >= 4 and data[0] & 0xF0 == 0x40 and data[0] & 0x0F > MAX_TOKEN_LENGTH


async def start_listener(site: Any, refusals: Refusals, host: str, port: int) -> CoapListener:
    """Bind UDP `host`:`port`; '::' serves IPv6 and IPv4 (as IPv4-mapped addresses)."""
    family = socket.AF_INET if ipaddress.ip_address(host).version == 4 else socket.AF_INET6
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    listener = CoapListener(site, refusals)
    await asyncio.get_running_loop().create_datagram_endpoint(lambda: listener, sock=sock)
    return listener
