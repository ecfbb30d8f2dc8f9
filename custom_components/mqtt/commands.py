"""Command messages from MQTT -> the downlink queue, with the REST API's validation.

A message on the command topic of a device is a JSON object
``{"command", "parameter"?, "command_id"?, "callback_url"?}``. It is checked
with the very schema of ``POST /api/v1/devices/{serial}/downlinks`` and handed
to the downlink queue, so both ways of scheduling accept and refuse the same
things. A refusal is returned as a `Refusal` for the integration to report on
the device's status topic; nothing here raises on bad input.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from driver_core.api.errors import MAX_BODY_BYTES, ApiError
from driver_core.api.schemas import DOWNLINK_BODY, validate
from driver_core.downlinks import COMMAND_ID_MAX, DownlinkError

from .topic import CommandTopic, TopicTemplate

_LOGGER = logging.getLogger(__name__)

EXAMPLE = '{"command": "tx_interval", "parameter": 30}'
LOG_BURST = 20  # refusals logged one line each per LOG_WINDOW_S; the rest are counted
LOG_WINDOW_S = 60.0


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a command message was not queued (`error` is the REST API's error code)."""

    serial: str
    command_id: str | None
    error: str
    detail: str


class _Refused(Exception):
    def __init__(self, error: str, detail: str) -> None:
        super().__init__(detail)
        self.error = error
        self.detail = detail


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def parse_command(payload: bytes) -> dict[str, Any]:
    """The validated command body of `payload`, or _Refused saying what is wrong."""
    if len(payload) > MAX_BODY_BYTES:
        raise _Refused("payload_too_large", f"the message is larger than {MAX_BODY_BYTES} bytes")
    if not payload.strip():
        raise _Refused("invalid_json", f"the message is blank: a JSON object is expected, e.g. {EXAMPLE}")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise _Refused("invalid_json", "the message is not UTF-8 text") from None
    try:
        data = json.loads(text, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as exc:
        raise _Refused("invalid_json", f"the message is not valid JSON: {exc}") from None
    try:  # lone surrogates parse but cannot be stored or echoed as UTF-8
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise _Refused(
            "invalid_json", "the message contains an escaped lone surrogate (\\ud800-\\udfff)"
        ) from None
    if not isinstance(data, dict):
        raise _Refused("invalid_body", f"the message must be a JSON object, e.g. {EXAMPLE}")
    try:
        return validate(DOWNLINK_BODY, data)
    except ApiError as exc:
        raise _Refused(exc.error, exc.detail) from None


def _given_command_id(payload: bytes) -> str | None:
    """The command_id a refused message carried, when it can be read (for the report)."""
    try:
        data = json.loads(payload)
    except (ValueError, RecursionError):
        return None
    command_id = data.get("command_id") if isinstance(data, dict) else None
    if not isinstance(command_id, str) or not 1 <= len(command_id) <= COMMAND_ID_MAX:
        return None
    try:
        command_id.encode("utf-8")  # a lone surrogate cannot be echoed
    except UnicodeEncodeError:
        return None
    return command_id


class _RefusalLog:
    """One log line per refusal, but no more than LOG_BURST a minute (a flood stays readable)."""

    def __init__(self) -> None:
        self._window_start = 0.0
        self._logged = 0
        self._suppressed = 0

    def __call__(self, message: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._window_start >= LOG_WINDOW_S:
            if self._suppressed:
                _LOGGER.warning(
                    "%d more refused MQTT command messages were not logged", self._suppressed
                )
            self._window_start, self._logged, self._suppressed = now, 0, 0
        if self._logged < LOG_BURST:
            self._logged += 1
            _LOGGER.warning(message, *args)
        else:
            self._suppressed += 1


class CommandReceiver:
    """Turns one received message into a queued downlink or a Refusal.

    `topic` may be swapped at any time (reload); `own_topics` gives the
    templates the driver publishes with, whose messages are never commands.
    """

    def __init__(
        self,
        queue: Any,
        topic: CommandTopic,
        own_topics: Callable[[], Iterable[TopicTemplate]],
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self.queue = queue
        self.topic = topic
        self._own_topics = own_topics
        self._on_change = on_change
        self.accepted = 0
        self.rejected = 0
        self.ignored = 0  # retained or empty messages
        self._log = _RefusalLog()

    async def handle(self, topic: str, payload: bytes, retain: bool) -> Refusal | None:
        """Queue the command of one message; a Refusal to report, or None (queued or ignored)."""
        serial = self.topic.serial(topic)
        if serial is None:
            return None  # e.g. still in flight from before a topic change
        if any(own.may_render(topic) for own in self._own_topics()):
            return None  # our own status or uplink message, not a command
        if retain:
            # Sent again by the broker at every (re)subscription: never a new command.
            self._ignored(
                "Ignored a retained MQTT command message on %s: publish commands with "
                "retain=false", topic,
            )
            return None
        if not payload:
            # What clears a retained message reaches current subscribers too.
            self._ignored("Ignored an empty MQTT message on %s", topic)
            return None
        try:
            body = parse_command(payload)
            await self.queue.schedule(
                serial,
                body["command"],
                body.get("parameter"),
                command_id=body.get("command_id"),
                callback_url=body.get("callback_url"),
            )
        except _Refused as exc:
            return self._refused(Refusal(serial, _given_command_id(payload), exc.error, exc.detail), topic)
        except DownlinkError as exc:
            return self._refused(Refusal(serial, _given_command_id(payload), exc.error, exc.detail), topic)
        except Exception as exc:  # the database is away: the sender must try again
            detail = f"the downlink could not be queued ({type(exc).__name__}: {exc}); try again"
            return self._refused(Refusal(serial, _given_command_id(payload), "unavailable", detail), topic)
        self.accepted += 1
        self._on_change()
        return None

    def _ignored(self, message: str, *args: Any) -> None:
        self.ignored += 1
        self._on_change()
        self._log(message, *args)

    def _refused(self, refusal: Refusal, topic: str) -> Refusal:
        self.rejected += 1
        self._on_change()
        self._log(
            "Refused the MQTT command message on %s (command_id %s): %s: %s",
            topic, refusal.command_id, refusal.error, refusal.detail,
        )
        return refusal
