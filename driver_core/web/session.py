"""The session cookie: signed (HMAC-SHA256), HttpOnly, SameSite=Lax, with its CSRF token.

Every visitor has a session, anonymous until login, so the login and
first-admin forms carry a CSRF token too. The cookie holds the user id and a
fingerprint of the password hash: deleting the user or changing the password
ends every session of that user. Nothing else about the user is trusted from it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass, field

COOKIE = "coap_driver_session"
LIFETIME_S = 12 * 3600  # sliding: renewed when half is used
CSRF_FIELD = "csrf_token"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass
class Session:
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    user_id: int | None = None
    fingerprint: str = ""
    expires: int = 0
    dirty: bool = True  # the cookie must be (re)sent

    def check_csrf(self, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(self.csrf.encode(), str(token).encode())


class SessionCodec:
    def __init__(self, key: bytes) -> None:
        self._key = key

    def fingerprint(self, password_hash: str) -> str:
        return _b64(hmac.new(self._key, password_hash.encode(), hashlib.sha256).digest()[:12])

    def _sign(self, body: bytes) -> str:
        return _b64(hmac.new(self._key, body, hashlib.sha256).digest())

    def dump(self, session: Session, now: float | None = None) -> str:
        now = time.time() if now is None else now
        session.expires = int(now) + LIFETIME_S
        body = json.dumps(
            {"c": session.csrf, "u": session.user_id, "f": session.fingerprint, "e": session.expires},
            separators=(",", ":"),
        ).encode()
        return f"{_b64(body)}.{self._sign(body)}"

    def load(self, cookie: str | None, now: float | None = None) -> Session:
        """The session in ``cookie``, or a new anonymous one if it is absent, forged or expired."""
        now = time.time() if now is None else now
        if not cookie or "." not in cookie or len(cookie) > 1024:
            return Session()
        encoded, signature = cookie.rsplit(".", 1)
        try:
            body = _unb64(encoded)
            if not hmac.compare_digest(self._sign(body), signature):
                return Session()
            data = json.loads(body)
            session = Session(
                csrf=str(data["c"]),
                user_id=data["u"] if isinstance(data["u"], int) else None,
                fingerprint=str(data["f"]),
                expires=int(data["e"]),
                dirty=False,
            )
        except (ValueError, KeyError, TypeError):
            return Session()
        if session.expires <= now:
            return Session()
        if session.expires - now < LIFETIME_S / 2:
            session.dirty = True  # slide
        return session
