"""A real Home Assistant for tests: its own venv, a minimal config dir, REST and websocket clients.

`scripts/install_home_assistant.sh` creates the venv (once; later runs return at once).
The config dir holds MQTT as a config entry (written to .storage, the way Home
Assistant stores the entry its own config flow creates), the coap_driver custom
integration, and nothing else beyond what Home Assistant always loads. The
owner account is created through the onboarding API, which also hands out the
access token the tests use.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
HA_VENV = Path(os.environ.get("HA_VENV", ROOT / ".venv-ha"))
INSTALL_SCRIPT = ROOT / "scripts" / "install_home_assistant.sh"
HASS = HA_VENV / "bin" / "hass"
HA_PYTHON = HA_VENV / "bin" / "python"
INSTALL_TIMEOUT_S = 1200
START_TIMEOUT_S = 120


class HomeAssistantError(AssertionError):
    """Home Assistant could not be installed, started or reached; the message says why."""


def install_home_assistant() -> None:
    """Run the install script (idempotent, seconds when already installed); fail loudly."""
    result = subprocess.run(
        ["bash", str(INSTALL_SCRIPT), str(HA_VENV)],
        capture_output=True,
        text=True,
        timeout=INSTALL_TIMEOUT_S,
        check=False,
    )
    if result.returncode != 0 or not HASS.exists():
        output = (result.stdout + result.stderr).strip().splitlines()
        raise HomeAssistantError(
            f"installing Home Assistant with {INSTALL_SCRIPT.name} failed "
            f"(exit {result.returncode}):\n" + "\n".join(output[-30:])
        )


def run_in_ha_venv(code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -c code args...` inside Home Assistant's venv."""
    return subprocess.run(
        [str(HA_PYTHON), "-c", code, *args],
        capture_output=True, text=True, timeout=timeout, check=False,
    )


def mqtt_config_entry(broker_port: int, prefix: str = "homeassistant") -> dict[str, Any]:
    """The MQTT config entry as Home Assistant 2024.3 stores it after its config flow."""
    return {
        "entry_id": uuid.uuid4().hex,
        "version": 1,
        "minor_version": 1,
        "domain": "mqtt",
        "title": "127.0.0.1",
        "data": {
            "broker": "127.0.0.1",
            "port": broker_port,
            "discovery": True,
            "discovery_prefix": prefix,
        },
        "options": {},
        "pref_disable_new_entities": False,
        "pref_disable_polling": False,
        "source": "user",
        "unique_id": None,
        "disabled_by": None,
    }


def write_config(config_dir: Path, http_port: int, broker_port: int) -> None:
    """A minimal Home Assistant configuration: HTTP on loopback, MQTT on the test broker."""
    (config_dir / ".storage").mkdir(parents=True, exist_ok=True)
    (config_dir / "configuration.yaml").write_text(
        "homeassistant:\n"
        "  name: coap-driver test\n"
        "  latitude: 52.37\n  longitude: 4.89\n  elevation: 0\n"
        "  unit_system: metric\n  time_zone: UTC\n  currency: EUR\n  country: NL\n"
        "http:\n"
        f"  server_host: 127.0.0.1\n  server_port: {http_port}\n"
        "logger:\n  default: warning\n"
        "automation: !include automations.yaml\n",
        encoding="utf-8",
    )
    (config_dir / "automations.yaml").write_text("[]\n", encoding="utf-8")
    entries = {
        "version": 1,
        "minor_version": 1,
        "key": "core.config_entries",
        "data": {"entries": [mqtt_config_entry(broker_port)]},
    }
    (config_dir / ".storage" / "core.config_entries").write_text(json.dumps(entries))
    # Onboarding: every step but the owner account is done (the core_config step would set
    # up weather, radio and TTS integrations this test does not want).
    onboarding = {
        "version": 4,
        "minor_version": 1,
        "key": "onboarding",
        "data": {"done": ["core_config", "analytics", "integration"]},
    }
    (config_dir / ".storage" / "onboarding").write_text(json.dumps(onboarding))
    custom = config_dir / "custom_components"
    custom.mkdir(exist_ok=True)
    shutil.copytree(ROOT / "custom_components" / "coap_driver", custom / "coap_driver")
    shutil.copytree(ROOT / "blueprints", config_dir / "blueprints")


class HomeAssistant:
    """One `hass` process on loopback, with an owner account and its access token."""

    def __init__(self, config_dir: Path, http_port: int) -> None:
        self.config_dir = config_dir
        self.port = http_port
        self.url = f"http://127.0.0.1:{http_port}"
        self.client_id = f"{self.url}/"
        self.token: str | None = None
        self.refresh_token: str | None = None
        self._process: asyncio.subprocess.Process | None = None
        self._http: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._ws_id = 0
        self._ws_lock = asyncio.Lock()
        self._events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._ws_reader: asyncio.Task[None] | None = None
        self._answers: dict[int, asyncio.Future[dict[str, Any]]] = {}

    @property
    def log(self) -> str:
        path = self.config_dir / "home-assistant.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.splitlines()[-lines:])

    async def start(self) -> None:
        self._http = aiohttp.ClientSession()
        self._process = await asyncio.create_subprocess_exec(
            str(HASS), "-c", str(self.config_dir), "--skip-pip",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:  # the HTTP server answers long before every integration is set up
            if self._process.returncode is not None:
                raise HomeAssistantError(f"hass exited with {self._process.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(aiohttp.ClientError):
                async with self._http.get(f"{self.url}/api/onboarding") as response:
                    if response.status == 200:
                        break
            if time.monotonic() > deadline:
                raise HomeAssistantError(f"Home Assistant did not answer within {START_TIMEOUT_S} s:\n{self.log_tail()}")
            await asyncio.sleep(0.2)
        await self._onboard()
        await self._connect_websocket()
        await self.wait_running()

    async def _onboard(self) -> None:
        """Create the owner through onboarding (the last step left): the token comes with it."""
        assert self._http is not None
        async with self._http.post(
            f"{self.url}/api/onboarding/users",
            json={
                "client_id": self.client_id,
                "name": "Test",
                "username": "test",
                "password": "test-password-123",
                "language": "en",
            },
        ) as response:
            body = await response.json()
            if response.status != 200:
                raise HomeAssistantError(f"onboarding refused the user: {response.status} {body}")
        async with self._http.post(
            f"{self.url}/auth/token",
            data={"grant_type": "authorization_code", "code": body["auth_code"], "client_id": self.client_id},
        ) as response:
            tokens = await response.json()
            if response.status != 200:
                raise HomeAssistantError(f"no access token: {response.status} {tokens}")
        self.token = tokens["access_token"]
        self.refresh_token = tokens["refresh_token"]

    async def rest(self, method: str, path: str, payload: Any = None) -> Any:
        assert self._http is not None
        async with self._http.request(
            method, f"{self.url}{path}", json=payload,
            headers={"Authorization": f"Bearer {self.token}"},
        ) as response:
            text = await response.text()
            if response.status >= 400:
                raise HomeAssistantError(f"{method} {path}: HTTP {response.status}: {text}")
            return json.loads(text) if text else None

    async def _connect_websocket(self) -> None:
        assert self._http is not None
        self._ws = await self._http.ws_connect(f"{self.url}/api/websocket")
        hello = await self._ws.receive_json()
        assert hello["type"] == "auth_required", hello
        await self._ws.send_json({"type": "auth", "access_token": self.token})
        answer = await self._ws.receive_json()
        if answer["type"] != "auth_ok":
            raise HomeAssistantError(f"websocket authentication failed: {answer}")
        self._ws_reader = asyncio.create_task(self._read_websocket())

    async def _read_websocket(self) -> None:
        assert self._ws is not None
        async for message in self._ws:
            if message.type != aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(message.data)
            for item in data if isinstance(data, list) else [data]:
                if item.get("type") == "event":
                    await self._events.put(item["event"])
                future = self._answers.pop(item.get("id"), None)
                if future is not None and not future.done():
                    future.set_result(item)

    async def ws(self, command: str, **fields: Any) -> Any:
        """One websocket command; its result (raises on an error answer)."""
        assert self._ws is not None
        async with self._ws_lock:
            self._ws_id += 1
            ident = self._ws_id
            future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
            self._answers[ident] = future
            await self._ws.send_json({"id": ident, "type": command, **fields})
        async with asyncio.timeout(30):
            answer = await future
        if not answer.get("success", True):
            raise HomeAssistantError(f"{command}: {answer.get('error')}")
        return answer.get("result")

    async def subscribe_events(self, event_type: str) -> None:
        await self.ws("subscribe_events", event_type=event_type)

    async def next_event(self, predicate: Any, timeout: float = 30) -> dict[str, Any]:
        """The next subscribed event matching `predicate` (earlier ones are skipped)."""
        skipped: list[dict[str, Any]] = []
        try:
            async with asyncio.timeout(timeout):
                while True:
                    event = await self._events.get()
                    if predicate(event):
                        return event
                    skipped.append(event["data"])
        except TimeoutError:
            raise HomeAssistantError(
                f"no matching event within {timeout} s; other events: {skipped}\n{self.log_tail(30)}"
            ) from None

    async def wait_running(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while (await self.rest("GET", "/api/config"))["state"] != "RUNNING":
            if time.monotonic() > deadline:
                raise HomeAssistantError(f"Home Assistant never reached RUNNING:\n{self.log_tail()}")
            await asyncio.sleep(0.2)

    async def state(self, entity_id: str) -> dict[str, Any] | None:
        try:
            return await self.rest("GET", f"/api/states/{entity_id}")
        except HomeAssistantError as exc:
            if "HTTP 404" in str(exc):
                return None
            raise

    async def wait_state(
        self, entity_id: str, predicate: Any, timeout: float = 30, what: str = ""
    ) -> dict[str, Any]:
        """Poll one entity's state until `predicate(state_dict)` holds (no event for it here)."""
        deadline = time.monotonic() + timeout
        while True:
            state = await self.state(entity_id)
            if state is not None and predicate(state):
                return state
            if time.monotonic() > deadline:
                raise HomeAssistantError(
                    f"{entity_id}: {what or 'expected state'} not reached within {timeout} s; "
                    f"last: {state}\n{self.log_tail(20)}"
                )
            await asyncio.sleep(0.2)

    async def stop(self) -> None:
        if self._ws_reader is not None:
            self._ws_reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._ws_reader
        if self._ws is not None:
            await self._ws.close()
        if self._http is not None:
            await self._http.close()
        process, self._process = self._process, None
        if process is not None and process.returncode is None:
            process.terminate()
            try:
                async with asyncio.timeout(30):
                    await process.wait()
            except TimeoutError:
                process.kill()
                await process.wait()
