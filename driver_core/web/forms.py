"""Integration settings forms built from the config flow's voluptuous schema.

Each schema key may carry a ``description`` marker (``form_field``): label,
help, ``options`` (dict value -> label, or a list of values) and ``secret``.
The input kind follows from that and from the default value: options -> select,
a boolean default -> checkbox, secret -> password, anything else -> text (numbers
too: the schema, not the browser, decides what is valid and says why).
A new integration gets its page with no web code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import voluptuous as vol

from driver_core.integration_base import is_secret

CLEAR_SUFFIX = "__clear"  # checkbox next to a secret: remove the stored value


@dataclass
class FormField:
    name: str
    label: str
    help: str
    kind: str  # text | select | checkbox | password
    required: bool
    default: Any
    options: list[tuple[str, str]] = field(default_factory=list)  # (value, label)
    value: str = ""  # as shown in the input
    checked: bool = False
    has_secret: bool = False  # a secret is stored (never shown)
    error: str | None = None


def _default(marker: vol.Marker) -> Any:
    default = getattr(marker, "default", vol.UNDEFINED)
    if default is vol.UNDEFINED:
        return None
    return default() if callable(default) else default


def _options(raw: Any) -> list[tuple[str, str]]:
    if isinstance(raw, dict):
        return [(str(value), str(label)) for value, label in raw.items()]
    return [(str(value), str(value)) for value in raw]


def describe(schema: vol.Schema) -> list[FormField]:
    """The fields of ``schema`` in declaration order, without values."""
    fields = []
    for marker in schema.schema:
        if not isinstance(marker, vol.Marker):
            continue
        name = str(marker.schema)
        meta = marker.description if isinstance(marker.description, dict) else {}
        default = _default(marker)
        if meta.get("options") is not None:
            kind = "select"
        elif is_secret(marker):  # also what integrations.py encrypts at rest
            kind = "password"
        elif isinstance(default, bool):
            kind = "checkbox"
        else:
            kind = "text"
        fields.append(
            FormField(
                name=name,
                label=str(meta.get("label") or name.replace("_", " ").capitalize()),
                help=str(meta.get("help") or ""),
                kind=kind,
                required=isinstance(marker, vol.Required),
                default=default,
                options=_options(meta.get("options") or []),
            )
        )
    return fields


def _shown(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list):  # e.g. networks: shown as the comma-separated text they accept
        return ", ".join(str(item) for item in value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def fill(fields: list[FormField], values: dict[str, Any]) -> list[FormField]:
    """Put current (validated) settings into the fields; secrets only say whether one is set."""
    for item in fields:
        value = values.get(item.name, item.default)
        if item.kind == "checkbox":
            item.checked = bool(value)
        elif item.kind == "password":
            item.has_secret = bool(value)
            item.value = ""
        else:
            item.value = _shown(value)
    return fields


def changes_from(
    fields: list[FormField], form: dict[str, str]
) -> dict[str, Any]:
    """The settings a submitted form asks for.

    An unchecked checkbox is absent from a form: it means False. An empty secret
    keeps the stored one unless its "clear" box is ticked.
    """
    changes: dict[str, Any] = {}
    for item in fields:
        if item.kind == "checkbox":
            changes[item.name] = item.name in form
        elif item.kind == "password":
            if form.get(item.name + CLEAR_SUFFIX):
                changes[item.name] = ""
            elif form.get(item.name):
                changes[item.name] = form[item.name]
        elif item.name in form:
            changes[item.name] = form[item.name]
    return changes


def refill(fields: list[FormField], form: dict[str, str], errors: dict[str, str], stored: dict) -> None:
    """Show what was submitted (not what is stored) with each error next to its field."""
    for item in fields:
        if item.kind == "checkbox":
            item.checked = item.name in form
        elif item.kind == "password":
            item.has_secret = bool(stored.get(item.name))
            item.value = ""
        else:
            item.value = form.get(item.name, item.value)
        item.error = errors.get(item.name)


def unplaced(fields: list[FormField], errors: dict[str, str]) -> dict[str, str]:
    """Errors that belong to no field of the form (shown above it)."""
    names = {item.name for item in fields}
    return {key: msg for key, msg in errors.items() if key.split(".")[0] not in names}
