"""Owner-only files and directories: the database, keys, firmware and backups are private.

Everything the driver writes under its configuration directory, and the SQLite
database wherever it lives, is created 0600 (files) / 0700 (directories)
whatever the umask: the mode is set explicitly at creation (os.open + fchmod).
SQLite gives its -wal and -shm files the mode of the database file, so creating
the database file ourselves before SQLite opens it makes those private too.
At start-up `tighten()` removes group/other bits left by older releases and
logs one line naming what it changed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

_LOGGER = logging.getLogger(__name__)

FILE_MODE = 0o600
DIR_MODE = 0o700


def private_dir(path: Path) -> None:
    """Create `path` and missing parents owner-only (an existing directory is left as it is)."""
    path = Path(path)
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=DIR_MODE)
        except FileExistsError:  # created meanwhile by another process
            continue
        os.chmod(directory, DIR_MODE)


def create_private_file(path: Path) -> bool:
    """Create an empty owner-only file unless it exists; True if created."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    except FileExistsError:
        return False
    try:
        os.fchmod(fd, FILE_MODE)
    finally:
        os.close(fd)
    return True


@contextlib.contextmanager
def private_output(path: Path, exclusive: bool = True, mode: int = FILE_MODE) -> Iterator[BinaryIO]:
    """An owner-only file to write (new if `exclusive`, else truncated), on disk when the block
    ends: backups and staged restore files, which may replace live ones."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC)
    with os.fdopen(os.open(path, flags, mode), "wb") as out:
        os.fchmod(out.fileno(), mode)
        yield out
        out.flush()
        os.fsync(out.fileno())


def open_private(path: Path) -> int:
    """A new owner-only file for writing (truncated if it exists); returns its descriptor."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    os.fchmod(fd, FILE_MODE)
    return fd


def _tighten_one(path: Path, changed: list[str]) -> None:
    try:
        status = path.lstat()
    except FileNotFoundError:
        return
    if stat.S_ISLNK(status.st_mode) or not status.st_mode & 0o077:
        return  # a symlink's target is not ours to change
    if status.st_uid != os.geteuid():
        return  # not ours (e.g. a mounted file): chmod would fail
    mode = stat.S_IMODE(status.st_mode) & 0o700 | (DIR_MODE if stat.S_ISDIR(status.st_mode) else FILE_MODE)
    try:
        os.chmod(path, mode)
    except OSError as exc:  # a read-only mount: say so, and start all the same
        _LOGGER.warning("Cannot make %s readable by its owner only: %s", path, exc.strerror or exc)
        return
    changed.append(str(path))


def tighten(config_dir: Path, extra: Iterable[Path] = ()) -> list[str]:
    """Make the configuration directory, everything in it and `extra` files owner-only.

    Returns what was changed (and logs it in one line): installations made by
    releases that created these files 0644/0755 get private at their next start.
    """
    changed: list[str] = []
    config_dir = Path(config_dir)
    _tighten_one(config_dir, changed)
    for root, dirs, files in os.walk(config_dir):
        for name in (*dirs, *files):
            _tighten_one(Path(root) / name, changed)
    for path in extra:
        _tighten_one(Path(path), changed)
    changed = sorted(set(changed))
    if changed:
        _LOGGER.warning(
            "Made %d files and directories readable by their owner only (they were readable "
            "by other users): %s", len(changed), ", ".join(changed),
        )
    return changed
