"""scripts/test_services.py, the wrapper of `make test`: it starts a private Mosquitto and a
throw-away PostgreSQL where nothing listens, and says what to install when it cannot.

The machine's servers on 1883/5432 are never stopped here (other runs use them): the script
is pointed at free ports through COAP_TEST_MQTT_PORT / COAP_TEST_PG_PORT instead.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.mqtt_helpers import free_port

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "test_services.py"
TEMP = Path(os.environ.get("TMPDIR", "/tmp"))

# Run as the wrapped command: uses both servers, says what it got.
PROBE = """
import asyncio, os, aiomqtt, asyncpg

async def main():
    mqtt, pg = int(os.environ["COAP_TEST_MQTT_PORT"]), int(os.environ["COAP_TEST_PG_PORT"])
    async with aiomqtt.Client("127.0.0.1", mqtt) as client:
        await client.subscribe("probe/#", qos=1)
        await client.publish("probe/x", b"through the private broker", qos=1)
        async for message in client.messages:
            print("mqtt:", message.payload.decode())
            break
    conn = await asyncpg.connect(host="127.0.0.1", port=pg, user="postgres", database="test")
    print("postgresql:", await conn.fetchval("SELECT current_database()"))
    await conn.close()

asyncio.run(main())
"""


def run_script(*command: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *command], env={**os.environ, **env},
        capture_output=True, text=True, timeout=120, check=False,
    )


def listening(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def workdirs() -> set[Path]:
    return set(TEMP.glob("coap-test-*"))


@pytest.mark.timeout(180)
def test_private_servers_started_where_nothing_listens_and_removed_after() -> None:
    mqtt, pg = free_port(), free_port()
    before = workdirs()
    done = run_script(
        sys.executable, "-c", PROBE, COAP_TEST_MQTT_PORT=str(mqtt), COAP_TEST_PG_PORT=str(pg)
    )
    assert (done.returncode, done.stdout) == (
        0, "mqtt: through the private broker\npostgresql: test\n"
    ), done.stderr
    assert done.stderr.splitlines() == [
        f"test services: started a private Mosquitto on 127.0.0.1:{mqtt}",
        f"test services: started a private PostgreSQL on 127.0.0.1:{pg}",
    ]
    assert (listening(mqtt), listening(pg)) == (False, False)  # both stopped ...
    assert workdirs() == before  # ... and their directories gone


def test_servers_already_listening_are_used_and_the_exit_status_passed_on() -> None:
    done = run_script(sys.executable, "-c", "print('ran'); raise SystemExit(3)")
    assert (done.returncode, done.stdout, done.stderr) == (3, "ran\n", "")


def test_missing_programs_fail_at_once_in_one_line(tmp_path: Path) -> None:
    mqtt, pg = free_port(), free_port()
    marker = tmp_path / "ran"
    done = run_script(
        "touch", str(marker), COAP_TEST_MQTT_PORT=str(mqtt), COAP_TEST_PG_PORT=str(pg),
        MOSQUITTO="/nonexistent/mosquitto", PG_BINDIR="/nonexistent",
    )
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == (
        f"test services: the tests need Mosquitto (nothing listens on 127.0.0.1:{mqtt}; "
        f"apt-get install mosquitto) and PostgreSQL (nothing listens on 127.0.0.1:{pg}; "
        "apt-get install postgresql)\n"
    )
    assert not marker.exists()  # the tests did not run
