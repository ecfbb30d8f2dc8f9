"""Integrations: one page per loaded integration, its form built from SETTINGS_SCHEMA.

Save validates on the server (the schema, then the config flow's
``async_validate``), stores the settings and applies them at once; nothing is
stored when any field is wrong.
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web

from driver_core.broker_access import CredentialsError, CredentialStore, is_loopback
from driver_core.integration_base import SettingsError

from . import forms
from .context import ctx, driver, form, page, redirect

_LOGGER = logging.getLogger(__name__)
routes = web.RouteTableDef()


def _status(request: web.Request, domain: str) -> dict[str, Any] | None:
    handle = driver(request).integrations.running.get(domain)
    status = getattr(handle, "status", None) if handle is not None else None
    return dict(status) if isinstance(status, dict) else None


def _current(request: web.Request, domain: str) -> dict[str, Any]:
    manager = driver(request).integrations
    settings = manager.settings(domain)
    if not settings:  # not configured yet: the schema's defaults
        try:
            settings = manager.schema(domain)({})
        except Exception:
            settings = {}
    return settings


@routes.get("/integrations")
async def integrations(request: web.Request) -> web.Response:
    names = ctx(request).integration_names
    items = [
        {
            "domain": domain,
            "name": name,
            "running": domain in driver(request).integrations.running,
            "status": _status(request, domain),
        }
        for domain, name in names.items()
    ]
    return page(request, "integrations.html", title="Integrations", items=items)


def _domain(request: web.Request) -> str:
    domain = request.match_info["domain"]
    if domain not in driver(request).integrations.modules:
        raise web.HTTPNotFound()
    return domain


def _render(
    request: web.Request,
    domain: str,
    fields: list[forms.FormField],
    status: int = 200,
    errors: dict[str, str] | None = None,
) -> web.Response:
    name = ctx(request).integration_names.get(domain, domain)
    return page(
        request,
        "integration.html",
        status=status,
        title=f"Integrations → {name}",
        name=name,
        domain=domain,
        fields=fields,
        form_errors=forms.unplaced(fields, errors or {}),
        running=domain in driver(request).integrations.running,
        status_info=_status(request, domain),
        clear_suffix=forms.CLEAR_SUFFIX,
        broker_access=_broker_access(request, domain),
    )


def _broker_access(request: web.Request, domain: str) -> dict[str, Any] | None:
    """Users and passwords of the built-in MQTT broker, for the MQTT page (logged-in admins)."""
    if domain != "mqtt":
        return None
    settings = _current(request, domain)
    if settings.get("broker") != "builtin":
        return None
    the_driver = driver(request)
    store = CredentialStore(the_driver.config_dir, the_driver.box)
    try:
        users = store.shown()
    except CredentialsError as exc:
        return {"error": str(exc), "users": []}
    host = settings.get("builtin_host", "127.0.0.1")
    return {
        "users": users,
        "address": f"{host}:{settings.get('builtin_port')}",
        "tls_port": settings.get("builtin_tls_port") or None,
        "anonymous": bool(settings.get("builtin_anonymous")) and is_loopback(host),
        "error": None,
    }


@routes.get("/integrations/{domain}")
async def integration(request: web.Request) -> web.Response:
    domain = _domain(request)
    manager = driver(request).integrations
    fields = forms.fill(forms.describe(manager.schema(domain)), _current(request, domain))
    return _render(request, domain, fields)


def _differences(schema: Any, current: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """Only what the form changes: untouched fields keep following configuration.yaml."""
    try:
        wanted = schema({**current, **changes})
    except Exception:  # invalid: save() names the fields at fault
        return changes
    return {key: changes[key] for key in changes if wanted.get(key) != current.get(key)}


@routes.post("/integrations/{domain}")
async def save(request: web.Request) -> web.Response:
    domain = _domain(request)
    manager = driver(request).integrations
    fields = forms.describe(manager.schema(domain))
    submitted = form(request)
    changes = _differences(manager.schema(domain), _current(request, domain), forms.changes_from(fields, submitted))
    try:
        await manager.save(domain, changes)
    except SettingsError as exc:
        forms.refill(fields, submitted, exc.errors, _current(request, domain))
        return _render(request, domain, fields, 400, exc.errors)
    try:
        await manager.apply_saved()
    except SettingsError as exc:
        forms.refill(fields, submitted, exc.errors, _current(request, domain))
        return _render(request, domain, fields, 400, exc.errors)
    except Exception as exc:  # stored, but applying failed: say so, the watcher retries
        _LOGGER.exception("Applying the %s settings failed", domain)
        forms.fill(fields, _current(request, domain))
        return _render(
            request, domain, fields, 500,
            {"_": f"saved, but applying failed ({exc}); the driver retries within seconds"},
        )
    return redirect(f"/integrations/{domain}", notice="saved")
