"""Who may use the built-in MQTT broker, and for what.

Two kinds of users: the driver's own user (publishes uplinks, downlink status,
availability; reads commands) and application users (read everything, write
only command topics). Their passwords are generated here on first run and kept
in ``<config>/.storage/mqtt_credentials.json`` (mode 0600): an Argon2 hash for
the broker to check and the plaintext encrypted with the secret box, so the
CLI and the web panel can show it to the operator. The broker never sees a
plaintext; a copied file without ``secret.key`` reveals no password.

Rotation rewrites the file; a running broker notices the change (file stamp),
re-reads it and disconnects the sessions of users whose password changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import secrets
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pwdlib import PasswordHash
from pwdlib.hashers.argon2 import Argon2Hasher

from .storage.secretbox import STORAGE_DIR, SecretBox

_LOGGER = logging.getLogger(__name__)

CREDENTIALS_FILE = "mqtt_credentials.json"
ROLE_DRIVER = "driver"
ROLE_APPLICATION = "application"
ROLES = (ROLE_DRIVER, ROLE_APPLICATION)
DRIVER_USER = "coap-driver"
APPLICATION_USER = "application"
PASSWORD_BYTES = 18  # 24 url-safe characters
_FORMAT = 1
_HASHER = PasswordHash((Argon2Hasher(),))


class CredentialsError(Exception):
    """The credentials file is unusable or a request about it is wrong; one line for the user."""


@dataclass(frozen=True, slots=True)
class BrokerUser:
    name: str
    role: str
    password_hash: str
    password_token: str  # the plaintext, Fernet-encrypted with the secret box


@dataclass(frozen=True, slots=True)
class ShownUser:
    """A user as shown to the operator (CLI, web panel)."""

    name: str
    role: str
    password: str


def is_loopback(host: str) -> bool:
    """True for an address (or name) that only this machine can reach."""
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)


def credentials_path(config_dir: Path) -> Path:
    return Path(config_dir) / STORAGE_DIR / CREDENTIALS_FILE


def _new_password() -> str:
    return secrets.token_urlsafe(PASSWORD_BYTES)


class CredentialStore:
    """The broker users of one configuration directory."""

    def __init__(self, config_dir: Path, box: SecretBox) -> None:
        self.path = credentials_path(config_dir)
        self._box = box
        self._users: dict[str, BrokerUser] = {}
        self._stamp: tuple[int, int, int] | None = None

    # -- file ---------------------------------------------------------------------------

    def _file_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def ensure(self) -> dict[str, BrokerUser]:
        """Read the file, creating it with the driver and an application user on first run."""
        if not self.path.exists():
            users = {
                DRIVER_USER: self._make(DRIVER_USER, ROLE_DRIVER, _new_password()),
                APPLICATION_USER: self._make(APPLICATION_USER, ROLE_APPLICATION, _new_password()),
            }
            self._write(users, exclusive=True)
            _LOGGER.info(
                "Created built-in MQTT broker credentials in %s (see: coap-driver broker credentials)",
                self.path,
            )
        return self.load()

    def load(self) -> dict[str, BrokerUser]:
        stamp = self._file_stamp()
        if stamp is not None and stamp == self._stamp:
            return self._users
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
            users = {
                name: BrokerUser(name, entry["role"], entry["password_hash"], entry["password"])
                for name, entry in raw["users"].items()
            }
        except FileNotFoundError:
            raise CredentialsError(
                f"no broker credentials yet ({self.path}); they are created when the "
                "built-in broker first starts, or by: coap-driver broker credentials"
            ) from None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CredentialsError(f"broker credentials file {self.path} is damaged: {exc}") from None
        for user in users.values():
            if user.role not in ROLES:
                raise CredentialsError(
                    f"broker credentials file {self.path}: user {user.name!r} has unknown "
                    f"role {user.role!r}"
                )
        self._users, self._stamp = users, stamp
        return users

    def _make(self, name: str, role: str, password: str) -> BrokerUser:
        return BrokerUser(
            name, role, _HASHER.hash(password), self._box.encrypt(password.encode()).decode()
        )

    def _write(self, users: dict[str, BrokerUser], exclusive: bool = False) -> None:
        """Atomically replace (or, exclusive, create) the file, readable by the owner only."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        data = {
            "format": _FORMAT,
            "users": {
                u.name: {"role": u.role, "password_hash": u.password_hash, "password": u.password_token}
                for u in users.values()
            },
        }
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(data, handle, indent=1)
                handle.flush()
                os.fsync(handle.fileno())
            if exclusive:
                with contextlib.suppress(FileExistsError):
                    os.link(tmp, self.path)  # another process won the race: keep its file
            else:
                os.replace(tmp, self.path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    # -- operations -------------------------------------------------------------------------

    def shown(self) -> list[ShownUser]:
        """Every user with its plaintext password (for the operator only)."""
        return [
            ShownUser(u.name, u.role, self._box.decrypt(u.password_token.encode()).decode())
            for u in sorted(self.load().values(), key=lambda u: (u.role != ROLE_DRIVER, u.name))
        ]

    def password(self, name: str) -> str:
        user = self.load().get(name)
        if user is None:
            raise CredentialsError(f"no broker user named {name!r}")
        return self._box.decrypt(user.password_token.encode()).decode()

    def rotate(self, names: Iterable[str] | None = None) -> list[ShownUser]:
        """New passwords for `names` (all users when None); returns the rotated users."""
        users = dict(self.ensure())
        chosen = list(users) if names is None else list(names)
        for name in chosen:
            if name not in users:
                raise CredentialsError(
                    f"no broker user named {name!r} (users: {', '.join(sorted(users))})"
                )
        rotated = []
        for name in chosen:
            password = _new_password()
            users[name] = self._make(name, users[name].role, password)
            rotated.append(ShownUser(name, users[name].role, password))
        self._write(users)
        self.load()
        return rotated

    def add(self, name: str, role: str = ROLE_APPLICATION) -> ShownUser:
        users = dict(self.ensure())
        if not name or any(c in name for c in ":#+/ ") or len(name) > 64:
            raise CredentialsError(
                f"invalid broker user name {name!r}: 1-64 characters, no spaces, ':', '/', '+' or '#'"
            )
        if name in users:
            raise CredentialsError(f"a broker user named {name!r} already exists")
        if role not in ROLES:
            raise CredentialsError(f"unknown role {role!r} (use {' or '.join(ROLES)})")
        password = _new_password()
        users[name] = self._make(name, role, password)
        self._write(users)
        self.load()
        return ShownUser(name, role, password)

    def remove(self, name: str) -> None:
        users = dict(self.ensure())
        if name not in users:
            raise CredentialsError(f"no broker user named {name!r}")
        if name == DRIVER_USER:
            raise CredentialsError("the driver's own broker user cannot be removed (rotate it instead)")
        del users[name]
        self._write(users)
        self.load()


def topic_matches(topic: str, topic_filter: str) -> bool:
    """MQTT filter matching (`+` one level, `#` the rest) of a topic name."""
    levels = topic.split("/")
    parts = topic_filter.split("/")
    for index, part in enumerate(parts):
        if part == "#":
            return True
        if index >= len(levels):
            return False
        if part != "+" and part != levels[index]:
            return False
    return len(levels) == len(parts)


class BrokerAccess:
    """The broker's access policy: who may connect, publish and subscribe.

    `writable` lists the topic filters application users (and anonymous clients,
    where allowed) may publish on; it is called per check so a changed command
    topic applies at once. Anonymous clients get `anonymous_role`.
    """

    def __init__(
        self,
        store: CredentialStore | None,
        *,
        allow_anonymous: bool,
        writable: Callable[[], list[str]] = list,
        anonymous_role: str = ROLE_APPLICATION,
    ) -> None:
        self.store = store
        self.allow_anonymous = allow_anonymous
        self.anonymous_role = anonymous_role
        self.writable = writable
        self._verified: dict[tuple[str, str], str] = {}  # (user, hash) -> password that matched
        self._snapshot: dict[str, tuple[str, str]] | None = None  # see changed_users()

    async def authenticate(self, username: str | None, password: str | None) -> bool:
        """A named client must present its current password; a nameless one only if allowed."""
        if not username:
            return self.allow_anonymous
        if self.store is None:
            return False
        try:
            user = self.store.load().get(username)
        except CredentialsError as exc:
            _LOGGER.error("MQTT broker: %s", exc)
            return False
        if user is None or password is None:
            return False
        key = (username, user.password_hash)
        if self._verified.get(key) == password:
            return True
        ok = await asyncio.to_thread(_HASHER.verify, password, user.password_hash)
        if ok:
            self._verified = {k: v for k, v in self._verified.items() if k[0] != username}
            self._verified[key] = password
        return ok

    def role(self, username: str | None) -> str | None:
        if not username:
            return self.anonymous_role if self.allow_anonymous else None
        if self.store is None:
            return None
        try:
            user = self.store.load().get(username)
        except CredentialsError:
            return None
        return user.role if user is not None else None

    def may_publish(self, username: str | None, topic: str) -> bool:
        role = self.role(username)
        if role == ROLE_DRIVER:
            return True
        if role == ROLE_APPLICATION:
            return any(topic_matches(topic, f) for f in self.writable())
        return False

    def may_subscribe(self, username: str | None, topic_filter: str) -> bool:
        return self.role(username) is not None

    def changed_users(self) -> set[str] | None:
        """Users whose password or role changed since the last call (None: nothing changed).

        Compared with a snapshot of its own, not with the file stamp: a login may
        re-read the file first, and its sessions must still be found and closed.
        """
        if self.store is None:
            return None
        try:
            current = {name: (u.password_hash, u.role) for name, u in self.store.load().items()}
        except CredentialsError as exc:
            _LOGGER.error("MQTT broker: %s", exc)
            return None
        before, self._snapshot = self._snapshot, current
        if before is None:
            return None
        changed = {n for n in set(before) | set(current) if before.get(n) != current.get(n)}
        return changed or None


def driver_credentials(config_dir: Path, box: SecretBox) -> tuple[str, str]:
    """The driver's own username and password for the built-in broker (created if needed)."""
    store = CredentialStore(config_dir, box)
    store.ensure()
    return DRIVER_USER, store.password(DRIVER_USER)


def describe_users(users: list[ShownUser]) -> list[dict[str, Any]]:
    return [{"username": u.name, "role": u.role, "password": u.password} for u in users]
