"""State a restore must coordinate with a running driver: the run lock and the JOIN epoch.

* Every running driver holds a shared lock on ``<config>/.storage/driver.lock``;
  ``coap-driver restore`` takes it exclusively, so it refuses to overwrite the
  database and keys under a running driver.
* The key that signs R2 values of the B.2 JOIN (join_tokens.py) is derived from
  the secret key and an *epoch* that every restore renews: an R2 handed out
  before the restore no longer verifies, so a JOIN step 3 recorded before the
  restore cannot bring back a context the restore dropped (RFC 8613 B.1/B.2).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
from pathlib import Path

from .storage.secretbox import STORAGE_DIR, SecretBox

LOCK_FILE = "driver.lock"
EPOCH_FILE = "join-epoch"


class RunLockError(Exception):
    """A driver is running on this configuration directory."""


def _lock_path(config_dir: Path) -> Path:
    directory = Path(config_dir) / STORAGE_DIR
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    return directory / LOCK_FILE


class RunLock:
    """An advisory lock on the configuration directory (flock: released if the process dies)."""

    def __init__(self, config_dir: Path) -> None:
        self.path = _lock_path(config_dir)
        self._fd: int | None = None

    def acquire_shared(self) -> None:
        """Held by a running driver; any number of drivers may share it."""
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_SH)

    def acquire_exclusive(self) -> None:
        """Held by a restore; RunLockError at once if a driver runs."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunLockError(
                f"a driver is running on {self.path.parent.parent} (it holds {self.path}); "
                "stop it before restoring"
            ) from None
        self._fd = fd

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def join_token_key(box: SecretBox, config_dir: Path) -> bytes:
    """The R2 signing key: HKDF of the secret key for "join-r2", plus the epoch after a restore."""
    path = Path(config_dir) / STORAGE_DIR / EPOCH_FILE
    try:
        epoch = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        epoch = ""
    return box.derive_key(b"join-r2" + (b"/" + epoch.encode() if epoch else b""))


def renew_join_epoch(config_dir: Path) -> str:
    """A new epoch: every R2 issued before this call stops verifying."""
    path = Path(config_dir) / STORAGE_DIR / EPOCH_FILE
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    epoch = secrets.token_hex(16)
    tmp = path.with_name(f".{EPOCH_FILE}.{os.getpid()}.tmp")
    tmp.write_text(epoch + "\n", encoding="ascii")
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return epoch
