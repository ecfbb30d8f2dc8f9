"""Callbacks integration: every downlink state change POSTed to the client's callback URL.

The core writes each state change as a `downlink_events` row (with the
downlink's callback URL) in the same transaction as the change, then fires
EVENT_DOWNLINK_STATE. This integration only wakes its worker on that event;
the worker (`delivery.py`) reads owed callbacks from the table, so nothing
here can slow the CoAP path, and a restart resumes what is still owed.

Interface used by the driver core:
    integration = await async_setup(driver, settings)
    await integration.async_reload(settings)
    await integration.async_unload()
    integration.status -> {"pending", "delivered", "failed", "last_error"}
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from driver_core.callback_policy import CallbackPolicy, driver_listeners
from driver_core.cluster import EVENT_DOWNLINK_ROWS
from driver_core.events import EVENT_DOWNLINK_STATE
from driver_core.integration_base import SettingsError, WatchableStatus

from .config_flow import DOMAIN, SETTINGS_SCHEMA, async_validate, async_validated
from .delivery import CallbackDelivery
from .sender import SIGNATURE_HEADER, TIMESTAMP_HEADER, callback_body, signature
from .store import CallbackStore, PendingCallback

__all__ = [
    "DOMAIN",
    "SETTINGS_SCHEMA",
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "CallbacksIntegration",
    "SettingsError",
    "async_setup",
    "async_validate",
    "callback_body",
    "signature",
]

async def async_setup(driver: Any, settings: dict[str, Any] | None) -> CallbacksIntegration:
    """Validate `settings` and start delivering owed callbacks. Raises SettingsError."""
    integration = CallbacksIntegration(driver, await async_validated(settings))
    integration.async_start()
    return integration


class CallbacksIntegration(WatchableStatus):
    def __init__(self, driver: Any, settings: dict[str, Any]) -> None:
        self._driver = driver
        self._delivery = CallbackDelivery(
            CallbackStore(driver.db), settings, self._changed, self._policy(settings)
        )
        self._unlisten: Callable[[], None] | None = None

    def _policy(self, settings: dict[str, Any]) -> CallbackPolicy:
        return CallbackPolicy.from_settings(settings, lambda: driver_listeners(self._driver))

    def _install(self, policy: CallbackPolicy) -> None:
        """Scheduling (REST, MQTT) refuses what delivery would refuse."""
        self._delivery.policy = policy
        queue = getattr(self._driver, "downlinks", None)
        if queue is not None:
            queue.callback_policy = policy

    @property
    def settings(self) -> dict[str, Any]:
        return dict(self._delivery.settings)

    @property
    def status(self) -> dict[str, Any]:
        return {
            "pending": self._delivery.pending,
            "delivered": self._delivery.delivered,
            "failed": self._delivery.failed,
            "last_error": self._delivery.last_error,
        }

    def async_start(self) -> None:
        self._install(self._delivery.policy)
        self._delivery.start()
        unlisteners = [
            self._driver.bus.listen(EVENT_DOWNLINK_STATE, self._on_state),
            # Cluster mode: owed callbacks committed by other instances (the payload is the
            # lowest new event id), or all of them when this instance becomes the leader.
            self._driver.bus.listen(EVENT_DOWNLINK_ROWS, self._delivery.notify),
        ]
        self._unlisten = lambda: [unlisten() for unlisten in unlisteners]

    async def async_reload(self, settings: dict[str, Any] | None) -> None:
        """Apply new settings from the next attempt on, without dropping anything owed.

        Raises SettingsError and keeps the current settings when they cannot apply.
        """
        validated = await async_validated(settings)
        self._delivery.settings = validated
        self._install(self._policy(validated))
        self._changed()

    async def async_unload(self) -> None:
        """Stop; owed callbacks stay in the database for the next start."""
        if self._unlisten is not None:
            self._unlisten()
            self._unlisten = None
        await self._delivery.close()
        self._install(self._policy({}))  # the default refusals stay without the integration

    def _on_state(self, event: Any) -> None:
        url = getattr(event, "callback_url", None)
        if not url:
            return
        row_id = getattr(event, "downlink_row_id", None)
        if row_id is not None and getattr(self._driver.db, "leads_downlink_events", True):
            # Committed in this process with everything a callback needs: send it without
            # reading it back (a read costs several loop turns under load). Rows this process
            # did not announce are still found: other instances' through EVENT_DOWNLINK_ROWS,
            # anything else by the periodic full read.
            self._delivery.offer(
                PendingCallback(event.event_id, row_id, event.command_id, event.state, event.at, url, 0)
            )
            return
        self._delivery.notify(getattr(event, "event_id", None))
