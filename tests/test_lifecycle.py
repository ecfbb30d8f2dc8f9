"""The driver process's life: a clean stop on SIGTERM/SIGINT, a failed start that leaks nothing.

`coap-driver run` is started as a real process (the console entry point's module), devices send
uplinks over loopback UDP, a persistent subscriber on a private Mosquitto records what the driver
published. systemd, Docker and Kubernetes stop a service with SIGTERM; Ctrl-C sends SIGINT: both
must stop taking datagrams, answer what is being handled, publish the outbox and exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiocoap.numbers.codes import Code

from driver_core.enrollment import add_device
from driver_core.storage.db import Database
from driver_core.storage.secretbox import SecretBox
from tests.conftest import write_config
from tests.test_faults import (
    Fleet,
    KeepingBroker,
    MqttRx,
    device_session,
    fleet_devices,
    free_udp_port,
    in_device_order,
    join_all,
    keeping_broker,  # noqa: F401 - the fixture
    outbox_rows,
    stored_rx,
)

ROOT = Path(__file__).resolve().parent.parent
LISTENING = "coap-driver listening on UDP"
STOPPED = "coap-driver stopped cleanly"
EXIT_WITHIN_S = 10.0  # the figure: exit 0 within 10 s of SIGTERM under load


@dataclass
class DriverCommand:
    """`coap-driver ARGS` in a process of its own; its stderr (the log) kept line by line."""

    args: tuple[str, ...]
    stdout_lines: list[str] = field(default_factory=list)
    stderr_lines: list[str] = field(default_factory=list)
    process: asyncio.subprocess.Process | None = None
    _readers: list[asyncio.Task[None]] = field(default_factory=list)
    _line: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "driver_core", *self.args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        assert self.process.stdout is not None and self.process.stderr is not None
        self._readers = [
            asyncio.create_task(self._read(self.process.stdout, self.stdout_lines)),
            asyncio.create_task(self._read(self.process.stderr, self.stderr_lines)),
        ]

    async def _read(self, stream: asyncio.StreamReader, into: list[str]) -> None:
        async for raw in stream:
            into.append(raw.decode(errors="replace").rstrip("\n"))
            self._line.set()

    async def wait_for_line(self, text: str, within: float = 30.0, *, stdout: bool = False) -> str:
        """The first line containing `text` (stderr, or stdout), awaited as lines arrive."""
        lines = self.stdout_lines if stdout else self.stderr_lines
        try:
            async with asyncio.timeout(within):
                while True:
                    for line in lines:
                        if text in line:
                            return line
                    assert self.process is not None
                    if self.process.returncode is not None and all(r.done() for r in self._readers):
                        raise AssertionError(f"exited {self.process.returncode}; log:\n{self.log}")
                    self._line.clear()
                    await self._line.wait()
        except TimeoutError:
            raise AssertionError(f"no line with {text!r} within {within} s; log:\n{self.log}") from None

    async def wait(self, within: float) -> int:
        assert self.process is not None
        async with asyncio.timeout(within):
            code = await self.process.wait()
            await asyncio.gather(*self._readers)
        return code

    async def kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            await self.process.wait()
        for reader in self._readers:
            reader.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)

    @property
    def log(self) -> str:
        return "\n".join(self.stderr_lines)


@contextlib.asynccontextmanager
async def driver_command(*args: str) -> AsyncIterator[DriverCommand]:
    command = DriverCommand(args)
    await command.start()
    try:
        yield command
    finally:
        await command.kill()


# ---- item 2: SIGTERM / SIGINT under load -------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_signal_under_load_stops_cleanly_and_loses_nothing(
    tmp_path: Path, keeping_broker: KeepingBroker, signum: signal.Signals  # noqa: F811
) -> None:
    """10 devices send 10 uplinks/s each; the signal comes mid-load. The driver exits 0 within
    10 s, and every uplink it answered 2.04 (and every one it stored) is on MQTT exactly once."""
    config_dir = tmp_path / "config"
    url = f"sqlite+aiosqlite:///{config_dir / 'coap-driver.db'}"
    coap_port = free_udp_port()
    write_config(config_dir, database_url=url, coap_port=coap_port, extra=keeping_broker.driver_config)
    devices = fleet_devices(10, "S")
    db = Database(url)  # the test's own connection to the driver's SQLite file
    await db.start()
    fleet: Fleet | None = None
    try:
        box = SecretBox.load_or_create(config_dir)
        for device in devices:
            await add_device(db, box, device)
        async with driver_command("--config", str(config_dir), "run") as driver:
            await driver.wait_for_line(LISTENING)
            fleet = Fleet({d.serial: device_session(d, coap_port) for d in devices})
            await join_all(fleet.sessions)
            fleet.start(interval=0.1)
            await fleet.wait(lambda: len(fleet.acknowledged()) >= 100, 30, "100 uplinks before the signal")
            assert driver.process is not None
            driver.process.send_signal(signum)
            signalled = time.monotonic()
            code = await driver.wait(within=30)
            exited_in = time.monotonic() - signalled
            await fleet.stop()
            log = driver.log
        stored = await stored_rx(db)
        left_in_outbox = await outbox_rows(db)
        received = await MqttRx(keeping_broker.collector).wait_for(len(stored), within=10)
    finally:
        if fleet is not None:
            await fleet.stop()
        await db.stop()

    acknowledged = fleet.acknowledged()
    print(f"\n{signum.name}: exit {code} after {exited_in:.2f} s; {len(acknowledged)} acknowledged, "
          f"{len(stored)} stored, {len(received.first)} on MQTT")
    assert code == 0, log
    assert exited_in < EXIT_WITHIN_S
    assert len(acknowledged) >= 100
    assert acknowledged <= set(stored)
    assert len(stored) == len(set(stored))
    assert left_in_outbox == 0  # drained before the exit, not left for the next start
    assert sorted(received.first) == sorted(stored)  # every stored uplink on MQTT ...
    assert received.resent_by_driver == []  # ... exactly once
    assert in_device_order(received.first)
    assert "Traceback" not in log
    assert f"Received {signum.name}: stopping" in log
    assert log.splitlines()[-1].endswith(STOPPED)


@pytest.mark.timeout(60)
async def test_second_signal_stops_at_once_and_keeps_the_outbox(tmp_path: Path) -> None:
    """The broker is unreachable, so the outbox cannot drain (up to 30 s here): a second SIGTERM
    skips the wait, the driver exits 0 and the unpublished JOIN and uplink stay in the outbox."""
    config_dir = tmp_path / "config"
    url = f"sqlite+aiosqlite:///{config_dir / 'coap-driver.db'}"
    coap_port = free_udp_port()
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        dead_port = closed.getsockname()[1]
    write_config(
        config_dir, database_url=url, coap_port=coap_port,
        extra=f"mqtt:\n  broker: external\n  url: mqtt://127.0.0.1:{dead_port}\n"
        "shutdown:\n  drain_seconds: 30\n",
    )
    (device,) = fleet_devices(1, "Q")
    db = Database(url)
    await db.start()
    try:
        await add_device(db, SecretBox.load_or_create(config_dir), device)
        async with driver_command("--config", str(config_dir), "run") as driver:
            await driver.wait_for_line(LISTENING)
            fleet = Fleet({device.serial: device_session(device, coap_port)})
            await join_all(fleet.sessions)
            assert (await fleet.send(device.serial, 0)).code == Code.CHANGED
            assert driver.process is not None
            driver.process.send_signal(signal.SIGTERM)
            await driver.wait_for_line("Stopping: publishing 2 MQTT outbox row(s), up to 30 s")
            driver.process.send_signal(signal.SIGTERM)
            again = time.monotonic()
            code = await driver.wait(within=15)
            exited_in = time.monotonic() - again
        left_in_outbox = await outbox_rows(db)
    finally:
        await db.stop()
    assert code == 0, driver.log
    assert exited_in < 5.0
    assert "Received SIGTERM again: stopping at once" in driver.log
    assert "Traceback" not in driver.log
    assert left_in_outbox == 2  # the JOIN and the uplink, published after the next start


# ---- item 15: a start that fails leaks nothing -------------------------------------------------


@pytest.fixture
def taken_tcp_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


async def test_taken_mqtt_port_is_one_line_and_closes_everything(tmp_path: Path, taken_tcp_port: int) -> None:
    """The callbacks integration (an HTTP client session) starts before the MQTT broker fails."""
    config_dir = tmp_path / "config"
    write_config(
        config_dir, extra=f"callbacks:\nmqtt:\n  broker: builtin\n  builtin_port: {taken_tcp_port}\n"
    )
    async with driver_command("--config", str(config_dir), "run") as driver:
        code = await driver.wait(within=30)
    assert code == 2
    assert "Traceback" not in driver.log
    assert "Unclosed" not in driver.log, driver.log
    errors = [line for line in driver.stderr_lines if line.startswith("coap-driver:")]
    assert errors == [
        f"coap-driver: mqtt.builtin_port: port {taken_tcp_port} on 127.0.0.1 is already in use "
        "(another MQTT broker, e.g. Mosquitto, may be running); choose another builtin_port or use "
        "the external broker"
    ]
    assert driver.stderr_lines[-1] == errors[0]  # nothing logged after the error line
