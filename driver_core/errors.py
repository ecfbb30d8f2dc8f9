"""A refusal the user caused, shaped for every way in (REST, web form, MQTT report, CLI)."""

from __future__ import annotations


class RequestRefused(Exception):
    """`status` is the HTTP status it maps to, `error` a stable code, `field` the input at fault."""

    def __init__(self, status: int, error: str, detail: str, field: str | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.error = error
        self.detail = detail
        self.field = field
