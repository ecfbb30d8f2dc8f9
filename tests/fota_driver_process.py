"""A driver with its FOTA service in a process of its own (tests/test_fota.py measures its memory).

Usage: python -m tests.fota_driver_process CONFIG_DIR; prints the CoAP port, runs until stdin closes.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from driver_core.driver import Driver
from driver_core.fota import start_fota, stop_fota


async def main(config_dir: Path) -> None:
    driver = Driver(config_dir)
    await driver.start()
    await start_fota(driver)
    print(driver.coap_port, flush=True)
    try:
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    finally:
        await stop_fota(driver)
        await driver.stop()


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1])))
