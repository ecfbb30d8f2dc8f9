"""Shared fixtures: a real driver on loopback UDP with its real database."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from driver_core.device_client import CoapTiming, DeviceSession
from driver_core.driver import Driver
from driver_core.enrollment import DeviceInput, add_device
from driver_core.events import EVENT_UPLINK
from driver_core.uplink import Uplink

pytest_plugins = ["tests.storage_fixtures", "tests.api_fixtures"]

FAST = CoapTiming(ack_timeout=0.5, max_retransmit=2)


def write_config(
    config_dir: Path, database_url: str | None = None, extra: str = "", coap_port: int = 0,
    http: str = "", coap: str = "",
) -> None:
    """A configuration for tests: CoAP on a free loopback port, no MQTT unless `extra` adds it.

    `coap` and `http` add indented lines to those sections (e.g. "  auth_failures_per_minute: 0\n").
    """
    config_dir.mkdir(parents=True, exist_ok=True)
    database = f"database:\n  url: {database_url}\n" if database_url else ""
    (config_dir / "configuration.yaml").write_text(
        f"coap:\n  host: 127.0.0.1\n  port: {coap_port}\n{coap}http:\n  host: 127.0.0.1\n  port: 0\n{http}"
        f"{database}{extra}",
        encoding="utf-8",
    )


class UplinkLog:
    """Collects uplink events from the bus and lets a test await the n-th one."""

    def __init__(self) -> None:
        self.items: list[Uplink] = []
        self._grew = asyncio.Event()

    def __call__(self, uplink: Uplink) -> None:
        self.items.append(uplink)
        self._grew.set()

    async def wait_for(self, count: int, timeout: float = 10.0) -> list[Uplink]:
        async with asyncio.timeout(timeout):
            while len(self.items) < count:
                self._grew.clear()
                await self._grew.wait()
        return self.items


@contextlib.asynccontextmanager
async def started_driver(config_dir: Path) -> AsyncIterator[Driver]:
    """The driver of `config_dir`, started; stopped on exit, whatever happened inside."""
    driver = Driver(config_dir)
    await driver.start()
    try:
        yield driver
    finally:
        await driver.stop()


@pytest.fixture
async def running_driver(tmp_path: Path) -> AsyncIterator[Driver]:
    config_dir = tmp_path / "config"
    write_config(config_dir)
    async with started_driver(config_dir) as driver:
        yield driver


@pytest.fixture
def uplinks(running_driver: Driver) -> UplinkLog:
    log = UplinkLog()
    running_driver.bus.listen(EVENT_UPLINK, log)
    return log


def make_device(serial: str, hw_type: int, index: int) -> DeviceInput:
    return DeviceInput(
        serial=serial,
        hw_type=hw_type,
        sender_id=bytes([0xA0, index]),
        master_secret=bytes(range(index, index + 16)),
        master_salt=bytes([index] * 8),
    )


@pytest.fixture
def enroll(running_driver: Driver) -> Callable:
    async def enroll_device(device: DeviceInput) -> DeviceSession:
        return await enrolled_session(running_driver, device)

    return enroll_device


async def enrolled_session(driver: Driver, device: DeviceInput, **kwargs) -> DeviceSession:
    """Enroll `device` on `driver` and return the device's side of it (not JOINed yet)."""
    await add_device(driver.db, driver.box, device)
    return session_for(driver, device, **kwargs)


def session_for(driver: Driver, device: DeviceInput, **kwargs) -> DeviceSession:
    return DeviceSession(
        device.sender_id, device.master_secret, device.master_salt, "127.0.0.1", driver.coap_port,
        timing=FAST, **kwargs,
    )


@pytest.fixture
def restore_levels() -> Iterator[None]:
    """For tests that change global log levels: put every logger's level back afterwards."""
    manager = logging.getLogger().manager
    saved = {n: lg.level for n, lg in manager.loggerDict.items() if isinstance(lg, logging.Logger)}
    root = logging.getLogger().level
    yield
    logging.getLogger().setLevel(root)
    for name, logger in manager.loggerDict.items():
        if isinstance(logger, logging.Logger):
            logger.setLevel(saved.get(name, logging.NOTSET))
