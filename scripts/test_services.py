#!/usr/bin/env python3
"""Run a command (the test suite) with the servers it talks to on 127.0.0.1.

The tests need Mosquitto on 127.0.0.1:1883 (anonymous) and PostgreSQL on 127.0.0.1:5432
(trust auth, a database named `test`). A server already listening there is used as it is.
Otherwise, when its programs are installed, a private one is started for the command's run,
its configuration and data in a temporary directory, and removed afterwards. When neither
is possible the command is not run: one line says what is missing and what to install.

    scripts/test_services.py .venv/bin/pytest -p no:cacheprovider

COAP_TEST_MQTT_PORT and COAP_TEST_PG_PORT choose other ports (tests/test_test_services.py
uses them to try this script without touching the machine's servers); MOSQUITTO and
PG_BINDIR choose the programs (default: `mosquitto` on PATH or /usr/sbin/mosquitto, the
newest /usr/lib/postgresql/<version>/bin).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

HOST = "127.0.0.1"
START_TIMEOUT_S = 30.0


class ServiceError(Exception):
    """A server the tests need can be neither found nor started (one line for the user)."""


def listening(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:`port`."""
    try:
        with socket.create_connection((HOST, port), timeout=1.0):
            return True
    except OSError:
        return False


def mosquitto_binary() -> str | None:
    chosen = os.environ.get("MOSQUITTO") or shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    return chosen if os.access(chosen, os.X_OK) else None


def postgres_bindir() -> Path | None:
    chosen = os.environ.get("PG_BINDIR")
    if chosen:
        candidates = [Path(chosen)]
    else:
        versions = Path("/usr/lib/postgresql").glob("*/bin")
        candidates = sorted(versions, key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)
    for bindir in reversed(candidates):
        if all(os.access(bindir / name, os.X_OK) for name in ("initdb", "pg_ctl", "createdb")):
            return bindir
    return None


def wait_listening(port: int, alive: Callable[[], bool], what: str, log: Path) -> None:
    """Until `port` accepts connections; ServiceError if the server exits or takes too long."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while not listening(port):
        if not alive():
            raise ServiceError(f"{what} exited at start: {last_line(log)}")
        if time.monotonic() > deadline:
            raise ServiceError(f"{what} did not listen on {HOST}:{port} within {START_TIMEOUT_S:.0f} s")
        time.sleep(0.05)  # a port has no event to wait for


def last_line(log: Path) -> str:
    lines = log.read_text(errors="replace").strip().splitlines() if log.exists() else []
    return lines[-1] if lines else "(no output)"


@contextlib.contextmanager
def private_mosquitto(binary: str, port: int, workdir: Path) -> Iterator[None]:
    """Mosquitto on 127.0.0.1:`port`, anonymous, no persistence; stopped on exit."""
    conf, log = workdir / "mosquitto.conf", workdir / "mosquitto.log"
    conf.write_text(f"listener {port} {HOST}\nallow_anonymous true\nlog_dest stderr\n")
    with log.open("wb") as out:
        # Its own session: a Ctrl-C reaches the tests, which still need the broker to finish.
        process = subprocess.Popen(
            [binary, "-c", str(conf)], stdin=subprocess.DEVNULL, stdout=out, stderr=out,
            start_new_session=True,
        )
    try:
        wait_listening(port, lambda: process.poll() is None, "mosquitto", log)
        print(f"test services: started a private Mosquitto on {HOST}:{port}", file=sys.stderr)
        yield
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def as_postgres_user(workdir: Path) -> list[str]:
    """The command prefix to run PostgreSQL's programs: initdb refuses to run as root."""
    if os.geteuid() != 0:
        return []
    try:
        user = pwd.getpwnam("postgres")
    except KeyError:
        raise ServiceError(
            "initdb refuses to run as root and there is no 'postgres' user to run it as: "
            "run the tests as another user, or start PostgreSQL on "
            f"{HOST}:{pg_port()} yourself"
        ) from None
    os.chown(workdir, user.pw_uid, user.pw_gid)
    return ["runuser", "-u", "postgres", "--"]


def run_step(command: list[str], what: str) -> None:
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        output = (done.stderr or done.stdout).strip().splitlines()
        raise ServiceError(f"{what} failed: {output[-1] if output else f'exit {done.returncode}'}")


@contextlib.contextmanager
def private_postgres(bindir: Path, port: int, workdir: Path) -> Iterator[None]:
    """A throw-away cluster on 127.0.0.1:`port`: trust auth, superuser postgres, database
    `test`, its socket in `workdir` (never the machine's /var/run/postgresql); stopped on exit."""
    prefix = as_postgres_user(workdir)
    data, log = workdir / "data", workdir / "postgres.log"
    run_step(
        [*prefix, str(bindir / "initdb"), "-D", str(data), "--auth=trust", "--username=postgres",
         "--encoding=UTF8", "--locale=C", "--no-sync"],
        "initdb",
    )
    options = f"-p {port} -k {workdir} -c listen_addresses={HOST} -c fsync=off"
    pg_ctl = [*prefix, str(bindir / "pg_ctl"), "-D", str(data)]
    run_step([*pg_ctl, "-l", str(log), "-o", options, "-w", "start"], "pg_ctl start")
    try:
        run_step(
            [*prefix, str(bindir / "createdb"), "-h", HOST, "-p", str(port), "-U", "postgres", "test"],
            "createdb test",
        )
        print(f"test services: started a private PostgreSQL on {HOST}:{port}", file=sys.stderr)
        yield
    finally:
        subprocess.run([*pg_ctl, "-m", "immediate", "-w", "stop"], capture_output=True, check=False)


def mqtt_port() -> int:
    return int(os.environ.get("COAP_TEST_MQTT_PORT", "1883"))


def pg_port() -> int:
    return int(os.environ.get("COAP_TEST_PG_PORT", "5432"))


def plan() -> list[Callable[[Path], contextlib.AbstractContextManager[None]]]:
    """The private servers to start; ServiceError naming everything that is missing."""
    starts: list[Callable[[Path], contextlib.AbstractContextManager[None]]] = []
    missing: list[str] = []
    mqtt, pg = mqtt_port(), pg_port()
    if not listening(mqtt):
        binary = mosquitto_binary()
        if binary is None:
            missing.append(f"Mosquitto (nothing listens on {HOST}:{mqtt}; apt-get install mosquitto)")
        else:
            starts.append(lambda workdir: private_mosquitto(binary, mqtt, workdir))
    if not listening(pg):
        bindir = postgres_bindir()
        if bindir is None:
            missing.append(f"PostgreSQL (nothing listens on {HOST}:{pg}; apt-get install postgresql)")
        else:
            starts.append(lambda workdir: private_postgres(bindir, pg, workdir))
    if missing:
        raise ServiceError("the tests need " + " and ".join(missing))
    return starts


def run(command: list[str]) -> int:
    with contextlib.ExitStack() as stack:
        try:
            for start in plan():
                workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="coap-test-")))
                stack.enter_context(start(workdir))
        except ServiceError as exc:
            print(f"test services: {exc}", file=sys.stderr)
            return 2
        return subprocess.run(command, check=False).returncode


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: scripts/test_services.py COMMAND [ARG...]", file=sys.stderr)
        return 2
    # A plain `kill` of this script still stops the private servers (SystemExit unwinds).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    return run(argv)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
