"""A whole driver in a process of its own, so a test can SIGKILL it (tests/test_faults.py).

Usage: python -m tests.driver_process CONFIG_DIR
Prints one JSON line {"coap_port": ..., "http_port": ...} once it listens, then runs
until stdin closes (a clean stop) or the process is killed.

`DriverProcess` starts and kills it from a test.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path

from driver_core import logs
from driver_core.driver import Driver

START_TIMEOUT_S = 30.0


async def main(config_dir: Path) -> None:
    driver = Driver(config_dir)
    logs.configure(driver.load().logger)  # as `coap-driver run` does: the log goes to stderr
    await driver.start()
    assert driver.api is not None
    print(json.dumps({"coap_port": driver.coap_port, "http_port": driver.api.port}), flush=True)
    try:
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    finally:
        await driver.stop()


class DriverProcess:
    """`python -m tests.driver_process` driven from a test: start, kill -9, clean stop."""

    def __init__(self, config_dir: Path, log_path: Path) -> None:
        self.config_dir = config_dir
        self.log_path = log_path  # the driver's stderr (its log), appended across restarts
        self.coap_port = 0
        self.http_port = 0
        self.started_in = 0.0  # seconds from exec to "listening"
        self._process: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    async def start(self) -> None:
        began = time.perf_counter()
        root = Path(__file__).resolve().parent.parent
        env = {**os.environ, "PYTHONPATH": str(root)}
        with self.log_path.open("ab") as log:
            self._process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "tests.driver_process", str(self.config_dir),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
                cwd=root,
                env=env,
            )
        assert self._process.stdout is not None
        try:
            async with asyncio.timeout(START_TIMEOUT_S):
                line = await self._process.stdout.readline()
        except TimeoutError:
            await self.kill()
            raise RuntimeError(f"driver did not start; log:\n{self.log()}") from None
        if not line:
            await self._process.wait()
            raise RuntimeError(f"driver exited with {self._process.returncode}; log:\n{self.log()}")
        ports = json.loads(line)
        self.coap_port, self.http_port = ports["coap_port"], ports["http_port"]
        self.started_in = time.perf_counter() - began

    async def kill(self) -> None:
        """SIGKILL: no cleanup of any kind runs in the driver."""
        process, self._process = self._process, None
        if process is None or process.returncode is not None:
            return
        process.send_signal(signal.SIGKILL)
        await process.wait()

    async def stop(self) -> None:
        """A clean stop (stdin closed), SIGKILL if it takes longer than 20 s."""
        process, self._process = self._process, None
        if process is None or process.returncode is not None:
            return
        assert process.stdin is not None
        process.stdin.close()
        try:
            async with asyncio.timeout(20):
                await process.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1])))
