"""Jinja2 environment and the small formatting helpers the templates share."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jinja2
from aiohttp import web

from driver_core.textfmt import visible

TEMPLATES = Path(__file__).resolve().parent / "templates"


def when(moment: datetime | None) -> str:
    """UTC, to the second: the same text in every table and on every page."""
    if moment is None:
        return "—"
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def iso(moment: datetime | None) -> str:
    return "" if moment is None else moment.astimezone(UTC).isoformat()


def value_text(value: Any) -> str:
    """A decoded data value as a human reads it (lists joined, the rest as JSON)."""
    if isinstance(value, list):
        return ", ".join(value_text(item) for item in value) if value else "none"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, str):
        return visible(value)
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False, separators=(", ", ": "))
    return str(value)


def compact_json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(", ", ": "))


def make_environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["when"] = when
    env.filters["iso"] = iso
    env.filters["value_text"] = value_text
    env.filters["compact_json"] = compact_json
    env.filters["visible"] = visible
    return env


def html(text: str, status: int = 200) -> web.Response:
    return web.Response(
        text=text, status=status, content_type="text/html", charset="utf-8"
    )
