"""The driver process's life: a clean stop on SIGTERM/SIGINT, a failed start that leaks nothing.

`coap-driver run` is started as a real process (the console entry point's module), devices send
uplinks over loopback UDP, a persistent subscriber on a private Mosquitto records what the driver
published. systemd, Docker and Kubernetes stop a service with SIGTERM; Ctrl-C sends SIGINT: both
must stop taking datagrams, answer what is being handled, publish the outbox and exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiomqtt
import pytest
from aiocoap.numbers.codes import Code

from driver_core.cli import DEMO_CSV
from driver_core.config import DRAIN_SECONDS
from driver_core.enrollment import add_device
from driver_core.storage.db import Database
from driver_core.storage.secretbox import SecretBox
from tests.conftest import write_config
from tests.test_deployment import compose, exec_form, instruction
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
    assert set(stored) == acknowledged  # what was being handled at the signal was answered too
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


# ---- item 14: the demo's broker port and the commands it prints -------------------------------


def port_taken(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


async def run_printed(line: str, *extra: str) -> asyncio.subprocess.Process:
    """The command after the demo's label, exactly as printed (plus `extra` options)."""
    argv = shlex.split(line.split(":  ", 1)[1].strip())
    return await asyncio.create_subprocess_exec(
        *argv, *extra, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )


@pytest.mark.timeout(120)
async def test_demo_moves_to_1884_when_1883_is_taken_and_its_commands_work(tmp_path: Path) -> None:
    """The machine's Mosquitto holds 1883 here: the demo's broker takes 1884, and the
    `mosquitto_sub` / `mosquitto_pub` lines it prints work as printed."""
    assert port_taken(1883), "this test needs the machine's Mosquitto on 127.0.0.1:1883"
    config_dir = tmp_path / "config"
    write_config(config_dir)
    async with driver_command("--config", str(config_dir), "demo", "--time-scale", "600") as demo:
        await demo.wait_for_line("web panel on", stdout=True)
        serials = [row.split(",")[0] for row in (config_dir / DEMO_CSV).read_text().splitlines()[1:]]
        assert serials == ["D0000001", "D0000002", "D0000003"]
        assert demo.stdout_lines[:4] == [
            "demo: port 1883 is taken (another MQTT broker?); the built-in broker uses 1884",
            "demo: devices D0000001, D0000002, D0000003; built-in MQTT broker on 127.0.0.1:1884",
            "demo: watch the uplinks:  mosquitto_sub -h 127.0.0.1 -p 1884 "
            "-t 'application/COAP/device/+/uplink' -v",
            "demo: send a command:     mosquitto_pub -h 127.0.0.1 -p 1884 "
            "-t 'application/COAP/device/D0000001/downlink' -m '{\"command\": \"reboot\", \"parameter\": 1}'",
        ]
        uplink = await run_printed(demo.stdout_lines[2], "-C", "1", "-W", "30")
        out, err = await uplink.communicate()
        assert uplink.returncode == 0, err
        topic, document = out.decode().split(" ", 1)
        assert topic in {f"application/COAP/device/{serial}/uplink" for serial in serials}
        assert json.loads(document)["serial"] in serials

        await demo.wait_for_line("Receiving downlink commands on")  # the driver subscribed
        async with aiomqtt.Client("127.0.0.1", 1884) as watcher:
            await watcher.subscribe("application/COAP/device/D0000001/downlink/status", qos=1)
            command = await run_printed(demo.stdout_lines[3])
            assert (await command.wait()) == 0
            async with asyncio.timeout(30):
                status = await anext(aiter(watcher.messages))
        assert json.loads(status.payload)["status"] == 0  # queued for D0000001: pending

        assert demo.process is not None
        demo.process.send_signal(signal.SIGINT)
        assert await demo.wait(within=20) == 0, demo.log
    assert demo.log.splitlines()[-1].endswith(STOPPED)


async def test_demo_with_1883_and_1884_taken_says_so(tmp_path: Path, taken_tcp_port: int) -> None:
    assert port_taken(1883), "this test needs the machine's Mosquitto on 127.0.0.1:1883"
    config_dir = tmp_path / "config"
    write_config(config_dir)
    with socket.socket() as blocker:
        blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past earlier TIME_WAITs
        blocker.bind(("127.0.0.1", 1884))
        blocker.listen()
        async with driver_command("--config", str(config_dir), "demo") as demo:
            code = await demo.wait(within=30)
    assert code == 2
    assert demo.stderr_lines[-1] == (
        "coap-driver: demo: the built-in MQTT broker needs TCP port 1883 or 1884 on 127.0.0.1, "
        "and both are taken (other MQTT brokers?); stop one, or set mqtt.builtin_port"
    )
    assert "Traceback" not in demo.log


# ---- the container: docker stop sends SIGTERM to the driver itself --------------------------------


def test_container_stop_reaches_the_driver_within_its_grace_period() -> None:
    """Exec-form ENTRYPOINT (the driver is PID 1, no shell swallowing the signal), SIGTERM as
    the stop signal, and a grace period longer than the drain plus the rest of the stop."""
    assert exec_form(instruction("ENTRYPOINT")[0])[0] == "coap-driver"
    assert instruction("STOPSIGNAL") == ["SIGTERM"]
    grace = compose()["services"]["driver"]["stop_grace_period"]
    assert grace == "20s" and int(grace[:-1]) > DRAIN_SECONDS + EXIT_WITHIN_S
