"""The driver: wires configuration, storage, the CoAP listener and the integrations together."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from .api.server import ApiServer
from .api.throttle import auth_throttle
from .callback_policy import CallbackPolicy, driver_listeners
from .cluster import Cluster
from .coap_server import CoapCore, start_coap_server
from .coap_transport import CoapListener
from .components import builtin_components_dir, discover_components, import_integration
from .config import CoreConfig, ensure_config_dir, load_configuration
from .downlinks import DownlinkQueue
from .events import EVENT_UPLINK, EventBus
from .family import Family, load_family
from .fota.service import start_fota, stop_fota
from .housekeeping import Housekeeping
from .integrations import IntegrationManager
from .join_tokens import JoinTokens
from .metrics import Metrics, TimedCore
from .ops_http import ops_middleware
from .permissions import tighten
from .rate_limit import CoapGate, TokenBuckets
from .refusals import Refusals
from .runstate import RunLock, join_token_key
from .runtime import StopSignals
from .security import DeviceCredentials
from .storage.db import Database, sqlite_files
from .storage.secretbox import SecretBox
from .tasks import cancel_and_wait
from .web import setup_web
from .writer import UplinkWriter

_LOGGER = logging.getLogger(__name__)
REQUESTS_DRAIN_S = 3.0  # a request takes milliseconds: one still running then waits on a stuck database


class StartupError(Exception):
    """The driver cannot start; the message says which setting to change."""


def load_components(config_dir: Path) -> tuple[dict[int, Family], dict[str, Any]]:
    """Families by hw_type and integration modules by domain, built-in then the user's overrides."""
    manifests = discover_components([builtin_components_dir(), config_dir / "custom_components"])
    families: dict[int, Family] = {}
    integrations: dict[str, Any] = {}
    for domain, manifest in sorted(manifests.items()):
        if manifest.type == "device_family":
            family = load_family(manifest.path, domain)
            for hw_type in family.hw_types:
                if hw_type in families:
                    raise StartupError(
                        f"hw_type {hw_type} is declared by both {families[hw_type].domain} and {domain}"
                    )
                families[hw_type] = family
        else:
            integrations[domain] = import_integration(manifest)
    return families, integrations


class Driver:
    """One running driver instance. `start()` then `stop()`; attributes are what integrations use."""

    def __init__(self, config_dir: Path) -> None:
        self.config_dir = Path(config_dir).resolve()
        self.bus = EventBus()
        self.refusals = Refusals()
        self.config: CoreConfig | None = None
        self.db: Database | None = None  # type: ignore[assignment]
        self.box: SecretBox | None = None
        self.families: dict[int, Family] = {}
        self.credentials: DeviceCredentials | None = None
        self.writer: UplinkWriter | None = None
        self.coap: CoapCore | None = None
        self.downlinks: DownlinkQueue | None = None
        self.coap_listener: CoapListener | None = None
        self.integrations: IntegrationManager | None = None
        self.housekeeping: Housekeeping | None = None
        self.api: ApiServer | None = None
        self.metrics: Metrics | None = None
        self.fota = None  # FotaService, once started
        self.cluster: Cluster | None = None  # cluster mode only
        self.coap_gate: CoapGate | None = None
        self._run_lock: RunLock | None = None
        self._unlisten_metrics: Any = None

    @property
    def coap_port(self) -> int:
        """The bound UDP port (useful when configured as 0)."""
        assert self.coap_listener is not None, "CoAP listener not bound"
        return self.coap_listener.port

    def load(self) -> CoreConfig:
        """Read components and configuration (no I/O beyond files); raises ConfigError & co."""
        ensure_config_dir(self.config_dir)
        self.families, modules = load_components(self.config_dir)
        schemas = {domain: module.config_flow.SETTINGS_SCHEMA for domain, module in modules.items()}
        self.config = load_configuration(self.config_dir, schemas)
        self._modules = modules
        return self.config

    async def start(self) -> None:
        """Open everything; a failure closes what was opened before it is raised."""
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        config = self.config or self.load()
        tighten(self.config_dir, sqlite_files(config.database["url"]))  # older releases: 0644
        self.box = SecretBox.load_or_create(self.config_dir)
        self._run_lock = RunLock(self.config_dir)  # `coap-driver restore` waits for no driver
        self._run_lock.acquire_shared()
        self.db = Database(config.database["url"])
        await self.db.start()
        self.metrics = Metrics(self)
        self.db.write_observer = self.metrics.db_write_seconds.observe
        self._unlisten_metrics = self.bus.listen(EVENT_UPLINK, self.metrics.on_uplink)
        self.credentials = DeviceCredentials(
            self.db,
            self.box,
            JoinTokens(join_token_key(self.box, self.config_dir)),
            self.refusals,
            cache_size=config.coap["context_cache_size"],
        )
        if config.cluster["enabled"]:
            self.cluster = Cluster(self.db, self.bus, config.cluster)
            await self.cluster.start()
            self.credentials.shared = True
        self.writer = UplinkWriter(self.db, self.bus)
        self.writer.start()
        self.downlinks = DownlinkQueue(
            self.db,
            self.bus,
            self.families,
            ack_timeout=config.downlinks["ack_timeout"],
            max_pending=config.downlinks["max_pending"],
        )
        self.downlinks.callback_policy = CallbackPolicy(own_listeners=lambda: driver_listeners(self))
        await self.downlinks.start()
        self.coap = CoapCore(
            self.credentials,
            self.writer,
            self.families,
            self.refusals,
            config.coap["max_payload"],
            self.downlinks,
        )
        self.integrations = IntegrationManager(self, self._modules, config.integrations)
        await self.integrations.start()
        self.housekeeping = Housekeeping(self)
        self.housekeeping.start()
        self.api = ApiServer(self)
        self.api.app.middlewares.insert(0, ops_middleware(self))  # /metrics, /ops/logging
        self.api.app.middlewares.insert(0, auth_throttle(TokenBuckets(  # 429 after failed logins
            config.http["auth_failures_per_minute"] / 60, config.http["auth_failure_burst"]
        )))
        setup_web(self.api.app, self)
        try:
            await self.api.start(config.http["host"], config.http["port"])
        except OSError as exc:
            raise StartupError(
                f"http.port: cannot listen on TCP {config.http['host']} port {config.http['port']}: "
                f"{exc.strerror or exc}"
            ) from None
        try:
            self.coap_listener = await start_coap_server(
                TimedCore(self.coap, self.metrics.handler_seconds),
                config.coap["host"],
                config.coap["port"],
            )
        except OSError as exc:
            raise StartupError(
                f"coap.port: cannot listen on UDP {config.coap['host']} port {config.coap['port']}: "
                f"{exc.strerror or exc}"
            ) from None
        self.coap_gate = CoapGate(  # drops would-be refusals from sources over their budget
            TokenBuckets(config.coap["refusals_per_second"], config.coap["refusal_burst"]),
            self.refusals,
            self.credentials,
        )
        self.coap_gate.attach(self.coap_listener)
        await start_fota(self, stall_after=timedelta(minutes=config.fota["stall_minutes"]))
        _LOGGER.info(
            "coap-driver listening on UDP [%s]:%s with %d device families",
            config.coap["host"], self.coap_port, len({f.domain for f in self.families.values()}),
        )

    async def stop(self) -> None:
        await stop_fota(self)
        if self.coap_listener is not None:
            await self.coap_listener.close()
            self.coap_listener = None
        if self.api is not None:
            await self.api.stop()
            self.api = None
        if self.housekeeping is not None:
            await self.housekeeping.stop()
        if self.writer is not None:
            await self.writer.stop()
        if self.downlinks is not None:
            await self.downlinks.stop()
        if self.integrations is not None:
            await self.integrations.stop()
        if self.cluster is not None:
            await self.cluster.stop()
            self.cluster = None
        if self._unlisten_metrics is not None:
            self._unlisten_metrics()
            self._unlisten_metrics = None
        if self.db is not None:
            await self.db.stop()
        if self._run_lock is not None:
            self._run_lock.release()
            self._run_lock = None

    async def drain(self) -> None:
        """The clean part of a stop: no new datagrams, answer the requests being handled,
        let the integrations publish their outboxes (`shutdown.drain_seconds`).

        `stop()` follows; whatever is not published by then stays in the outbox tables
        and goes out after the next start.
        """
        assert self.config is not None
        if self.coap_listener is not None:
            listener, self.coap_listener = self.coap_listener, None
            cut = await listener.drain(REQUESTS_DRAIN_S)
            if cut:
                _LOGGER.warning(
                    "Stopping: %d request(s) were still being handled after %s s", cut, REQUESTS_DRAIN_S
                )
        if self.integrations is not None:
            within = self.config.shutdown["drain_seconds"]
            drains = [
                handle.async_drain(within)
                for handle in self.integrations.running.values()
                if hasattr(handle, "async_drain")
            ]
            await asyncio.gather(*drains)

    async def run_forever(self, alongside: Callable[[], Awaitable[None]] | None = None) -> None:
        """Serve until SIGTERM or SIGINT, then stop cleanly; a second signal skips the draining.

        `alongside()` (the demo's devices and subscriber) runs once the driver is started and is
        cancelled at the signal; if it fails, the driver stops and its error is raised.
        """
        signals = StopSignals()
        signals.install()  # a signal during the start stops the driver right after it
        try:
            starting = asyncio.create_task(self.start(), name="driver-start")
            signals.on_again = starting.cancel  # a start that hangs (database): the second signal
            await asyncio.wait([starting])
            if starting.cancelled():  # start() closed what it had opened
                _LOGGER.warning("coap-driver stopped during its start")
                return
            starting.result()
            try:
                await self._serve_until(signals.requested, alongside)
                draining = asyncio.create_task(self.drain(), name="driver-drain")
                signals.on_again = draining.cancel
                await asyncio.wait([draining])  # cancelled by a second signal: no exception here
                if not draining.cancelled():
                    draining.result()
            finally:
                await self.stop()
        finally:
            signals.remove()
        _LOGGER.info("coap-driver stopped cleanly")

    @staticmethod
    async def _serve_until(
        requested: asyncio.Event, alongside: Callable[[], Awaitable[None]] | None
    ) -> None:
        waiting = asyncio.ensure_future(requested.wait())
        side = asyncio.ensure_future(alongside()) if alongside is not None else None
        try:
            tasks = [task for task in (waiting, side) if task is not None]
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            if side is not None and side.done():
                side.result()  # it ended or failed before any signal: its error is the command's
        finally:
            await cancel_and_wait(waiting)
            await cancel_and_wait(side)
