"""Device lookup by kid and the choice of the context that verifies a request.

aiocoap's OSCORE site asks a credentials object, synchronously, for the context
matching a request's `kid` / `kid context`. `DeviceCredentials` answers from a
bounded in-memory cache that `preload()` fills from the database before
aiocoap asks, so a fleet larger than the cache works and nothing loops over
devices.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from aiocoap.error import UnparsableMessage
from aiocoap.oscore import COSE_KID, COSE_KID_CONTEXT, DecodeError, ProtectionInvalid, ReplayError
from sqlalchemy import func, select

from . import refusals as why
from .batch_loader import BatchLoader
from .join_tokens import R1_LENGTH, R2_LENGTH, R3_LENGTH, JoinTokens
from .oscore_context import (
    DRIVER_SENDER_ID,
    JoinAnswerContext,
    PairwiseContext,
    kid_context_matches,
    unwrap_kid_context,
)
from .storage.models import Device, SecurityContext

if TYPE_CHECKING:
    from .refusals import Refusals
    from .storage.db import Database
    from .storage.secretbox import SecretBox

_LOGGER = logging.getLogger(__name__)

UNKNOWN_KID_TTL = 10.0  # seconds an unknown kid is remembered, so floods do not hit the database
SENDER_SEQ_CHUNK = 256  # RFC 8613 B.1.1: sequence numbers are reserved in chunks


@dataclass(slots=True, eq=False)
class DeviceState:
    """What the hot path needs about one device, kept in the cache."""

    device_id: int
    serial: str
    hw_type: int
    kid: bytes
    master_secret: bytes = field(repr=False)
    master_salt: bytes = field(repr=False)
    tx_interval: int
    join_date: datetime | None
    last_seen: datetime | None
    firmware: str | None
    uplinks_since_join: int
    context: DeviceContext | None = None
    context_r2_ms: int = 0


class PossiblyStaleContext(Exception):
    """Cluster mode: a replay under the cached context; another instance may hold a newer one."""


class DeviceContext(PairwiseContext):
    """A device's context on the driver side, tied to its cached state.

    `phase` says what the context is for: ``current`` (the committed context),
    ``join1`` (C1, built from R1 to verify JOIN step 1) or ``join3`` (C3, built
    from R2 ‖ R3, committed once the JOIN resource accepts it).
    """

    def __init__(self, device: DeviceState, phase: str, id_context: bytes, **kwargs: Any) -> None:
        super().__init__(
            sender_id=DRIVER_SENDER_ID,
            recipient_id=device.kid,
            id_context=id_context,
            master_secret=device.master_secret,
            master_salt=device.master_salt,
            **kwargs,
        )
        self.device = device
        self.phase = phase
        self.r2_ms = 0
        self.join_answer: JoinAnswerContext | None = None
        # C1 only: builds C2 once step 1 verified (a forgery must not cost an R2 and a derivation).
        self.answer_factory: Callable[[], JoinAnswerContext] | None = None
        self.seq_reserved = self.sender_sequence_number

    refusals: Refusals | None = None
    shared = False  # cluster mode: a replay may only mean this cached context is stale

    def unprotect(self, protected_message, request_id=None):
        try:
            unprotected, seqno = super().unprotect(protected_message, request_id)
        except ReplayError:
            if self.shared:
                raise PossiblyStaleContext() from None
            if self.refusals is not None:
                self.refusals.record(
                    why.REPLAY, remote=protected_message.remote, kid=self.device.kid,
                    serial=self.device.serial,
                )
            raise
        except ProtectionInvalid:
            raise
        except (UnparsableMessage, ValueError) as exc:
            # aiocoap decodes the inner options after the MAC check: a device with the key
            # (or a bug in its stack) can send a Uri-Path that is not UTF-8, a reserved length.
            raise DecodeError(f"inner options do not decode: {exc}") from None
        # The cluster check (driver_core.writer) compares it with the shared replay window.
        unprotected.oscore_seqno = int.from_bytes(seqno.partial_iv, "big")
        return unprotected, seqno

    def context_for_response(self):
        if self.join_answer is None and self.answer_factory is not None:
            self.join_answer = self.answer_factory()
        return self.join_answer if self.join_answer is not None else self

    def post_seqnoincrease(self) -> None:
        # Responses reuse the request nonce; own sequence numbers are rare. Reserve
        # in chunks and persist with the next write (RFC 8613 B.1.1).
        if self.sender_sequence_number > self.seq_reserved:
            self.seq_reserved = self.sender_sequence_number + SENDER_SEQ_CHUNK


class DeviceCredentials:
    """The `server_credentials` object given to aiocoap's OSCORE site wrapper."""

    def __init__(
        self,
        db: Database,
        box: SecretBox,
        tokens: JoinTokens,
        refusals: Refusals,
        cache_size: int = 100_000,
    ) -> None:
        self._db = db
        self._refusals = refusals
        self._box = box
        self.tokens = tokens
        self._cache_size = cache_size
        self._by_kid: OrderedDict[bytes, DeviceState] = OrderedDict()
        self._unknown: dict[bytes, float] = {}
        self._fleet_stamp: tuple[int, int | None] | None = None
        self.shared = False  # cluster mode: other instances write the same devices
        # Concurrent cache misses (a JOIN storm) are read in one query.
        self._loads: BatchLoader[bytes, DeviceState] = BatchLoader(self._load_many)

    # -- cache ---------------------------------------------------------------
    async def preload(self, kid: bytes) -> DeviceState | None:
        """Make sure the device with `kid` is cached (or known not to exist)."""
        state = self._by_kid.get(kid)
        if state is not None:
            self._by_kid.move_to_end(kid)
            return state
        expiry = self._unknown.get(kid)
        if expiry is not None and expiry > time.monotonic():
            return None
        state = await self._load(kid)
        if state is None:
            if len(self._unknown) > self._cache_size:
                self._unknown.clear()
            self._unknown[kid] = time.monotonic() + UNKNOWN_KID_TTL
            return None
        self._by_kid[kid] = state
        while len(self._by_kid) > self._cache_size:
            self._by_kid.popitem(last=False)
        return state

    # -- cluster mode: another instance may have committed a newer context -------------
    def names_other_context(self, state: DeviceState, unprotected: dict) -> bool:
        """True when a request names a post-JOIN context that is not the cached one."""
        received = unprotected.get(COSE_KID_CONTEXT)
        if received is None or state.context is None:
            return False
        if kid_context_matches(received, state.context.id_context):
            return False
        raw = unwrap_kid_context(received)
        return raw is not None and len(raw) == R2_LENGTH + R3_LENGTH

    async def reload(self, kid: bytes) -> DeviceState | None:
        """Read the device again from the database (its context may be newer there)."""
        self.forget(kid)
        return await self.preload(kid)

    async def reloaded_other_context(self, state: DeviceState) -> bool:
        """After a failed verification: reload; True when the database holds another context."""
        fresh = await self.reload(state.kid)
        if fresh is None or fresh.context is None:
            return False
        return state.context is None or fresh.context.id_context != state.context.id_context

    def forget(self, kid: bytes) -> None:
        """Drop a device from the cache (deleted, re-enrolled, or restored elsewhere)."""
        self._by_kid.pop(kid, None)
        self._unknown.pop(kid, None)

    def cached(self, kid: bytes) -> DeviceState | None:
        return self._by_kid.get(kid)

    async def reconcile(self) -> None:
        """Notice enrollments and removals made elsewhere (CLI, API, another instance).

        Cheap when nothing changed: one aggregate query. On a change, the
        negative cache is cleared (a new device can join at once) and cached
        devices that no longer exist are dropped (a removed device is refused).
        """
        async with self._db.session() as session:
            stamp = tuple((await session.execute(select(func.count(), func.max(Device.id)))).one())
            if stamp == self._fleet_stamp:
                return
            self._fleet_stamp = stamp
            self._unknown.clear()
            kids = list(self._by_kid)
            present: set[bytes] = set()
            for start in range(0, len(kids), 500):
                chunk = kids[start : start + 500]
                rows = await session.execute(select(Device.kid).where(Device.kid.in_(chunk)))
                present.update(rows.scalars())
        for kid in kids:
            if kid not in present:
                self._by_kid.pop(kid, None)

    async def _load(self, kid: bytes) -> DeviceState | None:
        return await self._loads.load(kid)

    async def _load_many(self, kids: list[bytes]) -> dict[bytes, DeviceState]:
        """The devices (with their stored context) of `kids`, in one query; absent kids are left out."""
        async with self._db.session() as session:
            rows = (
                await session.execute(
                    select(
                        Device.id, Device.serial, Device.hw_type, Device.kid,
                        Device.master_secret_enc, Device.master_salt_enc, Device.tx_interval,
                        Device.join_date, Device.last_seen, Device.firmware, Device.uplinks_since_join,
                        SecurityContext.id_context, SecurityContext.sender_seq_reserved,
                        SecurityContext.replay_index, SecurityContext.replay_bitfield,
                        SecurityContext.r2_issued_ms,
                    )
                    .outerjoin(SecurityContext, SecurityContext.device_id == Device.id)
                    .where(Device.kid.in_(kids))
                )
            ).all()
        states: dict[bytes, DeviceState] = {}
        for row in rows:
            state = DeviceState(
                device_id=row.id,
                serial=row.serial,
                hw_type=row.hw_type,
                kid=bytes(row.kid),
                master_secret=self._box.decrypt(row.master_secret_enc),
                master_salt=self._box.decrypt(row.master_salt_enc),
                tx_interval=row.tx_interval,
                join_date=row.join_date,
                last_seen=row.last_seen,
                firmware=row.firmware,
                uplinks_since_join=row.uplinks_since_join,
            )
            if row.id_context is not None:
                context = DeviceContext(
                    state,
                    "current",
                    row.id_context,
                    # Never reuse a sequence number handed out before a restart.
                    sender_sequence_number=row.sender_seq_reserved,
                    replay_state=(row.replay_index, row.replay_bitfield),
                )
                context.refusals = self._refusals
                context.shared = self.shared
                state.context = context
                state.context_r2_ms = row.r2_issued_ms
            states[state.kid] = state
        return states

    # -- aiocoap's credentials interface ----------------------------------------
    def find_oscore(self, unprotected: dict) -> DeviceContext:
        """Pick the context for a request; KeyError becomes 4.01 'Security context not found'."""
        kid = unprotected.get(COSE_KID)
        state = self._by_kid.get(kid) if kid is not None else None
        if state is None:
            raise KeyError("unknown kid")
        received = unprotected.get(COSE_KID_CONTEXT)
        current = state.context
        if received is None:
            if current is None:
                raise KeyError("no context")
            return current
        if current is not None and kid_context_matches(received, current.id_context):
            return current
        raw = unwrap_kid_context(received)
        if raw is None:
            raise KeyError("kid context not a CBOR byte string")
        if len(raw) == R1_LENGTH:
            return self._join_step1(state, raw)
        if len(raw) == R2_LENGTH + R3_LENGTH:
            return self._join_step3(state, raw)
        raise KeyError("unknown kid context")

    def _join_step1(self, state: DeviceState, r1: bytes) -> DeviceContext:
        c1 = DeviceContext(state, "join1", r1)
        c1.refusals = self._refusals
        c1.answer_factory = lambda: self._join_answer(state, r1)
        return c1

    def _join_answer(self, state: DeviceState, r1: bytes) -> JoinAnswerContext:
        """C2 with a fresh R2, for the answer to a step 1 that verified."""
        r2 = self.tokens.issue(state.kid)
        return JoinAnswerContext(
            r2=r2,
            sender_id=DRIVER_SENDER_ID,
            recipient_id=state.kid,
            id_context=r2 + r1,
            master_secret=state.master_secret,
            master_salt=state.master_salt,
        )

    def _join_step3(self, state: DeviceState, r2r3: bytes) -> DeviceContext:
        issued_ms = self.tokens.verify(state.kid, r2r3[:R2_LENGTH])
        if issued_ms is None or issued_ms <= state.context_r2_ms:
            # Forged, stale, or older than the context in force: a superseded context.
            raise KeyError("superseded or stale R2")
        c3 = DeviceContext(state, "join3", r2r3)
        c3.refusals = self._refusals
        c3.shared = self.shared
        c3.r2_ms = issued_ms
        return c3

    def find_all_used_contextless_oscore_kid(self) -> set[bytes]:
        """aiocoap asks this only for EDHOC, which devices do not use."""
        return set()

    @staticmethod
    def commit(state: DeviceState, c3: DeviceContext) -> None:
        """Make a verified C3 the device's only context (the old one is dropped)."""
        c3.phase = "current"
        state.context = c3
        state.context_r2_ms = c3.r2_ms
