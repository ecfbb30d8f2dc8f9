"""REST API bearer tokens: created once, stored as SHA-256, checked on every request.

The token itself is shown only when it is created (like GitHub personal access
tokens): the database holds its SHA-256, so a leaked database does not leak
usable tokens. A lookup by hash takes the same time whatever the first wrong
character is, which is the timing property that matters for a 256-bit secret.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from datetime import timedelta

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError

from .storage.db import Database
from .storage.models import ApiToken
from .timefmt import utcnow

TOKEN_PREFIX = "cdt_"  # recognisable in logs and by secret scanners
MAX_TOKEN_LENGTH = 256  # anything longer is not ours; do not even hash it
LAST_USED_PRECISION = timedelta(minutes=1)  # at most one write per token and minute
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 _.@-]{0,63}")


class TokenError(Exception):
    """A token cannot be created; the message is one line for the user."""


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def check_name(name: str) -> str:
    """The name, or TokenError saying what a name may contain."""
    if not _NAME.fullmatch(name):
        raise TokenError(
            f"invalid token name {name!r}: 1 to 64 characters, letters, digits, space and _ . @ -, "
            "starting with a letter or digit"
        )
    return name


async def create_token(db: Database, name: str) -> str:
    """Store a new token under ``name`` and return it; it cannot be shown again."""
    check_name(name)
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    row = ApiToken(name=name, token_hash=hash_token(token), created_at=utcnow())
    taken = TokenError(f"a token named {name!r} already exists (revoke it first)")
    try:
        async with db.session() as session, session.begin():
            if await session.scalar(select(ApiToken.id).where(ApiToken.name == name)) is not None:
                raise taken
            session.add(row)
    except IntegrityError:  # created concurrently under the same name
        raise taken from None
    return token


async def list_tokens(db: Database) -> list[ApiToken]:
    """Every token, by name (hashes included: callers show name and dates only)."""
    async with db.session() as session:
        return list(await session.scalars(select(ApiToken).order_by(ApiToken.name)))


async def revoke_token(db: Database, name: str) -> bool:
    """Delete the token called ``name``; False when there is none. Effective immediately."""
    async with db.session() as session, session.begin():
        result = await session.execute(delete(ApiToken).where(ApiToken.name == name))
    return bool(result.rowcount)


async def verify_token(db: Database, token: str) -> ApiToken | None:
    """The stored token matching ``token``, or None; refreshes ``last_used_at`` once a minute."""
    if not token or len(token) > MAX_TOKEN_LENGTH:
        return None
    digest = hash_token(token)
    async with db.session() as session, session.begin():
        row = await session.scalar(select(ApiToken).where(ApiToken.token_hash == digest))
        if row is None or not hmac.compare_digest(row.token_hash, digest):
            return None
        now = utcnow()
        if row.last_used_at is None or now - row.last_used_at >= LAST_USED_PRECISION:
            row.last_used_at = now  # flushed by the commit at the end of the block
    return row
