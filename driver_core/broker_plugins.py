"""amqtt plugins that ask a `BrokerAccess` policy: one for CONNECT, one for topics.

amqtt builds plugin configuration from a dict; the live policy object travels
in it (`{"access": policy}`), so a password rotation or a changed command
topic applies without restarting the broker.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from amqtt.contexts import Action
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session

_LOGGER = logging.getLogger("driver_core.broker")


class DriverAuthPlugin(BaseAuthPlugin):
    """Accept a client only with its current password (or anonymously where allowed)."""

    async def authenticate(self, *, session: Session) -> bool | None:
        access = self.config.access
        ok = await access.authenticate(session.username, session.password)
        if not ok:
            _LOGGER.warning(
                "MQTT broker refused a connection: client_id=%s username=%s (%s)",
                session.client_id,
                session.username or "-",
                "anonymous access is not allowed" if not session.username else "wrong credentials",
            )
        return ok

    @dataclass
    class Config:
        access: Any = None


class DriverTopicPlugin(BaseTopicPlugin):
    """Publish: the driver anywhere, applications only on command topics. Subscribe: any user."""

    async def topic_filtering(
        self, *, session: Session | None = None, topic: str | None = None, action: Action | None = None
    ) -> bool | None:
        if action == Action.RECEIVE:  # delivery of what a client may already subscribe to
            return True
        access = self.config.access
        username = session.username if session is not None else None
        if topic is None:
            return False
        if action == Action.PUBLISH:
            allowed = access.may_publish(username, topic)
            if not allowed:
                _LOGGER.warning(
                    "MQTT broker dropped a publish: username=%s topic=%s (not allowed for this user)",
                    username or "-", topic,
                )
            return allowed
        allowed = access.may_subscribe(username, topic)
        if not allowed:
            _LOGGER.warning(
                "MQTT broker refused a subscription: username=%s filter=%s", username or "-", topic
            )
        return allowed

    @dataclass
    class Config:
        access: Any = None
