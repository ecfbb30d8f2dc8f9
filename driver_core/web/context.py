"""What every page handler shares: the driver, templates, the session codec, request state."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import jinja2
import yaml
from aiohttp import web

from driver_core.storage.models import User

from .render import html
from .session import CSRF_FIELD, Session, SessionCodec

if TYPE_CHECKING:
    from driver_core.driver import Driver

    from .live import LiveHub


@dataclass
class WebContext:
    driver: Driver
    env: jinja2.Environment
    codec: SessionCodec
    hub: LiveHub
    integration_names: dict[str, str] = field(default_factory=dict)


WEB: web.AppKey[WebContext] = web.AppKey("web", WebContext)
SESSION: web.RequestKey[Session] = web.RequestKey("web_session", Session)
USER: web.RequestKey[Any] = web.RequestKey("web_user", object)
FORM: web.RequestKey[dict] = web.RequestKey("web_form", dict)
FILES: web.RequestKey[dict] = web.RequestKey("web_files", dict)  # file part name -> bytes


def integration_names(modules: dict[str, Any]) -> dict[str, str]:
    """Display names from each integration's manifest.yaml (the domain when absent)."""
    names = {}
    for domain, module in modules.items():
        name = domain
        manifest = Path(getattr(module, "__file__", "") or ".").parent / "manifest.yaml"
        try:
            data = yaml.safe_load(manifest.read_text(encoding="utf-8"))
            if isinstance(data, dict) and isinstance(data.get("name"), str):
                name = data["name"]
        except (OSError, yaml.YAMLError):
            pass
        names[domain] = name
    return dict(sorted(names.items(), key=lambda item: item[1].lower()))


def ctx(request: web.Request) -> WebContext:
    return request.app[WEB]


def driver(request: web.Request) -> Driver:
    return request.app[WEB].driver


def form(request: web.Request) -> dict[str, str]:
    return request.get(FORM) or {}


def page(request: web.Request, template: str, status: int = 200, **values: Any) -> web.Response:
    """Render ``template`` with what the layout needs (user, CSRF token, menu)."""
    context = request.app[WEB]
    user: User | None = request.get(USER)
    notice = values.pop("notice", None) or _notice(request)
    text = context.env.get_template(template).render(
        user=user,
        csrf=request[SESSION].csrf,
        csrf_field=CSRF_FIELD,
        path=request.path,
        notice=notice,
        **values,
    )
    return html(text, status)


# Messages a redirect may ask for (?notice=<code>); placeholders come from the query.
NOTICES = {
    "logged_out": "You are logged out.",
    "welcome": "Welcome! Your administrator account is ready.",
    "scheduled": "Command {command} scheduled: it is sent with the device's next transmission.",
    "canceled": "Downlink {command_id} canceled.",
    "added": "Device {serial} enrolled.",
    "deleted": "Device {serial} deleted.",
    "saved": "Settings saved and applied.",
    "revoked": "Token {name} revoked.",
    "uploaded": "Firmware {version} for hw_type {hw_type} uploaded.",
    "fw_deleted": "Firmware {version} for hw_type {hw_type} deleted.",
    "target_set": "hw_type {hw_type} now targets firmware {version}.",
    "target_cleared": "hw_type {hw_type} has no firmware target any more.",
}


class _Blank(dict):
    def __missing__(self, key: str) -> str:
        return "?"


def _notice(request: web.Request) -> str | None:
    template = NOTICES.get(request.query.get("notice", ""))
    if template is None:
        return None
    return template.format_map(_Blank({k: v[:200] for k, v in request.query.items()}))


def redirect(location: str, **query: Any) -> web.Response:
    """303 See Other: the browser follows with GET (post/redirect/get)."""
    if query:
        location += ("&" if "?" in location else "?") + urlencode(
            {key: value for key, value in query.items() if value is not None}
        )
    return web.Response(status=303, headers={"Location": location})
