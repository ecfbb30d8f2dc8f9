"""Owner-only files (0600) and directories (0700) whatever the umask; older ones tightened at start.

A real driver on a fresh configuration directory: SQLite with its -wal/-shm while writing,
the secret key, broker credentials, a firmware image uploaded through the REST API, a backup
written into the configuration directory.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import cbor2
import pytest
from aiocoap.numbers.codes import Code

from driver_core.backup import create_backup
from driver_core.config import ensure_config_dir
from driver_core.driver import Driver
from driver_core.enrollment import add_device
from tests.api_fixtures import client_for
from tests.conftest import make_device, session_for, write_config

IMAGE = bytes(range(256)) * 8


@pytest.fixture(params=[0o022, 0o000], ids=["umask022", "umask000"])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    previous = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(previous)


def modes(top: Path) -> dict[str, str]:
    """Every path under `top` (and `top`) with its permission bits in octal."""
    found = {".": oct(stat.S_IMODE(top.stat().st_mode))}
    for root, dirs, files in os.walk(top):
        for name in (*dirs, *files):
            path = Path(root) / name
            found[str(path.relative_to(top))] = oct(stat.S_IMODE(path.lstat().st_mode))
    return found


def owner_only(found: dict[str, str], top: Path) -> dict[str, str]:
    return {
        name: "0o700" if (top / name).is_dir() else "0o600" for name in found
    }


def tightened(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "driver_core.permissions"]


async def test_everything_is_created_owner_only(
    tmp_path: Path, umask: int, caplog: pytest.LogCaptureFixture
) -> None:
    config_dir = tmp_path / "config"
    ensure_config_dir(config_dir)  # as the driver's first run does
    write_config(config_dir)  # new content, same (existing) file
    caplog.set_level(logging.INFO)
    driver = Driver(config_dir)
    await driver.start()
    try:
        device = make_device("P0000001", 17, 33)
        await add_device(driver.db, driver.box, device)
        session = session_for(driver, device)
        assert (await session.join("1.0.0", 17)).code == Code.CHANGED
        assert (await session.post("rx", cbor2.dumps({1: 1}))).code == Code.CHANGED
        async with client_for(driver) as api:
            reply = await api.call(
                "POST", "/firmware", data=IMAGE, headers={"Content-Type": "application/octet-stream"},
                params={"hw_type": "17", "version": "2.0.0"},
            )
            assert reply.status == 201, reply.body
        await create_backup(driver.config, config_dir / "backup.tar.gz")
        found = modes(config_dir)
        for name in ["coap-driver.db", "coap-driver.db-wal", "coap-driver.db-shm", ".storage/secret.key",
                     "firmware", f"firmware/{reply.body['sha256']}.bin", "backup.tar.gz"]:
            assert name in found, (name, sorted(found))
        assert found == owner_only(found, config_dir)
    finally:
        await driver.stop()
    assert tightened(caplog) == []  # nothing was ever created open


async def test_older_installations_are_tightened_at_start_with_one_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config_dir = tmp_path / "config"
    write_config(config_dir)
    caplog.set_level(logging.INFO)
    driver = Driver(config_dir)
    await driver.start()
    await driver.stop()
    loose = {
        ".": 0o755, "coap-driver.db": 0o644, ".storage": 0o755, "configuration.yaml": 0o664,
    }
    for name, mode in loose.items():
        os.chmod(config_dir / name, mode)
    caplog.clear()
    driver = Driver(config_dir)
    await driver.start()
    try:
        found = modes(config_dir)
        assert found == owner_only(found, config_dir)
    finally:
        await driver.stop()
    named = ", ".join(str(config_dir / name) if name != "." else str(config_dir) for name in [
        ".", ".storage", "coap-driver.db", "configuration.yaml",
    ])
    assert tightened(caplog) == [
        f"Made 4 files and directories readable by their owner only (they were readable by "
        f"other users): {named}"
    ]
    caplog.clear()
    driver = Driver(config_dir)
    await driver.start()
    await driver.stop()
    assert tightened(caplog) == []
