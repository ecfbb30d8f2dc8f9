"""The container deployment (Dockerfile, compose.yaml, deploy/), checked without a Docker engine.

This machine has no Docker engine, so the images are never built here. What can be checked
is: compose.yaml parses and its references resolve; the driver's configuration in deploy/
validates with the driver's own loader and agrees with compose on ports, host names, users
and the database; the Dockerfile's entrypoint is this project's console script; and the
image's health check command, run against the driver started by that very command line
with that configuration (hosts swapped for this machine's PostgreSQL and Mosquitto), says
healthy, then unhealthy once the driver is gone. Plus `/ops/health` itself.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
import yaml
from sqlalchemy.engine import make_url

from driver_core.config import CoreConfig
from driver_core.driver import Driver
from tests.conftest import write_config
from tests.mqtt_helpers import free_port
from tests.storage_fixtures import _admin_connection

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
DEPLOY_CONFIG = ROOT / "deploy" / "config"
HEALTHCHECK = ROOT / "deploy" / "healthcheck.py"
CONSOLE_SCRIPT = Path(sys.executable).with_name("coap-driver")
TEST_ENV = {"POSTGRES_PASSWORD": "pg-test-password", "MQTT_PASSWORD": "mqtt-test-password"}
_VARIABLE = re.compile(r"\$\{(\w+)(?::([-?])([^}]*))?\}")


# ---- reading the files as Docker would ---------------------------------------------------------


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?message} in every string of `value`."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        name, kind, rest = match.groups()
        if env.get(name):
            return env[name]
        if kind == "?":
            raise KeyError(f"{name}: {rest}")
        return rest or ""

    return _VARIABLE.sub(substitute, value)


def compose(env: dict[str, str] | None = None) -> dict[str, Any]:
    return interpolate(yaml.safe_load(COMPOSE.read_text(encoding="utf-8")), {**TEST_ENV, **(env or {})})


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        text = pending + stripped
        pending = ""
        keyword, _, args = text.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
    assert not pending, "the Dockerfile ends with a continuation backslash"
    return instructions


def instruction(name: str) -> list[str]:
    return [args for keyword, args in dockerfile() if keyword == name]


def exec_form(args: str) -> list[str]:
    """A JSON-array (exec form) argument list, after any --option=value flags."""
    while args.startswith("--"):
        args = args.split(" ", 1)[1].lstrip()
    if args.startswith("CMD "):
        args = args[4:]
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value)
    return value


def deploy_config_dir(target: Path) -> Path:
    """deploy/config copied with secrets.yaml made from its example, as the guide says."""
    shutil.copytree(DEPLOY_CONFIG, target)
    shutil.copy(target / "secrets.yaml.example", target / "secrets.yaml")
    return target


def load_deploy_config(target: Path) -> CoreConfig:
    """The configuration as the driver itself reads it (components, schemas, !secret)."""
    return Driver(deploy_config_dir(target)).load()


def container_ports(service: dict[str, Any]) -> set[tuple[int, str]]:
    """(container port, protocol) of each published port ("host:container[/proto]")."""
    ports = set()
    for entry in service["ports"]:
        container, _, protocol = entry.rsplit(":", 1)[1].partition("/")
        ports.add((int(container), protocol or "tcp"))
    return ports


# ---- compose.yaml ------------------------------------------------------------------------------


def test_compose_services_and_references_resolve() -> None:
    data = compose()
    services = data["services"]
    assert set(services) == {"driver", "postgres", "vernemq"}
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown service {dependency}"
        for volume in service.get("volumes", []):
            if isinstance(volume, str):
                source = volume.split(":", 1)[0]
                if not source.startswith((".", "/")):
                    assert source in data["volumes"], f"{name}: undeclared volume {source}"
            elif volume["type"] == "bind":
                source = ROOT / volume["source"]
                if source.name == "secrets.yaml":  # made by the operator from its example
                    assert (source.parent / "secrets.yaml.example").is_file()
                    assert volume["bind"]["create_host_path"] is False  # missing: a clear error
                else:
                    assert source.is_file(), f"{name}: bind source {source} is missing"
    assert services["driver"]["depends_on"] == {
        "postgres": {"condition": "service_healthy"},
        "vernemq": {"condition": "service_healthy"},
    }
    assert services["driver"]["build"] == "."
    assert services["vernemq"]["image"] == "vernemq/vernemq"
    assert services["vernemq"]["environment"]["DOCKER_VERNEMQ_ACCEPT_EULA"] == "yes"
    assert services["vernemq"]["environment"]["DOCKER_VERNEMQ_ALLOW_ANONYMOUS"] == "off"
    assert services["postgres"]["image"] == "postgres:16"


def test_compose_scales_the_driver_with_one_host_port_per_replica() -> None:
    single = compose()["services"]["driver"]
    assert single["deploy"]["replicas"] == "1"
    assert single["ports"] == ["5683:5683/udp", "127.0.0.1:8080:8080"]
    scaled = compose(
        {"DRIVER_REPLICAS": "2", "DRIVER_COAP_PORTS": "15683-15684", "DRIVER_HTTP_PORTS": "18080-18081"}
    )["services"]["driver"]
    assert scaled["deploy"]["replicas"] == "2"
    assert scaled["ports"] == ["15683-15684:5683/udp", "127.0.0.1:18080-18081:8080"]


def test_compose_refuses_to_start_without_the_passwords() -> None:
    raw = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    with pytest.raises(KeyError, match="POSTGRES_PASSWORD: set POSTGRES_PASSWORD in .env"):
        interpolate(raw, {"MQTT_PASSWORD": "x"})
    with pytest.raises(KeyError, match="MQTT_PASSWORD: set MQTT_PASSWORD in .env"):
        interpolate(raw, {"POSTGRES_PASSWORD": "x"})


# ---- the driver's configuration agrees with compose --------------------------------------------


def test_deploy_configuration_validates_and_matches_compose(tmp_path: Path) -> None:
    config = load_deploy_config(tmp_path / "config")
    services = compose()["services"]
    driver = services["driver"]
    # ports: what the driver listens on is what compose publishes and the image exposes
    assert container_ports(driver) == {(config.coap["port"], "udp"), (config.http["port"], "tcp")}
    assert sorted(" ".join(instruction("EXPOSE")).split()) == sorted(
        [f"{config.coap['port']}/udp", f"{config.http['port']}/tcp"]
    )
    assert config.coap["host"] == "0.0.0.0" and config.http["host"] == "0.0.0.0"
    # the database is the postgres service, with its user and database name
    url = make_url(config.database["url"])
    environment = services["postgres"]["environment"]
    assert (url.drivername, url.host, url.port) == ("postgresql+asyncpg", "postgres", 5432)
    assert (url.username, url.database) == (environment["POSTGRES_USER"], environment["POSTGRES_DB"])
    # several instances: cluster mode on PostgreSQL
    assert config.cluster["enabled"] is True
    # the external broker is the vernemq service, as a user VerneMQ creates
    mqtt = config.integrations["mqtt"]
    assert (mqtt["broker"], mqtt["url"]) == ("external", "mqtt://vernemq:1883")
    users = {
        key.removeprefix("DOCKER_VERNEMQ_USER_").lower()
        for key in services["vernemq"]["environment"]
        if key.startswith("DOCKER_VERNEMQ_USER_")
    }
    assert users == {mqtt["username"]}
    assert mqtt["password"] == "change-me-mqtt"  # from secrets.yaml (the example here)
    assert config.retention == {"uplinks_days": 90, "downlinks_days": 90}
    # the configuration file compose mounts is the one validated here
    mounts = {v["target"]: v["source"] for v in driver["volumes"] if isinstance(v, dict)}
    assert mounts == {
        "/config/configuration.yaml": "./deploy/config/configuration.yaml",
        "/config/secrets.yaml": "./deploy/config/secrets.yaml",
    }


def test_deploy_secrets_stay_out_of_git_and_the_image() -> None:
    ignored = (ROOT / ".dockerignore").read_text(encoding="utf-8").split()
    assert {"deploy/config", "config", ".env"} <= set(ignored)
    gitignore = (ROOT / ".gitignore").read_text(encoding="utf-8").split()
    assert {"/deploy/config/secrets.yaml", "/.env"} <= set(gitignore)
    assert not (DEPLOY_CONFIG / "secrets.yaml").exists()


# ---- Dockerfile --------------------------------------------------------------------------------


def test_dockerfile_runs_the_console_script_as_an_unprivileged_user() -> None:
    assert instruction("FROM") == ["python:3.11-slim"]
    assert exec_form(instruction("ENTRYPOINT")[0]) == ["coap-driver", "--config", "/config", "run"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]
    assert scripts["coap-driver"] == "driver_core.cli:main"
    assert instruction("USER") == ["coap-driver"]
    run = " ".join(instruction("RUN"))
    assert "useradd --system --uid 10001" in run and "pip install -e ." in run
    assert instruction("VOLUME") == ['["/config"]']
    volumes = compose()["services"]["driver"]["volumes"]
    assert "driver-data:/config" in volumes
    for args in instruction("COPY"):
        for source in args.split()[:-1]:
            assert (ROOT / source).exists(), f"COPY source {source} is missing"
            assert source not in (ROOT / ".dockerignore").read_text().split()


def test_dockerfile_healthcheck_calls_the_health_endpoint_on_the_http_port(tmp_path: Path) -> None:
    config = load_deploy_config(tmp_path / "config")
    command = exec_form(instruction("HEALTHCHECK")[0])
    assert command == ["python", "/opt/coap-driver/deploy/healthcheck.py"]
    environment = " ".join(instruction("ENV"))
    assert f"COAP_DRIVER_HEALTH_URL=http://127.0.0.1:{config.http['port']}/ops/health" in environment


# ---- the real driver, started as the image starts it ------------------------------------------


async def healthcheck(url: str) -> tuple[int, str]:
    """deploy/healthcheck.py as the HEALTHCHECK runs it (exit code, output)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(HEALTHCHECK),
        env={**os.environ, "COAP_DRIVER_HEALTH_URL": url},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await process.communicate()
    return process.returncode, out.decode().strip()


def local_deploy_config(target: Path, database_url: str, http_port: int) -> Path:
    """deploy/config with this machine's PostgreSQL, Mosquitto and free ports in place."""
    deploy_config_dir(target)
    config = target / "configuration.yaml"
    text_ = config.read_text(encoding="utf-8")
    for old, new in (
        ('host: "0.0.0.0"\n  port: 5683', 'host: "127.0.0.1"\n  port: 0'),
        ('host: "0.0.0.0"\n  port: 8080', f'host: "127.0.0.1"\n  port: {http_port}'),
        ("url: mqtt://vernemq:1883", "url: mqtt://127.0.0.1:1883"),
    ):
        assert old in text_
        text_ = text_.replace(old, new)
    config.write_text(text_, encoding="utf-8")
    secrets = target / "secrets.yaml"
    secrets.write_text(
        secrets.read_text(encoding="utf-8").replace(
            "postgresql+asyncpg://coap:change-me-postgres@postgres:5432/coap_driver", database_url
        ),
        encoding="utf-8",
    )
    return target


async def test_entrypoint_with_the_deploy_configuration_passes_the_healthcheck(
    tmp_path: Path, postgres_url: str
) -> None:
    http_port = free_port()
    config_dir = local_deploy_config(tmp_path / "config", postgres_url, http_port)
    url = f"http://127.0.0.1:{http_port}/ops/health"
    entrypoint = exec_form(instruction("ENTRYPOINT")[0])
    assert CONSOLE_SCRIPT.is_file()
    command = [str(CONSOLE_SCRIPT), *entrypoint[1:]]
    command[command.index("/config")] = str(config_dir)
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 60
        while True:  # the external effect: the health endpoint answers 200
            code, out = await healthcheck(url)
            if code == 0 or process.returncode is not None or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        assert process.returncode is None, (await process.stderr.read()).decode()[-2000:]
        assert (code, out) == (0, 'healthy: {"status": "ok"}')
        connection = await asyncpg.connect(postgres_url.replace("postgresql+asyncpg://", "postgresql://"))
        try:  # cluster mode from the deploy configuration: the instance registered itself
            assert await connection.fetchval("SELECT count(*) FROM instances") == 1
        finally:
            await connection.close()
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            await process.wait()
    code, out = await healthcheck(url)
    assert code == 1 and out.startswith(f"unhealthy: {url}: <urlopen error [Errno 111] Connection refused>")


# ---- /ops/health --------------------------------------------------------------------------------


async def test_health_needs_no_token_and_reports_a_lost_database(tmp_path: Path, postgres_url: str) -> None:
    config_dir = tmp_path / "config"
    write_config(config_dir, postgres_url)
    name = make_url(postgres_url).database
    driver = Driver(config_dir)
    await driver.start()
    try:
        base = f"http://127.0.0.1:{driver.api.port}/ops/health"
        async with aiohttp.ClientSession() as http:
            async with http.get(base) as response:
                assert (response.status, await response.json()) == (200, {"status": "ok"})
            async with http.post(base) as response:
                assert response.status == 405 and response.headers["Allow"] == "GET"
            assert await healthcheck(base) == (0, 'healthy: {"status": "ok"}')
            admin, _ = await _admin_connection()
            try:
                await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
                await admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name
                )
                async with http.get(base) as response:
                    assert (response.status, await response.json()) == (
                        503, {"status": "unavailable", "detail": "database unreachable"},
                    )
                assert await healthcheck(base) == (
                    1, 'unhealthy: HTTP 503 {"status": "unavailable", "detail": "database unreachable"}'
                )
                await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
            finally:
                await admin.close()
            deadline = time.monotonic() + 20
            while True:  # the pool reconnects on its own
                async with http.get(base) as response:
                    if response.status == 200 or time.monotonic() > deadline:
                        break
                await asyncio.sleep(0.2)
            assert response.status == 200
    finally:
        await driver.stop()
