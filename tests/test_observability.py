"""Metrics, structured logs, log levels at runtime, no secrets in the log.

A real driver (UDP devices, built-in MQTT broker, callbacks to a real HTTP
server), scraped over HTTP like Prometheus does and parsed with the
prometheus_client parser.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import cbor2
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from driver_core import logs
from driver_core.broker_access import APPLICATION_USER, DRIVER_USER, CredentialStore
from driver_core.config import ConfigError, load_configuration
from driver_core.device_client import DeviceSession
from driver_core.driver import Driver
from driver_core.enrollment import add_device
from driver_core.metrics import REASONS
from driver_core.refusals import Refusals
from driver_core.tokens import create_token
from tests.conftest import FAST, make_device, session_for, write_config
from tests.http_helpers import http_endpoint
from tests.mqtt_helpers import free_port, wait_until


@dataclass
class Ops:
    driver: Driver
    origin: str
    token: str
    http: aiohttp.ClientSession
    hooks: list[dict]

    async def get(self, path: str, token: str | None = "default") -> tuple[int, str, dict]:
        headers = {} if token is None else {"Authorization": f"Bearer {self.token if token == 'default' else token}"}
        async with self.http.get(self.origin + path, headers=headers) as response:
            return response.status, await response.text(), dict(response.headers)

    async def put(self, path: str, body: bytes, token: str | None = "default") -> tuple[int, dict]:
        headers = {"Content-Type": "application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {self.token if token == 'default' else token}"
        async with self.http.put(self.origin + path, data=body, headers=headers) as response:
            return response.status, await response.json()

    async def samples(self) -> dict[tuple[str, tuple], float]:
        status, text, headers = await self.get("/metrics")
        assert status == 200, text
        assert headers["Content-Type"].startswith("text/plain; version=")
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }


@pytest.fixture
async def ops(tmp_path: Path, restore_levels: None) -> AsyncIterator[Ops]:
    hooks: list[dict] = []

    async def hook(request: web.Request) -> web.Response:
        hooks.append(await request.json())
        return web.Response(status=204)

    async with http_endpoint("/hook", hook) as hook_port:
        config_dir = tmp_path / "config"
        write_config(
            config_dir,
            extra=f"mqtt:\n  builtin_port: {free_port()}\ncallbacks:\n  retry_for: 0\n"
            "  allowed_networks: [127.0.0.0/8]\n",  # the hook listens on loopback
        )
        driver = Driver(config_dir)
        await driver.start()
        try:
            token = await create_token(driver.db, "prometheus")
            async with aiohttp.ClientSession() as http:
                setup = Ops(driver, f"http://127.0.0.1:{driver.api.port}", token, http, hooks)
                setup.hook_url = f"http://127.0.0.1:{hook_port}/hook"  # type: ignore[attr-defined]
                yield setup
        finally:
            await driver.stop()


# ---- /metrics ---------------------------------------------------------------------------------


async def test_metrics_need_an_api_token(ops: Ops) -> None:
    for token in (None, "not-a-token"):
        status, text, headers = await ops.get("/metrics", token=token)
        assert status == 401
        assert json.loads(text)["error"] == "unauthorized"
        assert headers["WWW-Authenticate"] == 'Bearer realm="coap-driver"'
    async with ops.http.post(ops.origin + "/metrics", headers={"Authorization": f"Bearer {ops.token}"}) as r:
        assert r.status == 405


async def test_metrics_count_what_the_driver_did(ops: Ops) -> None:
    driver = ops.driver
    before = await ops.samples()
    assert all(before[("coap_driver_refused_requests_total", (("reason", r),))] == 0 for r in REASONS)
    assert before[("coap_driver_info", (("version", "0.1.0"),))] == 1
    transmitter, positioner = make_device("M0000017", 17, 101), make_device("M0000024", 24, 102)
    for device in (transmitter, positioner):
        await add_device(driver.db, driver.box, device)
    first = session_for(driver, transmitter)
    await first.join("1.0.0", 17)
    await first.post("rx", cbor2.dumps({1: 90}))
    await first.post("rx", cbor2.dumps({1: 89}))
    second = session_for(driver, positioner)
    await second.join("1.0.0", 24)
    stranger = DeviceSession(b"\x99\x99", bytes(16), b"", "127.0.0.1", driver.coap_port, timing=FAST)
    with pytest.raises(Exception):  # noqa: B017 - refused at step 1, whatever the exception
        await stranger.join("1.0.0", 17)
    await driver.downlinks.schedule("M0000017", "tx_interval", 30, callback_url=ops.hook_url)
    await driver.downlinks.schedule(
        "M0000017", "tx_interval", 45, callback_url=f"http://127.0.0.1:{free_port()}/closed"
    )
    callbacks = driver.integrations.running["callbacks"]
    await callbacks.async_wait_status(lambda s: s["delivered"] == 1 and s["failed"] == 1)
    mqtt = driver.integrations.running["mqtt"]
    await mqtt.async_wait_status(lambda s: s["connected"] and s["outbox"] == 0)

    after = await ops.samples()
    assert after[("coap_driver_uplinks_total", (("family", "vidi_transmitter"), ("message_type", "join")))] == 1
    assert after[("coap_driver_uplinks_total", (("family", "vidi_transmitter"), ("message_type", "rx")))] == 2
    assert after[("coap_driver_uplinks_total", (("family", "vidi_positioner"), ("message_type", "join")))] == 1
    assert after[("coap_driver_joins_total", (("family", "vidi_transmitter"),))] == 1
    assert after[("coap_driver_joins_total", (("family", "vidi_positioner"),))] == 1
    assert after[("coap_driver_refused_requests_total", (("reason", "unknown_kid"),))] == 1
    assert after[("coap_driver_downlinks", (("code", "0"), ("state", "pending")))] == 2
    assert after[("coap_driver_downlinks", (("code", "3"), ("state", "acknowledged")))] == 0
    assert after[("coap_driver_callbacks_total", (("outcome", "delivered"),))] == 1
    assert after[("coap_driver_callbacks_total", (("outcome", "failed"),))] == 1
    assert after[("coap_driver_callbacks_pending", ())] == 0
    assert after[("coap_driver_mqtt_connected", (("broker", "builtin"),))] == 1
    assert after[("coap_driver_mqtt_published_total", ())] == 4
    assert after[("coap_driver_mqtt_outbox_depth", ())] == 0
    assert after[("coap_driver_devices", ())] == 2
    # 2 requests per JOIN, 2 rx, 1 refused JOIN step 1 (FAST timing: no retransmission needed).
    handled = after[("coap_driver_coap_handler_seconds_count", ())]
    assert handled == 7
    assert after[("coap_driver_coap_handler_seconds_bucket", (("le", "+Inf"),))] == 7
    assert after[("coap_driver_coap_handler_seconds_bucket", (("le", "0.1"),))] == 7  # inside 100 ms
    assert after[("coap_driver_db_write_seconds_count", ())] >= 4  # 4 uplink batches, outbox deletes
    assert after[("coap_driver_write_batches_total", ())] >= 4
    assert ("process_resident_memory_bytes", ()) in after


async def test_mqtt_down_shows_in_the_metrics(ops: Ops) -> None:
    await ops.driver.integrations.save(
        "mqtt", {"broker": "external", "url": f"mqtt://127.0.0.1:{free_port()}"}
    )
    await ops.driver.integrations.apply_saved()
    mqtt = ops.driver.integrations.running["mqtt"]
    await mqtt.async_wait_status(lambda s: not s["connected"] and s["last_error"] is not None)
    samples = await ops.samples()
    connected = [v for (name, _), v in samples.items() if name == "coap_driver_mqtt_connected"]
    assert connected == [0]


# ---- logs ------------------------------------------------------------------------------------------


def test_refusal_line_is_structured_in_json(restore_levels: None) -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    handler = logging.StreamHandler(stream)
    root.addHandler(handler)
    try:
        logs.configure({"default": "INFO", "format": "json", "logs": {}})
        Refusals().record("replay", kid=b"\xa0\x01", serial="A0000001", remote="127.0.0.1:5683")
        Refusals().record("unknown_kid", kid=b"\x99")
    finally:
        root.removeHandler(handler)
        logs.configure({"default": "INFO", "format": "text", "logs": {}})
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    for line in lines:
        assert set(line) == {"time", "level", "logger", "message", "event", "reason", "serial", "kid", "remote", "detail"}
    assert [(x["level"], x["logger"], x["event"], x["reason"], x["serial"], x["kid"], x["remote"]) for x in lines] == [
        ("WARNING", "driver_core.refused", "refused", "replay", "A0000001", "a001", "127.0.0.1:5683"),
        ("WARNING", "driver_core.refused", "refused", "unknown_kid", None, "99", None),
    ]
    assert lines[0]["message"] == "refused reason=replay serial=A0000001 kid=a001 remote=127.0.0.1:5683"


def test_text_format_keeps_one_human_line() -> None:
    record = logging.makeLogRecord(
        {"name": "driver_core.refused", "levelname": "WARNING", "msg": "refused reason=%s", "args": ("replay",), "reason": "replay"}
    )
    assert logs.make_formatter("text").format(record).endswith(" WARNING driver_core.refused: refused reason=replay")
    document = json.loads(logs.make_formatter("json").format(record))
    assert (document["message"], document["reason"]) == ("refused reason=replay", "replay")


def test_logger_format_in_the_configuration(tmp_path: Path) -> None:
    (tmp_path / "configuration.yaml").write_text("logger:\n  format: json\n")
    assert load_configuration(tmp_path, {}).logger["format"] == "json"
    (tmp_path / "configuration.yaml").write_text("logger:\n  format: xml\n")
    with pytest.raises(ConfigError) as info:
        load_configuration(tmp_path, {})
    assert str(info.value).endswith("2: logger.format: expected text or json")


async def test_log_levels_change_at_runtime_over_http(ops: Ops) -> None:
    status, body = await ops.put("/ops/logging", b'{"logs": {"driver_core.coap": "debug"}, "default": "warning"}')
    assert status == 200
    assert logging.getLogger("driver_core.coap").level == logging.DEBUG
    assert logging.getLogger().level == logging.WARNING
    assert body["default"] == "WARNING" and body["logs"]["driver_core.coap"] == "DEBUG"
    status, text, _ = await ops.get("/ops/logging")
    assert json.loads(text) == body
    status, body = await ops.put("/ops/logging", b'{"logs": {"driver_core.coap": "notset"}}')
    assert "driver_core.coap" not in body["logs"]
    bad = [
        (b"not json", "Expecting value"),
        (b"[]", 'expected a JSON object like {"logs": {"driver_core.coap": "debug"}}'),
        (b'{"level": "debug"}', "unknown key 'level' (use default and logs)"),
        (b'{"default": "loud"}', "invalid log level 'loud' (use one of: critical, error, warning, info, debug, notset)"),
        (b'{"logs": {"aiocoap": 10}}', "logs.aiocoap: invalid log level 10"),
        (b'{"logs": ["x"]}', "logs must be an object: logger name -> level"),
    ]
    for raw, message in bad:
        status, body = await ops.put("/ops/logging", raw)
        assert status == 400 and body["error"] == "invalid_levels"
        assert body["detail"].startswith(message), body
    status, body = await ops.put("/ops/logging", b'{"default": "debug"}', token=None)
    assert status == 401 and logging.getLogger().level == logging.WARNING


async def test_cli_sets_levels_of_the_running_driver(ops: Ops) -> None:
    async def cli(*args: str) -> tuple[int, str, str]:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "driver_core", "--config", str(ops.driver.config_dir), "logging",
            *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        out, err = await process.communicate()
        return process.returncode, out.decode(), err.decode()

    code, out, err = await cli("--url", ops.origin, "--token", ops.token, "set", "driver_core.refused=error", "default=info")
    assert code == 0, err
    assert "driver_core.refused: ERROR" in out.splitlines() and out.startswith("default: INFO\n")
    assert logging.getLogger("driver_core.refused").level == logging.ERROR
    code, out, err = await cli("--url", ops.origin, "--token", "wrong", "show")
    assert (code, err) == (2, f"coap-driver: {ops.origin}/ops/logging: 401 a valid API token is required: "
                             "Authorization: Bearer <token> (create one with: coap-driver token create NAME)\n")
    code, out, err = await cli("--url", ops.origin, "--token", ops.token, "set", "aiocoap=chatty")
    assert (code, err) == (2, "coap-driver: aiocoap: invalid log level 'chatty' (use one of: critical, error, warning, info, debug, notset)\n")
    code, out, err = await cli("--url", f"http://127.0.0.1:{free_port()}", "--token", ops.token, "show")
    assert code == 2 and "cannot reach the driver at" in err and "(is it running?)" in err


async def test_no_secret_reaches_the_log(ops: Ops, caplog: pytest.LogCaptureFixture) -> None:
    """Everything logged at DEBUG during a run that handles every kind of secret."""
    driver = ops.driver
    caplog.set_level(logging.DEBUG)
    for name in logs.QUIET:  # the libraries too, at their most talkative
        logging.getLogger(name).setLevel(logging.DEBUG)
    store = CredentialStore(driver.config_dir, driver.box)
    device = make_device("S0000001", 17, 103)
    await add_device(driver.db, driver.box, device)
    session = session_for(driver, device)
    await session.join("1.0.0", 17)
    await session.post("rx", cbor2.dumps({1: 5}))
    wrong = make_device("S0000001", 17, 104)  # same kid, another key: decryption fails
    impostor = DeviceSession(device.sender_id, wrong.master_secret, wrong.master_salt, "127.0.0.1", driver.coap_port, timing=FAST)
    with pytest.raises(Exception):  # noqa: B017
        await impostor.join("1.0.0", 17)
    status, _, _ = await ops.get("/metrics")
    assert status == 200
    import aiomqtt

    async with aiomqtt.Client("127.0.0.1", driver.integrations.running["mqtt"].settings["builtin_port"],
                              username=APPLICATION_USER, password=store.password(APPLICATION_USER)):
        pass
    with pytest.raises(aiomqtt.MqttError):
        async with aiomqtt.Client("127.0.0.1", driver.integrations.running["mqtt"].settings["builtin_port"],
                                  username=APPLICATION_USER, password="guessed-password-1"):
            pass
    await driver.integrations.save(
        "mqtt", {"broker": "external", "url": "mqtt://127.0.0.1:1883", "username": "u", "password": "hunter2-mqtt"}
    )
    await driver.integrations.apply_saved()
    await wait_until(lambda: driver.integrations.running["mqtt"].status["connected"], what="external broker")
    text = "\n".join(f"{r.name} {r.getMessage()} {r.__dict__}" for r in caplog.records)
    assert "refused reason=decryption_failed" in text
    secrets = {
        "master secret": device.master_secret.hex(),
        "master salt": device.master_salt.hex(),
        "api token": ops.token,
        "driver broker password": store.password(DRIVER_USER),
        "application broker password": store.password(APPLICATION_USER),
        "guessed broker password": "guessed-password-1",
        "external broker password": "hunter2-mqtt",
        "secret key": (driver.config_dir / ".storage" / "secret.key").read_text().strip(),
    }
    for what, value in secrets.items():
        assert value not in text, f"the {what} appears in the log"
    assert len(caplog.records) > 50  # the run really was logged at DEBUG

