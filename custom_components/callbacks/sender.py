"""One callback request: the documented JSON body, the optional signature, one POST.

Kept free of retry logic so it can be reasoned about (and tested) alone: it
turns every way a request can end into an `Outcome` with a one-line reason.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import json
import time
from datetime import datetime
from typing import NamedTuple

import aiohttp
from yarl import URL

SIGNATURE_HEADER = "X-Coap-Driver-Signature"
TIMESTAMP_HEADER = "X-Coap-Driver-Timestamp"
USER_AGENT = "coap-driver-callbacks/0.1"


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
) -> Outcome:
    """POST `body` to `url` once; 2xx is delivered, anything else a reason to retry."""
    problem = url_problem(url)
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
