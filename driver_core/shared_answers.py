"""Cluster mode: a retransmission that reaches another instance gets the answer already sent.

A device that missed its ACK retransmits the identical datagram (same OSCORE
option and Partial IV, same ciphertext). Behind a UDP balancer it may reach
another instance, whose shared replay window has the sequence number already:
refused as a replay, the device would have to JOIN again for a message that was
stored. So with the shared replay window each device's context keeps its last
committed request (sequence number and a digest of the protected request) and
its protected answer, written in the transaction that commits the request, and
any instance answers the retransmission with those bytes, without processing it
again. A single instance needs none of this: the listener's response cache
answers its own retransmissions.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass

import aiocoap
from aiocoap import error
from aiocoap.message import Direction
from aiocoap.numbers.types import Type
from sqlalchemy import Select, select

from .storage.models import SecurityContext


def request_digest(request: aiocoap.Message) -> bytes:
    """What tells a retransmission from a replay: the OSCORE option (Partial IV, kid) and the
    ciphertext. Another ciphertext under the same Partial IV is a replay."""
    option = request.opt.oscore or b""
    digest = hashlib.sha256(len(option).to_bytes(2, "big"))
    digest.update(option)
    digest.update(request.payload)
    return digest.digest()


@dataclass(slots=True, eq=False)
class AnswerSeal:
    """One request's identity and its protected answer, made before the write commits it."""

    seqno: int
    digest: bytes
    protect: Callable[[aiocoap.Message], aiocoap.Message]
    encoded: bytes | None = None  # the protected answer as stored
    protected: aiocoap.Message | None = None
    committed: bool = False  # set by the writer: the stored answer is the one to send

    def seal(self, answer: aiocoap.Message) -> None:
        """Protect `answer` now: its bytes are stored in the request's transaction."""
        protected = self.protect(answer)
        protected.mtype, protected.mid, protected.token = Type.ACK, 0, b""  # the listener sets them
        self.protected, self.encoded = protected, protected.encode()

    def answer(self) -> aiocoap.Message | None:
        """The protected answer to send, once the writer committed it with the request."""
        return self.protected if self.committed else None


# The seal of the request being rendered (cluster mode only), set by the OSCORE site.
CURRENT_SEAL: ContextVar[AnswerSeal | None] = ContextVar("coap_driver_answer_seal", default=None)


class Retransmission(error.RenderableError):
    """The request was committed before (here or by another instance): its stored answer."""

    def __init__(self, stored: bytes) -> None:
        super().__init__("retransmission")
        self.stored = stored

    @property
    def answer(self) -> aiocoap.Message:
        """The stored answer, decoded where it is sent (not in the writer's loop)."""
        message = aiocoap.Message.decode(self.stored)
        message.direction = Direction.OUTGOING  # decoded to be sent again
        return message

    def to_message(self) -> aiocoap.Message:
        return self.answer


def stored_answer_query(device_id: int, seqno: int, digest: bytes) -> Select:
    """The stored answer of exactly this request of the device (no row: not a retransmission)."""
    return select(SecurityContext.answer).where(
        SecurityContext.device_id == device_id,
        SecurityContext.answered_seqno == seqno,
        SecurityContext.answered_request == digest,
        SecurityContext.answer.is_not(None),
    )
