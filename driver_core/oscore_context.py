"""OSCORE security contexts for the RFC 8613 Appendix B.2 JOIN, built on aiocoap's classes.

aiocoap ships the OSCORE primitives but not B.2. This module adds what B.2 needs:

* `kid context` values travel CBOR-wrapped on the wire (``0x48 ‖ R1``) while key
  derivation uses the raw bytes; some stacks send the raw value, some omit it.
  `PairwiseContext` accepts raw, wrapped or absent values equal to its ID Context.
* answer #1 of the JOIN is protected with a context (C2) whose ID Context differs
  from the request's; it carries its own Partial IV and announces R2 in the
  OSCORE option (`JoinAnswerContext`).

The same classes serve the device side (simulator, load generator) so both ends
of the tests run one implementation of the derivation rules.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable

import cbor2
from aiocoap import oscore
from aiocoap.oscore import COSE_KID_CONTEXT, ProtectionInvalid
from cryptography.hazmat.primitives import hashes

AEAD = oscore.algorithms["AES-CCM-16-64-128"]  # COSE 10, as PROTOCOL.md requires
REPLAY_WINDOW = 32
DRIVER_SENDER_ID = b""  # the driver's own Sender ID
_OPTION_FLAG_KID_CONTEXT = 0x10  # the 'h' bit of the OSCORE option (RFC 8613 §6.1)
MAX_PIV_LENGTH = 5  # RFC 8613 §6.1: Partial IV lengths 6 and 7 are reserved


def check_option(option: bytes | None) -> None:
    """Refuse what aiocoap's option parser lets through and then trips over.

    RFC 8613 §6.1 reserves Partial IV lengths 6 and 7; aiocoap would build a nonce
    of the wrong size from them and fail an assertion (a 5.00) once a context is
    found. One byte test: the hot path pays nothing else.
    """
    if option and option[0] & oscore.COMPRESSION_BITS_N > MAX_PIV_LENGTH:
        raise oscore.DecodeError("Partial IV length uses a reserved value")


def oscore_fields(message) -> dict:
    """aiocoap's `verify_start`, strict: raises only NotAProtectedMessage or DecodeError.

    The fields of the OSCORE option (kid, kid context, Partial IV) a context is chosen by.
    """
    check_option(message.opt.oscore)
    try:
        return oscore.verify_start(message)
    except IndexError:  # aiocoap: a kid context flag with no length byte after it
        raise oscore.DecodeError("kid context announced but not present") from None


def wrap_kid_context(raw: bytes) -> bytes:
    """Wire form of a kid context: the CBOR encoding of the byte string."""
    return cbor2.dumps(raw)


def unwrap_kid_context(value: bytes) -> bytes | None:
    """The raw bytes inside a CBOR byte-string encoding, or None if `value` is not exactly one."""
    if not value:
        return None
    first = value[0]
    if 0x40 <= first <= 0x57:
        length, body = first - 0x40, value[1:]
    elif first == 0x58 and len(value) >= 2:
        length, body = value[1], value[2:]
    else:
        return None
    return body if len(body) == length else None


def kid_context_matches(value: bytes, id_context: bytes) -> bool:
    """True when a received kid context names `id_context`, raw or CBOR-wrapped."""
    return value == id_context or unwrap_kid_context(value) == id_context


class PairwiseContext(oscore.CanProtect, oscore.CanUnprotect, oscore.SecurityContextUtils):
    """A plain OSCORE context (RFC 8613 §3) held in memory.

    `on_replay_update` is called after every accepted sequence number so the
    owner can persist the replay window with the request it belongs to.
    """

    alg_aead = AEAD
    hashfun = hashes.SHA256()
    echo_recovery = None
    # The device side accepts whatever kid context a response names: the
    # context was already chosen by the exchange.
    check_kid_context = True

    def __init__(
        self,
        *,
        sender_id: bytes,
        recipient_id: bytes,
        id_context: bytes,
        master_secret: bytes,
        master_salt: bytes,
        sender_sequence_number: int = 0,
        replay_state: tuple[int, int] | None = None,
        on_replay_update: Callable[[], None] | None = None,
        on_seqno_increase: Callable[[], None] | None = None,
    ) -> None:
        self.sender_id = sender_id
        self.recipient_id = recipient_id
        self.id_context = id_context
        self.derive_keys(master_salt, master_secret)
        self.sender_sequence_number = sender_sequence_number
        self._on_seqno_increase = on_seqno_increase
        self.recipient_replay_window = oscore.ReplayWindow(
            REPLAY_WINDOW, on_replay_update or (lambda: None)
        )
        if replay_state is None:
            self.recipient_replay_window.initialize_empty()
        else:
            index, bitfield = replay_state
            self.recipient_replay_window.initialize_from_persisted(
                {"index": index, "bitfield": bitfield}
            )

    def derive_keys(self, master_salt: bytes, master_secret: bytes) -> None:
        """RFC 8613 §3.2.1 with one HKDF-Extract for the three outputs.

        aiocoap runs a full HKDF object per output (extract + expand + debug
        logging): about 60 µs per context here, and a JOIN builds three. The
        PRK does not depend on the output, and every output fits in one
        SHA-256 block, so Expand is a single HMAC. Same bytes as aiocoap's
        derivation (the tests compare both).
        """
        alg = self.alg_aead
        prk = hmac.digest(master_salt or b"", master_secret, "sha256")
        id_context = self.id_context

        def expand(role_id: bytes, out_type: str, length: int) -> bytes:
            info = cbor2.dumps([role_id, id_context, alg.value, out_type, length])
            return hmac.digest(prk, info + b"\x01", "sha256")[:length]

        self.sender_key = expand(self.sender_id, "Key", alg.key_bytes)
        self.recipient_key = expand(self.recipient_id, "Key", alg.key_bytes)
        self.common_iv = expand(b"", "IV", alg.iv_bytes)

    def replay_state(self) -> tuple[int, int]:
        state = self.recipient_replay_window.persist()
        return state["index"], state["bitfield"]

    def post_seqnoincrease(self) -> None:
        if self._on_seqno_increase is not None:
            self._on_seqno_increase()

    def _extract_encrypted0(self, message):  # type: ignore[override]
        check_option(message.opt.oscore)
        protected_serialized, protected, unprotected, ciphertext = super()._extract_encrypted0(
            message
        )
        if oscore.COSE_COUNTERSIGNATURE0 in unprotected:
            # Group OSCORE's flag: aiocoap would look for a group key here and fail with
            # an AttributeError (it catches NameError), i.e. a 5.00; a pairwise context
            # simply cannot decode it.
            raise oscore.DecodeError("group OSCORE message under a pairwise context")
        received = unprotected.pop(COSE_KID_CONTEXT, None)
        if (
            received is not None
            and self.check_kid_context
            and not kid_context_matches(received, self.id_context)
        ):
            raise ProtectionInvalid("Sender ID context does not match")
        return protected_serialized, protected, unprotected, ciphertext

    def __repr__(self) -> str:  # never show keys
        return f"<{type(self).__name__} kid={self.recipient_id.hex()} ctx={self.id_context.hex()}>"


class JoinAnswerContext(PairwiseContext):
    """C2 (ID Context R2 ‖ R1): protects JOIN answer #1 with its own Partial IV and R2 in the option."""

    def __init__(self, *, r2: bytes, **kwargs) -> None:
        super().__init__(**kwargs)
        self.r2 = r2

    def protect(self, message, request_id=None, *, kid_context=True):
        if request_id is not None:
            request_id.can_reuse_nonce = False  # the request's nonce belongs to another context
        outer, request_id = super().protect(message, request_id, kid_context=kid_context)
        if message.code.is_response():
            outer.opt.oscore = add_kid_context_to_option(outer.opt.oscore, wrap_kid_context(self.r2))
        return outer, request_id


def add_kid_context_to_option(option: bytes, kid_context: bytes) -> bytes:
    """Insert a kid context into a compressed OSCORE option value.

    The option is not part of the AAD in OSCORE (RFC 8613 §5.4), so this is
    safe after encryption; aiocoap only writes kid contexts into requests.
    """
    if not option:
        flags, rest = 0, b""
    else:
        flags, rest = option[0], option[1:]
    if flags & _OPTION_FLAG_KID_CONTEXT:
        raise ValueError("option already carries a kid context")
    piv_len = flags & 0x07
    piv, kid = rest[:piv_len], rest[piv_len:]
    return bytes([flags | _OPTION_FLAG_KID_CONTEXT]) + piv + bytes([len(kid_context)]) + kid_context + kid
