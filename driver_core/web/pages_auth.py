"""Login, logout and the one-time "create the first admin" form."""

from __future__ import annotations

import re
from urllib.parse import unquote

from aiohttp import web

from .context import SESSION, USER, ctx, driver, form, page, redirect
from .session import Session
from .users import UserError, authenticate, count_users, create_first_user

routes = web.RouteTableDef()


# One leading "/", then printable ASCII only: no second "/" or "\\" after it (scheme-relative
# to a browser), no space, tab, CR/LF or other control (trimmed or dropped by the WHATWG URL
# parser, or a header injection), no non-ASCII look-alike of "/".
_LOCAL_PATH = re.compile(r"/(?![/\\])[!-\[\]-~]*")


def _safe_next(target: str | None) -> str:
    """``target`` if it is a local path once browsers have normalised it, else ``/``.

    Checked as sent and once percent-decoded too (``/%2F/host``, ``/%0d%0a``...), for
    whatever decodes it again on the way; only a plain printable local path passes.
    """
    if not target or not _LOCAL_PATH.fullmatch(target):
        return "/"
    decoded = unquote(target)
    if decoded[1:2] in ("/", "\\") or "\\" in decoded or not decoded.isprintable():
        return "/"
    return target


def _log_in(request: web.Request, user_id: int, password_hash: str) -> None:
    # A fresh session (new CSRF token) at login: a planted cookie is worth nothing.
    request[SESSION] = Session(
        user_id=user_id, fingerprint=ctx(request).codec.fingerprint(password_hash)
    )


@routes.get("/")
async def home(request: web.Request) -> web.Response:
    return redirect("/devices")


@routes.get("/login")
async def login_form(request: web.Request) -> web.Response:
    if request.get(USER) is not None:
        return redirect(_safe_next(request.query.get("next")))
    if await count_users(driver(request).db) == 0:
        return redirect("/setup")
    return page(request, "login.html", title="Log in", next=request.query.get("next", ""), username="")


@routes.post("/login")
async def login(request: web.Request) -> web.Response:
    data = form(request)
    username = data.get("username", "").strip()
    password = data.get("password", "")
    target = data.get("next", "")
    user = None
    if username and password:
        user = await authenticate(driver(request).db, username, password)
    if user is None:
        return page(
            request,
            "login.html",
            status=401,
            title="Log in",
            next=target,
            username=username,
            error="Wrong username or password." if username and password
            else "Enter your username and password.",
        )
    _log_in(request, user.id, user.password_hash)
    return redirect(_safe_next(target))


@routes.post("/logout")
async def logout(request: web.Request) -> web.Response:
    request[SESSION] = Session()
    return redirect("/login", notice="logged_out")


@routes.get("/setup")
async def setup_form(request: web.Request) -> web.Response:
    if await count_users(driver(request).db) > 0:
        return redirect("/login")
    return page(request, "setup.html", title="Create the first administrator", values={}, errors={})


@routes.post("/setup")
async def setup(request: web.Request) -> web.Response:
    if await count_users(driver(request).db) > 0:
        return redirect("/login")
    data = form(request)
    username = data.get("username", "").strip()
    password = data.get("password", "")
    errors: dict[str, str] = {}
    if password != data.get("password_confirm", ""):
        errors["password_confirm"] = "the two passwords differ"
    user = None
    if not errors:
        try:
            user = await create_first_user(driver(request).db, username, password)
        except UserError as exc:
            errors[exc.field] = exc.message
        else:
            if user is None:  # someone else was first
                return redirect("/login")
    if errors:
        return page(
            request,
            "setup.html",
            status=400,
            title="Create the first administrator",
            values={"username": username},
            errors=errors,
        )
    assert user is not None
    _log_in(request, user.id, user.password_hash)
    return redirect("/devices", notice="welcome")
