"""One callback request: the documented JSON body, the optional signature, one POST.

Kept free of retry logic so it can be reasoned about (and tested) alone: it
turns every way a request can end into an `Outcome` with a one-line reason.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import ipaddress
import json
import socket
import time
from collections.abc import Callable
from datetime import datetime
from typing import NamedTuple

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from driver_core.api.throttle import CALLBACK_AGENT
from driver_core.callback_policy import CallbackPolicy

SIGNATURE_HEADER = "X-Coap-Driver-Signature"
TIMESTAMP_HEADER = "X-Coap-Driver-Timestamp"
USER_AGENT = f"{CALLBACK_AGENT}0.1"  # the driver answers 403 to it, see throttle.py


class Outcome(NamedTuple):
    delivered: bool
    error: str | None = None
    permanent: bool = False  # retrying cannot help (e.g. the URL itself is unusable)


DELIVERED = Outcome(True)


def callback_body(command_id: str, state: int, at: datetime) -> bytes:
    """The documented body; its bytes are fixed once so every retry carries the same signature."""
    document = {"command_id": command_id, "status": state, "timestamp": int(at.timestamp())}
    return json.dumps(document, separators=(",", ":")).encode()


def signature(secret: str, body: bytes) -> str:
    """``sha256=<hex>``: HMAC-SHA256 of the raw body with the configured secret."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def url_problem(url: str) -> str | None:
    """Why `url` can never be called (None when it looks usable)."""
    try:
        parsed = URL(url)
    except (ValueError, TypeError):
        return f"invalid callback URL {url!r}"
    if parsed.scheme not in ("http", "https"):
        return f"invalid callback URL {url!r}: only http:// and https:// are supported"
    if not parsed.host:
        return f"invalid callback URL {url!r}: no host name"
    return None


class CallbackRefused(OSError):
    """The callback's host resolves only to addresses the policy refuses (permanent)."""


class GuardedResolver(AbstractResolver):
    """The system resolver, with every address the callback policy refuses left out.

    aiohttp connects only to what the resolver returns, so a name pointing at
    loopback or at the metadata service is refused however it is spelled, and the
    check costs nothing per request beyond the (cached) lookup itself.
    """

    def __init__(
        self, policy: Callable[[], CallbackPolicy], inner: AbstractResolver | None = None
    ) -> None:
        self._policy = policy
        self._inner = inner or aiohttp.DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        policy = self._policy()
        allowed, refusals = [], []
        for result in results:
            address = ipaddress.ip_address(result["host"].split("%", 1)[0])
            refusal = policy.address_refusal(address, port, host)
            if refusal is None:
                allowed.append(result)
            else:
                refusals.append(refusal)
        if not allowed and refusals:
            raise CallbackRefused(refusals[0])
        return allowed

    async def close(self) -> None:
        await self._inner.close()


def shown_url(url: str) -> str:
    """`url` for logs: without credentials, query or fragment (they may hold tokens)."""
    try:
        return str(URL(url).with_user(None).with_query(None).with_fragment(None))
    except (ValueError, TypeError):
        return "<invalid URL>"


def headers_for(body: bytes, hmac_secret: str) -> dict[str, str]:
    headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT}
    if hmac_secret:
        headers[SIGNATURE_HEADER] = signature(hmac_secret, body)
        headers[TIMESTAMP_HEADER] = str(int(time.time()))
    return headers


async def post_callback(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    *,
    timeout_s: float,
    hmac_secret: str = "",
    verify_tls: bool = True,
    policy: CallbackPolicy | None = None,
) -> Outcome:
    """POST `body` to `url` once; 2xx is delivered, anything else a reason to retry.

    `policy` refuses a literal address here (aiohttp resolves names only); names are
    checked by the session's GuardedResolver. Redirects are never followed.
    """
    problem = url_problem(url) or (policy.url_refusal(url) if policy is not None else None)
    if problem:
        return Outcome(False, problem, permanent=True)
    try:
        async with session.post(
            url,
            data=body,
            headers=headers_for(body, hmac_secret),
            timeout=aiohttp.ClientTimeout(total=timeout_s),
            allow_redirects=False,  # a redirected POST may turn into a GET: report it instead
            ssl=None if verify_tls else False,
        ) as response:
            if 200 <= response.status < 300:
                return DELIVERED
            return Outcome(False, f"HTTP {response.status}")
    except TimeoutError:
        return Outcome(False, f"timeout after {timeout_s:g} s")
    except aiohttp.ClientConnectorDNSError as exc:
        if isinstance(exc.os_error, CallbackRefused):
            return Outcome(False, str(exc.os_error), permanent=True)
        return Outcome(False, describe_error(exc))
    except aiohttp.ClientError as exc:
        return Outcome(False, describe_error(exc))


def describe_error(exc: aiohttp.ClientError) -> str:
    """One line for the user, without aiohttp's internals."""
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return f"TLS certificate of {exc.host} not accepted: {exc.certificate_error}"
    if isinstance(exc, aiohttp.ClientConnectorSSLError):
        return f"TLS handshake with {exc.host} failed: {exc.os_error}"
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return f"cannot resolve host {exc.host}"
    if isinstance(exc, aiohttp.ClientConnectorError):
        if exc.os_error.errno == errno.ECONNREFUSED:
            return "connection refused"
        reason = exc.os_error.strerror or str(exc.os_error) or type(exc.os_error).__name__
        return f"cannot connect to {exc.host}:{exc.port}: {reason}"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the server closed the connection without answering"
    if isinstance(exc, aiohttp.InvalidURL):
        return f"invalid callback URL {str(exc.url)!r}"
    return str(exc) or type(exc).__name__
