"""Key derivation and JOIN tokens: the fast paths give exactly the bytes of the reference ones."""

from __future__ import annotations

import os

import pytest
from aiocoap import oscore

from driver_core.join_tokens import R2_LENGTH, JoinTokens
from driver_core.oscore_context import PairwiseContext

MASTER_SECRET = bytes(range(1, 17))
MASTER_SALT = bytes.fromhex("9e7ca92223786340")


@pytest.mark.parametrize(
    ("id_context", "sender_key", "recipient_key", "common_iv"),
    [
        # RFC 8613 C.1.1 (no ID Context) and C.3.1 (ID Context 0x37cbf3210017a2d3), client side.
        (None, "f0910ed7295e6ad4b54fc793154302ff", "ffb14e093c94c9cac9471648b4f98710", "4622d4dd6d944168eefb54987c"),
        (
            bytes.fromhex("37cbf3210017a2d3"),
            "af2a1300a5e95788b356336eeecd2b92",
            "e39a0c7c77b43f03b4b39ab9a268699f",
            "2ca58fb85ff1b81c0b7181b85e",
        ),
    ],
)
def test_derivation_matches_the_rfc_8613_test_vectors(id_context, sender_key, recipient_key, common_iv):
    context = PairwiseContext(
        sender_id=b"", recipient_id=b"\x01", id_context=id_context,
        master_secret=MASTER_SECRET, master_salt=MASTER_SALT,
    )
    assert context.sender_key.hex() == sender_key
    assert context.recipient_key.hex() == recipient_key
    assert context.common_iv.hex() == common_iv


@pytest.mark.parametrize("salt", [b"", b"\x01" * 8])
@pytest.mark.parametrize("id_context_length", [8, 24])
def test_derivation_matches_aiocoaps_own(salt, id_context_length):
    secret, id_context = os.urandom(16), os.urandom(id_context_length)
    context = PairwiseContext(
        sender_id=b"", recipient_id=b"\xbe\x00\x00\x07", id_context=id_context,
        master_secret=secret, master_salt=salt,
    )
    fast = (context.sender_key, context.recipient_key, context.common_iv)
    oscore.SecurityContextUtils.derive_keys(context, salt, secret)  # aiocoap's HKDF, three times
    assert fast == (context.sender_key, context.recipient_key, context.common_iv)


def test_join_tokens_stay_unique_and_verifiable_across_random_refills():
    tokens = JoinTokens(b"k" * 32)
    kid = b"\xbe\x00\x00\x01"
    issued = [tokens.issue(kid, now_ms=1_000_000) for _ in range(4096)]  # two 4 KiB random draws
    assert all(len(r2) == R2_LENGTH for r2 in issued)
    # 2 random bytes in the same ms: about 125 birthday collisions expected among 4096, never a
    # repeated draw (the second 2,048 values would then equal the first).
    assert len(set(issued)) > 3800
    assert issued[:2048] != issued[2048:]
    assert {tokens.verify(kid, r2, now_ms=1_000_500) for r2 in issued} == {1_000_000}
    assert tokens.verify(b"\xbe\x00\x00\x02", issued[0], now_ms=1_000_500) is None
