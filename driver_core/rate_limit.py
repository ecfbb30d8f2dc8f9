"""Rate limits on refused traffic: a token bucket per source address, in bounded memory.

Every refusal costs its source one token; tokens come back at a fixed rate up to
a burst. A source with no token left is *over its budget*.

* CoAP (`CoapGate`): each datagram is classified as it arrives, before aiocoap
  decodes it for real, queues it, arms timers or asks the database (about 5 µs).
  A datagram that does not decode is refused right there (aiocoap never sees
  it). One that will be refused (undecodable, unprotected, a bad OSCORE option, a
  replayed sequence number) or that names a kid the driver has not cached pays
  its source's token right there, so a flood cannot slip in while earlier
  refusals are still being worked on; with no token left it is dropped without
  an answer and counted as ``rate_limited``. A kid that turns out enrolled gets
  its token back (`Refusals.cleared`). Refusals the gate cannot foresee (a
  forged request under a cached kid fails to decrypt) take their token when
  they happen (`Refusals.on_refusal`). A request under the current context of a
  cached device never waits for a token: a device behind the same NAT as an
  abuser keeps working.
* CoAP, decryption failures (`CoapGate.answers_decryption_failure`): the kid is
  in clear, so forgeries naming a cached kid reach verification, from any
  address. Each is verified; its failure is answered and logged within the
  budget of its kid and of its source (same rate and burst), and past either
  only counted (``decryption_failed_unanswered``), one line per kid per
  `LOG_EVERY` s.
* HTTP (`driver_core.api.throttle`): failed authentications (401) charge the
  client address; over budget, unauthenticated requests get 429 with Retry-After.

IPv4 sources (also IPv4-mapped IPv6) are keyed by address, IPv6 sources by
their /64: one subscriber usually owns a whole /64. The buckets live in an LRU of
at most `MAX_SOURCES` entries; a source forgotten by the LRU starts again with a
full bucket. A source that forges its address gets a fresh bucket per address:
per-source limits bound what one honest-addressed abuser costs, not a spoofed flood.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from functools import lru_cache
from typing import TYPE_CHECKING

import aiocoap
from aiocoap import oscore
from aiocoap.numbers.codes import Code
from aiocoap.numbers.types import Type

from . import refusals as why
from .oscore_context import kid_context_matches, oscore_fields

if TYPE_CHECKING:
    from .coap_transport import CoapListener
    from .refusals import Refusals
    from .security import DeviceCredentials

_LOGGER = logging.getLogger(__name__)

MAX_SOURCES = 16_384  # buckets kept; about 150 bytes each
LOG_EVERY = 10.0  # seconds between two log lines about the same rate-limited source


@dataclass(slots=True)
class _Bucket:
    tokens: float
    stamp: float
    prepaid: int = 0  # tokens taken at the gate for refusals not recorded yet
    logged: float = -math.inf  # when a drop from this source was last logged
    dropped: int = 0  # drops since that line


class TokenBuckets:
    """Per-key token buckets: `rate` tokens per second, at most `burst`; rate 0 disables."""

    def __init__(
        self,
        rate: float,
        burst: int,
        max_sources: int = MAX_SOURCES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate < 0 or burst < 1 or max_sources < 1:
            raise ValueError("rate must be >= 0, burst and max_sources >= 1")
        self.rate = rate
        self.burst = burst
        self.max_sources = max_sources
        self._clock = clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def __len__(self) -> int:
        return len(self._buckets)

    def _refilled(self, key: str) -> _Bucket | None:
        bucket = self._buckets.get(key)
        if bucket is not None:
            now = self._clock()
            bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.stamp) * self.rate)
            bucket.stamp = now
            if bucket.tokens >= self.burst:
                bucket.prepaid = 0  # what was prepaid that long ago never came
        return bucket

    def _bucket(self, key: str) -> _Bucket:
        """The refilled bucket of `key`, created full; now the most recently used."""
        bucket = self._refilled(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(float(self.burst), self._clock())
            if len(self._buckets) > self.max_sources:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        return bucket

    def exhausted(self, key: str) -> bool:
        """True while `key` has no token left (a source never charged has a full bucket)."""
        bucket = self._refilled(key)
        return bucket is not None and bucket.tokens < 1

    def charge(self, key: str) -> None:
        """A refusal of `key`: one token (none left: it stays at zero), unless prepaid."""
        if not self.enabled:
            return
        bucket = self._bucket(key)
        if bucket.prepaid:
            bucket.prepaid -= 1
        else:
            bucket.tokens = max(0.0, bucket.tokens - 1)

    def prepay(self, key: str) -> bool:
        """Take the token of a refusal to come; False (nothing taken) when none is left."""
        if not self.enabled:
            return True
        bucket = self._bucket(key)
        if bucket.tokens < 1:
            return False
        bucket.tokens -= 1
        bucket.prepaid += 1
        return True

    def take(self, key: str) -> bool:
        """One token for what happens now; False (nothing taken) when none is left."""
        if not self.enabled:
            return True
        bucket = self._bucket(key)
        if bucket.tokens < 1:
            return False
        bucket.tokens -= 1
        return True

    def refund(self, key: str) -> None:
        """A prepaid refusal that did not happen: the token goes back."""
        bucket = self._refilled(key)
        if bucket is not None and bucket.prepaid:
            bucket.prepaid -= 1
            bucket.tokens = min(self.burst, bucket.tokens + 1)

    def retry_after(self, key: str) -> int:
        """Whole seconds until `key` has a token again (at least 1)."""
        bucket = self._refilled(key)
        missing = 1 - bucket.tokens if bucket is not None else 0.0
        return max(1, math.ceil(missing / self.rate)) if self.rate else 1

    def note_drop(self, key: str) -> int | None:
        """Count a drop for `key`; the drops to log now (first one, then every LOG_EVERY s)."""
        bucket = self._bucket(key)
        bucket.dropped += 1
        now = self._clock()
        if now - bucket.logged < LOG_EVERY:
            return None
        bucket.logged, dropped, bucket.dropped = now, bucket.dropped, 0
        return dropped


@lru_cache(maxsize=4096)
def source_key(host: str) -> str:
    """The bucket key of an address: IPv4 as is (also when IPv4-mapped), IPv6 as its /64."""
    host = host.split("%", 1)[0]  # drop an IPv6 zone
    if host.startswith("::ffff:") and "." in host:
        return host[7:]
    if ":" not in host:
        return host
    try:
        return str(ipaddress.IPv6Network((host, 64), strict=False))
    except ValueError:
        return host


def host_of(remote: object) -> str | None:
    """The IP address of a CoAP remote (aiocoap address object, socket address tuple or text)."""
    if isinstance(remote, str):
        return remote
    if isinstance(remote, tuple):
        return remote[0] if remote and isinstance(remote[0], str) else None
    remote = getattr(remote, "underlying_address", remote)  # an OSCORE address wraps the UDP one
    sockaddr = getattr(remote, "sockaddr", None)
    if isinstance(sockaddr, tuple) and sockaddr and isinstance(sockaddr[0], str):
        return sockaddr[0]
    return None


class Verdict(Enum):
    """What the gate expects the driver to do with a datagram."""

    SERVE = "serve"  # a request under a cached device's current context, or an ACK/RST
    SUSPECT = "suspect"  # refused, or only the database knows (its token is prepaid)
    FOREIGN = "foreign"  # a ping or a response: not a request, not refused, not ours
    UNDECODABLE = "undecodable"  # not CoAP: refused here, never handed to aiocoap


class CoapGate:
    """Prepays or drops would-be refusals at the UDP listener; charges the others to their source."""

    def __init__(
        self, buckets: TokenBuckets, refusals: Refusals, credentials: DeviceCredentials
    ) -> None:
        self.buckets = buckets
        # Decryption failures answered per kid: the same budget as per source.
        self.kid_buckets = TokenBuckets(buckets.rate, buckets.burst, buckets.max_sources, buckets._clock)
        self._refusals = refusals
        self._credentials = credentials

    def charge(self, remote: object) -> None:
        """`Refusals.on_refusal`: one token from the refused request's source."""
        host = host_of(remote)
        if host is not None:
            self.buckets.charge(source_key(host))

    def refund(self, remote: object) -> None:
        """`Refusals.on_cleared`: a suspected request came from an enrolled device."""
        host = host_of(remote)
        if host is not None:
            self.buckets.refund(source_key(host))

    def attach(self, listener: CoapListener) -> None:
        """Put the gate in front of the UDP listener, and let refusals charge their source.

        Attached also with limiting off: undecodable datagrams are then counted here.
        """
        listener.gate = self
        self._refusals.on_refusal = self.charge
        self._refusals.on_cleared = self.refund
        self._refusals.on_decryption_failure = self.answers_decryption_failure

    def answers_decryption_failure(self, remote: object, kid: bytes, serial: str | None) -> bool:
        """A request naming `kid` failed verification: True to answer (and log) it as usual.

        The kid travels in clear, so anyone can forge requests naming it, from any address;
        the gate cannot tell them from the device's own. Each one is verified (a valid MAC
        is always served). Past its source's budget, or its kid's (the same rate and burst),
        a failure goes unanswered and is only counted, with one line per kid every
        `LOG_EVERY` seconds. O(1): two dictionary lookups, on failures only.
        """
        host = host_of(remote)
        key = source_key(host) if host is not None else None
        kid_key = kid.hex()
        if (key is None or not self.buckets.exhausted(key)) and self.kid_buckets.take(kid_key):
            return True  # answered and logged; the refusal charges its source
        if key is not None:
            self.buckets.charge(key)  # a refusal of its source all the same
        self._unanswered(kid_key, kid, serial)
        return False

    def _unanswered(self, kid_key: str, kid: bytes, serial: str | None) -> None:
        """Count a failure left unanswered; one line per kid (not per source: sources can be
        spoofed by the million) every `LOG_EVERY` seconds."""
        dropped = self.kid_buckets.note_drop(kid_key)
        if dropped is None:
            self._refusals.count(why.DECRYPTION_FAILED_UNANSWERED)
            return
        self._refusals.record(
            why.DECRYPTION_FAILED_UNANSWERED,
            kid=kid,
            serial=serial,
            detail=(
                f"kid {kid_key} or its sources over the decryption-failure budget "
                f"({self.kid_buckets.rate:g}/s, burst {self.kid_buckets.burst} each): {dropped} "
                "request(s) failed verification and went unanswered since the last line"
            ),
        )

    def admit(self, message: aiocoap.Message | None, host: str) -> bool:
        """Whether the listener handles a datagram (`message` None: it did not decode)."""
        verdict = Verdict.UNDECODABLE if message is None else self.verdict_of(message)
        if verdict is Verdict.SERVE:
            return True
        key = source_key(host)
        buckets = self.buckets
        if buckets.prepay(key) if verdict is not Verdict.FOREIGN else not buckets.exhausted(key):
            return True
        self._dropped(key, host)
        return False

    def _dropped(self, key: str, host: str) -> None:
        dropped = self.buckets.note_drop(key)
        if dropped is None:
            self._refusals.count(why.RATE_LIMITED)
            return
        self._refusals.record(
            why.RATE_LIMITED,
            remote=key if "/" not in key else host,
            detail=(
                f"source {key} over its refusal budget ({self.buckets.rate:g}/s, burst "
                f"{self.buckets.burst}): {dropped} datagram(s) dropped unanswered since the last line"
            ),
        )

    def would_be_refused(self, data: bytes) -> bool:
        return self.verdict(data) is not Verdict.SERVE

    def verdict(self, data: bytes) -> Verdict:
        """What the driver will do with `data`, guessed from the datagram and the cache alone."""
        try:
            message = aiocoap.Message.decode(data)
        except Exception:  # the codec raises more than UnparsableMessage on hostile input
            return Verdict.UNDECODABLE
        return self.verdict_of(message)

    def verdict_of(self, message: aiocoap.Message) -> Verdict:
        """`verdict` of a decoded datagram."""
        if not message.code.is_request():
            if message.code == Code.EMPTY and message.mtype in (Type.ACK, Type.RST):
                return Verdict.SERVE  # may answer a separate response of ours
            return Verdict.FOREIGN
        try:
            unprotected = oscore_fields(message)
        except (oscore.NotAProtectedMessage, oscore.DecodeError):  # unprotected, or a bad option
            return Verdict.SUSPECT
        kid = unprotected.get(oscore.COSE_KID)
        state = self._credentials.cached(kid) if isinstance(kid, bytes) else None
        if state is None:
            return Verdict.SUSPECT  # an unknown kid, or one only the database knows
        context = state.context
        kid_context = unprotected.get(oscore.COSE_KID_CONTEXT)
        if kid_context is not None and (
            context is None or not kid_context_matches(kid_context, context.id_context)
        ):
            return Verdict.SERVE  # a JOIN step: only the site can build its context
        piv = unprotected.get(oscore.COSE_PIV)
        if context is None or not piv:
            return Verdict.SUSPECT  # no context until the device joins; no Partial IV
        try:
            fresh = context.recipient_replay_window.is_valid(int.from_bytes(piv, "big"))
        except Exception:
            return Verdict.SERVE
        return Verdict.SERVE if fresh else Verdict.SUSPECT
