"""Encryption at rest for device secrets (Fernet) and derived keys for other uses.

The key lives in ``<config_dir>/.storage/secret.key`` (file 0600, directory
0700), apart from the database: a copied or leaked database alone does not
reveal any device key. Losing the key file makes the stored secrets useless,
so it is created once and never rewritten. Nothing here logs key material.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import re
import stat
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

_LOGGER = logging.getLogger(__name__)

STORAGE_DIR = ".storage"
KEY_FILE = "secret.key"
_HKDF_INFO_PREFIX = b"coap-driver/"
_KEY_FORMAT = re.compile(rb"[A-Za-z0-9_-]{43}=")


class SecretBoxError(Exception):
    """The key file is unusable or a token does not decrypt; one line for the user."""


class SecretBox:
    """Fernet encryption with a key kept in a file next to the configuration."""

    def __init__(self, key: bytes, path: Path | None = None) -> None:
        """``key`` is a Fernet key (32 url-safe base64-encoded bytes)."""
        self.path = path
        try:
            if not _KEY_FORMAT.fullmatch(key):
                raise ValueError("not a Fernet key")
            self._raw = base64.urlsafe_b64decode(key)
            self._fernet = Fernet(key)
        except ValueError:
            where = f"secret key file {path}" if path else "secret key"
            raise SecretBoxError(
                f"{where} is corrupt: expected a Fernet key (32 bytes, url-safe base64); "
                "restore it from a backup, without it the stored device secrets cannot be "
                "decrypted"
            ) from None

    def __repr__(self) -> str:  # never show the key
        return f"SecretBox(path={self.path})"

    @classmethod
    def load_or_create(cls, config_dir: Path) -> SecretBox:
        """Load ``<config_dir>/.storage/secret.key``, creating it (and the directory) if absent."""
        directory = Path(config_dir) / STORAGE_DIR
        path = directory / KEY_FILE
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            if not path.exists():
                _create_key_file(path)
            key = path.read_bytes().strip()
            mode = stat.S_IMODE(path.stat().st_mode)
        except OSError as exc:
            raise SecretBoxError(
                f"cannot use secret key file {path}: {exc.strerror or exc}"
            ) from None
        if mode & 0o077:
            _LOGGER.warning(
                "Secret key file %s is readable by other users (mode %o); run chmod 600 on it",
                path,
                mode,
            )
        return cls(key, path)

    def encrypt(self, data: bytes) -> bytes:
        return self._fernet.encrypt(data)

    def decrypt(self, token: bytes) -> bytes:
        try:
            return self._fernet.decrypt(token)
        except InvalidToken:
            raise SecretBoxError(
                f"cannot decrypt a stored secret with the key in {self.path or 'memory'}: "
                "the key file was replaced or the data is damaged"
            ) from None

    def derive_key(self, purpose: bytes) -> bytes:
        """A 32-byte subkey for ``purpose`` (e.g. b"join-r2"), stable for this key file.

        HKDF keeps subkeys independent of each other and of the Fernet keys.
        """
        if not purpose:
            raise ValueError("purpose must not be empty")
        hkdf = HKDF(
            algorithm=hashes.SHA256(), length=32, salt=None, info=_HKDF_INFO_PREFIX + purpose
        )
        return hkdf.derive(self._raw)


def _create_key_file(path: Path) -> None:
    """Write a fresh key atomically; if another process won the race, keep its key."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(Fernet.generate_key() + b"\n")
            handle.flush()
            os.fsync(handle.fileno())
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)  # never replaces an existing key
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    _LOGGER.info("Created secret key file %s; back it up with the database", path)
