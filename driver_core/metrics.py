"""Prometheus metrics of one driver (served at ``GET /metrics`` by ops_http.py).

The hot path only increments: a counter child per (message_type, family)
cached in a dict, one histogram observation per CoAP request and per database
write batch. Everything else (refusals, downlinks by state, outbox depth, MQTT
and callback state) is read when Prometheus scrapes, from counters the driver
keeps anyway or from one aggregate query each.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from . import __version__
from . import refusals as why
from .downlinks import (
    ACKNOWLEDGED,
    CANCELED,
    PENDING,
    REJECTED,
    SENT,
    STATE_NAMES,
    UNACKNOWLEDGED,
)
from .storage.models import Device, Downlink, OutboxMessage

if TYPE_CHECKING:
    from .driver import Driver
    from .uplink import Uplink

_LOGGER = logging.getLogger(__name__)

# A device waits awake for its answer: CoAP handlers should take milliseconds.
HANDLER_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 1.0)
DB_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
REASONS = sorted(
    value
    for name, value in vars(why).items()
    if name.isupper() and isinstance(value, str) and not name.startswith("_")
)


class Metrics:
    """The registry of one driver instance (tests run several drivers in one process)."""

    def __init__(self, driver: Driver) -> None:
        self._driver = driver
        self.registry = CollectorRegistry(auto_describe=True)
        self.uplinks = Counter(
            "coap_driver_uplinks", "Uplinks accepted (stored and answered)",
            ["message_type", "family"], registry=self.registry,
        )
        self.joins = Counter(
            "coap_driver_joins", "Completed JOINs (RFC 8613 B.2)", ["family"], registry=self.registry
        )
        self.handler_seconds = Histogram(
            "coap_driver_coap_handler_seconds",
            "Time from a CoAP request reaching the driver's site to its answer",
            buckets=HANDLER_BUCKETS, registry=self.registry,
        )
        self.db_write_seconds = Histogram(
            "coap_driver_db_write_seconds",
            "Duration of one database write transaction (a group-committed batch or an outbox update)",
            buckets=DB_BUCKETS, registry=self.registry,
        )
        self.scrape_seconds = Histogram(
            "coap_driver_metrics_query_seconds",
            "Duration of the database queries made for one scrape",
            buckets=DB_BUCKETS, registry=self.registry,
        )
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self._state = _ScrapeState()
        self.registry.register(_DriverCollector(driver, self._state))
        self._children: dict[tuple[str, int], tuple[Any, Any | None]] = {}

    # -- hot path -------------------------------------------------------------------------

    def on_uplink(self, uplink: Uplink) -> None:
        """EVENT_UPLINK listener: one dict lookup and one or two increments."""
        key = (uplink.message_type, uplink.hw_type)
        children = self._children.get(key)
        if children is None:
            children = self._new_children(key)
        children[0].inc()
        if children[1] is not None:
            children[1].inc()

    def _new_children(self, key: tuple[str, int]) -> tuple[Any, Any | None]:
        message_type, hw_type = key
        family = self._driver.families.get(hw_type)
        name = family.domain if family is not None else "unknown"
        children = (
            self.uplinks.labels(message_type, name),
            self.joins.labels(name) if message_type == "join" else None,
        )
        self._children[key] = children
        return children

    # -- scrape -----------------------------------------------------------------------------

    async def refresh(self) -> None:
        """Read what lives in the database: downlinks by state, outbox depth, devices."""
        db = self._driver.db
        started = time.perf_counter()
        async with db.session() as session:
            states = dict((await session.execute(
                select(Downlink.state, func.count()).group_by(Downlink.state)
            )).all())
            outbox = int(await session.scalar(select(func.count()).select_from(OutboxMessage)) or 0)
            devices = int(await session.scalar(select(func.count()).select_from(Device)) or 0)
        self.scrape_seconds.observe(time.perf_counter() - started)
        self._state.downlinks = {code: int(states.get(code, 0)) for code in STATE_NAMES}
        self._state.outbox = outbox
        self._state.devices = devices

    async def render(self) -> bytes:
        await self.refresh()
        return generate_latest(self.registry)


class _ScrapeState:
    """What the last refresh read from the database."""

    def __init__(self) -> None:
        self.downlinks: dict[int, int] = {}
        self.outbox = 0
        self.devices = 0


_STATE_LABELS = {
    PENDING: "pending",
    CANCELED: "canceled",
    SENT: "sent",
    ACKNOWLEDGED: "acknowledged",
    REJECTED: "rejected",
    UNACKNOWLEDGED: "unacknowledged",
}


class _DriverCollector(Collector):
    """Values the driver already keeps, turned into metric families at scrape time."""

    def __init__(self, driver: Driver, state: _ScrapeState) -> None:
        self._driver = driver
        self._state = state

    def describe(self) -> list:
        return []  # values appear at scrape time; nothing to check at registration

    def collect(self) -> Iterator[Any]:
        driver = self._driver
        info = GaugeMetricFamily("coap_driver_info", "Version of the running driver", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        refused = CounterMetricFamily(
            "coap_driver_refused_requests", "Refused CoAP requests by reason", labels=["reason"]
        )
        counts = driver.refusals.counts
        for reason in sorted(set(REASONS) | set(counts)):  # every reason, 0 until it happens
            refused.add_metric([reason], counts.get(reason, 0))
        yield refused
        downlinks = GaugeMetricFamily(
            "coap_driver_downlinks", "Downlinks stored, by state", labels=["state", "code"]
        )
        for code, count in sorted(self._state.downlinks.items()):
            downlinks.add_metric([_STATE_LABELS.get(code, str(code)), str(code)], count)
        yield downlinks
        yield GaugeMetricFamily(
            "coap_driver_mqtt_outbox_depth", "Uplink documents waiting for the MQTT broker",
            value=self._state.outbox,
        )
        yield GaugeMetricFamily(
            "coap_driver_devices", "Enrolled devices", value=self._state.devices
        )
        running = driver.integrations.running if driver.integrations is not None else {}
        yield from _mqtt_families(running.get("mqtt"))
        yield from _callback_families(running.get("callbacks"))
        if driver.writer is not None:
            yield CounterMetricFamily(
                "coap_driver_write_batches", "Group-committed write batches", value=driver.writer.batches
            )
        health = getattr(driver.db, "health", None)
        if health is not None:
            yield GaugeMetricFamily(
                "coap_driver_storage_writable",
                "1 while the database takes writes; 0 from a failed write until one succeeds",
                value=1 if health.writable else 0,
            )
            yield CounterMetricFamily(
                "coap_driver_storage_write_failures",
                "Database write transactions that failed (connection lost, disk full, read-only)",
                value=health.failures,
            )


def _status(handle: Any) -> dict[str, Any] | None:
    status = getattr(handle, "status", None) if handle is not None else None
    return status if isinstance(status, dict) else None


def _mqtt_families(handle: Any) -> Iterator[Any]:
    status = _status(handle)
    connected = GaugeMetricFamily(
        "coap_driver_mqtt_connected", "1 while connected to the MQTT broker (absent: MQTT off)",
        labels=["broker"],
    )
    published = CounterMetricFamily(
        "coap_driver_mqtt_published", "Uplink documents acknowledged by the MQTT broker since start"
    )
    if status is not None:
        connected.add_metric([str(status.get("broker", ""))], 1 if status.get("connected") else 0)
        published.add_metric([], int(status.get("published", 0)))
    yield connected
    yield published


def _callback_families(handle: Any) -> Iterator[Any]:
    status = _status(handle)
    outcomes = CounterMetricFamily(
        "coap_driver_callbacks",
        "Downlink status callbacks finished since start: delivered, or failed after every retry",
        labels=["outcome"],
    )
    pending = GaugeMetricFamily("coap_driver_callbacks_pending", "Callbacks not delivered yet")
    if status is not None:
        outcomes.add_metric(["delivered"], int(status.get("delivered", 0)))
        outcomes.add_metric(["failed"], int(status.get("failed", 0)))
        pending.add_metric([], int(status.get("pending", 0)))
    yield outcomes
    yield pending


# -- the CoAP site, timed ---------------------------------------------------------------------


class TimedSite:
    """Wraps the CoAP site: observes how long each request takes to be answered."""

    def __init__(self, site: Any, histogram: Histogram) -> None:
        self._site = site
        self._observe = histogram.observe

    async def render_to_pipe(self, pipe: Any) -> None:
        started = time.perf_counter()
        try:
            await self._site.render_to_pipe(pipe)
        finally:
            self._observe(time.perf_counter() - started)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._site, name)


class TimedCore:
    """What `start_coap_server` needs from the core (`site()`), with the site timed."""

    def __init__(self, core: Any, histogram: Histogram) -> None:
        self._core = core
        self._histogram = histogram

    def site(self) -> TimedSite:
        return TimedSite(self._core.site(), self._histogram)

    @property
    def refusals(self) -> Any:
        return self._core.refusals
