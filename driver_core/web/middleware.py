"""The web panel's gate: session, login requirement, CSRF check, error pages, security headers.

Applies to every path except the REST API (/api/..., which has its own JSON
errors and bearer tokens) and the static files. A user never sees a traceback:
any failure becomes a short page and a log line.
"""

from __future__ import annotations

import logging
from urllib.parse import quote

from aiohttp import BodyPartReader, web

from driver_core.api.errors import Handler

from .context import FILES, FORM, SESSION, USER, WEB, page, redirect
from .session import COOKIE, CSRF_FIELD, LIFETIME_S, Session
from .users import count_users, get_user

_LOGGER = logging.getLogger(__name__)

PUBLIC = ("/login", "/setup")
STATIC_PREFIX = "/static/"
MAX_UPLOAD_BYTES = 16 * 1024 * 1024  # a CSV of about 100,000 devices
_CHUNK = 64 * 1024

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
}


def is_api(path: str) -> bool:
    return path == "/api" or path.startswith("/api/")


class UploadTooLarge(Exception):
    pass


async def read_form(request: web.Request, files: dict[str, bytes] | None = None) -> dict[str, str]:
    """Fields of a urlencoded or multipart form as text (a file field holds the file's text).

    ``files`` receives the bytes of every file part too (binary uploads: firmware images).

    A file larger than MAX_UPLOAD_BYTES is dropped and ``<field>__error`` says why;
    the CSRF field comes first in every form, so it is read even then.
    """
    if request.content_type != "multipart/form-data":
        data = await request.post()
        return {key: value for key, value in data.items() if isinstance(value, str)}
    fields: dict[str, str] = {}
    reader = await request.multipart()
    async for part in reader:
        if not isinstance(part, BodyPartReader) or not part.name:
            continue
        raw = bytearray()
        too_large = False
        while chunk := await part.read_chunk(_CHUNK):
            if len(raw) + len(chunk) > MAX_UPLOAD_BYTES:
                too_large = True
                continue  # drain the rest of this part
            raw.extend(chunk)
        name = part.name
        if files is not None and part.filename and not too_large:
            files[name] = bytes(raw)
            fields[name + "__filename"] = part.filename
        if too_large:
            fields[name + "__error"] = (
                f"the file is larger than {MAX_UPLOAD_BYTES // (1024 * 1024)} MB; split it"
            )
            continue
        try:
            fields[name] = raw.decode("utf-8")
        except UnicodeDecodeError:
            fields[name + "__error"] = "the file is not UTF-8 text (save the CSV as UTF-8)"
        if part.filename:
            fields[name + "__filename"] = part.filename
    return fields


def _finish(request: web.Request, response: web.StreamResponse) -> web.StreamResponse:
    if response.prepared:  # a live stream: its headers are gone already
        return response
    session: Session | None = request.get(SESSION)
    if session is not None and session.dirty:
        response.set_cookie(
            COOKIE,
            request.app[WEB].codec.dump(session),
            max_age=LIFETIME_S,
            path="/",
            httponly=True,
            samesite="Lax",
            secure=request.secure,
        )
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    response.headers.setdefault("Cache-Control", "no-store")
    return response


def _error_page(request: web.Request, status: int, title: str, message: str) -> web.Response:
    if SESSION not in request:
        request[SESSION] = Session()
    try:
        return page(request, "error.html", status=status, title=title, message=message)
    except Exception:  # the error page itself failed: plain text, still no traceback
        _LOGGER.exception("Rendering the error page failed")
        return web.Response(text=f"{status} {title}: {message}", status=status)


async def _gate(request: web.Request, handler: Handler) -> web.StreamResponse:
    context = request.app[WEB]
    session = context.codec.load(request.cookies.get(COOKIE))
    request[SESSION] = session
    user = None
    if session.user_id is not None:
        user = await get_user(context.driver.db, session.user_id)
        if user is None or session.fingerprint != context.codec.fingerprint(user.password_hash):
            user = None
            request[SESSION] = session = Session()  # deleted user or changed password
    request[USER] = user
    if user is None and request.path not in PUBLIC:
        if request.method != "GET":
            return redirect("/login")
        if await count_users(context.driver.db) == 0:
            return redirect("/setup")
        wanted = request.raw_path  # as sent: decoding here would change "?q=a%26b" into "?q=a&b"
        return redirect("/login" + (f"?next={quote(wanted, safe='')}" if wanted != "/" else ""))
    if request.method == "POST":
        try:
            request[FILES] = {}
            request[FORM] = await read_form(request, request[FILES])
        except web.HTTPRequestEntityTooLarge:
            return _error_page(request, 413, "Form too large", "The form sent is too large.")
        if not session.check_csrf(request[FORM].get(CSRF_FIELD)):
            return _error_page(
                request,
                403,
                "Form expired",
                "The form was not sent from this page or has expired (missing or wrong CSRF "
                "token). Go back, reload the page and send it again.",
            )
    return await handler(request)


@web.middleware
async def web_pages(request: web.Request, handler: Handler) -> web.StreamResponse:
    path = request.path
    if is_api(path):
        return await handler(request)
    if path.startswith(STATIC_PREFIX):
        try:
            response = await handler(request)
        except web.HTTPNotFound:
            return web.Response(status=404, text="not found")
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        return response
    try:
        response = await _gate(request, handler)
    except web.HTTPException as exc:
        if exc.status < 400:
            response = web.Response(status=exc.status, headers=exc.headers)
        elif exc.status == 404:
            response = _error_page(request, 404, "Not found", f"There is no page at {path}.")
        elif exc.status == 405:
            response = _error_page(
                request, 405, "Not allowed", f"{request.method} is not allowed on {path}."
            )
        else:
            response = _error_page(request, exc.status, exc.reason, exc.text or exc.reason)
    except Exception:
        _LOGGER.exception("Web panel: unexpected error on %s %s", request.method, path)
        response = _error_page(
            request, 500, "Something went wrong",
            "The request failed unexpectedly; the driver log has the details."
        )
    return _finish(request, response)
