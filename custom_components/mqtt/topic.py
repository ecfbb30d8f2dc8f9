"""Topics: user-editable Jinja2 templates, checked once and rendered fast.

A template is compiled (sandboxed) when settings are validated or reloaded,
never per message; plain ``{{serial}}`` templates skip Jinja2 entirely, and
rendered topics are cached per device because a fleet repeats serials.

The command topic goes the other way: the driver subscribes to it, so its
template becomes a subscription filter (``{{serial}}`` -> ``+``) and a pattern
that reads the serial back out of a received topic (`CommandTopic`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable

from jinja2 import StrictUndefined, TemplateSyntaxError, meta
from jinja2.exceptions import TemplateError
from jinja2.sandbox import SandboxedEnvironment

DEFAULT_UPLINK_TOPIC = "application/COAP/device/{{serial}}/uplink"
DEFAULT_DOWNLINK_STATUS_TOPIC = "application/COAP/device/{{serial}}/downlink/status"
DEFAULT_DOWNLINK_COMMAND_TOPIC = "application/COAP/device/{{serial}}/downlink"
TOPIC_VARIABLES = ("serial", "hw_type")
SAMPLE = {"serial": "A0000001", "hw_type": "17"}
_MAX_TOPIC_BYTES = 65535
_CACHE_SIZE = 100_000

_ENV = SandboxedEnvironment(undefined=StrictUndefined, autoescape=False)
# Only `{{serial}}` / `{{ hw_type }}` placeholders and literal text: no Jinja2 needed.
_PLAIN = re.compile(r"(?:[^{}]|\{\{\s*(?:serial|hw_type)\s*\}\})*")
_PLACEHOLDER = re.compile(r"\{\{\s*(serial|hw_type)\s*\}\}")


def check_topic_name(topic: str) -> str:
    """A topic a client may publish on (MQTT 3.1.1 section 4.7); returns it or raises ValueError."""
    if not topic:
        raise ValueError("the topic is empty")
    if "+" in topic or "#" in topic:
        raise ValueError(f"the topic {topic!r} must not contain the wildcards + or #")
    if topic.startswith("$"):
        raise ValueError(f"the topic {topic!r} must not start with $ (reserved for the broker)")
    if "\x00" in topic:
        raise ValueError("the topic must not contain a NUL character")
    if len(topic.encode()) > _MAX_TOPIC_BYTES:
        raise ValueError("the topic is longer than 65535 bytes")
    return topic


class TopicTemplate:
    """A validated uplink topic template; `render(serial, document_json)` gives the topic."""

    def __init__(self, source: str) -> None:
        if not isinstance(source, str):
            raise ValueError("the topic template must be text")
        self.source = source
        try:
            parsed = _ENV.parse(source)
        except TemplateSyntaxError as exc:
            message = (exc.message or "syntax error").rstrip(".")
            raise ValueError(f"not a valid template: {message} (line {exc.lineno})") from None
        unknown = sorted(meta.find_undeclared_variables(parsed) - set(TOPIC_VARIABLES))
        if unknown:
            raise ValueError(
                f"unknown variable {unknown[0]!r} in the topic template; "
                "available: serial, hw_type"
            )
        self.uses_hw_type = "hw_type" in meta.find_undeclared_variables(parsed)
        self._render_vars: Callable[[dict[str, str]], str]
        self._pattern: re.Pattern[str] | None = None
        if _PLAIN.fullmatch(source):
            parts = _PLACEHOLDER.split(source)  # literal, name, literal, name, ...
            self._render_vars = lambda values: "".join(
                part if i % 2 == 0 else values[part] for i, part in enumerate(parts)
            )
            self._pattern = re.compile(
                "".join(re.escape(part) if i % 2 == 0 else "[^/]*" for i, part in enumerate(parts))
            )
        else:
            compiled = _ENV.from_string(source)
            self._render_vars = compiled.render
        self._cache: dict[tuple[str, str], str] = {}
        sample = self._render_checked(SAMPLE)
        self.example = sample

    def _render_checked(self, values: dict[str, str]) -> str:
        try:
            topic = self._render_vars(values)
        except TemplateError as exc:
            raise ValueError(f"the topic template cannot be rendered: {exc}") from None
        return check_topic_name(topic)

    def may_render(self, topic: str) -> bool:
        """Whether `topic` is one this (plain) template gives for some device."""
        return self._pattern is not None and self._pattern.fullmatch(topic) is not None

    def render(self, serial: str, document: str | None = None) -> str:
        """Topic for one outbox row; `document` (its JSON) is read only for hw_type."""
        hw_type = ""
        if self.uses_hw_type and document is not None:
            hw_type = str(json.loads(document).get("hw_type", ""))
        return self.render_for(serial, hw_type)

    def render_for(self, serial: str, hw_type: str = "") -> str:
        """Topic for a device whose hw_type is known (or unknown: empty)."""
        if not self.uses_hw_type:
            hw_type = ""
        key = (serial, hw_type)
        topic = self._cache.get(key)
        if topic is None:
            topic = self._render_checked({"serial": serial, "hw_type": hw_type})
            if len(self._cache) >= _CACHE_SIZE:
                self._cache.clear()
            self._cache[key] = topic
        return topic


class CommandTopic:
    """The command topic template as a subscription filter and a serial reader.

    Only literal text and ``{{serial}}`` are allowed: the driver must be able to
    subscribe with ``+`` in place of the serial and read the serial back from
    the topic a message arrives on, which Jinja2 expressions or ``{{hw_type}}``
    (unknown before the device is) would make impossible or ambiguous.
    """

    def __init__(self, source: str) -> None:
        template = TopicTemplate(source)  # the same rules as the uplink topic first
        if not _PLAIN.fullmatch(source):
            raise ValueError(
                "the command topic can only contain text and {{serial}} (no other template "
                "syntax): the driver subscribes to it with + in place of the serial"
            )
        if template.uses_hw_type:
            raise ValueError(
                "{{hw_type}} cannot be used in the command topic: only {{serial}} can be read "
                "back from the topic of a received command"
            )
        if not _PLACEHOLDER.search(source):
            raise ValueError(
                "the command topic must contain {{serial}}: the serial in the topic says which "
                "device the command is for"
            )
        self.source = source
        self.example = template.example
        filters: list[str] = []
        patterns: list[str] = []
        seen = False
        for level in source.split("/"):  # placeholders never contain "/"
            parts = _PLACEHOLDER.split(level)  # literal, name, literal, ...
            if len(parts) == 1:
                filters.append(level)
                patterns.append(re.escape(level))
                continue
            filters.append("+")
            pattern = ""
            for i, part in enumerate(parts):
                if i % 2 == 0:
                    pattern += re.escape(part)
                else:
                    pattern += "(?P=serial)" if seen else "(?P<serial>[^/]+)"
                    seen = True
            patterns.append(pattern)
        self.filter = "/".join(filters)
        self._pattern = re.compile("/".join(patterns))

    def serial(self, topic: str) -> str | None:
        """The serial in `topic`, or None when `topic` is not a command topic."""
        found = self._pattern.fullmatch(topic)
        return found.group("serial") if found else None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CommandTopic) and other.source == self.source

    def __hash__(self) -> int:
        return hash(self.source)
